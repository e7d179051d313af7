"""Wall time of the work that waits on decoding, before and after, in one run: the main job's held-out
evaluation (200 ID + 100 OOD Sokoban puzzles, greedy) and Dyna-GRPO steps (--steps alternating simulation and
policy steps at the old defaults: 4 tasks x 8 rollouts, 320 new tokens, temperature 1), each run by this tree
and by the git revision --before (checked out into a temporary directory), from the same model.

    python bench/bench_rl.py --model runs/resim_sokoban/model [--before 109ae41]
    python bench/bench_rl.py --model runs/resim_sokoban/model --after-args decode_compile=true

Rollout and update seconds come from each run's metrics.jsonl (the old code logs the whole step only).
With decode_compile=true the decode step is compiled before the first step (train.py logs decode_compile_s).
The speed-up compares the first two steps, which start from the same weights; later steps are listed but not
compared (the trees train different policies: 109ae41's collapses).
Run it alone: the two trees take turns, but a busy machine slows them unevenly.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RL = ["rl.tasks=4", "rl.group=8", "rl.micro_batch=16", "max_new_tokens=320", "rl.temperature=1.0",
      "eval.id=0", "eval.ood=0", "checkpoint_minutes=1000"]


def checkout(rev):
    """The files of revision `rev` in a temporary directory (git archive: no worktree bookkeeping)."""
    where = Path(tempfile.mkdtemp(prefix=f"dynamind-{rev}-"))
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def run(tree, args):
    t = time.perf_counter()
    p = subprocess.run([sys.executable] + args, cwd=tree, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(tree)))
    if p.returncode:
        raise SystemExit(f"{tree}: {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def measure(tree, model, out, n_steps, extra=()):
    ev = sum(run(tree, ["evaluate.py", "--model", model, "--split", split, "--episodes", str(n)])
             for split, n in (("id", 200), ("ood", 100)))
    wall = run(tree, ["train.py", "--stage", "dyna_grpo", f"init_from={model}", f"out_dir={out}",
                      f"rl.steps={n_steps}"] + RL + list(extra))
    steps = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["stage"] == "rl_dyna_grpo"]
    return ev, wall, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained Sokoban model directory (save_pretrained)")
    ap.add_argument("--before", default="109ae41")
    ap.add_argument("--steps", type=int, default=2, help="RL steps per tree (simulation and policy alternate)")
    ap.add_argument("--after-args", nargs="*", default=[], help="overrides for this tree's RL run only")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (a simulation step and a policy step)")
    model = str(Path(args.model).resolve())
    rows = {}
    for label, tree, extra in (("before", checkout(args.before), ()), ("after", ROOT, args.after_args)):
        rows[label] = measure(tree, model, tempfile.mkdtemp(prefix=f"bench-rl-{label}-"), args.steps, extra)
    print(f"\nmodel {args.model}; before = {args.before}, after = this tree {' '.join(args.after_args)}\n")
    print(f"{'':<8}{'eval 300 (s)':>13}{'sim step (s)':>14}{'pi step (s)':>13}   rollout + update, every step (s)")
    for label, (ev, wall, steps) in rows.items():
        split = " / ".join(f"{r['rollout_s']:.0f}+{r.get('update_s', r['step_s'] - r['rollout_s']):.0f}"
                           for r in steps)
        print(f"{label:<8}{ev:>13.0f}{steps[0]['step_s']:>14.0f}{steps[1]['step_s']:>13.0f}   {split}")
    (b_ev, _, b), (a_ev, _, a) = rows["before"], rows["after"]
    print(f"\nspeed-up: evaluation {b_ev / a_ev:.1f}x, simulation step {b[0]['step_s'] / a[0]['step_s']:.1f}x, "
          f"policy step {b[1]['step_s'] / a[1]['step_s']:.1f}x (the first two steps: the same model in both trees)")
    if "decode_compile_s" in a[0]:
        print(f"(after: the decode step compiled in {a[0]['decode_compile_s']:.0f} s before its first step)")


if __name__ == "__main__":
    main()
