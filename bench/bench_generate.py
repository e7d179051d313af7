"""Tokens/s of agent.generate (rows dropped when done) vs HF model.generate (stop_strings=) on a batch like a
multi-turn rollout turn: 32 prompts of 100-400 tokens whose responses end at different lengths.

  tiny:    seeded sampling (temperature 1) from the random-init model; stop on "\\n" or "." (about 1 in 130
           sampled bytes), so responses end anywhere in 1..256 tokens
  smollm2: greedy; varied questions; stop on "\\n\\n" / "</action>" or EOS
Both in bf16, the same prompts and budget. Generated tokens are counted the same way for both: up to and
including the token that completes a stop string or the EOS.

  cd /work/main && /work/venv/bin/python bench/bench_generate.py --models tiny smollm2
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import agent  # noqa: E402

QUESTIONS = ["Name one color.", "What is 2+2? Answer with the number only.", "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue.", "List three fruits, one per line.",
             "Describe how to make tea, step by step.", "Say yes or no: is fire cold?",
             "Write a short story about a robot who learns to paint."]


def make_prompts(tok, n, lo, hi, seed, chat):
    """n prompts with lengths uniform in [lo, hi] tokens: filler context (Sokoban-like grids) + a question."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        target = rng.randint(lo, hi - 30 if chat else hi)   # chat prompts overshoot by up to one grid
        grid = "\n".join("".join(rng.choice("#_OXP") for _ in range(6)) for _ in range(6))
        ctx = ""
        while True:
            q = QUESTIONS[i % len(QUESTIONS)]
            msgs = [{"role": "user", "content": f"Observation:\n{ctx}\n\n{q}"}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) if chat else ctx + q
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= target:
                out.append(ids[-target:] if not chat else ids)
                break
            ctx += grid + "\n"
    return out


def count(tok, resp, stop, eos):
    """Generated tokens of one row: through the first EOS or the first token that completes a stop string."""
    for k, t in enumerate(resp):
        if t in eos or (stop and any(s in tok.decode(resp[max(0, k - 40):k + 1]) for s in stop)):
            return k + 1
    return len(resp)


def run_ours(model, tok, prompts, kw, stop, eos):
    t0 = time.perf_counter()
    gens = agent.generate(model, tok, prompts, stop=stop, **kw)
    dt = time.perf_counter() - t0
    n = sum(len(g.token_ids) + (g.finish_reason == "eos") for g in gens)
    return n, dt, [g.token_ids for g in gens]


def run_hf(model, tok, prompts, kw, stop, eos):
    T = max(map(len, prompts))
    pad = tok.pad_token_id
    x = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    sample = kw["temperature"] > 0
    extra = dict(do_sample=True, temperature=kw["temperature"], top_p=1.0, top_k=0) if sample else \
        dict(do_sample=False)
    if sample:
        torch.manual_seed(kw["seed"])
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=mask, max_new_tokens=kw["max_new_tokens"], stop_strings=list(stop),
                         tokenizer=tok, pad_token_id=pad, eos_token_id=sorted(eos), **extra)
    dt = time.perf_counter() - t0
    rows = out[:, T:].tolist()
    ks = [count(tok, r, stop, eos) for r in rows]
    return sum(ks), dt, [r[:k - (k > 0 and r[k - 1] in eos)] for r, k in zip(rows, ks)]   # EOS dropped, as ours


def bench(name, args):
    model, tok = agent.load_model(name, dtype=torch.bfloat16)
    chat = name != "tiny"
    prompts = make_prompts(tok, args.batch, 100, 400, 0, chat)
    if name == "tiny":
        kw, stop = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0), ("\n", ".")
    else:
        kw, stop = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, seed=0), ("\n\n", "</action>")
    eos = agent._eos_ids(model, tok)
    run_ours(model, tok, prompts[:2], dict(kw, max_new_tokens=4), stop, eos)   # warm-up
    run_hf(model, tok, prompts[:2], dict(kw, max_new_tokens=4), stop, eos)
    rows = []
    for rep in range(args.repeats):
        for label, fn in (("ours", run_ours), ("hf", run_hf)):
            n, dt, resp = fn(model, tok, prompts, kw, stop, eos)
            rows.append((label, n, dt, resp))
    best = {lab: max((r for r in rows if r[0] == lab), key=lambda r: r[1] / r[2]) for lab in ("ours", "hf")}
    lens = sorted(len(r) for r in best["ours"][3])
    same = sum(a == b for a, b in zip(best["ours"][3], best["hf"][3]))
    print(f"\n{name}: {len(prompts)} prompts, {min(map(len, prompts))}-{max(map(len, prompts))} prompt tokens, "
          f"{'greedy' if kw['temperature'] == 0 else 'sampling T=1'}, max_new_tokens {kw['max_new_tokens']}, "
          f"stop {stop}; ours response lengths min/median/max {lens[0]}/{lens[len(lens) // 2]}/{lens[-1]}; "
          f"rows identical to HF: {same}/{len(prompts)}")
    print(f"{'impl':<6}{'gen tokens':>11}{'seconds':>9}{'tokens/s':>10}")
    for lab in ("ours", "hf"):
        _, n, dt, _ = best[lab]
        print(f"{lab:<6}{n:>11}{dt:>9.2f}{n / dt:>10.1f}")
    speedup = (best["ours"][1] / best["ours"][2]) / (best["hf"][1] / best["hf"][2])
    print(f"speedup ours/hf: {speedup:.2f}x")
    return speedup


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)   # 1: the 2 shared cores stall with more
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
