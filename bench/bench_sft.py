"""SFT step time on a run's own traces, by attention: eager everywhere, sdpa everywhere, and the switch
(`sft.sdpa_from`: eager below it, sdpa at and above), optionally with the compiled forward for the short batches.
The same batches of the run's SFT plan, the variants alternating (machine speed drifts); the full SFT's time is
projected from the mean step time of each length class times its number of batches.

    python bench/bench_sft.py runs/resim_sokoban --short 40 --long 20
    python bench/bench_sft.py runs/resim_sokoban --compile      # adds compiled (short) + sdpa (long): the
                                                                # compiled Hugging Face forward and train.compiled's
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import agent  # noqa: E402
import resim  # noqa: E402
import train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a stage-1 run directory holding config.yaml and traces.jsonl")
    ap.add_argument("--short", type=int, default=40, help="batches timed below sdpa_from")
    ap.add_argument("--long", type=int, default=20, help="batches timed at or above sdpa_from")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(open(f"{args.run}/config.yaml"))
    sc = dict(train.DEFAULTS["sft"], **cfg["sft"])
    cut = sc["sdpa_from"] or train.DEFAULTS["sft"]["sdpa_from"]
    torch.manual_seed(0)
    model, tok = agent.load_model(cfg["model"], attn="eager", **(cfg["tiny"] if cfg["model"] == "tiny" else {}))
    model.train()
    samples = resim.samples(tok, resim.read_jsonl(f"{args.run}/traces.jsonl"), cfg["resim"]["action_only"])
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    plan = train.sft_plan(len(samples), sc["batch_size"], sc["epochs"], lengths, cfg["seed"])
    longest = np.array([max(lengths[i] for i in b) for b in plan])
    classes = {"short": np.flatnonzero(longest < cut), "long": np.flatnonzero(longest >= cut)}
    print(f"{len(plan)} SFT batches of {sc['batch_size']}: {len(classes['short'])} below {cut} tokens, "
          f"{len(classes['long'])} at or above (longest example {max(lengths)})")
    variants = {"eager": dict(sdpa_from=10**9), "sdpa": dict(sdpa_from=1), "switch": dict(sdpa_from=cut)}
    opt = train.make_optimizer(model, 0.0)                # lr 0: every variant and batch sees the same model
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    fwds = {}
    if args.compile:   # the SFT's compiled forward (engine.LeanForward) and, before it, Hugging Face's compiled
        for name, f in (("compiled HF", torch.compile(model, dynamic=False)), ("compiled lean", train.compiled(model))):
            t = time.perf_counter()
            bucket = {-(-int(longest[j]) // sc["pad_to"]): j for j in classes["short"]}   # one batch per shape
            for j in bucket.values():
                b = [samples[i] for i in plan[j]]
                train.sft_step(model, opt, sched, b, tok.pad_token_id, dict(sc, sdpa_from=cut), True, 1, f)
            print(f"{name}: compiled the short lengths in {time.perf_counter() - t:.0f} s (not in the projection)")
            variants[f"{name} + switch"], fwds[f"{name} + switch"] = dict(sdpa_from=cut), f
    rng = np.random.default_rng(0)
    times = {v: {c: [] for c in classes} for v in variants}
    for c, n in (("short", args.short), ("long", args.long)):
        for j in rng.choice(classes[c], min(n, len(classes[c])), replace=False):
            batch = [samples[i] for i in plan[j]]
            order = list(variants) if j % 2 else list(variants)[::-1]
            for v in order:
                t = time.perf_counter()
                train.sft_step(model, opt, sched, batch, tok.pad_token_id, dict(sc, **variants[v]), True, 1,
                               fwds.get(v))
                times[v][c].append(time.perf_counter() - t)
    print("| variant | short batch, s | long batch, s | projected SFT, min |\n|---|---|---|---|")
    for v, tc in times.items():
        proj = sum(len(classes[c]) * np.mean(tc[c]) for c in classes if tc[c]) / 60
        print(f"| {v} | {np.mean(tc['short']):.3f} | {np.mean(tc['long']) if tc['long'] else float('nan'):.3f} | "
              f"{proj:.1f} |")


if __name__ == "__main__":
    main()
