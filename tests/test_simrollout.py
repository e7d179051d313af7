"""simrollout.py: SimRollout (Algorithm 2) with a scripted policy on a Sokoban corridor, and phase (A)'s samples."""
import pytest
import torch

import agent
import engine
import simrollout
import sokoban
from agent import Plan, format_response

LEVEL = "#######\n#@ $ .#\n#######"          # Right, Right, Right solves it


@pytest.fixture(scope="module")
def tok():
    return agent.load_model("tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2, intermediate_size=64)[1]


def corridor():
    env = sokoban.Sokoban.from_xsb(LEVEL)
    env.reset(0)
    return env


def test_real_futures_are_real_and_restore_the_env():
    env = corridor()
    env.step("Right")
    before, state = env.obs, env.get_state()
    futures = simrollout.real_futures(env, ["Right", "Right", "Up"])
    assert env.obs == before and env.get_state() == state and env.steps == 1
    assert [a for a, _ in futures] == ["Right", "Right"]             # the episode ended after the push home
    twin = corridor()
    twin.step("Right")
    assert [o for _, o in futures] == [twin.step("Right")[0], twin.step("Right")[0]]


def test_extract_plan_starts_with_the_executed_action_and_is_cut_at_d():
    plans = [Plan(["Left", "Up"], ["a", "b"], 0.1), Plan(["Right", "Right", "Right"], ["c", "d", "e"], 0.9)]
    assert simrollout.extract_plan(format_response(plans, 1, "Right"), d=2) == ["Right", "Right"]
    assert simrollout.extract_plan(format_response(plans, 1, "Right"), d=5) == ["Right", "Right", "Right"]
    # the chosen plan does not start with the action the response executes: only the action is run
    assert simrollout.extract_plan(format_response(plans, 0, "Right"), d=5) == ["Right"]
    assert simrollout.extract_plan(format_response(plans, None, "Left"), d=5) == ["Left", "Up"]
    assert simrollout.extract_plan("<action>Down</action>", d=5) == ["Down"]
    assert simrollout.extract_plan("no action at all", d=5) == []


def _script(monkeypatch, tok, draft, refined):
    """generate: prompts that hold a refinement request get `refined`, the others `draft`."""
    calls = []

    def fake(model, tokenizer, prompts, generator=None, **kw):
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            calls.append(text)
            reply = refined if "Real states after your plan" in text else draft
            ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append(engine.Generation(ids, [0.0] * len(ids), reply, "eos"))
        return out
    monkeypatch.setattr(engine, "generate", fake)
    return calls


class _Model:   # simrollout only asks the model for its device
    device = torch.device("cpu")


def test_simrollout_refines_with_real_states_and_follows_the_refined_action(tok, monkeypatch):
    wrong = format_response([Plan(["Left"], ["#######\n#P_X_O#\n#######"], 0.9)], 0, "Left")
    right = format_response([Plan(["Right"], ["#######\n#_PX_O#\n#######"], 0.8)], 0, "Right")
    calls = _script(monkeypatch, tok, wrong, right)
    env = corridor()
    ep, = simrollout.simrollout(_Model(), tok, [env], [0], gen_kwargs={}, d=5, system=False)
    assert ep.success and ep.steps == 3 and [t.action for t in ep.turns] == ["Right"] * 3   # a_ref's action
    t = ep.turns[0]
    s_ref = tok.decode(t.refine_prompt_ids)
    assert wrong in s_ref                                   # the draft is in the refinement prompt ...
    assert "> Left\n#######\n#@_$_.#\n#######".replace("@", "P").replace("$", "X").replace(".", "O") in s_ref
    assert tok.decode(t.prompt_ids) == calls[0]             # ... tau' keeps the plain prompt s_t
    assert tok.decode(t.response_ids[:-1]) == right and t.response_ids[-1] == tok.eos_token_id
    assert len(calls) == 2 * ep.steps


def test_progress_shows_a_bar_of_turns_and_is_off_by_default(tok, monkeypatch, capsys):
    """An ALFWorld simulation step is minutes of SimRollout turns: train.py shows them on rank 0."""
    right = format_response([Plan(["Right"], ["y"], 0.8)], 0, "Right")
    _script(monkeypatch, tok, right, right)
    simrollout.simrollout(_Model(), tok, [corridor()], [0], gen_kwargs={}, system=False)
    assert "SimRollout turns" not in capsys.readouterr().err
    simrollout.simrollout(_Model(), tok, [corridor()], [0], gen_kwargs={}, system=False, progress=True)
    assert "SimRollout turns" in capsys.readouterr().err


def test_plain_rollouts_ride_in_the_drafts_call(tok, monkeypatch):
    """plain=1: the last env plays a plain rollout (its own answer, no refinement) inside the drafts' generate
    call, so a turn costs two sequential calls for both episodes, not three."""
    wrong = format_response([Plan(["Left"], ["x"], 0.9)], 0, "Left")
    right = format_response([Plan(["Right"], ["y"], 0.8)], 0, "Right")
    calls = []
    texts = _script(monkeypatch, tok, wrong, right)
    scripted = engine.generate
    monkeypatch.setattr(engine, "generate", lambda m, t, prompts, **kw: calls.append(len(prompts)) or
                        scripted(m, t, prompts, **kw))
    sim, plain = simrollout.simrollout(_Model(), tok, [corridor(), corridor()], [0, 0], gen_kwargs={}, system=False,
                                       plain=1)
    assert sim.success and sim.steps == 3 and all(t.refine_prompt_ids for t in sim.turns)
    assert plain.steps == 100 and not plain.success                   # it kept its Left answers to the step cap
    assert {t.action for t in plain.turns} == {"Left"} and all(t.refine_prompt_ids is None for t in plain.turns)
    assert calls == [2, 1] * 3 + [1] * 97 and sum("Real states" in x for x in texts) == 3
    assert tok.decode(plain.turns[0].prompt_ids) == tok.decode(sim.turns[0].prompt_ids)   # the same task, same s_0
    with pytest.raises(ValueError, match="plain"):
        simrollout.simrollout(_Model(), tok, [corridor(), corridor()], [0, 0], gen_kwargs={}, plain=3)


def test_simulation_samples_share_a_refs_tokens_and_reward_improvements(tok, monkeypatch):
    right = format_response([Plan(["Right"], ["x"], 0.8)], 0, "Right")
    _script(monkeypatch, tok, right, right)
    sim = simrollout.simrollout(_Model(), tok, [corridor(), corridor()], [0, 0], gen_kwargs={}, system=False)
    _script(monkeypatch, tok, "<action>Up</action>", right)
    plain = agent.run_episodes(None, tok, [corridor(), corridor()], [0, 0], gen_kwargs={}, system=False)
    returns = lambda ep: agent.episode_return(ep.steps, ep.success)   # noqa: E731
    group, refine, stats = simrollout.simulation_samples(plain, sim, returns)
    n_sim_turns = sum(ep.steps for ep in sim)
    assert len(group) == sum(ep.steps for ep in plain) + n_sim_turns and len(refine) == n_sim_turns
    tau_p = group[-n_sim_turns:]                            # tau': a_ref under s_t; tau'_refine: a_ref under s_ref
    for a, b, t in zip(tau_p, refine, [t for ep in sim for t in ep.turns]):
        assert a.response_ids == b.response_ids == t.response_ids
        assert a.prompt_ids == t.prompt_ids and b.prompt_ids == t.refine_prompt_ids != t.prompt_ids
        assert a.drawn_under == t.refine_prompt_ids and b.drawn_under is None   # tau': the ratio's old prompt
    assert all(s.drawn_under is None for s in group[:-n_sim_turns])          # plain rollouts: drawn under s_t
    assert all(s.advantage > 0 for s in tau_p) and all(s.advantage < 0 for s in group[:-n_sim_turns])
    # both SimRollouts solved it in 3 steps, better than the plain mean: but not better than their own mean
    assert stats["simrollout_success"] == 1.0 and stats["a_refine_mean"] == 0.0


def test_a_refine_fires_only_for_refinements_that_beat_both_means():
    def episode(steps, success, refine=True):
        turns = [agent.Turn([1], [2], "", "", "Up", True, i == steps - 1, success and i == steps - 1,
                            [3] if refine else None) for i in range(steps)]
        return agent.Episode("sokoban", 7, turns, success, 20)
    plain = [episode(20, False, False), episode(4, True, False)]
    sim = [episode(3, True), episode(6, True)]
    returns = lambda ep: agent.episode_return(ep.steps, ep.success)   # noqa: E731
    _, refine, stats = simrollout.simulation_samples(plain, sim, returns)
    assert [s.advantage for s in refine] == [1.0] * 3 + [0.0] * 6     # 9.8 > max(mean plain, mean sim 9.65)
    assert stats["a_refine_mean"] == 0.5


def test_admissible_admits_the_answer_played_under_the_prompt_that_drew_it(tok, monkeypatch):
    """admissible: a SimRollout's a_ref is admitted under its refinement prompt, a plain answer under its own."""
    jump = format_response([Plan(["Jump"], ["#######\n#P_X_O#\n#######"], 0.9)], 0, "Jump")
    _script(monkeypatch, tok, jump, jump)
    seen = []

    def fake_admit(model, tokenizer, env, prompt_ids, gen):
        seen.append(("Real states after your plan" in tokenizer.decode(prompt_ids), parse(gen.text)))
        ids = tokenizer("<action>Right</action>", add_special_tokens=False)["input_ids"]
        return engine.Generation(ids, [0.0] * len(ids), "<action>Right</action>", "stop", replaced="Jump")
    parse = lambda text: agent.parse_response(text).action   # noqa: E731
    monkeypatch.setattr(agent, "admit", fake_admit)
    sim, plain = simrollout.simrollout(_Model(), tok, [corridor(), corridor()], [0, 0], gen_kwargs={}, d=5,
                                       system=False, plain=1, admissible=True)
    assert sim.success and plain.success and sim.steps == plain.steps == 3
    assert seen == [(True, "Jump"), (False, "Jump")] * 3
    assert all(t.valid and t.replaced == "Jump" and t.action == "Right" for t in sim.turns + plain.turns)
    assert all(t.refine_prompt_ids for t in sim.turns) and not any(t.refine_prompt_ids for t in plain.turns)
