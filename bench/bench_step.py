"""One decode step of engine.py against a git revision's engine.py, in one process, alternating: the A/B for a
change to the decode step (machine speed drifts between runs; alternating cancels most of it). Same weights,
same random prompts, the same cache length; prints the largest logit difference and the median step times.

    python bench/bench_step.py --before caff864 --model runs/resim_sokoban/model --batch 128
    python bench/bench_step.py --before caff864 --model smollm2 --batch 32 --prompt 400

(caff864: the last revision before keys were cached transposed.)

    python bench/bench_step.py --compile --model runs/resim_sokoban/model --batch 32
    python bench/bench_step.py --model smollm2 --batch 8 --prompt 680 --profile   # where a step's time goes

--compile: this tree's step eager against the same step through torch.compile (engine.COMPILE), instead of a
revision; the compile is done before the timing and reported apart.
"""
import argparse
import inspect
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import agent  # noqa: E402
import engine  # noqa: E402
from bench_generate import module_at  # noqa: E402  (bench/ is sys.path[0] when run as a script)


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/resim_sokoban/model")
    ap.add_argument("--before", default="HEAD", help="the git revision whose engine.py is 'before'")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=200, help="cache length: prompt tokens per row")
    ap.add_argument("--steps", type=int, default=10, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="eager against compiled, both this tree")
    ap.add_argument("--profile", action="store_true", help="then the operators of this tree's steps by CPU time (totals)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = agent.load_model(args.model, dtype=torch.bfloat16)
    vocab, B, T = min(len(tok), model.config.vocab_size), args.batch, args.prompt
    ids = [torch.randint(0, vocab, (T,)).tolist() for _ in range(B)]
    mods = ({"eager": engine, "compiled": engine} if args.compile else
            {"before": module_at(args.before, "engine"), "this tree": engine})
    # cache one column longer than the steps fill, as in generate (a full cache would be a new shape to compile)
    decs = {k: m._prefill(model, ids, tok.pad_token_id, 8, T + args.steps + 1)[0] for k, m in mods.items()}
    if args.compile:
        engine.COMPILE = True
        print(f"compiled in {engine.warm_up(model, tok):.0f} s")
    toks, pos = torch.randint(0, vocab, (B,)), torch.full((B,), T)
    # the cache column: an int since 17e9fc9, a [B] tensor before
    col = {k: (lambda i: pos + i) if "cols" in inspect.signature(d.step).parameters else (lambda i: T + i)
           for k, d in decs.items()}
    first = {}
    for k, d in decs.items():
        engine.COMPILE = k == "compiled"
        first[k] = d.step(toks, pos, col[k](0))
    a, b = first.values()
    diff = float((a.float() - b.float()).abs().max())

    def steps(k, d):   # one decoder's steps 1 .. steps-1, under its own COMPILE setting
        engine.COMPILE = k == "compiled"
        for i in range(1, args.steps):
            d.step(toks, pos + i, col[k](i))
    times = {k: [] for k in decs}
    for _ in range(args.repeats):
        for k, d in decs.items():
            t = time.perf_counter()
            steps(k, d)
            times[k].append((time.perf_counter() - t) / (args.steps - 1) * 1e3)
    print(f"{args.model}, batch {B}, cache {T}, {args.threads} threads; max |logit difference| {diff:.3g}")
    for k, v in times.items():
        print(f"  {k:<10} median {sorted(v)[len(v) // 2]:.2f} ms a step  ({', '.join(f'{x:.2f}' for x in v)})")
    if args.profile:   # where the step's time goes: mm = projections and vocabulary head, bmm = attention
        k, d = list(decs.items())[-1]
        with torch.profiler.profile() as prof:
            steps(k, d)
        print(f"{k}, {args.steps - 1} steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
