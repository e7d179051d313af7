"""Stage 2 compared over seeds: each RL stage (Dyna-GRPO, GRPO, RLOO) from the same stage-1 model with seeds
0..n-1, then a table of held-out success and simulation score per seed and their mean with a 95% interval
(Student's t over the seeds: a seed-to-seed interval, wider than one run's Wilson interval).

    python bench/compare_rl.py --init runs/resim_sokoban/model --seeds 0 1 2 -- rl.steps=24
    python bench/compare_rl.py --report runs/compare            # only print the table of finished runs

Runs go to --out/<stage>_s<seed>; finished ones (eval.json present) are not run again. --jobs 2 runs two at a
time with one thread each (more throughput on two cores; their wall times are then not for quoting).
"""
import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}   # Student's t, two-sided 95%, by degrees of freedom


def run(stage, seed, args, threads):
    out = Path(args.out) / f"{stage}_s{seed}"
    if (out / "eval.json").exists():
        return
    cmd = [sys.executable, "train.py", "--stage", stage, f"init_from={args.init}", f"out_dir={out}",
           f"seed={seed}"] + args.overrides
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(Path(args.out) / f"{stage}_s{seed}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def interval(xs):
    m = float(np.mean(xs))
    if len(xs) < 2:
        return m, m, m
    h = T975.get(len(xs) - 1, 1.96) * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))
    return m, m - h, m + h


def report(out):
    rows = {}
    for d in sorted(Path(out).glob("*_s*")):
        if (d / "eval.json").exists():
            stage, seed = d.name.rsplit("_s", 1)
            ev = json.loads((d / "eval.json").read_text())
            steps = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            rl = [r for r in steps if r["stage"].startswith("rl_")]
            rows.setdefault(stage, []).append((int(seed), ev, len(rl), sum(r["step_s"] for r in rl) / 60))
    print(f"{'stage':<10}{'seed':>5}{'ID':>8}{'OOD':>8}{'sim ID':>8}{'5+ ID':>8}{'RL steps':>9}{'RL min':>8}")
    for stage, rs in rows.items():
        for seed, ev, n, minutes in sorted(rs):
            five = ev["id"].get("success_by_length", {}).get("5+", float("nan"))
            print(f"{stage:<10}{seed:>5}{ev['id']['success']:>8.3f}{ev.get('ood', {}).get('success', float('nan')):>8.3f}"
                  f"{ev['id']['sim']:>8.3f}{five:>8.3f}{n:>9}{minutes:>8.1f}")
        for key, split in (("success", "id"), ("success", "ood"), ("sim", "id")):
            vals = [ev[split][key] for _, ev, _, _ in rs if split in ev]
            if vals:
                m, lo, hi = interval(vals)
                print(f"{'':<10} mean {split} {key}: {m:.3f} [{lo:.3f}, {hi:.3f}] over {len(vals)} seeds")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", help="the stage-1 model all runs start from")
    ap.add_argument("--stages", nargs="+", default=["dyna_grpo", "grpo", "rloo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--report", metavar="OUT", help="print the table of OUT and stop")
    ap.add_argument("overrides", nargs="*", help="key=value for every run (after --)")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    if not args.init:
        ap.error("--init is required")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    todo = [(st, s) for s in args.seeds for st in args.stages]
    threads = 1 if args.jobs > 1 else 2
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run(*job, args, threads), todo))
    report(args.out)


if __name__ == "__main__":
    main()
