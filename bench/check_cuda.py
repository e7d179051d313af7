"""The GPU checks, in one run (CI has no GPU): the generation loop on CUDA against Hugging Face, its speed there,
and the two stages end to end on CUDA.

    python bench/check_cuda.py            # on a machine with a GPU; exits 1 if a check fails

1. tiny Qwen2 (float32): engine.generate greedy == Hugging Face's greedy, lean step and fallback, rows ending
   on EOS / stop strings at different steps; sampled tokens' log-probs == a full forward's; a CUDA generator.
2. a random Llama of SmolLM2-135M's shape (bf16): lean greedy vs Hugging Face's greedy (share of identical
   rows; bf16 kernels differ) and tokens/s of lean / fallback / model.generate at batch 32 and 128.
3. allsum and allreduce_grads in a one-rank NCCL group: one GPU cannot hold
   two NCCL ranks, so this checks what NCCL accepts (CUDA tensors), not a sum over ranks.
4. train.py --stage resim, then --stage dyna_grpo, device=cuda, on a toy budget.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import agent  # noqa: E402
import common  # noqa: E402
import engine  # noqa: E402
import train  # noqa: E402

FAILED = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def hf_greedy(model, ids, n, eos):
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def tiny_checks():
    model, tok = agent.load_model("tiny", dtype=torch.float32, device="cuda")
    prompts = ["hi there", "a", "a much longer prompt " * 6, "xyz √√ 123", "the quick brown fox"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    free = [hf_greedy(model, p, 40, [tok.eos_token_id]) for p in ids]
    eos = [tok.eos_token_id, free[0][17]]
    stop = (tok.decode(free[1][9:12]),)
    model.generation_config.eos_token_id = eos
    ref = [hf_greedy(model, p, 40, eos) for p in ids]
    for lean in (("llama", "qwen2"), ()):
        engine.LEAN_TYPES = lean
        out = engine.generate(model, tok, ids, max_new_tokens=40, temperature=0, stop=stop)
        same = 0
        for r, g in zip(ref, out):
            cut = next((k + 1 for k in range(len(r)) if r[k] in eos or any(s in tok.decode(r[:k + 1]) for s in stop)),
                       len(r))
            same += g.token_ids == r[:cut]
        check(f"tiny greedy == HF ({'lean' if lean else 'fallback'})", same == len(ids), f"{same}/{len(ids)} rows")
    engine.LEAN_TYPES = ("llama", "qwen2")
    model.generation_config.eos_token_id = tok.eos_token_id
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = engine.generate(model, tok, ids, max_new_tokens=24, temperature=0.8, stop=(), generator=gen)
    worst = 0.0
    for p, g in zip(ids, out):
        x = torch.tensor([p + g.token_ids], device="cuda")
        with torch.no_grad():
            lp = (model(x).logits[0, len(p) - 1:-1].float() / 0.8).log_softmax(-1)
        ref_lp = lp.gather(-1, torch.tensor(g.token_ids, device="cuda")[:, None]).squeeze(-1).cpu()
        worst = max(worst, float((ref_lp - torch.tensor(g.logprobs)).abs().max()))
    check("tiny sampled log-probs == full forward", worst < 1e-3, f"max diff {worst:.2e}")


def smol_shape_checks():
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    _, tok = agent.load_model("tiny")           # only token ids travel: any tokenizer decodes the stop check
    ids = [torch.randint(3, 255, (n,)).tolist() for n in torch.randint(200, 400, (32,)).tolist()]
    out = engine.generate(model, tok, ids, max_new_tokens=32, temperature=0, stop=())
    same = sum(g.token_ids == hf_greedy(model, p, 32, [2])[:len(g.token_ids)] for p, g in zip(ids, out))
    check("SmolLM2-shaped bf16 greedy vs HF", same >= 0.75 * len(ids), f"{same}/{len(ids)} rows identical")
    for B in (32, 128):
        batch = [ids[i % len(ids)] for i in range(B)]
        rates = {}
        for label, lean in (("lean", ("llama", "qwen2")), ("fallback", ())):
            engine.LEAN_TYPES = lean
            engine.generate(model, tok, batch[:2], max_new_tokens=4, stop=())
            torch.cuda.synchronize()
            t = time.perf_counter()
            n = sum(len(g.token_ids) for g in engine.generate(model, tok, batch, max_new_tokens=128, stop=(), seed=0))
            torch.cuda.synchronize()
            rates[label] = n / (time.perf_counter() - t)
        T = max(map(len, batch))
        x = torch.tensor([[2] * (T - len(p)) + p for p in batch], device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(x, attention_mask=(x != 2).long(), max_new_tokens=128, min_new_tokens=128, do_sample=True,
                       top_k=0, pad_token_id=2)
        torch.cuda.synchronize()
        rates["hf generate"] = B * 128 / (time.perf_counter() - t)
        print(f"  batch {B}: " + ", ".join(f"{k} {v:.0f} tokens/s" for k, v in rates.items()))
    engine.LEAN_TYPES = ("llama", "qwen2")


def nccl_checks():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:    # world=2 below makes each helper take its collective path; the group itself has one rank
        check("nccl allsum", common.allsum(2.5, 2) == 2.5 and common.allsum(3.0, 2, op="max") == 3.0)
        model = torch.nn.Linear(4, 2).cuda()
        model(torch.ones(3, 4, device="cuda")).sum().backward()
        before = model.weight.grad.clone()
        common.allreduce_grads(model, 2)
        check("nccl allreduce_grads", torch.equal(model.weight.grad, before))
    finally:
        torch.distributed.destroy_process_group()


def stage_checks():
    out = Path(tempfile.mkdtemp())
    small = ["device=cuda", "tiny.hidden_size=64", "tiny.num_hidden_layers=2", "tiny.num_attention_heads=2",
             "tiny.num_key_value_heads=1", "tiny.intermediate_size=128", "max_new_tokens=48",
             "env_kwargs={max_steps: 4}", "eval.id=8", "eval.ood=4"]
    r = train.main(["--stage", "resim", f"out_dir={out / 'r'}", "resim.episodes=200", "sft.epochs=2"] + small)
    check("resim stage on CUDA", "id" in r, f"ID success {r['id']['success']:.2f}")
    r = train.main(["--stage", "dyna_grpo", f"out_dir={out / 'd'}", f"init_from={out / 'r' / 'model'}",
                    "rl.steps=2", "rl.tasks=2", "rl.group=4"] + small)
    check("dyna_grpo stage on CUDA", "id" in r, f"ID success {r['id']['success']:.2f}")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    for part in (tiny_checks, smol_shape_checks, nccl_checks, stage_checks):
        try:
            part()
        except Exception as e:   # report every part, then fail
            check(part.__name__, False, f"{type(e).__name__}: {e}")
    raise SystemExit(1 if FAILED else 0)
