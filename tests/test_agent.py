"""agent.py: tokenizer, response format, prompts, episodes (with fresh sampling noise at every turn)."""
import random

import pytest
import torch

import agent
import engine
from agent import Parsed, Plan, format_response, parse_response

torch.set_num_threads(1)   # 2 shared cores: one thread avoids oversubscription stalls
RULES = "Toy rules: reach position 3 with actions Inc or Dec."


class CounterEnv:
    """A minimal protocol env: a counter that must reach 3; anything but Inc/Dec is an invalid step."""
    name, task, task_type, rules = "counter", "Reach 3.", "count", RULES

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
    g1 = engine.generate(model, tok, ["abc"], max_new_tokens=8, temperature=0)
    g2 = engine.generate(m2, t2, ["abc"], max_new_tokens=8, temperature=0)
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


def test_quitting_early_does_not_pay_with_the_cap_return():
    quit_, tried = agent.episode_return(1, False), agent.episode_return(10, False)
    assert quit_ > tried                                    # the paper's return rewards a false "complete"
    assert agent.episode_return(1, False, cap=10) == agent.episode_return(10, False, cap=10) == pytest.approx(-0.9)
    assert agent.episode_return(3, True, cap=10) == pytest.approx(9.8)   # successes are unchanged


# ---------------------------------------------------------------------------------------------- prompts
def test_build_prompt(tiny):
    _, tok = tiny
    env = CounterEnv()
    env.reset(0)
    hist = [("Inc", "at 1"), ("Dec", "at 0"), ("Inc", "at 1")]
    obs = hist[-1][1]                       # in play the last action's observation is the current one
    full = agent.build_prompt(tok, env, hist, obs, history_k=-1)
    assert full.startswith("<|im_start|>system\n" + RULES) and "<action>ACTION</action>" in full
    assert full.endswith("Current observation:\nat 1\n\nActions: Inc, Dec<|im_end|>\n<|im_start|>assistant\n")
    assert "Task: Reach 3." in full and "Previous steps:\n> Inc\nat 1\n> Dec\nat 0\n> Inc\n\nCurrent" in full
    last = agent.build_prompt(tok, env, hist, obs, history_k=1, system=False)
    assert last.startswith("<|im_start|>user\nTask: Reach 3.") and RULES not in last
    assert "Previous steps:\n> Inc\n\nCurrent observation:\nat 1" in last
    assert last.count("at 1") == 1          # the current observation is not repeated as history
    assert "Previous" not in agent.build_prompt(tok, env, hist, obs, history_k=0)
    assert "action only" in agent.build_prompt(tok, env, [], obs, action_only=True)
    with pytest.raises(ValueError):
        agent.build_prompt(tok, env, hist, obs, history_k=-2)


# ---------------------------------------------------------------------------------------------- episodes
def _scripted(monkeypatch, tok, script):
    """Replace generate with a policy script(prompt_text) -> response text; tokens are the text's bytes."""
    def fake(model, tokenizer, prompts, **kw):
        out = []
        for p in prompts:
            text = script(tokenizer.decode(p))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(engine.Generation(ids, [-0.5] * len(ids), text, "stop"))
        return out
    monkeypatch.setattr(engine, "generate", fake)


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
    made = [CounterEnv(), CounterEnv(), CounterEnv(max_steps=2)]
    eps = agent.run_episodes(None, tok, made, [0, 1, 0], gen_kwargs={}, history_k=-1)
    e0, e1, e2 = eps
    assert [t.action for t in e0.turns] == ["Inc", None, "Inc", "Inc"]
    assert [t.valid for t in e0.turns] == [True, False, True, True]
    assert [t.obs for t in e0.turns] == ["at 0", "at 1", "at 1", "at 2"]
    assert e0.success and e0.steps == 4 and e0.ret == pytest.approx(9.7) and e0.turns[-1].done
    assert e1.success and e1.steps == 3 and e1.seed == 1 and e1.env_name == "counter" and e1.task_type == "count"
    assert not e2.success and e2.steps == 2 and e2.ret == pytest.approx(-0.1) and e2.max_steps == 2
    assert e0.invalid == 1 and e0.turns[0].refine_prompt_ids is None
    assert len(calls) == 4 + 3 + 2        # lockstep: finished envs get no more prompts
    t = e0.turns[1]
    assert tok.decode(t.prompt_ids) == calls[3] and t.text == "garbage" and t.response_ids == list(b"garbage")


def test_every_turn_draws_fresh_noise(tiny):
    """An untrained model's Sokoban answers are invalid, so its prompt repeats turn after turn; with one
    sampling stream that advances, the answers still differ (a generator re-seeded per call repeats them)."""
    import sokoban
    model, tok = tiny
    env = sokoban.make_env("id", max_steps=6)
    ep, = agent.run_episodes(model, tok, [env], [1_000_000], system=False, seed=3,
                             gen_kwargs=dict(max_new_tokens=12, temperature=1.0))
    prompts = {tuple(t.prompt_ids) for t in ep.turns}
    assert ep.steps == 6 and len(prompts) == 1 and not any(t.valid for t in ep.turns)
    assert len({tuple(t.response_ids) for t in ep.turns}) == 6


def test_greedy_episodes_decode_each_prompt_once(tiny, monkeypatch):
    """Greedy play answers a repeated prompt from memory: two episodes of one seed, looping on invalid answers
    for 6 turns, decode one prompt once (every turn decoded it before) and take the turns they took before."""
    import sokoban
    model, tok = tiny
    rows, real = [], engine.generate

    def counting(model, tokenizer, prompts, **kw):
        rows.extend(tuple(p) for p in prompts)
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(engine, "generate", counting)
    made = [sokoban.make_env("id", max_steps=6) for _ in range(2)]
    eps = agent.run_episodes(model, tok, made, [1_000_000] * 2, system=False,
                             gen_kwargs=dict(max_new_tokens=12, temperature=0.0))
    assert [ep.steps for ep in eps] == [6, 6] and len(rows) == len(set(rows)) == 1
    first = real(model, tok, [list(rows[0])], max_new_tokens=12, temperature=0.0)[0]
    assert all(t.response_ids == first.token_ids and t.text == first.text for ep in eps for t in ep.turns)


def test_run_episodes_tiny_model(tiny):
    model, tok = tiny
    made = [CounterEnv(max_steps=3) for _ in range(3)]
    eps = agent.run_episodes(model, tok, made, [0, 1, 2], history_k=2, system=False,
                             gen_kwargs=dict(max_new_tokens=12, temperature=1.0))
    for ep in eps:
        assert ep.steps == len(ep.turns) == 3 and not ep.success   # random bytes: all invalid
        for t in ep.turns:
            assert len(t.response_ids) <= 12 and not t.valid and t.action is None
            assert tok.decode(t.prompt_ids).endswith("<|im_start|>assistant\n")


def test_run_episodes_on_sokoban(tiny, monkeypatch):
    import sokoban
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


def test_a_prompt_with_nothing_but_the_observation_is_the_observation(tiny):
    import sokoban
    _, tok = tiny
    env = sokoban.make_env("id")
    obs = env.reset(1_000_000)
    assert agent.build_messages(env, [], obs, system=False) == [{"role": "user", "content": obs}]
    assert "Current observation:" in agent.build_prompt(tok, env, [("Up", obs)], obs, history_k=1, system=False)


class ClosedCounterEnv(CounterEnv):
    """CounterEnv with a closed command list, as ALFWorld lists its admissible commands (valid_actions, admits)."""
    def __init__(self, order=("Inc", "Dec"), **kw):
        super().__init__(**kw)
        self.order = list(order)

    def valid_actions(self):
        return list(self.order)

    def admits(self, action):
        return action in ("Inc", "Dec")   # step's own rule


def test_admit_puts_the_likeliest_admissible_command_in_the_action_slot(tiny):
    model, tok = tiny
    env = ClosedCounterEnv()
    env.reset(0)
    prompt = agent.encode(tok, agent.build_prompt(tok, env, [], env.render()))
    text = format_response([Plan(["Jump"], ["at 9"], 0.5)], 0, "Jump")
    ids = agent.encode(tok, text)
    gen = engine.Generation(ids, [-0.5] * len(ids), text, "stop")
    head = text[:text.rindex("<action>") + len("<action>")]
    keep = agent.encode(tok, head)

    def score(c):   # a full forward of prompt + the model's reasoning + the command
        tail = agent.encode(tok, c + "</action>")
        lp = torch.log_softmax(model(torch.tensor([prompt + keep + tail])).logits[0, :-1].float(), -1)
        return sum(lp[len(prompt + keep) - 1 + j, t].item() for j, t in enumerate(tail))
    best = max(["Inc", "Dec"], key=score)
    for order in (("Inc", "Dec"), ("Dec", "Inc")):   # the model's choice, not the list's first
        got = agent.admit(model, tok, ClosedCounterEnv(order), prompt, gen)
        assert parse_response(got.text).action == best and got.replaced == "Jump" and got.text.startswith(head)
        assert got.token_ids == keep + agent.encode(tok, best + "</action>") and tok.decode(got.token_ids) == got.text
    ok = engine.Generation(*[agent.encode(tok, "<action>Dec</action>")] * 2, "<action>Dec</action>", "stop")
    assert agent.admit(model, tok, env, prompt, ok) is ok          # an admitted action stays
    bare = engine.Generation(ids[:5], ids[:5], text[:5], "length")
    assert agent.admit(model, tok, env, prompt, bare) is bare       # no action to replace: stays invalid


def test_run_episodes_with_admissible_never_plays_a_rejected_action(tiny, monkeypatch):
    model, tok = tiny
    _scripted(monkeypatch, tok, lambda p: format_response([Plan(["Jump"], ["at 9"], 0.5)], 0, "Jump"))
    for admissible in (False, True):
        ep, = agent.run_episodes(model, tok, [ClosedCounterEnv(max_steps=3)], [0], gen_kwargs={}, admissible=admissible)
        assert [t.valid for t in ep.turns] == [admissible] * 3
        assert [t.replaced for t in ep.turns] == (["Jump"] * 3 if admissible else [None] * 3)
        assert all(t.action in ("Inc", "Dec") for t in ep.turns) == admissible
