"""torchrun on CPU (gloo): two ranks reproduce one process with twice the batch, and uneven shards finish."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tiny.hidden_size=32", "tiny.num_hidden_layers=1", "tiny.num_attention_heads=2",
        "tiny.num_key_value_heads=2", "tiny.intermediate_size=64", "max_new_tokens=24", "bf16=false",
        "env_kwargs={max_steps: 3}", "sft.epochs=2", "sft.micro_batch=1", "sft.warmup=0.0"]


def run(nproc, out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "train.py", *args, f"out_dir={out}"] + TINY
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    one = run(1, tmp_path / "one", "--stage", "resim", "resim.episodes=12", "sft.batch_size=4",
              "eval.id=0", "eval.ood=0")
    two = run(2, tmp_path / "two", "--stage", "resim", "resim.episodes=12", "sft.batch_size=2",
              "eval.id=0", "eval.ood=0")
    l1 = [r["loss"] for r in one if r["stage"] == "sft"]
    l2 = [r["loss"] for r in two if r["stage"] == "sft"]
    assert len(l1) == len(l2) >= 3
    for a, b in zip(l1, l2):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (l1, l2)


def test_uneven_shards_finish(tmp_path):
    # 5 episodes and 3 + 1 evaluation puzzles over 2 ranks: every collective still pairs up
    metrics = run(2, tmp_path / "resim", "--stage", "resim", "resim.episodes=5", "sft.batch_size=1",
                  "eval.id=3", "eval.ood=1")
    assert any(r["stage"] == "eval" for r in metrics)
    run(2, tmp_path / "grpo", "--stage", "grpo", f"init_from={tmp_path / 'resim' / 'model'}",
        "rl.steps=1", "rl.tasks=1", "rl.group=3", "eval.id=1", "eval.ood=0")
