"""The hand-written batched generation loop (nanochat's Engine, in spirit): prefill the prompts, then decode one
token per step for every live row, sampling with a generator the caller owns.

    gens = generate(model, tokenizer, prompts, max_new_tokens=320, temperature=1.0, generator=g)

Why it is fast. A decode step of a small model is bound by per-step overhead, not by arithmetic: Hugging Face's
forward re-concatenates the whole KV cache every step and runs a flash-attention kernel built for long queries
(about 30 ms a step at batch 128 for a 3M model whose matrix products take 1.3 ms). For Llama / Qwen2 models
`LeanDecoder` runs the model's own weights through a lean decode step instead: a KV cache preallocated once and
written in place, attention as two batched matrix products over the filled part, and no per-row Python work
except for rows whose newest token could complete a stop string. Any other model falls back to Hugging Face's
forward with a DynamicCache (said once per model type). Prefill uses Hugging Face's forward either way; with
the lean step, a prefix every prompt shares (the system prompt) is prefilled once, not once per row.
COMPILE (train.py's decode_compile) runs the lean step through torch.compile (LeanDecoder says what it costs).
LeanForward runs the same layers over whole sequences, with gradients: train.py's compiled SFT forward.
"""
import functools
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutput

# model families whose decoder layer LeanDecoder reproduces (DYNAMIND_LEAN=0: always Hugging Face's forward)
LEAN_TYPES = () if os.environ.get("DYNAMIND_LEAN") == "0" else ("llama", "qwen2")
COMPILE = os.environ.get("DYNAMIND_COMPILE") == "1"   # torch.compile the lean step (also train.py's decode_compile)
SHARE_MIN = 32                    # lean prefill: a prefix all prompts share is computed once from this many tokens
COMPACT_AT = 0.75                 # lean: drop finished rows once they are a quarter of the batch (a copy)
PAD_SLACK = 0.1                   # prefill: a group of rows pads at most this share of its real tokens
_SAID = set()                     # model types whose fallback was already reported


@dataclass
class Generation:
    token_ids: list     # sampled tokens: a stop string's tokens are kept, and so is the EOS that ended the row
    logprobs: list      # log-prob of each token under the distribution it was sampled from
    text: str           # the decoded tokens, EOS left out
    finish_reason: str  # "stop" | "eos" | "length"
    replaced: str = None  # agent.admit only: the generated action it replaced with an admissible one


def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=("</action>",),
             generator=None, seed=None, batch_size=256, prefill_group=32):
    """Sample a response for each prompt (text or token ids). A row ends on a stop string, on EOS or after
    max_new_tokens. Noise comes from `generator` (a torch.Generator the caller advances across calls, so no two
    calls share noise), else from a fresh one seeded with `seed`, else from torch's global generator.
    batch_size: rows decoded together; prefill_group: at most this many rows of similar length prefilled
    together (prefill_groups)."""
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


def _logprobs(logits, temperature, top_p):
    """Log-probs of the distribution tokens are drawn from: softmax(logits / T), cut to the top-p nucleus and
    renormalised; temperature 0 = greedy (the plain softmax, drawn by argmax)."""
    logits = logits.float()
    if temperature == 0:
        return logits.log_softmax(-1)
    lp = (logits / temperature).log_softmax(-1)
    if top_p < 1.0:  # keep the smallest prefix of sorted tokens whose mass reaches top_p, renormalise
        slp, idx = lp.sort(-1, descending=True)
        p = slp.exp()
        slp[(p.cumsum(-1) - p) >= top_p] = -math.inf
        lp = torch.full_like(lp, -math.inf).scatter(-1, idx, slp).log_softmax(-1)
    return lp


def _draw(probs, temperature, gen):
    return probs.argmax(-1) if temperature == 0 else _categorical(probs, gen)


def _sample(logits, temperature, top_p, gen):
    """Next tokens and their log-probs under the (temperature, top-p) distribution; temperature 0 = greedy."""
    lp = _logprobs(logits, temperature, top_p)
    tok = _draw(lp.exp(), temperature, gen)
    return tok, lp.gather(-1, tok[:, None]).squeeze(-1)


def _categorical(probs, gen):
    """One draw per row by inverting the CDF: B uniforms instead of multinomial's B x V exponentials (the same
    distribution; "right" never lands on a zero-probability token)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=gen, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


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


# ---- decoders: step(tokens, positions, cache column) -> next-token logits; select(rows) keeps those rows

class LeanDecoder:
    """A Llama / Qwen2 decode step over a KV cache preallocated once and written in place at column t: the
    model's own weights and operations, without the overhead.
    - Keys are kept transposed ([B, H_kv, D, T]; values [B, H_kv, T, D]), so the scores q @ K[..., :W] read the
      filled columns in place: K[:, :, :W].transpose would make matmul copy the whole filled cache every step.
    - q, k, v run as one matrix product (their weights concatenated once per generate call); so do gate and up.
    - RoPE is one complex multiplication: the q and k rows of each head are reordered so that the pairs
      RoPE rotates together ((i, i + D/2), rotate_half's pairs) sit side by side. Attention scores are dot
      products within a head, which the same reordering of q and k leaves unchanged; prefill keys are reordered
      as they are copied in.
    - Every row writes the same cache column at a step (prompts are left-padded to one length and every row
      advances one column), so the step takes that column as a number.
    - COMPILE: the layers run through torch.compile: one graph for every batch size above one and every cache
      length (a batch of one gets its own), in which inductor fuses the norms, RoPE, softmax and activations that
      otherwise cost a call each. On this project's 2-core CPU: 1.2-1.4x faster steps for the main job's model,
      about 30 s to compile it once per process (70 s on one thread); SmolLM2's 30 layers take 3 min for 1.2x.
      Worth it where one process decodes for long (RL; RESULTS.md, Speed).
    - Attention runs in float32 even for a bf16 model: on CPUs, batched bf16 products of these shapes are
      2-4x slower than float32 ones, and float32 is the more exact."""

    def __init__(self, model, batch, length):
        self.base, self.head = model.model, model.lm_head
        attn = self.base.layers[0].self_attn
        self.hkv, self.d, self.scale = model.config.num_key_value_heads, attn.head_dim, attn.scaling
        self.nq = model.config.num_attention_heads * self.d
        w = self.head.weight
        self.k = [w.new_zeros((batch, self.hkv, self.d, length), dtype=torch.float32) for _ in self.base.layers]
        self.v = [w.new_zeros((batch, self.hkv, length, self.d), dtype=torch.float32) for _ in self.base.layers]
        self.mask = w.new_full((batch, length), -math.inf, dtype=torch.float32)   # additive: 0 where a key is real
        d = self.d
        self.pair = torch.arange(d, device=w.device).view(2, d // 2).t().flatten()   # 0, D/2, 1, D/2 + 1, ...
        self.qkv = [self._fused(l.self_attn) for l in self.base.layers]
        self.gate_up = [_cat(l.mlp.gate_proj, l.mlp.up_proj) for l in self.base.layers]
        cos, sin = self.base.rotary_emb(w.new_zeros(1, dtype=torch.float32), torch.arange(length, device=w.device)[None])
        self.rot = torch.complex(cos[0, :, :d // 2], sin[0, :, :d // 2])            # [positions, D/2]

    def _fused(self, a):
        """[q; k; v] weights (and biases) with the q and k rows of each head in RoPE pair order."""
        nkv = self.hkv * self.d
        rows = torch.cat([(torch.arange(0, self.nq + nkv, self.d, device=self.pair.device)[:, None] + self.pair).flatten(),
                          torch.arange(self.nq + nkv, self.nq + 2 * nkv, device=self.pair.device)])
        w, b = _cat(a.q_proj, a.k_proj, a.v_proj)
        return w[rows], None if b is None else b[rows]

    def fill(self, rows, cache, start):
        """Copy a prefill cache (Hugging Face layers, rows `rows`) into columns start.. of the preallocated one."""
        for i, layer in enumerate(cache.layers):
            n = layer.keys.shape[2]
            self.k[i][rows, :, :, start:start + n] = layer.keys[..., self.pair].transpose(-1, -2).to(self.k[i].dtype)
            self.v[i][rows, :, start:start + n] = layer.values.to(self.v[i].dtype)

    def step(self, tokens, pos, col):
        """tokens [B] at RoPE positions pos, written to cache column col (an int). Returns next-token logits [B, V]."""
        self.mask[:, col] = 0.0
        forward = _compiled_forward() if COMPILE else LeanDecoder._forward
        return forward(self, tokens, torch.view_as_real(self.rot[pos])[:, None, None], col)   # [B, 1, 1, D/2, 2]

    def _forward(self, tokens, rot, col):
        """The model's layers for one token per row. The new key and value are written as the slice col:col+1
        (an index would make torch.compile specialise on col and recompile every step). generate's cache always
        has a column more than it fills (W < cache length): a full cache would be one more graph to compile."""
        B, d, hkv, nq, W = len(tokens), self.d, self.hkv, self.nq, col + 1
        bias = self.mask[:, None, None, :W]                                     # [B, 1, 1, W]: 0 where a key is real
        x = self.base.embed_tokens(tokens)
        for i, layer in enumerate(self.base.layers):
            qkv = F.linear(_rms_norm(x, layer.input_layernorm), *self.qkv[i]).float()   # [B, q + k + v]
            q = _rope(qkv[:, :nq].view(B, hkv, -1, d), rot)                       # [B, H_kv, heads per kv head, D]
            self.k[i][..., col:W].copy_(_rope(qkv[:, nq:nq + hkv * d].view(B, hkv, 1, d), rot).transpose(-1, -2))
            self.v[i][:, :, col:W].copy_(qkv[:, nq + hkv * d:].view(B, hkv, 1, d))
            s = torch.matmul(q, self.k[i][..., :W]) * self.scale + bias
            o = torch.matmul(s.softmax(-1), self.v[i][:, :, :W]).reshape(B, nq).to(x.dtype)
            a, mlp = layer.self_attn, layer.mlp
            x = x + F.linear(o, a.o_proj.weight, a.o_proj.bias)
            gate, up = F.linear(_rms_norm(x, layer.post_attention_layernorm), *self.gate_up[i]).chunk(2, dim=-1)
            x = x + F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        return self.head(_rms_norm(x, self.base.norm))

    def select(self, rows):
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.mask = self.mask.index_select(0, rows)


# ---- the same layers over whole sequences, with gradients: the compiled SFT forward (train.compiled) ---------

class LeanForward:
    """Called like the model on right-padded ids [B, T] with logits_to_keep [B, L] (positions, as
    grpo.response_logprobs calls it), returns the logits of those positions with gradients to the model's own
    weights: Hugging Face's forward, the overhead left out, compiled for fixed shapes. On this project's 2-core
    CPU, main job's SFT steps of 16 x 256 tokens: 0.238 s against 0.281 s for the compiled Hugging Face forward
    and 0.342 s uncompiled, and half the compile time (bench/bench_sft.py, RESULTS.md, Speed). Where it gains:
    - RoPE's cos / sin and the causal mask are tables made once per length, outside the graph (from the Hugging
      Face forward, inductor recomputes cos and sin inside the kernel, for every element of every head, and
      builds the mask from int64 comparisons);
    - attention runs in float32 (batched bf16 products of these shapes are slower on CPUs, LeanDecoder), the
      query heads of one key head stacked into one matrix product against their keys, with no copies of K / V."""

    def __init__(self, model):
        self.model, self.tables = model, {}
        self.forward = torch.compile(_lean_logits, dynamic=False)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, input_ids, logits_to_keep, use_cache=False):
        tables = self.table(input_ids.shape[1], input_ids.device)
        return CausalLMOutput(logits=self.forward(self.model, input_ids, logits_to_keep, *tables))

    def table(self, T, dev):
        """cos, sin [T, D] and the causal mask of the stacked heads [g * T, T], made once per length."""
        if (T, dev) not in self.tables:
            cfg = self.model.config
            g = cfg.num_attention_heads // cfg.num_key_value_heads
            cos, sin = self.model.model.rotary_emb(torch.zeros(1, device=dev), torch.arange(T, device=dev)[None])
            mask = torch.full((T, T), -math.inf, device=dev).triu(1).repeat(g, 1)
            self.tables[T, dev] = (cos[0], sin[0], mask)
        return self.tables[T, dev]


def _lean_logits(model, ids, keep, cos, sin, mask):
    """The decoder layers of a Llama / Qwen2 model over ids [B, T] at positions 0..T-1; logits at keep [B, L]."""
    base, cfg = model.model, model.config
    (B, T), H, hkv = ids.shape, cfg.num_attention_heads, cfg.num_key_value_heads
    x = base.embed_tokens(ids)
    for layer in base.layers:
        a, h = layer.self_attn, _rms_norm(x, layer.input_layernorm)
        d = a.head_dim
        q = _rope_half(a.q_proj(h).view(B, T, H, d).transpose(1, 2).float(), cos, sin)        # [B, H, T, D]
        k = _rope_half(a.k_proj(h).view(B, T, hkv, d).transpose(1, 2).float(), cos, sin)      # [B, H_kv, T, D]
        v = a.v_proj(h).view(B, T, hkv, d).transpose(1, 2).float()
        with torch.autocast(x.device.type, enabled=False):
            s = torch.matmul(q.reshape(B, hkv, -1, d), k.transpose(-1, -2)) * a.scaling + mask   # [B, H_kv, g T, T]
            o = torch.matmul(s.softmax(-1), v).view(B, H, T, d)
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, H * d).to(h.dtype))
        x = x + layer.mlp(_rms_norm(x, layer.post_attention_layernorm))
    x = _rms_norm(x, base.norm)
    return model.lm_head(torch.take_along_dim(x, keep[..., None], dim=1))


def _rope_half(x, cos, sin):
    """Hugging Face's RoPE (rotate_half pairs: i with i + D/2), written on the halves: Hugging Face's form
    (x * cos + rotate_half(x) * sin) compiles to a backward whose key gradients are NaN under bf16 autocast when
    the head is 64 wide (SmolLM2; inductor's vectorised CPU code, torch 2.13: fine with aot_eager or simdlen 0)."""
    h = x.shape[-1] // 2
    x1, x2, c, s = x[..., :h], x[..., h:], cos[..., :h], sin[..., :h]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def _cat(*linears):
    return (torch.cat([l.weight for l in linears]),
            None if linears[0].bias is None else torch.cat([l.bias for l in linears]))


def _rope(x, rot):
    """RoPE on float32 vectors whose rotated pairs are adjacent; rot: (cos, sin) pairs [..., D/2, 2]. One complex
    multiplication (under torch.compile the same product in real arithmetic, which inductor fuses: it has no
    complex kernels)."""
    if torch.compiler.is_compiling():
        x0, x1, c, s = x[..., 0::2], x[..., 1::2], rot[..., 0], rot[..., 1]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)
    z = torch.view_as_complex(x.view(*x.shape[:-1], -1, 2)) * torch.view_as_complex(rot)
    return torch.view_as_real(z).flatten(-2)


def warm_up(model, tokenizer):
    """Compile the lean decode step now (with COMPILE), for 7 rows and for 1 (torch.compile specialises a batch
    of one), so that no timed rollout pays for it. Returns the seconds it took. 7 rows and an 11-token prompt:
    sizes that equal no other dimension of the step, which torch.compile would otherwise tie to the batch."""
    t = time.perf_counter()
    for n in (7, 1):
        generate(model, tokenizer, [list(range(1, 12))] * n, max_new_tokens=2, temperature=0, stop=())
    return time.perf_counter() - t


@functools.cache
def _compiled_forward():
    """LeanDecoder._forward through torch.compile, built once per process (dynamic: batch and width vary)."""
    return torch.compile(LeanDecoder._forward, dynamic=True)


def _rms_norm(x, norm):
    """The model's RMSNorm (Llama / Qwen2), inline: the same operations without a module call."""
    h = x.float()
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def _decode_batch(tokenizer, rows):
    """Token rows -> texts, through the Rust tokenizer when there is one (transformers' batch_decode spends
    more time converting the lists than decoding them)."""
    fast = getattr(tokenizer, "_tokenizer", None)
    return fast.decode_batch(rows, skip_special_tokens=False) if fast is not None else tokenizer.batch_decode(rows)


class HFDecoder:
    """The fallback: Hugging Face's forward with a DynamicCache (any causal LM)."""

    def __init__(self, model, cache, mask):
        self.model, self.cache, self.mask = model, cache, mask

    def step(self, tokens, pos, col):
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


def _shared_prefix(ids):
    """Length of the prefix every prompt shares (a system prompt, the chat template), leaving each row at least
    one token of its own; 0 when it is too short to be worth a forward of its own."""
    n, first = min(map(len, ids)) - 1, ids[0]
    p = next((i for i in range(n) if any(r[i] != first[i] for r in ids)), n)
    return p if len(ids) > 1 and p >= SHARE_MIN else 0


def prefill_groups(lengths, most):
    """Rows in groups for prefill, shortest first: at most `most` rows a group, and a group closes before its
    padding would pass PAD_SLACK of its real tokens. Bigger groups mean fewer, larger forwards (main job's
    model, 128 prompts of 60 tokens, 2 threads: 8-row groups about 300 ms, 32-row about 200), while padding
    is compute spent on nothing (SmolLM2's prompts vary by hundreds of tokens)."""
    groups, cur, real = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if cur and (len(cur) == most or lengths[i] * (len(cur) + 1) > (1 + PAD_SLACK) * (real + lengths[i])):
            groups.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    return groups + [cur] if cur else groups


def _prefill(model, ids, pad_id, group, length):
    """Prefill rows in length-sorted groups (little padding compute) with Hugging Face's forward, and hand their
    caches, left-padded to the longest prompt T, to a decoder. Returns (decoder, logits of the last tokens).
    Lean: the prefix all rows share is prefilled once and each group continues from its cache; a short row's
    cache then has a hole of padding between the prefix and its own tokens, which the decoder's mask hides
    (keys carry their RoPE position, so a key's column does not matter)."""
    dev, T, B = model.device, max(map(len, ids)), len(ids)
    lean = lean_ok(model)
    dec = LeanDecoder(model, B, length) if lean else None
    P = _shared_prefix(ids) if lean else 0
    if P:
        shared = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([ids[0][:P]], device=dev), cache=shared, use_cache=True, logits_to_keep=1)
    logits, kv = torch.empty(B, model.config.vocab_size, device=dev), []
    for rows in prefill_groups([len(p) - P for p in ids], group):
        x, m, p = _left_pad([ids[i][P:] for i in rows], pad_id, len(ids[rows[-1]]) - P, dev)
        if P:   # this group's cache starts as the shared prefix's
            cache = DynamicCache(ddp_cache_data=[(l.keys.expand(len(rows), -1, -1, -1), l.values.expand(
                len(rows), -1, -1, -1)) for l in shared.layers], config=model.config)
            m, p = torch.cat([m.new_ones(len(rows), P), m], 1), p + P
        else:
            cache = DynamicCache(config=model.config)
        out = model(input_ids=x, attention_mask=m, position_ids=p, cache=cache, use_cache=True, logits_to_keep=1)
        logits[rows] = out.logits[:, -1].to(logits.dtype)
        if lean:
            r = torch.tensor(rows, device=dev)
            dec.fill(r, cache, T - m.shape[1])
            dec.mask[r, T - m.shape[1]:T] = torch.where(m.bool(), 0.0, -math.inf)
        else:   # left-pad keys / values to T; the merged mask hides the padding
            pad = T - x.shape[1]
            kv.append((rows, [(F.pad(l.keys, (0, 0, pad, 0)), F.pad(l.values, (0, 0, pad, 0))) for l in cache.layers]))
    if lean:
        return dec, logits
    _, mask, _ = _left_pad(ids, pad_id, T, dev)
    inv = torch.tensor([r for rows, _ in kv for r in rows], device=dev).argsort()
    merged = [(torch.cat([c[li][0] for _, c in kv])[inv], torch.cat([c[li][1] for _, c in kv])[inv])
              for li in range(len(kv[0][1]))]
    return HFDecoder(model, DynamicCache(ddp_cache_data=merged, config=model.config), mask), logits


def _stopped(tokenizer, tail, stop):
    text = _decode_batch(tokenizer, [tail.tolist()])[0]
    return any(x in text for x in stop)


@torch.inference_mode()
def _generate_batch(model, tokenizer, ids, max_new, temperature, top_p, stop, gen, prefill_group):
    """Prefill, then one token per row per step. The bookkeeping is tensor work: EOS by lookup, and only rows
    whose newest token could complete a stop string get their tail decoded. A finished row stays in the batch
    (its tokens past the end are never read) until finished rows are a quarter of it."""
    dev, B, T = model.device, len(ids), max(map(len, ids))
    dec, logits = _prefill(model, ids, tokenizer.pad_token_id, prefill_group, T + max_new)
    eos = torch.tensor(sorted(eos_ids(model, tokenizer)), dtype=torch.long, device=dev)
    cand = stop_tokens(tokenizer, stop).to(dev) if stop else torch.empty(0, dtype=torch.long, device=dev)
    window = 4 * max(map(len, stop), default=0) + 4          # tokens whose text surely holds a stop string
    toks = torch.zeros(B, max_new, dtype=torch.long, device=dev)
    lps = torch.zeros(B, max_new, device=dev)
    length, reason = [max_new] * B, ["length"] * B
    orig = torch.arange(B, device=dev)                       # the original row of each decoder row
    pos = torch.tensor([len(p) for p in ids], device=dev)    # RoPE position of the token fed next
    live = torch.ones(B, dtype=torch.bool, device=dev)       # per decoder row
    at = COMPACT_AT if isinstance(dec, LeanDecoder) else 1.0  # HF's cache is copied every step anyway
    for t in range(max_new):
        nxt, lp = _sample(logits, temperature, top_p, gen)
        toks[orig, t], lps[orig, t] = nxt, lp
        done = dict.fromkeys((live & torch.isin(nxt, eos)).nonzero().flatten().tolist(), "eos")
        for j in (live & torch.isin(nxt, cand)).nonzero().flatten().tolist():
            if j not in done and _stopped(tokenizer, toks[orig[j], max(0, t + 1 - window):t + 1], stop):
                done[j] = "stop"
        for j, why in done.items():
            length[int(orig[j])], reason[int(orig[j])] = t + 1, why
        live[list(done)] = False
        n_live = int(live.sum())
        if n_live == 0 or t + 1 == max_new:
            break
        if n_live < len(live) and n_live <= at * len(live):    # drop finished rows from the batch (a copy)
            keep = live.nonzero().flatten()
            dec.select(keep)
            orig, nxt, pos, live = orig[keep], nxt[keep], pos[keep], live[keep]
        logits = dec.step(nxt, pos, T + t)                  # cache column T + t: the same for every row
        pos = pos + 1
    toks, lps = toks.tolist(), lps.tolist()
    return [Generation(toks[r][:n], lps[r][:n], tokenizer.decode(toks[r][:n - (why == "eos")]), why)
            for r, (n, why) in enumerate(zip(length, reason))]


@torch.no_grad()
def continuation_logprobs(model, prefix, continuations, chunk=16):
    """log p(c | prefix) token by token, a list per continuation c (token id lists): the prefix is run once
    and its KV cache repeated for `chunk` continuations at a time (agent.admit ranks ALFWorld's admissible
    commands this way; running every candidate with the whole prompt would cost 40 prompts a turn)."""
    if not prefix or any(len(c) == 0 for c in continuations):
        raise ValueError("need a non-empty prefix and non-empty continuations")
    dev = next(model.parameters()).device
    past = DynamicCache()
    if len(prefix) > 1:
        model(input_ids=torch.tensor([prefix[:-1]], device=dev), cache=past, use_cache=True, logits_to_keep=1)
    out = []
    for i in range(0, len(continuations), chunk):
        part = continuations[i:i + chunk]
        width = max(map(len, part))
        # each row: the prefix's last token, then the continuation, right-padded (a causal model's logits at a
        # real token never see the padding after it)
        x = torch.tensor([[prefix[-1]] + c + [c[-1]] * (width - len(c)) for c in part], device=dev)
        cache = DynamicCache()
        for n, layer in enumerate(past.layers if len(prefix) > 1 else ()):
            cache.update(layer.keys.expand(len(part), -1, -1, -1).contiguous(),
                         layer.values.expand(len(part), -1, -1, -1).contiguous(), n)
        logp = F.log_softmax(model(input_ids=x, cache=cache, use_cache=True).logits[:, :-1].float(), -1)
        picked = logp.gather(-1, x[:, 1:, None])[..., 0]
        out += [row[:len(c)] for row, c in zip(picked.tolist(), part)]
    return out
