"""The main job's held-out evaluation, timed with and without answering a repeated greedy prompt from memory
(agent.generate_once), in one run, alternating: seconds per split, and how many episodes wrote the same responses as
the first (every-turn) pass.

    python bench/bench_eval.py runs/resim_sokoban/model            # 200 ID + 100 OOD, as train.py evaluates
    python bench/bench_eval.py runs/resim_sokoban/model --repeats 2

The model is loaded in bfloat16, as train.py's evaluation copy generates; the settings are the run's own.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import common  # noqa: E402
import engine  # noqa: E402
import envs  # noqa: E402
import evaluate  # noqa: E402

REUSE = agent.generate_once


def decode_every_turn(model, tokenizer, ids, answered, **gen_kwargs):
    """The path before: every turn decodes every prompt."""
    return engine.generate(model, tokenizer, ids, **gen_kwargs)


def timed(model, tok, split, n, saved, reuse):
    """Seconds, prompts decoded, each episode's responses, and the metrics of one evaluation of a split."""
    agent.generate_once = REUSE if reuse else decode_every_turn
    rows, generate = [0], engine.generate

    def counting(model, tokenizer, prompts, **kw):
        rows[0] += len(prompts)
        return generate(model, tokenizer, prompts, **kw)

    engine.generate, t0 = counting, time.time()
    try:
        made, eps = evaluate.play(model, tok, saved.get("env", "sokoban"), split, envs.split_seeds(split, n),
                                  env_kwargs=saved.get("env_kwargs", {}), history_k=saved.get("history_k", 0),
                                  system=saved.get("system", False),
                                  max_new_tokens=saved.get("max_new_tokens", 320), temperature=0.0, progress=False)
    finally:
        engine.generate = generate
    seconds = time.time() - t0
    metrics = evaluate.summarize(evaluate.episode_rows(made, eps))
    return seconds, rows[0], [[t.text for t in ep.turns] for ep in eps], metrics


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--id", type=int, default=200)
    ap.add_argument("--ood", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    saved = common.prompt_settings(args.model)
    model, tok = agent.load_model(args.model, dtype="bfloat16")
    print(f"{'split':<6}{'reuse':>6}{'seconds':>9}{'turns decoded':>15}{'success':>9}{'sim':>7}{'same episodes':>15}")
    for split, n in (("id", args.id), ("ood", args.ood)):
        if n <= 0:
            continue
        ref = None
        for _ in range(args.repeats):
            for reuse in (False, True):
                seconds, decoded, texts, m = timed(model, tok, split, n, saved, reuse)
                ref = ref or texts
                same = sum(a == b for a, b in zip(texts, ref))
                print(f"{split:<6}{str(reuse):>6}{seconds:>9.1f}{decoded:>15}{m['success']:>9.3f}{m['sim']:>7.3f}"
                      f"{f'{same}/{len(texts)}':>15}")


if __name__ == "__main__":
    main()
