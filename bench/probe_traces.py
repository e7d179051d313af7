"""Has a ReSim-trained model learnt its traces' decisions? Greedy answers on ReSim prompts, two sets:

    train     prompts from the run's own traces.jsonl (what SFT saw: does it fit them?)
    held-out  fresh ReSim traces of held-out ID episodes, searched as the run searched its train ones

and for each set:
    valid          the answer holds a readable action
    trace's pick   the action equals the trace's (the first action of the plan the search valued best)
    own argmax     `Best: Plan k` names a plan with the highest value the answer itself wrote (answers with
                   two or more valued plans)

Underfit shows as a low "trace's pick" on the train set; a gap between the sets is generalisation.

    python bench/probe_traces.py runs/resim_android_smollm2 [--n 48]
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import common  # noqa: E402
import engine  # noqa: E402
import envs  # noqa: E402
import resim  # noqa: E402
import train  # noqa: E402


def held_out(cfg, model, tok, n_episodes):
    rc = cfg["resim"]
    act, value, aggregate = train.search_parts(cfg, model, tok, model.device)   # the run's own search
    records, _ = resim.collect(cfg["env"], cfg["env_kwargs"], envs.split_seeds("id", n_episodes), act=act,
                               value=value, aggregate=aggregate, tokenizer=tok, b=rc["b"], d=rc["d"],
                               b_train=rc["b_train"], plan_order=rc["plan_order"], value_scale=rc["value_scale"],
                               gamma=rc["gamma"], distinct=rc["distinct"], history_k=cfg["history_k"],
                               system=cfg["system"], seed=cfg["seed"], progress=False, split="id")
    return records


def same(a, b):
    return a is not None and "".join(a.split()) == "".join(b.split())


def score(model, tok, records, max_new_tokens):
    gens = engine.generate(model, tok, [r.prompt for r in records], max_new_tokens=max_new_tokens,
                           temperature=0, batch_size=64)
    valid = pick = argmax = compared = 0
    for r, g in zip(records, gens):
        p = agent.parse_response(g.text)
        valid += p.action is not None
        pick += same(p.action, r.action)
        vals = [pl.value for pl in p.plans]
        if len(vals) > 1 and None not in vals and p.best is not None and 0 <= p.best < len(vals):
            compared += 1
            argmax += vals[p.best] == max(vals)
    n = len(records)
    return dict(n=n, valid=valid / n, trace_pick=pick / n, own_argmax=argmax / max(compared, 1), compared=compared)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a stage-1 run directory (config.yaml, traces.jsonl, model/)")
    ap.add_argument("--model", default="", help="the model to probe (default: the run's model/)")
    ap.add_argument("--n", type=int, default=48, help="prompts per set")
    args = ap.parse_args()
    cfg = common.load_config(train.DEFAULTS, os.path.join(args.run, "config.yaml"))   # an older run: today's defaults
    model, tok = agent.load_model(args.model or os.path.join(args.run, "model"), dtype="bfloat16")
    trained = [r for r in resim.read_jsonl(os.path.join(args.run, "traces.jsonl")) if r.kind == "resim"]
    random.Random(0).shuffle(trained)
    heldout = []
    for k in (max(8, args.n // 3), args.n * 2):   # enough held-out episodes for n steps
        heldout = [r for r in held_out(cfg, model, tok, k) if r.kind == "resim"]
        if len(heldout) >= args.n:
            break
    random.Random(0).shuffle(heldout)
    print(f"{'set':<10}{'n':>5}{'valid':>8}{'trace pick':>12}{'own argmax':>12}{'(compared)':>12}")
    for name, recs in (("train", trained[:args.n]), ("held-out", heldout[:args.n])):
        s = score(model, tok, recs, cfg["max_new_tokens"])
        print(f"{name:<10}{s['n']:>5}{s['valid']:>8.3f}{s['trace_pick']:>12.3f}{s['own_argmax']:>12.3f}"
              f"{s['compared']:>12}")
        print(json.dumps(dict(set=name, **s)))


if __name__ == "__main__":
    main()
