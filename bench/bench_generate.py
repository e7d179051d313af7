"""Decoding speed, in one run:
  lean     engine.generate: the lean decode step over a preallocated cache
  compiled the same, its step through torch.compile (--compile; compiled before the timing)
  HF fwd   the same loop over Hugging Face's forward with a DynamicCache (the fallback)
  before   agent.generate of revision --before (the project's generation loop before engine.py)
  HF gen   Hugging Face's model.generate with the same stop string
  raw step one Hugging Face decode step at the run's mean cache length (batch / seconds)
  floor    the matrix products of one decode step alone, attention over the cache included (batch / seconds)

    python bench/bench_generate.py                       # the main job's model shape, untrained
    python bench/bench_generate.py --models runs/resim_sokoban/model   # the main job's trained model
    python bench/bench_generate.py --models smollm2 --batches 32 --prompt 900 --new 64
    python bench/bench_generate.py --models runs/resim_sokoban/model --compile

Prompts are real Sokoban prompts (about 80 tokens for the tiny model; --prompt N pads them to N tokens with
more observations). An untrained model never meets the stop string "</action>": every row makes --new tokens;
a trained one writes real traces, which end at different lengths. Every implementation pays for checking the
stop string as in a rollout. Weights in bfloat16, as generation runs in training and evaluation. Tokens/s = generated tokens / seconds, best of --repeats.
"""
import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import agent  # noqa: E402
import common  # noqa: E402
import engine  # noqa: E402
import envs  # noqa: E402
import train  # noqa: E402


def prompts(tok, n, length, system):
    env = envs.make_env("sokoban", "train")
    out = []
    for seed in envs.split_seeds("train", n):
        obs = env.reset(seed)
        hist = []
        ids = agent.encode(tok, agent.build_prompt(tok, env, hist, obs, system=system))
        while len(ids) < length:                       # longer prompts: more observations in the history
            hist.append(("Up", obs))
            ids = agent.encode(tok, agent.build_prompt(tok, env, hist, obs, history_k=-1, system=system))
        out.append(ids)
    return out


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def raw_step(model, ids, new):
    """Seconds of one Hugging Face decode step with a DynamicCache at the mean cache length of the run."""
    B, T = len(ids), max(map(len, ids)) + new // 2
    x = torch.randint(0, 200, (B, T))
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
        tok, pos = torch.zeros(B, 1, dtype=torch.long), torch.full((B, 1), T)
        mask = torch.ones(B, T + 1, dtype=torch.long)

        def step():
            model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            cache.crop(-1)                            # back to the same cache length every time
        step()
        return timed(step, 10)


def matmul_floor(model, B, T):
    """Seconds of a decode step's matrix products alone: every projection and the vocabulary head, plus the two
    attention products over a float32 cache of length T (what the lean step does), nothing else."""
    cfg, w = model.config, model.lm_head.weight
    attn = model.model.layers[0].self_attn
    x = torch.randn(B, cfg.hidden_size, dtype=w.dtype)
    mid = torch.randn(B, cfg.intermediate_size, dtype=w.dtype)
    q = torch.randn(B, cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, attn.head_dim)
    kv = torch.randn(B, cfg.num_key_value_heads, T, attn.head_dim)

    def step():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                F.linear(x, lin.weight)
            F.linear(x, a.o_proj.weight), F.linear(mid, m.down_proj.weight)
            torch.matmul(torch.matmul(q, kv.transpose(-1, -2)), kv)
        F.linear(x, w)
    with torch.inference_mode():
        step()
        return timed(step, 10)


def module_at(rev, name):
    """Module `name` (agent, engine: files that import nothing of this project) as it was at revision `rev`."""
    src = subprocess.run(["git", "show", f"{rev}:{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    path = Path(tempfile.mkdtemp()) / f"{name}_before.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location(f"{name}_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(name, args):
    kw = train.DEFAULTS["tiny"] if name == "tiny" else {}
    model, tok = agent.load_model(name, dtype=torch.bfloat16, **kw)
    system = common.prompt_settings(name).get("system", name not in ("tiny",) and "model" not in name)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n{name} ({n_params:.1f}M parameters, bf16, {torch.get_num_threads()} threads), {args.new} new tokens/row")
    print(f"{'batch':>6}{'prompt':>8} | {'lean':>7}{'compiled':>9}{'HF fwd':>8}{'before':>8}{'HF gen':>8}"
          f"{'raw step':>10}{'floor':>8}  tokens/s | lean / before, compiled / before")
    before = module_at(args.before, "agent").generate
    stop = ("</action>",)
    for B in args.batches:
        ids = prompts(tok, B, args.prompt, system=system)
        gen = dict(max_new_tokens=args.new, temperature=1.0, stop=stop, batch_size=B, seed=0)
        rate = {"compiled": math.nan}
        runs = [("lean", engine.generate, ("llama", "qwen2")), ("hf", engine.generate, ()), ("before", before, ())]
        for label, fn, types in runs + ([("compiled", engine.generate, ("llama", "qwen2"))] if args.compile else []):
            engine.LEAN_TYPES, engine.COMPILE = types, label == "compiled"
            if engine.COMPILE:
                engine.warm_up(model, tok)
            fn(model, tok, ids[:2], **dict(gen, max_new_tokens=4))                    # warm-up
            n = sum(len(g.token_ids) for g in fn(model, tok, ids, **gen))
            rate[label] = n / timed(lambda: fn(model, tok, ids, **gen), args.repeats)
        engine.COMPILE = False
        T = max(map(len, ids))
        x = torch.tensor([[tok.pad_token_id] * (T - len(p)) + p for p in ids])
        mask = (x != tok.pad_token_id).long()
        torch.manual_seed(0)
        hf = timed(lambda: model.generate(x, attention_mask=mask, max_new_tokens=args.new, do_sample=True, top_k=0,
                                          stop_strings=list(stop), tokenizer=tok, pad_token_id=tok.pad_token_id), 1)
        raw, floor = raw_step(model, ids, args.new), matmul_floor(model, B, T + args.new // 2)
        print(f"{B:>6}{T:>8} | {rate['lean']:>7.0f}{rate['compiled']:>9.0f}{rate['hf']:>8.0f}{rate['before']:>8.0f}"
              f"{B * args.new / hf:>8.0f}{B / raw:>10.0f}{B / floor:>8.0f}          | "
              f"{rate['lean'] / rate['before']:.2f}x, {rate['compiled'] / rate['before']:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny"],
                    help="tiny (the main job's shape, untrained), smollm2, or trained model directories")
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--prompt", type=int, default=0, help="pad prompts to at least this many tokens")
    ap.add_argument("--new", type=int, default=190, help="new tokens per row (a d=1 Sokoban trace is about 190)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the lean step through torch.compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before", default="109ae41", help="the git revision whose agent.generate is 'before'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
