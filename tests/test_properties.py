"""Property-based tests: whatever a model writes (random bytes, no tags, half tags, thousands of tokens), reading
it never raises and stepping any environment with it is at worst an invalid step."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent
import envs

TAGS = ["<think>", "</think>", "<action>", "</action>", "Plan 1:", "> ", "Value: ", "Best: Plan 2", "\n",
        '{"action_type": "click", "index": ', "}", "nan", "-1e999"]
# text built from the format's own pieces and arbitrary characters: reaches the parser's corners
pieces = st.lists(st.one_of(st.sampled_from(TAGS), st.text(max_size=30)), max_size=40).map("".join)
outputs = st.one_of(st.text(), pieces, st.binary().map(lambda b: b.decode("utf-8", "replace")),
                    st.text(min_size=1, max_size=3).map(lambda s: s * 4000))   # thousands of tokens
settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("ci")


@given(outputs)
def test_parse_response_never_raises_and_takes_the_last_action(text):
    parsed = agent.parse_response(text)
    assert parsed.action is None or isinstance(parsed.action, str)
    assert all(p.value is None or p.value == p.value for p in parsed.plans)     # no NaN values
    assert parsed.best is None or parsed.best >= 0
    wrapped = agent.parse_response(text + "<action> Left </action>")
    assert wrapped.action == "Left"


@given(st.lists(st.integers(min_value=0, max_value=255), max_size=600))
def test_random_token_ids_decode_and_parse(ids):
    tok = agent.load_model("tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, intermediate_size=64)[1]
    text = tok.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)
    agent.parse_response(text)


@pytest.fixture(scope="module", params=["sokoban", "android", pytest.param("alfworld", marks=pytest.mark.slow)])
def env(request):
    return envs.make_env(request.param, "train")


@given(text=outputs)
def test_any_output_is_at_worst_an_invalid_step(env, text):
    env.reset(envs.split_seeds("train", 1)[0])      # every example starts from the same fresh episode
    action = agent.parse_response(text).action
    obs, reward, done, info = env.step(action if action is not None else text)
    assert isinstance(obs, str) and isinstance(reward, float) and isinstance(done, bool)
    assert isinstance(info["action_is_valid"], bool) and isinstance(info["success"], bool)
    if env.name == "sokoban" and action is None:
        assert info["action_is_valid"] == (text.strip().lower() in ("up", "down", "left", "right"))
    if env.name == "android" and not info["action_is_valid"]:
        assert obs.strip(), "an invalid step says what was wrong"
    assert set(info) == {"success", "action_is_valid"}    # exactly the protocol's keys, plain data
    json.dumps(info)
