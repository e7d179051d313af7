"""torchrun on CPU (gloo): two ranks (DDP or FSDP2) reproduce one process with twice the batch, uneven shards
finish, and a sharded run saves, checkpoints and resumes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow   # torchrun and spawned processes: 20-40 s each
ROOT = Path(__file__).resolve().parents[1]
TINY = ["sft.compile=false", "tiny.hidden_size=32", "tiny.num_hidden_layers=1", "tiny.num_attention_heads=2",
        "tiny.num_key_value_heads=2", "tiny.intermediate_size=64", "max_new_tokens=24", "bf16=false",
        "env_kwargs={max_steps: 3}", "sft.epochs=2", "sft.micro_batch=1", "sft.warmup=0.0"]


def torchrun(nproc):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]


def run(nproc, out, *args, out_arg=True):
    cmd = torchrun(nproc) + ["train.py"] + (TINY + [f"out_dir={out}"] if out_arg else []) + list(args)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics if out_arg else (metrics, p.stdout)


def losses(metrics):
    return [r["loss"] for r in metrics if r["stage"] == "sft"]


def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    one = run(1, tmp_path / "one", "--stage", "resim", "resim.episodes=12", "sft.batch_size=4",
              "eval.id=0", "eval.ood=0")
    l1 = losses(one)
    assert len(l1) >= 3
    for dist in ("ddp", "fsdp"):
        l2 = losses(run(2, tmp_path / dist, "--stage", "resim", "resim.episodes=12", "sft.batch_size=2",
                        "eval.id=0", "eval.ood=0", f"dist={dist}", "checkpoint_minutes=0"))
        assert len(l1) == len(l2), dist
        for a, b in zip(l1, l2):
            assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (dist, l1, l2)
    # the sharded run saved a full model and a full checkpoint that one process can read
    model = tmp_path / "fsdp" / "model"
    run(1, tmp_path / "fsdp_eval", "--stage", "grpo", f"init_from={model}", "rl.steps=0", "eval.id=1", "eval.ood=0")


def test_fsdp_rl_with_uneven_shards_stops_on_ctrl_c_and_resumes(tmp_path):
    one = tmp_path / "resim"   # an action-only policy that solves some puzzles: RL updates are not all zero
    run(1, one, "--stage", "resim", "resim.episodes=300", "resim.action_only=true", "sft.epochs=4",
        "sft.batch_size=8", "sft.micro_batch=8", "sft.lr=0.01", "eval.id=0", "eval.ood=0")
    args = ["--stage", "dyna_grpo", f"init_from={one / 'model'}", "rl.steps=6", "rl.tasks=1", "rl.group=3",
            "rl.beta=0.01", "eval.id=3", "eval.ood=0", "dist=fsdp", "checkpoint_minutes=0"]
    alone = run(2, tmp_path / "alone", *args)
    rl = [r for r in alone if r["stage"] == "rl_dyna_grpo"]
    assert [r["step"] for r in rl] == [1, 2, 3, 4, 5, 6] and sum(r.get("grad_norm", 0) > 0 for r in rl[2:]) >= 2
    # Ctrl-C reaches torchrun, which signals both ranks: they finish the step, checkpoint together, exit
    proc = subprocess.Popen(torchrun(2) + ["train.py", *TINY, f"out_dir={tmp_path / 'stopped'}", *args], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ck = tmp_path / "stopped" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ck.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert "checkpoint saved" in log, log[-3000:]
    step = torch.load(ck, weights_only=True)["step"]
    assert 1 <= step < 6
    resumed = run(2, tmp_path / "stopped", "--resume", str(tmp_path / "stopped"), out_arg=False)
    assert f"resuming from rl step {step}" in resumed[1]
    keys = ("success", "ret", "loss", "pg_loss", "kl", "grad_norm", "refine_grad_norm")
    strip = lambda ms: [{k: r.get(k) for k in keys} for r in ms if r["stage"] == "rl_dyna_grpo"]   # noqa: E731
    assert strip(resumed[0]) == strip(alone)


def test_uneven_shards_finish(tmp_path):
    # 5 episodes and 3 + 1 evaluation puzzles over 2 ranks: every collective still pairs up
    metrics = run(2, tmp_path / "resim", "--stage", "resim", "resim.episodes=5", "sft.batch_size=1",
                  "eval.id=3", "eval.ood=1")
    assert any(r["stage"] == "eval" for r in metrics)
    run(2, tmp_path / "grpo", "--stage", "grpo", f"init_from={tmp_path / 'resim' / 'model'}",
        "rl.steps=1", "rl.tasks=1", "rl.group=3", "eval.id=1", "eval.ood=0")


def _rank_grads(rank, world, store, samples, agg, out):
    """One rank of an RL update on its share of the samples; rank 0 saves the summed gradient."""
    import agent
    import train
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, _ = agent.load_model("tiny", dtype=torch.float32, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    grads = {}

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    rc = dict(train.DEFAULTS["rl"], micro_batch=2, agg=agg)
    train.rl_update(model, None, Recorder(model.parameters(), lr=0.0), samples[rank::world], 0, rc, False, world, 40)
    if rank == 0:
        torch.save(grads, out)
    torch.distributed.destroy_process_group()


def test_rl_update_is_the_same_over_one_or_two_ranks(tmp_path):
    import torch.multiprocessing as mp
    import grpo
    g = torch.Generator().manual_seed(0)
    samples = [grpo.Sample(torch.randint(0, 250, (3 + i,), generator=g).tolist(),
                           torch.randint(0, 250, (2 + 3 * (i % 3),), generator=g).tolist(), a)
               for i, a in enumerate([1.0, -1.0, 0.0, 0.5, -0.5, 2.0, 0.0])]
    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        got = []
        for world in (1, 2):
            out = tmp_path / f"{agg}{world}.pt"
            mp.spawn(_rank_grads, args=(world, tmp_path / f"store{agg}{world}", samples, agg, out), nprocs=world)
            got.append(torch.load(out))
        for k in got[0]:
            assert torch.allclose(got[0][k], got[1][k], atol=1e-6), (agg, k)


def _rank_mean_turns(rank, world, store, out):
    import agent
    import train
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    turn = agent.Turn([1], [2], "", "", "Up", True, False, False)
    eps = [agent.Episode("sokoban", 0, [turn] * n, False, 20) for n in ([2, 4] if rank == 0 else [20])]
    torch.save(train.mean_turns(eps), out / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_turn_weights_use_the_mean_over_every_rank(tmp_path):
    """grpo.episode_samples scales by the mean turns of the whole step, not of one rank's episodes."""
    import torch.multiprocessing as mp
    mp.spawn(_rank_mean_turns, args=(2, tmp_path / "store", tmp_path), nprocs=2)
    assert torch.load(tmp_path / "0.pt") == torch.load(tmp_path / "1.pt") == pytest.approx(26 / 3)


def _rank_collect_stats(rank, world, store, out):
    import train
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.save(train.collect_stats(dict(episodes=5, steps=10 + rank, seconds=2.0 + rank), world), out / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_collection_seconds_are_the_slowest_rank_not_the_sum(tmp_path):
    """Ranks search their trees side by side: the run's collection took as long as its slowest rank."""
    import torch.multiprocessing as mp
    mp.spawn(_rank_collect_stats, args=(2, tmp_path / "store", tmp_path), nprocs=2)
    assert torch.load(tmp_path / "0.pt") == torch.load(tmp_path / "1.pt") == dict(episodes=10, steps=21, seconds=3.0)


def test_process_group_waits_hours_for_a_slow_rank(monkeypatch):
    """ReSim search ranks can finish more than torch's default 30 min apart (ALFWorld: 15 and over 45 min); the
    gather after the search must wait for the slow one, not time out and lose the search."""
    import datetime

    import common
    got = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: got.update(kw))
    assert common.setup_dist("cpu")[:2] == (0, 2)
    assert got.get("timeout", datetime.timedelta(minutes=30)) >= datetime.timedelta(hours=2)


def _rank_claims(rank, world, store, out):
    import time
    import common
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    got = []
    for s in common.claim(list(range(12)), world):
        got.append(s)
        time.sleep(0.4 if rank == 0 else 0.02)       # rank 0's episodes are the long ones
    again = list(common.claim(list(range(4)), world))   # a second handout starts from the first item again
    torch.save((got, again), out / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_search_episodes_go_to_whichever_rank_is_free(tmp_path):
    """train.traces hands ReSim episodes out one at a time (common.claim): every episode is searched once, and a
    rank stuck on long episodes takes fewer instead of holding up the other (a fixed deal gave each rank half)."""
    import torch.multiprocessing as mp
    import common
    mp.spawn(_rank_claims, args=(2, tmp_path / "store", tmp_path), nprocs=2)
    (got0, again0), (got1, again1) = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert sorted(got0 + got1) == list(range(12)) and sorted(again0 + again1) == list(range(4))
    assert len(got0) <= 3 < 9 <= len(got1), (got0, got1)
    assert list(common.claim([3, 1, 2], 1)) == [3, 1, 2]
