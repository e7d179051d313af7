"""ALFWorld's experts side by side: ReSim trees searched on the same train seeds with a config's settings, one
expert at a time; per expert the search time, steps, trace length and what the traces teach about searching
(bench/alfworld_traces.py). Search only: no model is loaded but the tokenizer, nothing is trained.

    python bench/alfworld_search.py --episodes 6 --experts planner explorer
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import alfworld_traces  # noqa: E402
import common  # noqa: E402
import envs  # noqa: E402
import resim  # noqa: E402
import train  # noqa: E402


def search(cfg, tok, expert, seeds, out_dir):
    rc, kw = cfg["resim"], dict(cfg["env_kwargs"], expert=expert)
    act, value, aggregate = train.search_parts(dict(cfg, env_kwargs=kw), None, tok, "cpu")
    t = time.time()
    records, stats = resim.collect(cfg["env"], kw, seeds, act=act, value=value, aggregate=aggregate, tokenizer=tok,
                                   b=rc["b"], d=rc["d"], b_train=rc["b_train"], plan_order=rc["plan_order"],
                                   refine_frac=rc["refine_frac"], refine_keep=rc["refine_keep"], detour=rc["detour"],
                                   hide_best=rc["hide_best"], value_scale=rc["value_scale"], gamma=rc["gamma"],
                                   distinct=rc["distinct"], history_k=cfg["history_k"], system=cfg["system"],
                                   seed=cfg["seed"], progress=False)
    path = os.path.join(out_dir, f"{expert}.jsonl")
    resim.write_jsonl(path, records)
    chars = [len(r.response) for r in records if r.kind == "resim"]
    return dict(expert=expert, minutes=round((time.time() - t) / 60, 2), solved=stats["solved"],
                trace_chars=round(sum(chars) / max(1, len(chars)), 1),
                **alfworld_traces.stats(alfworld_traces.episodes(path)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/alfworld_smollm2.yaml")
    ap.add_argument("--episodes", type=int, default=6)
    ap.add_argument("--experts", nargs="+", default=["planner", "explorer"])
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, as train.py takes them")
    args = ap.parse_args()
    cfg = common.load_config(train.DEFAULTS, args.config, args.overrides)
    if cfg["env"] != "alfworld":
        raise SystemExit(f"{args.config} is not an ALFWorld config")
    _, tok = agent.load_model(cfg["model"])
    seeds = envs.split_seeds("train", args.episodes)
    with tempfile.TemporaryDirectory() as out_dir:
        for expert in args.experts:
            print(json.dumps(search(cfg, tok, expert, seeds, out_dir)), flush=True)


if __name__ == "__main__":
    main()
