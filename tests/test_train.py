"""train.py: config errors before any work, and a smoke run of every stage on a tiny model."""
import json

import pytest

import train

TINY = ["tiny.hidden_size=32", "tiny.num_hidden_layers=1", "tiny.num_attention_heads=2",
        "tiny.num_key_value_heads=2", "tiny.intermediate_size=64", "max_new_tokens=40",
        "env_kwargs={max_steps: 3}", "eval.id=2", "eval.ood=1"]


def test_config_rejects_unknown_and_mistyped_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'epoch'"):
        train.load_config(None, ["sft.epoch=3"])
    with pytest.raises(ValueError, match="expected int"):
        train.load_config(None, ["rl.steps=many"])
    with pytest.raises(ValueError, match="expected key=value"):
        train.load_config(None, ["rl.steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("resim: [1, 2]\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        train.load_config(str(bad))
    cfg = train.load_config("configs/sokoban.yaml", ["rl.lr=1e-4", "sft.lr=1"])
    assert cfg["rl"]["lr"] == 1e-4 and cfg["sft"]["lr"] == 1.0


def test_cli_config_error_is_one_clear_message():
    with pytest.raises(SystemExit, match="config error: .*unknown key"):
        train.main(["--stage", "resim", "nonsense=1"])


def test_unwritable_run_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="not writable"):
        train.main(["--stage", "resim", f"out_dir={blocker}/run"] + TINY)


@pytest.fixture(scope="module")
def resim_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resim")
    results = train.main(["--stage", "resim", f"out_dir={out}", "resim.episodes=3", "sft.epochs=1",
                          "sft.batch_size=2", "sft.micro_batch=2"] + TINY)
    return out, results


def test_resim_stage_smoke(resim_run):
    out, results = resim_run
    for f in ("config.yaml", "metrics.jsonl", "eval.json", "traces.jsonl", "curves.png", "model/dynamind.json"):
        assert (out / f).exists(), f
    assert set(results) == {"id", "ood"} and results["id"]["episodes"] == 2
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "sft" for r in recs)


@pytest.mark.parametrize("stage", ["grpo", "rloo", "dyna_grpo"])
def test_rl_stage_smoke(resim_run, tmp_path, stage):
    src, _ = resim_run
    train.main(["--stage", stage, f"out_dir={tmp_path}", f"init_from={src / 'model'}", "rl.steps=2",
                "rl.tasks=1", "rl.group=2", "rl.micro_batch=4"] + TINY)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["stage"] == f"rl_{stage}"]
    assert len(steps) == 2
    if stage == "dyna_grpo":
        assert [r["phase"] for r in steps] == ["sim", "pi"] and "a_refine_mean" in steps[0]
    assert (tmp_path / "model" / "config.json").exists()


@pytest.mark.parametrize("config", ["configs/alfworld.yaml", "configs/android.yaml"])
def test_resim_and_dyna_grpo_run_on_the_other_envs(tmp_path, config):
    small = TINY[:-3] + ["eval.id=1", "eval.ood=1"]
    kw = "{max_steps: %d}" if "android" in config else "{max_steps: %d, expert: planner}"
    # ReSim keeps solved episodes only, so its episodes need room for the expert; RL then plays 3 steps
    train.main(["--stage", "resim", "--config", config, f"out_dir={tmp_path / 'r'}", "resim.episodes=2",
                "resim.b=2", "sft.epochs=1", "sft.batch_size=1", "sft.micro_batch=1", f"env_kwargs={kw % 30}",
                "eval.id=0", "eval.ood=0"] + small[:-2])
    assert (tmp_path / "r" / "traces.jsonl").read_text().strip()
    train.main(["--stage", "dyna_grpo", "--config", config, f"out_dir={tmp_path / 'd'}",
                f"init_from={tmp_path / 'r' / 'model'}", "rl.steps=1", "rl.tasks=1", "rl.group=2",
                "rl.micro_batch=2", f"env_kwargs={kw % 3}"] + small)
    recs = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs if r["stage"] == "rl_dyna_grpo"] == ["sim"]
