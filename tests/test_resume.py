"""Exact resume: a run killed with SIGKILL (or stopped with Ctrl-C) and continued with --resume ends with the
same losses and evaluation as the same run left alone."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["sft.compile=false", "tiny.hidden_size=64", "tiny.num_hidden_layers=2", "tiny.num_attention_heads=2",
        "tiny.num_key_value_heads=2", "tiny.intermediate_size=128", "max_new_tokens=48",
        "env_kwargs={max_steps: 3}", "eval.id=6", "eval.ood=0", "checkpoint_minutes=0"]
RESIM = ["--stage", "resim", "resim.episodes=40", "sft.epochs=3", "sft.batch_size=4", "sft.micro_batch=2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train(*args, check=True):
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert not check or p.returncode == 0, p.stderr[-3000:]
    return p


def stop_midway(args, sig, at):
    """Start a run that freezes itself (SIGSTOP) right after step `at` ("phase:step"), send `sig`, let it go on:
    the signal always lands mid-training, however slow or loaded the machine is."""
    ck = Path(args[-1].split("=", 1)[1]) / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=dict(ENV, DYNAMIND_PAUSE_AT=at),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not stopped(proc.pid):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.stderr.read()[-2000:]
    proc.send_signal(sig)
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out + err, torch.load(ck, weights_only=True)


def stopped(pid):
    """Whether the process is stopped by a signal (state T in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def metrics(run_dir, stage):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["stage"] == stage]


def final(run_dir):
    return json.loads((run_dir / "eval.json").read_text())["id"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    train(*RESIM, *TINY, f"out_dir={tmp_path / 'alone'}")
    code, _, ck = stop_midway([*RESIM, *TINY, f"out_dir={tmp_path / 'killed'}"], signal.SIGKILL, "sft:3")
    assert code == -signal.SIGKILL and ck["phase"] == "sft" and ck["step"] == 3
    total = len(metrics(tmp_path / "alone", "sft"))
    assert 3 <= ck["step"] < total
    out = train("--resume", str(tmp_path / "killed")).stdout
    assert f"resuming from sft step {ck['step']}" in out
    losses = [r["loss"] for r in metrics(tmp_path / "killed", "sft")]
    assert losses == [r["loss"] for r in metrics(tmp_path / "alone", "sft")] and len(losses) == total
    assert final(tmp_path / "killed") == final(tmp_path / "alone")


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_resume_equals_uninterrupted(tmp_path):
    # an action-only policy that already solves some puzzles, so GRPO groups have non-zero advantages
    train("--stage", "resim", "resim.episodes=300", "resim.action_only=true", "sft.epochs=4", "sft.batch_size=8",
          "sft.lr=0.005", *TINY, f"out_dir={tmp_path / 'policy'}")
    rl = ["--stage", "grpo", f"init_from={tmp_path / 'policy' / 'model'}", "rl.steps=6", "rl.tasks=2",
          "rl.group=4", "rl.lr=0.001", *TINY]
    train(*rl, f"out_dir={tmp_path / 'alone'}")
    alone = metrics(tmp_path / "alone", "rl_grpo")
    assert any(r.get("grad_norm", 0) > 0 for r in alone[2:]), "no update after the stop: the test would be vacuous"
    code, log, ck = stop_midway([*rl, f"out_dir={tmp_path / 'stopped'}"], signal.SIGINT, "rl:1")
    assert code == 128 + signal.SIGINT, log[-2000:]
    assert "checkpoint saved" in log and "--resume" in log
    assert ck["phase"] == "rl" and ck["step"] == 2          # the step under way when Ctrl-C came is finished
    assert not (tmp_path / "stopped" / "eval.json").exists()
    train("--resume", str(tmp_path / "stopped"))
    keys = ("success", "ret", "response_tokens", "pg_loss", "grad_norm")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs]   # noqa: E731
    assert strip(metrics(tmp_path / "stopped", "rl_grpo")) == strip(alone)
    assert final(tmp_path / "stopped") == final(tmp_path / "alone")


def test_resume_needs_a_run_directory(tmp_path):
    p = train("--resume", str(tmp_path / "nothing"), check=False)
    assert p.returncode != 0 and "resume error" in p.stderr
    p = train("--resume", str(tmp_path), "rl.steps=3", check=False)
    assert p.returncode != 0 and "give nothing else" in p.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    p = train(*RESIM, *TINY, "sft.lr=1e30", "sft.warmup=0.0", f"out_dir={tmp_path}", check=False)
    assert p.returncode != 0 and "stopped before the update" in p.stderr and "last good step" in p.stderr
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)     # readable without unpickling code
    assert ck["phase"] == "sft" and ck["step"] >= 1
    assert all(torch.isfinite(t).all() for t in ck["model"].values())
    assert not (tmp_path / "model").exists()
