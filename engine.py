"""The hand-written batched generation loop (nanochat's Engine, in spirit): prefill the prompts, then decode one
token per step for every live row, sampling with a generator the caller owns.

    gens = generate(model, tokenizer, prompts, max_new_tokens=320, temperature=1.0, generator=g)

Why it is fast. A decode step of a small model is bound by per-step overhead, not by arithmetic: Hugging Face's
forward re-concatenates the whole KV cache every step and runs a flash-attention kernel built for long queries
(about 30 ms a step at batch 128 for a 3M model whose matrix products take 1.3 ms). For Llama / Qwen2 models
`LeanDecoder` runs the model's own weights through a lean decode step instead: a KV cache preallocated once and
written in place, attention as two batched matrix products over the filled part, and no per-row Python work
except for rows whose newest token could complete a stop string. Any other model falls back to Hugging Face's
forward with a DynamicCache (said once per model type). Prefill uses Hugging Face's forward either way.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

# model families whose decoder layer LeanDecoder reproduces (DYNAMIND_LEAN=0: always Hugging Face's forward)
LEAN_TYPES = () if os.environ.get("DYNAMIND_LEAN") == "0" else ("llama", "qwen2")
COMPACT_AT = 0.75                 # lean: drop finished rows once they are a quarter of the batch (a copy)
_SAID = set()                     # model types whose fallback was already reported


@dataclass
class Generation:
    token_ids: list     # sampled tokens: a stop string's tokens are kept, and so is the EOS that ended the row
    logprobs: list      # log-prob of each token under the distribution it was sampled from
    text: str           # the decoded tokens, EOS left out
    finish_reason: str  # "stop" | "eos" | "length"


def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=("</action>",),
             generator=None, seed=None, batch_size=128, prefill_group=8):
    """Sample a response for each prompt (text or token ids). A row ends on a stop string, on EOS or after
    max_new_tokens. Noise comes from `generator` (a torch.Generator the caller advances across calls, so no two
    calls share noise), else from a fresh one seeded with `seed`, else from torch's global generator.
    batch_size: rows decoded together; prefill_group: rows of similar length prefilled together."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    if any(len(p) == 0 for p in ids):
        raise ValueError("empty prompt")
    if max_new_tokens <= 0:
        return [Generation([], [], "", "length") for _ in ids]
    dev = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for i in range(0, len(ids), batch_size):
        out += _generate_batch(model, tokenizer, ids[i:i + batch_size], max_new_tokens, temperature, top_p, stop,
                               generator, prefill_group)
    return out


def _sample(logits, temperature, top_p, gen):
    """Next tokens and their log-probs under the (temperature, top-p) distribution; temperature 0 = greedy."""
    logits = logits.float()
    if temperature == 0:
        lp = logits.log_softmax(-1)
        tok = lp.argmax(-1)
    else:
        lp = (logits / temperature).log_softmax(-1)
        if top_p < 1.0:  # keep the smallest prefix of sorted tokens whose mass reaches top_p, renormalise
            slp, idx = lp.sort(-1, descending=True)
            p = slp.exp()
            slp[(p.cumsum(-1) - p) >= top_p] = -math.inf
            lp = torch.full_like(lp, -math.inf).scatter(-1, idx, slp).log_softmax(-1)
        tok = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(-1)
    return tok, lp.gather(-1, tok[:, None]).squeeze(-1)


def eos_ids(model, tokenizer):
    e = model.generation_config.eos_token_id
    e = set(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
    return e | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


_STOP_TOKENS = {}


def stop_tokens(tokenizer, stop):
    """Ids of the tokens that can complete a stop string: their text holds a stop string's last character (or
    is a partial UTF-8 byte, or empty). Only rows whose newest token is one of these need their tail decoded."""
    key = (id(tokenizer), stop)
    if key not in _STOP_TOKENS:
        last = {s[-1] for s in stop if s}
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _STOP_TOKENS[key] = torch.tensor([i for i, t in enumerate(texts)
                                          if not t or "\ufffd" in t or any(c in t for c in last)])
    return _STOP_TOKENS[key]


# ---- decoders: step(tokens, positions, t) -> logits of the next token; select(rows) drops the other rows

class LeanDecoder:
    """A Llama / Qwen2 decode step over a KV cache preallocated once ([B, H_kv, T, D] per layer) and written in
    place at column t: the model's own weights and operations, without the overhead. The q, k, v projections
    run as one matrix product (their weights concatenated once per generate call), and so do gate and up;
    RoPE's cos / sin are tabled once. Attention runs in float32 even for a bf16 model: on CPUs, batched bf16
    products of these shapes are 2-4x slower than float32 ones, and float32 is the more exact."""

    def __init__(self, model, batch, length):
        self.base, self.head = model.model, model.lm_head
        attn = self.base.layers[0].self_attn
        self.hkv, self.d, self.scale = model.config.num_key_value_heads, attn.head_dim, attn.scaling
        self.nq = model.config.num_attention_heads * self.d
        w = self.head.weight
        shape = (batch, self.hkv, length, self.d)
        self.k = [w.new_zeros(shape, dtype=torch.float32) for _ in self.base.layers]
        self.v = [w.new_zeros(shape, dtype=torch.float32) for _ in self.base.layers]
        self.mask = w.new_full((batch, length), -math.inf, dtype=torch.float32)   # additive: 0 where a key is real
        cat = lambda *ls: (torch.cat([l.weight for l in ls]),                     # noqa: E731
                           None if ls[0].bias is None else torch.cat([l.bias for l in ls]))
        self.qkv = [cat(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj) for l in self.base.layers]
        self.gate_up = [cat(l.mlp.gate_proj, l.mlp.up_proj) for l in self.base.layers]
        cos, sin = self.base.rotary_emb(w.new_zeros(1, dtype=torch.float32), torch.arange(length, device=w.device)[None])
        self.cos, self.sin = cos[0], sin[0]                                       # [positions, D]

    def fill(self, rows, cache, start):
        """Copy a prefill cache (Hugging Face layers, rows `rows`) into columns start.. of the preallocated one."""
        for i, layer in enumerate(cache.layers):
            n = layer.keys.shape[2]
            self.k[i][rows, :, start:start + n] = layer.keys.to(self.k[i].dtype)
            self.v[i][rows, :, start:start + n] = layer.values.to(self.v[i].dtype)

    def step(self, tokens, pos, t):
        B, d, hkv, nq = tokens.shape[0], self.d, self.hkv, self.nq
        x = self.base.embed_tokens(tokens)
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]    # [B, 1, 1, D]
        self.mask[:, t] = 0.0
        mask = self.mask[:, None, None, :t + 1]
        for i, layer in enumerate(self.base.layers):
            h = layer.input_layernorm(x)
            qkv = F.linear(h, *self.qkv[i]).float()
            q = qkv[:, :nq].view(B, hkv, -1, d)                                   # query heads grouped by kv head
            k = qkv[:, nq:nq + hkv * d].view(B, hkv, 1, d)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            self.k[i][:, :, t] = k[:, :, 0]
            self.v[i][:, :, t] = qkv[:, nq + hkv * d:].view(B, hkv, d)
            s = torch.matmul(q, self.k[i][:, :, :t + 1].transpose(-1, -2)) * self.scale + mask
            o = torch.matmul(s.softmax(-1), self.v[i][:, :, :t + 1]).to(x.dtype)
            a, mlp = layer.self_attn, layer.mlp
            x = x + F.linear(o.reshape(B, -1), a.o_proj.weight, a.o_proj.bias)
            gate, up = F.linear(layer.post_attention_layernorm(x), *self.gate_up[i]).chunk(2, dim=-1)
            x = x + F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        return self.head(self.base.norm(x))

    def select(self, rows):
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.mask = self.mask.index_select(0, rows)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class HFDecoder:
    """The fallback: Hugging Face's forward with a DynamicCache (any causal LM)."""

    def __init__(self, model, cache, mask):
        self.model, self.cache, self.mask = model, cache, mask

    def step(self, tokens, pos, t):
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], 1)
        return self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=pos[:, None],
                          cache=self.cache, use_cache=True).logits[:, -1]

    def select(self, rows):
        self.cache.batch_select_indices(rows)
        self.mask = self.mask.index_select(0, rows)


def lean_ok(model):
    """Whether LeanDecoder reproduces this model's layer; the first time a type cannot, say so once."""
    cfg = model.config
    why = None
    if cfg.model_type not in LEAN_TYPES:
        why = f"model type {cfg.model_type!r}"
    elif "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        why = "sliding-window attention"
    elif any(type(p).__name__ == "DTensor" for p in model.parameters()):
        why = "sharded (FSDP) parameters"
    if why and why not in _SAID:
        _SAID.add(why)
        print(f"engine: {why} has no lean decode step; using Hugging Face's forward (slower)")
    return why is None


def _left_pad(ids, pad_id, T, dev):
    x = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, p in enumerate(ids):
        x[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    x, mask = x.to(dev), mask.to(dev)
    return x, mask, (mask.cumsum(1) - 1).clamp(min=0)   # positions count real tokens only


def _prefill(model, ids, pad_id, group, length):
    """Prefill rows in length-sorted groups (little padding compute) with Hugging Face's forward, and hand their
    caches, left-padded to the longest prompt T, to a decoder. Returns (decoder, logits of the last tokens)."""
    dev, T, B = model.device, max(map(len, ids)), len(ids)
    lean = lean_ok(model)
    dec = LeanDecoder(model, B, length) if lean else None
    order = sorted(range(B), key=lambda i: len(ids[i]))
    logits, kv = torch.empty(B, model.config.vocab_size, device=dev), []
    for g in range(0, B, group):
        rows = order[g:g + group]
        x, m, p = _left_pad([ids[i] for i in rows], pad_id, len(ids[rows[-1]]), dev)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=x, attention_mask=m, position_ids=p, cache=cache, use_cache=True, logits_to_keep=1)
        logits[rows] = out.logits[:, -1].to(logits.dtype)
        if lean:
            dec.fill(torch.tensor(rows, device=dev), cache, T - x.shape[1])
        else:   # left-pad keys / values to T; the merged mask hides the padding
            pad = T - x.shape[1]
            kv.append((rows, [(F.pad(l.keys, (0, 0, pad, 0)), F.pad(l.values, (0, 0, pad, 0))) for l in cache.layers]))
    _, mask, _ = _left_pad(ids, pad_id, T, dev)
    if lean:
        dec.mask[:, :T] = torch.where(mask.bool(), 0.0, -math.inf)
        return dec, logits
    inv = torch.tensor([r for rows, _ in kv for r in rows], device=dev).argsort()
    merged = [(torch.cat([c[li][0] for _, c in kv])[inv], torch.cat([c[li][1] for _, c in kv])[inv])
              for li in range(len(kv[0][1]))]
    return HFDecoder(model, DynamicCache(ddp_cache_data=merged, config=model.config), mask), logits


@torch.inference_mode()
def _generate_batch(model, tokenizer, ids, max_new, temperature, top_p, stop, gen, prefill_group):
    dev, B, T = model.device, len(ids), max(map(len, ids))
    eos = torch.tensor(sorted(eos_ids(model, tokenizer)), device=dev)
    window = 4 * max(map(len, stop), default=0) + 4        # tokens whose text surely holds a stop string's chars
    cand = stop_tokens(tokenizer, stop).to(dev) if stop else None
    dec, logits = _prefill(model, ids, tokenizer.pad_token_id, prefill_group, T + max_new)
    toks = torch.zeros(B, max_new, dtype=torch.long, device=dev)
    lps = torch.zeros(B, max_new, device=dev)
    length, reason = [max_new] * B, ["length"] * B
    orig = torch.arange(B, device=dev)                     # original row of each decoder row
    live = torch.ones(B, dtype=torch.bool, device=dev)     # decoder rows still generating
    pos = torch.tensor([len(p) for p in ids], device=dev)  # RoPE position of the next token
    for s in range(max_new):
        nxt, lp = _sample(logits, temperature, top_p, gen)
        rows = orig[live]
        toks[rows, s], lps[rows, s] = nxt[live], lp[live].float()
        ended = live & torch.isin(nxt, eos)
        for r in orig[ended].tolist():
            length[r], reason[r] = s + 1, "eos"
        if cand is not None:                               # decode a tail only where a stop could have completed
            maybe = (live & ~ended & torch.isin(nxt, cand)).nonzero().flatten()
            tails = tokenizer.batch_decode(toks[orig[maybe], max(0, s + 1 - window):s + 1].tolist())
            for j, tail in zip(maybe.tolist(), tails):
                if any(x in tail for x in stop):
                    ended[j] = True
                    length[int(orig[j])], reason[int(orig[j])] = s + 1, "stop"
        live &= ~ended
        n_live = int(live.sum())
        if n_live == 0 or s == max_new - 1:
            break
        at = COMPACT_AT if isinstance(dec, LeanDecoder) else 1.0   # HF's cache is copied every step anyway
        if n_live < len(live) and n_live <= at * len(live):     # drop finished rows: cache, positions, tokens
            keep = live.nonzero().flatten()
            dec.select(keep)
            orig, nxt, pos, live = orig[keep], nxt[keep], pos[keep], live[keep]
        logits = dec.step(nxt, pos, T + s)
        pos = pos + 1
    eos_set = set(eos.tolist())
    out = []
    for r in range(B):
        t = toks[r, :length[r]].tolist()
        body = t[:-1] if reason[r] == "eos" and t and t[-1] in eos_set else t
        out.append(Generation(t, lps[r, :length[r]].tolist(), tokenizer.decode(body), reason[r]))
    return out
