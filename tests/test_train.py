"""train.py: config errors before any work, the two updates (SFT and RL) against hand computations, and a smoke
run of every stage on a tiny model."""
import copy
import json
import math

import pytest
import torch

import agent
import common
import envs
import engine
import grpo
import train

TINY = ["sft.compile=false", "tiny.hidden_size=32", "tiny.num_hidden_layers=1", "tiny.num_attention_heads=2",
        "tiny.num_key_value_heads=2", "tiny.intermediate_size=64", "max_new_tokens=40",
        "env_kwargs={max_steps: 3}", "eval.id=2", "eval.ood=1"]
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)


def test_config_rejects_unknown_and_mistyped_keys(tmp_path):
    load = lambda path=None, ov=(): common.load_config(train.DEFAULTS, path, ov)   # noqa: E731
    with pytest.raises(ValueError, match="unknown key 'epoch'"):
        load(None, ["sft.epoch=3"])
    with pytest.raises(ValueError, match="expected int"):
        load(None, ["rl.steps=many"])
    with pytest.raises(ValueError, match="expected key=value"):
        load(None, ["rl.steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("resim: [1, 2]\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load(str(bad))
    cfg = load("configs/android.yaml", ["rl.lr=1e-4", "sft.lr=1"])
    assert cfg["rl"]["lr"] == 1e-4 and cfg["sft"]["lr"] == 1.0 and cfg["env"] == "android"


def test_a_dotted_env_option_on_the_command_line_keeps_the_config_files_other_env_options():
    cfg = common.load_config(train.DEFAULTS, "configs/android_smollm2.yaml", ["env_kwargs.future_lines=0"])
    assert cfg["env_kwargs"] == {"compact": True, "max_steps": 15, "future_lines": 0}
    with pytest.raises(ValueError, match="expected a mapping"):
        common.load_config(train.DEFAULTS, None, ["env_kwargs=3"])


def test_every_config_key_is_documented_where_it_is_defined():
    src = open("train.py").read()
    block = src[src.index("DEFAULTS = {"):src.index("STAGES = ")]
    def keys(d, pre=""):
        return [k for key, v in d.items() for k in ([pre + key] + (keys(v, pre + key + ".") if isinstance(v, dict)
                                                                   and key != "tiny" else []))]
    for k in keys(train.DEFAULTS):
        line = next(x for x in block.splitlines() if f'"{k.split(".")[-1]}":' in x)
        assert "#" in line, f"{k} has no comment"


@pytest.mark.parametrize("args,match", [
    (["nonsense=1"], "unknown key"),
    (["env=chess"], "unknown env 'chess'"),
    (["env_kwargs={colour: red}"], "unknown sokoban option"),
    (["attn=flash"], "attn must be eager or sdpa"),
    (["rl.tau_prime_old=s_0"], "rl.tau_prime_old must be one of"),
    (["rl.clip_c=1.0"], "rl.clip_c must be > 1"),
    (["resim.refine_keep=1.5"], "resim.refine_keep is a share"),
    (["resim.hide_best=-0.1"], "resim.hide_best is a share"),
    (["resim.hide_best=0.5", "resim.action_only=true"], "resim.hide_best needs the traces"),
    (["resim.value_scale=root"], "resim.value_scale must be absolute or relative"),
    (["resim.episode_minutes=-1"], "resim.episode_minutes is >= 0"),
    (["resim.distinct=0"], "resim.distinct is a count"),
    (["admissible=true"], "admissible: true is for env alfworld"),
])
def test_cli_config_error_is_one_clear_message(args, match):
    with pytest.raises(SystemExit, match=f"config error: .*{match}"):
        train.main(["--stage", "resim"] + args)


def test_min_moves_on_an_env_without_optimal_lengths_is_a_config_error(tmp_path):
    with pytest.raises(SystemExit, match="config error: rl.min_moves needs an env that knows"):
        train.main(["--stage", "grpo", "env=android", "rl.min_moves=3", f"out_dir={tmp_path}/run"])
    assert not (tmp_path / "run").exists()


def test_rl_task_pool_keeps_only_long_rooms_in_a_fixed_order():
    """rl.min_moves: the RL tasks are the train rooms whose optimal solution takes at least that many moves, the
    same ones on every rank and in every run, none twice; 0 keeps today's contiguous seeds."""
    cfg = copy.deepcopy(train.DEFAULTS)
    assert train.rl_task_pool(cfg, 5) == envs.split_seeds("train", 5, start=cfg["rl"]["task_offset"])
    cfg["rl"]["min_moves"] = 5
    pool = train.rl_task_pool(cfg, 40)
    env = envs.make_env("sokoban", "train")
    lengths = []
    for seed in pool:
        env.reset(seed)
        lengths.append(env.solution_length)
    assert min(lengths) >= 5 and len(set(pool)) == 40 and pool == sorted(pool)
    assert pool == train.rl_task_pool(cfg, 60)[:40]
    skipped = set(range(pool[0], pool[-1])) - set(pool)      # the short rooms in between were left out
    assert skipped and all(env.reset(s) is not None and (env.solution_length or 0) < 5 for s in skipped)


def test_unwritable_run_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="not writable"):
        train.main(["--stage", "resim", f"out_dir={blocker}/run"] + TINY)


# ---- the SFT update and the evaluation ----------------------------------------------------------------------

class Sched:
    def step(self):
        pass

    def get_last_lr(self):
        return [0.0]


def test_the_bf16_inference_copy_keeps_rope_frequencies_and_equals_a_bf16_load(tmp_path):
    """Generation runs on common.inference_copy: its weights are bf16 but RoPE's inv_freq stays float32, as in
    training and in a model loaded with dtype=bfloat16 (a bf16 inv_freq rotates positions differently)."""
    model, tok = agent.load_model("tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64)
    model.save_pretrained(tmp_path)
    copy_ = common.inference_copy(model, True)
    loaded, _ = agent.load_model(str(tmp_path), dtype="bfloat16")
    assert {n: b.dtype for n, b in copy_.named_buffers()} == {n: b.dtype for n, b in loaded.named_buffers()}
    assert all(b.dtype == torch.float32 for _, b in copy_.named_buffers()) and next(copy_.parameters()).dtype \
        == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    x = torch.tensor([list(range(3, 200))])
    with torch.no_grad():
        assert torch.equal(copy_(x).logits, loaded(x).logits)


@pytest.mark.slow   # compiling takes about 30 s
def test_the_compiled_sft_step_equals_the_plain_one():
    """sft.compile: the compiled forward (engine.LeanForward for this Qwen2; lengths padded up to pad_to) gives the
    plain step's loss and gradient; the micro-batch at sdpa_from runs uncompiled, with sdpa, in both."""

    model, tok = agent.load_model("tiny", dtype=torch.float32, attn="eager", **SMALL)
    batch = _samples(tok, [1.0] * 4)           # micro-batches of 2: longest 26 tokens (compiled), then 39
    sc = dict(train.DEFAULTS["sft"], micro_batch=2, pad_to=16, sdpa_from=30)
    out = []
    for net in (model, copy.deepcopy(model)):
        fwd = None if net is model else train.compiled(net)
        rec = Recorder(net)
        st = train.sft_step(net, rec, Sched(), batch, 0, sc, False, 1, fwd)
        out.append((st["loss"], rec.grads))
    (a, ga), (b, gb) = out
    assert abs(a - b) < 1e-5 * abs(a) and all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))


def test_long_sft_micro_batches_run_sdpa_and_the_step_is_unchanged():
    """sft.sdpa_from: a micro-batch whose longest example reaches it runs sdpa attention (eager's [T, T] scores
    cost 2x at 574 tokens), the others the model's own; the model keeps its own afterwards, and the loss and
    gradient are the all-eager step's."""
    model, tok = agent.load_model("tiny", dtype=torch.float32, attn="eager", **SMALL)
    batch = _samples(tok, [1.0] * 4)           # micro-batches of 2: longest 26 tokens, then 39
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    out = []
    for cut in (0, 30):
        rec = Recorder(model)
        st = train.sft_step(model, rec, Sched(), batch, 0, dict(train.DEFAULTS["sft"], micro_batch=2,
                                                                 sdpa_from=cut), False, 1)
        out.append((st["loss"], rec.grads))
    assert seen == ["eager", "eager", "eager", "sdpa"] and model.config._attn_implementation == "eager"
    (a, ga), (b, gb) = out
    assert abs(a - b) < 1e-5 * abs(a) and all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))


# ---- the RL update ----------------------------------------------------------------------------------------

RC = dict(train.DEFAULTS["rl"], lr=0.0, ppo_epochs=1, beta=0.0)


class Recorder:
    """An optimiser that only records the gradient it was asked to apply."""
    def __init__(self, model):
        self.params, self.grads = list(model.parameters()), None

    def step(self):
        self.grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _samples(tok, advantages):
    torch.manual_seed(0)
    out = []
    for i, a in enumerate(advantages):
        prompt = tok(f"prompt {i} " * (1 + i % 3), add_special_tokens=False)["input_ids"]
        resp = torch.randint(0, 250, (3 + 4 * (i % 4),)).tolist() + [tok.eos_token_id]
        out.append(grpo.Sample(prompt, resp, a))
    return out


def _grads(model, samples, **rc):
    rec = Recorder(model)
    train.rl_update(model, None, rec, samples, 0, dict(RC, **rc), False, 1, budget=40)
    return rec.grads


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_rl_update_does_not_depend_on_micro_batch(agg):
    model, tok = agent.load_model("tiny", dtype=torch.float32, **SMALL)
    samples = _samples(tok, [1.0, -0.5, 0.0, 2.0, -1.0, 0.3, 0.0])
    a = _grads(model, samples, micro_batch=1, agg=agg)
    b = _grads(model, samples, micro_batch=3, agg=agg)
    c = _grads(model, samples, micro_batch=16, agg=agg)
    for x, y, z in zip(a, b, c):
        assert torch.allclose(x, y, atol=1e-6) and torch.allclose(x, z, atol=1e-6)


def test_rl_update_counts_the_tokens_of_zero_advantage_samples():
    """veRL's token-mean divides by every response token of the batch: samples of all-equal groups (A = 0)
    dilute the step instead of being dropped from the normaliser."""
    model, tok = agent.load_model("tiny", dtype=torch.float32, **SMALL)
    samples = _samples(tok, [1.0, -1.0, 0.0, 0.0, 0.0])
    got = _grads(model, samples, micro_batch=2)
    model.zero_grad()
    logp, mask = grpo.response_logprobs(model, [s.prompt_ids for s in samples], [s.response_ids for s in samples], 0)
    loss, _ = grpo.policy_loss(logp, logp.detach(), torch.tensor([s.advantage for s in samples]), mask)
    loss.backward()
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad if p.grad is not None else torch.zeros_like(p), atol=1e-6)


def test_rl_update_takes_log_probs_at_the_sampling_temperature(monkeypatch):
    model, tok = agent.load_model("tiny", dtype=torch.float32, **SMALL)
    seen, real = [], grpo.response_logprobs

    def spy(*a, temperature=1.0, **kw):
        seen.append(temperature)
        return real(*a, temperature=temperature, **kw)
    monkeypatch.setattr(grpo, "response_logprobs", spy)
    _grads(model, _samples(tok, [1.0, -1.0]), temperature=0.7)
    assert seen and set(seen) == {0.7}


def test_tau_prime_old_log_probs_are_taken_under_the_prompt_a_ref_was_drawn_from():
    """tau' trains a_ref under s_t, but a_ref was sampled under s_ref: with tau_prime_old = s_ref the ratio is
    pi(a_ref | s_t) / pi_old(a_ref | s_ref) (so the clip acts); with s_t it is 1 (the first pass's log-probs)."""
    model, tok = agent.load_model("tiny", dtype=torch.float32, **SMALL)
    samples = _samples(tok, [1.0, -1.0, 0.5])          # responses of 4, 8 and 12 tokens
    s_ref = [tok(f"real states after plan {i} " * 3, add_special_tokens=False)["input_ids"] for i in range(2)]
    for i in range(2):   # two tau' rows, shorter than the longest response of their micro-batch
        samples[i] = grpo.Sample(samples[i].prompt_ids, samples[i].response_ids, samples[i].advantage,
                                 drawn_under=s_ref[i])

    def expected(old_prompts):
        model.zero_grad()
        logp, mask = grpo.response_logprobs(model, [s.prompt_ids for s in samples],
                                            [s.response_ids for s in samples], 0)
        with torch.no_grad():
            old, _ = grpo.response_logprobs(model, old_prompts, [s.response_ids for s in samples], 0)
        grpo.policy_loss(logp, old, torch.tensor([s.advantage for s in samples]), mask, clip_low=RC["clip_low"],
                         clip_high=RC["clip_high"], clip_c=RC["clip_c"])[0].backward()
        return [p.grad.clone() for p in model.parameters()]
    by_s_ref = _grads(model, samples, grad_clip=1e9)
    by_s_t = _grads(model, samples, tau_prime_old="s_t", grad_clip=1e9)
    for got, want in ((by_s_ref, expected(s_ref + [samples[2].prompt_ids])),
                      (by_s_t, expected([s.prompt_ids for s in samples]))):
        assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
    assert not all(torch.allclose(g, w, atol=1e-6) for g, w in zip(by_s_ref, by_s_t))


def test_an_rl_update_moves_the_weights():
    model, tok = agent.load_model("tiny", dtype=torch.float32, **SMALL)
    before = copy.deepcopy(model.state_dict())
    opt = train.make_optimizer(model, 1e-3)
    stats = train.rl_update(model, None, opt, _samples(tok, [1.0, -1.0, 0.0]), 0, dict(RC, lr=1e-3), False, 1, 40)
    assert stats["trained_samples"] == 2 and stats["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_nan_gradient_stops_the_update_and_leaves_the_weights():
    """A finite loss can have a NaN gradient (the compiled forward's RoPE once made them, tests/test_engine.py):
    SFT and RL steps stop before AdamW writes NaN into the weights (at any learning rate, lr 0 included)."""
    model, tok = agent.load_model("tiny", dtype=torch.float32, **SMALL)
    model.model.norm.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    before = copy.deepcopy(model.state_dict())
    batch = _samples(tok, [1.0, -1.0, 0.5])
    with pytest.raises(FloatingPointError, match="SFT gradient norm is nan"):
        train.sft_step(model, train.make_optimizer(model, 0.0), Sched(), batch, 0,
                       dict(train.DEFAULTS["sft"], micro_batch=2), False, 1)
    with pytest.raises(FloatingPointError, match="RL gradient norm is nan"):
        train.rl_update(model, None, train.make_optimizer(model, 0.0), batch, 0, RC, False, 1, 40)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- the stages, end to end -----------------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def solver(tmp_path_factory):
    """An action-only policy that already solves some 3-step puzzles, so RL groups have non-zero advantages."""
    out = tmp_path_factory.mktemp("solver")
    train.main(["--stage", "resim", f"out_dir={out}", "resim.episodes=300", "resim.action_only=true",
                "sft.epochs=4", "sft.batch_size=8", "sft.lr=0.005", "eval.id=0", "eval.ood=0"]
               + [a for a in TINY if not a.startswith("tiny.")]
               + ["tiny.hidden_size=64", "tiny.num_hidden_layers=2", "tiny.num_attention_heads=2",
                  "tiny.num_key_value_heads=2", "tiny.intermediate_size=128"])
    return out / "model"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "rloo", "dyna_grpo"])
def test_rl_stage_smoke_and_the_weights_move(solver, tmp_path, stage):
    train.main(["--stage", stage, f"out_dir={tmp_path}", f"init_from={solver}", "rl.steps=2", "rl.tasks=2",
                "rl.group=4", "rl.micro_batch=4", "rl.lr=0.001", "eval.id=0", "eval.ood=0", "max_new_tokens=24",
                "env_kwargs={max_steps: 3}"])
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["stage"] == f"rl_{stage}"]
    assert len(steps) == 2 and all(r["rollout_s"] > 0 and r["update_s"] >= 0 for r in steps)
    if stage == "dyna_grpo":
        assert [r["phase"] for r in steps] == ["sim", "pi"] and "a_refine_mean" in steps[0]
    assert any(r.get("trained_samples", 0) > 0 for r in steps), "every group had equal returns: vacuous"
    a = agent.load_model(str(solver))[0].state_dict()
    b = agent.load_model(str(tmp_path / "model"))[0].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rl_with_a_compiled_decode_step(solver, tmp_path):
    """decode_compile=true: the step is compiled before the first rollout (logged apart from it), the rollouts
    (many batch sizes and cache lengths) compile nothing more, and the switch is put back when the run ends."""
    from torch._dynamo.utils import counters
    graphs, before = counters["stats"]["unique_graphs"], engine.COMPILE
    train.main(["--stage", "dyna_grpo", f"out_dir={tmp_path}", f"init_from={solver}", "rl.steps=2", "rl.tasks=2",
                "rl.group=4", "eval.id=0", "eval.ood=0", "max_new_tokens=24", "env_kwargs={max_steps: 3}",
                "decode_compile=true"])
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["stage"] == "rl_dyna_grpo"]
    assert len(steps) == 2 and steps[0]["decode_compile_s"] > 0 and "decode_compile_s" not in steps[1]
    assert counters["stats"]["unique_graphs"] - graphs == 2    # warm_up's: many rows, and one row
    assert engine.COMPILE is before


def test_llm_rollout_value_and_aggregator_run_from_the_config(tmp_path):
    cfg = common.load_config(train.DEFAULTS, None, TINY + ["resim.rollout=llm", "resim.value=llm",
                                                          "resim.aggregator=llm"])
    model, tok = agent.load_model("tiny", **SMALL)
    act, value, aggregate = train.search_parts(cfg, model, tok, "cpu")
    import envs
    import numpy as np
    import resim
    env = envs.make_env("sokoban", "train", max_steps=2)
    recs, _ = resim.resim_episode(env, 5, b=2, d=1, b_train=2, plan_order="shuffled", act=act, value=value,
                                  aggregate=aggregate, rng=np.random.default_rng(0), tokenizer=tok, history_k=0,
                                  system=False)
    assert recs and all(r.kind == "resim" for r in recs)


def test_cached_traces_are_reused_only_with_the_same_prompt_format(tmp_path, monkeypatch, capsys):
    cfg = common.load_config(train.DEFAULTS, None, TINY + ["resim.episodes=2"])
    model, tok = agent.load_model("tiny", **SMALL)
    run = type("Run", (), {"dir": tmp_path, "log": lambda self, rec: None})()
    first = train.traces(cfg, model, tok, "cpu", 0, 1, run)
    again = train.traces(cfg, model, tok, "cpu", 0, 1, run)
    assert "reusing" in capsys.readouterr().out and [r.prompt for r in again] == [r.prompt for r in first]
    monkeypatch.setattr(agent, "PROMPT_FORMAT", agent.PROMPT_FORMAT + 1)   # prompts laid out another way
    train.traces(cfg, model, tok, "cpu", 0, 1, run)
    assert "reusing" not in capsys.readouterr().out


def test_a_killed_search_keeps_its_episodes_and_the_same_command_reuses_them(tmp_path, monkeypatch):
    """An ALFWorld search runs for an hour; killed, it once lost every episode. Now each searched episode is saved
    at once: the same command searches only the rest, with the records of a run left alone, and a run with more
    episodes (or a cut for stalled ones, resim.episode_minutes) reuses them too."""
    import dataclasses
    import resim
    cfg = common.load_config(train.DEFAULTS, None, TINY + ["resim.episodes=4"])
    model, tok = agent.load_model("tiny", **SMALL)
    run = lambda d: type("Run", (), {"dir": d, "log": lambda self, rec: None})()
    (tmp_path / "whole").mkdir(), (tmp_path / "r").mkdir()
    whole = train.traces(cfg, model, tok, "cpu", 0, 1, run(tmp_path / "whole"))
    real, calls = resim.resim_episode, []

    def killed_at_the_third(env, seed, **kw):
        calls.append(seed)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(env, seed, **kw)
    monkeypatch.setattr(resim, "resim_episode", killed_at_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        train.traces(cfg, model, tok, "cpu", 0, 1, run(tmp_path / "r"))
    searched, calls[:] = calls[:2], [None] * 3    # no second kill
    again = train.traces(cfg, model, tok, "cpu", 0, 1, run(tmp_path / "r"))
    assert calls[3:] == [s for s in envs.split_seeds("train", 4) if s not in searched] and len(calls[3:]) == 2
    assert whole and [dataclasses.asdict(r) for r in again] == [dataclasses.asdict(r) for r in whole]
    more = common.load_config(train.DEFAULTS, None, TINY + ["resim.episodes=8", "resim.episode_minutes=30"])
    calls[:] = [None] * 3
    train.traces(more, model, tok, "cpu", 0, 1, run(tmp_path / "r"))
    fresh = set(envs.split_seeds("train", 8)) - set(envs.split_seeds("train", 4))
    assert sorted(calls[3:]) == sorted(fresh) and len(fresh) == 4


def test_resim_first_searches_fresh_episodes_past_the_first_run(tmp_path):
    import envs
    model, tok = agent.load_model("tiny", **SMALL)
    run = type("Run", (), {"dir": tmp_path, "log": lambda self, rec: None})()
    seeds = {}
    for first in (0, 2):
        cfg = common.load_config(train.DEFAULTS, None, TINY + ["resim.episodes=2", f"resim.first={first}"])
        seeds[first] = {r.seed for r in train.traces(cfg, model, tok, "cpu", 0, 1, run)}
    assert seeds[0] <= set(envs.split_seeds("train", 2)) and seeds[2] <= set(envs.split_seeds("train", 2, 2))
    assert seeds[0] and seeds[2] and not seeds[0] & seeds[2]


@pytest.mark.parametrize("config", [pytest.param("configs/alfworld.yaml", marks=pytest.mark.slow),
                                    "configs/android.yaml"])
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
