"""ReSim: real search trees, traces grounded in the real env, SFT on responses only."""
import dataclasses

import numpy as np
import torch

import agent
import envs
import evaluate
import resim
import search_tree
import sokoban
import train


def test_tree_rollouts_replay_to_the_same_real_states():
    env = sokoban.make_env("train")
    env.reset(envs.split_seeds("train", 1)[0])
    env.step(env.expert_plan()[0])
    root, before = env.get_state(), env.render()
    rng = np.random.default_rng(0)
    tree = search_tree.expand(env, b=6, d=3, act=search_tree.expert_policy(0.5),
                              value=search_tree.expert_value(0.9), rng=rng)
    assert env.render() == before
    assert len({tuple(r.actions) for r in tree}) == len(tree), "rollouts are deduplicated"
    for r in tree:
        env.set_state(root)
        for a, o in zip(r.actions, r.observations):
            assert env.step(a)[0] == o
        plan = env.expert_plan()
        want = 1.0 if r.success else (0.0 if plan is None else 0.9 ** len(plan))
        assert abs(r.value - want) < 1e-9


def test_expand_leaves_the_env_where_it_was():
    env = sokoban.make_env("train")
    env.reset(envs.split_seeds("train", 2)[1])
    before = env.render()
    search_tree.expand(env, b=4, d=2, act=search_tree.random_policy, value=lambda e: 0.5,
                       rng=np.random.default_rng(1))
    assert env.render() == before and env.steps == 0


def test_value_functions_order_states():
    env = sokoban.Sokoban.from_xsb("#####\n#@$.#\n#####")
    env.reset(0)
    v_near = search_tree.expert_value(0.9)(env)
    assert abs(v_near - 0.9) < 1e-9                      # one push to go
    mc = search_tree.mc_value(search_tree.random_policy, n=16, horizon=5)(env)
    assert 0.0 < mc <= 1.0
    dead = sokoban.Sokoban.from_xsb("#####\n#$@.#\n#####")
    dead.reset(0)
    assert search_tree.expert_value(0.9)(dead) == 0.0     # the box is stuck in a corner


TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)


def _collect(n=3, eps=0.3, **kw):
    _, tok = agent.load_model("tiny", **TINY)
    seeds = envs.split_seeds("train", n)
    recs, stats = resim.collect("sokoban", {}, seeds, tokenizer=tok, aggregate=resim.template_aggregate,
                                act=search_tree.expert_policy(eps), value=search_tree.expert_value(0.9),
                                system=False, progress=False, **kw)
    return recs, stats, tok


def test_every_imagined_state_in_a_trace_is_real():
    recs, stats, _ = _collect(4, b=4, d=3, b_train=3)
    assert stats["solved"] >= 3 and recs
    checked, wrong = resim.verify(recs)
    assert checked >= 2 * len(recs) and wrong == []
    # a corrupted trace is caught
    p = agent.parse_response(recs[0].response)
    p.plans[0].states[0] = p.plans[0].states[0].replace("#", "_", 1)
    bad = dataclasses.replace(recs[0], response=agent.format_response(p.plans, p.best, p.action))
    assert resim.verify([bad])[1]


def test_trace_parses_back_to_what_the_aggregator_wrote():
    recs, _, _ = _collect(2, b=4, d=2, b_train=2)
    for r in recs:
        p = agent.parse_response(r.response)
        assert p.action == r.action and p.plans[p.best].actions[0] == r.action
        assert agent.format_response(p.plans, p.best, p.action) == r.response


def test_the_choice_comes_after_the_plans_and_the_best_plan_is_anywhere():
    """Shuffled traces: the best plan (highest value) sits at a random place, so the first token after
    "Plan 1:" does not decide the action; "Best: Plan k" comes after every plan, and the action is plan k's."""
    recs, _, _ = _collect(40, eps=0.6, b=4, d=1, b_train=2)
    places = []
    for r in (r for r in recs if r.kind == "resim"):
        p = agent.parse_response(r.response)
        if len(p.plans) < 2 or p.plans[0].value == p.plans[1].value:
            continue
        assert p.plans[p.best].value == max(q.value for q in p.plans) and r.action == p.plans[p.best].actions[0]
        assert r.response.index("Best: Plan") > r.response.rindex("Value:")
        places.append(p.best)
    assert len(places) >= 20 and 0.25 < np.mean(places) < 0.75           # both places, about equally often
    first, _, _ = _collect(40, eps=0.6, b=4, d=1, b_train=2, plan_order="best_first")
    assert all(agent.parse_response(r.response).best == 0 for r in first if r.kind == "resim")


def _previous_answers(recs):
    """(the previous answer parsed, the real states shown after it, the trace's action) of each refine record."""
    out = []
    for r in recs:
        if r.kind == "refine":
            prev = r.prompt.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
            assert "Real states after your plan" in r.prompt and r.prompt.endswith("<|im_start|>assistant\n")
            out.append((agent.parse_response(prev), r.prompt.split("Real states after your plan:\n")[1], r.action))
    return out


def test_refinement_examples_with_keep_0_always_choose_a_worse_plan():
    recs, _, _ = _collect(30, eps=0.6, b=4, d=1, b_train=2, refine_frac=1.0, refine_keep=0.0)
    prev = _previous_answers(recs)
    assert prev and all(p.plans[p.best].value == min(q.value for q in p.plans) for p, _, _ in prev)


def test_refinement_examples_keep_a_right_previous_choice_as_often_as_they_fix_a_wrong_one():
    """A refinement must not learn "always change the action": about half of the previous answers already
    chose the best plan (the trace keeps its action), the others a worse one; the real states shown are those
    of the plan the previous answer chose."""
    recs, _, _ = _collect(30, eps=0.6, b=4, d=1, b_train=2, refine_frac=1.0)
    kept = []
    for p, futures, action in _previous_answers(recs):
        if p.plans[0].value == p.plans[1].value:
            continue
        chosen = p.plans[p.best]
        assert futures.startswith(f"> {chosen.actions[0]}\n") and p.action == chosen.actions[0]
        kept.append(chosen.value == max(q.value for q in p.plans))
        if kept[-1]:
            assert action == p.action                                  # the trace keeps the previous action
    assert len(kept) >= 20 and 0.25 < np.mean(kept) < 0.75


def test_perfect_trace_has_simulation_score_one_and_wrong_states_lower():
    recs, _, _ = _collect(1, b=4, d=2, b_train=2)
    env = sokoban.make_env("train")

    recs = [r for r in recs if r.kind == "resim"]
    good, _ = evaluate.replay(env, _episode(recs, [r.response for r in recs]))
    assert good == [1.0] * len(recs)
    wrong = [r.response.replace("#", "_", 3) for r in recs]
    bad, _ = evaluate.replay(env, _episode(recs, wrong))
    assert max(bad) < 1.0
    none, _ = evaluate.replay(env, _episode(recs, [f"<action>{r.action}</action>" for r in recs]))
    assert none == [0.0] * len(recs)


def _episode(recs, texts):
    """An episode that plays the records' actions with `texts` as its responses (for evaluate.replay)."""
    turns = [agent.Turn(prompt_ids=[], response_ids=[], text=t, obs="", action=r.action, valid=True,
                        done=False, success=False) for t, r in zip(texts, recs)]
    return agent.Episode(env_name=recs[0].env, seed=recs[0].seed, turns=turns, success=True, max_steps=20)


def test_sft_learns_the_response_and_ignores_the_prompt():
    import grpo
    model, tok = agent.load_model("tiny", **TINY)
    sample = grpo.Sample(tok("noise " * 5)["input_ids"], tok("<action>Up</action>")["input_ids"])

    def nll():
        with torch.no_grad():
            return -grpo.response_logprobs(model, [sample.prompt_ids], [sample.response_ids], tok.pad_token_id)[0].sum()
    before = nll()
    opt = train.make_optimizer(model, 1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sc = dict(train.DEFAULTS["sft"], micro_batch=4, grad_clip=1.0)
    for _ in range(20):
        train.sft_step(model, opt, sched, [sample] * 8, tok.pad_token_id, sc, False, 1)
    assert nll() < before - 1.0


def test_summary_reports_success_by_optimal_length():
    rows = [dict(success=s, steps=1, ret=0.0, invalid=0.0, replaced=0.0, tokens=1.0, sim=0.0, revisit=False, task_type=None,
                 optimal=o)
            for s, o in [(True, 1), (False, 1), (True, 3), (False, 7), (False, 9)]]
    m = evaluate.summarize(rows)
    assert m["success"] == 0.4 and m["success_by_length"] == {"1": 0.5, "2-4": 1.0, "5+": 0.0}
    lo, hi = m["success_ci95"]
    assert lo < 0.4 < hi


def test_episode_rows_flag_a_state_shown_twice():
    """revisit: an episode whose prompts showed the same state twice (a greedy loop with a Markov prompt)."""
    env = envs.make_env("sokoban", "train")
    obs = env.reset(0)
    turn = lambda o: agent.Turn([1], [1], "", o, None, False, False, False)   # noqa: E731
    eps = [agent.Episode("sokoban", 0, [turn(obs), turn(obs + " ")], False, 10),
           agent.Episode("sokoban", 0, [turn(obs), turn(obs)], False, 10)]
    rows = evaluate.episode_rows([env, env], eps)
    assert [r["revisit"] for r in rows] == [False, True] and evaluate.summarize(rows)["revisit"] == 0.5


def test_llm_aggregator_never_changes_plans_states_or_action():
    model, tok = agent.load_model("tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64)
    recs, _, _ = _collect(2, b=4, d=2, b_train=2)
    aggregate = resim.llm_aggregator(model, tok, max_new_tokens=24)
    for r in recs:
        base = agent.parse_response(r.response)
        out = aggregate(base.plans, base.best, "state")
        p = agent.parse_response(out)
        assert (p.plans, p.best, p.action) == (base.plans, base.best, base.action)
        lines, base_lines = out.splitlines(), r.response.splitlines()
        if len(lines) != len(base_lines):     # at most one comparison line, right before "Best:"
            k = next(i for i, line in enumerate(lines) if line.startswith("Best:"))
            assert lines[:k - 1] + lines[k:] == base_lines


def test_detours_visit_states_off_the_best_path_and_traces_stay_true():
    recs, stats, _ = _collect(30, eps=0.6, b=4, d=1, b_train=2, detour=0.5)
    off = [r for r in recs if r.kind == "resim" and r.prefix and
           any(a != b for a, b in zip(r.prefix, [q.action for q in recs if q.seed == r.seed and q.kind == "resim"]))]
    assert stats["solved"] >= 20 and off                  # some episodes left the best path and still got solved
    checked, wrong = resim.verify(recs)                   # replaying the real prefix reproduces every state
    assert checked and wrong == []


def test_hidden_best_traces_choose_among_the_others_while_the_env_takes_the_best():
    """resim.hide_best: the trace lists only non-best rollouts and its action follows its own Best line (highest
    written value), so it differs from the move the real env then takes; the traces stay true, and off (0) the
    records are exactly the default ones."""
    recs, stats, _ = _collect(30, eps=0.6, b=4, d=1, b_train=2, hide_best=1.0)
    steps = [r for r in recs if r.kind == "resim"]
    taken = {(r.seed, r.step - 1): r.prefix[-1] for r in steps if r.prefix}
    hidden = [r for r in steps if (r.seed, r.step) in taken and taken[r.seed, r.step] != r.action]
    assert stats["solved"] == 30 and len(hidden) >= 5
    for r in hidden:
        p = agent.parse_response(r.response)
        assert p.plans[p.best].actions[0] == r.action == p.action
        assert p.plans[p.best].value == max(q.value for q in p.plans)
        assert taken[r.seed, r.step] not in [q.actions[0] for q in p.plans]   # the best move is not listed
    checked, wrong = resim.verify(recs)
    assert checked and wrong == []
    assert _collect(5, b=4, d=1, b_train=2, hide_best=0.0)[0] == _collect(5, b=4, d=1, b_train=2)[0]


def test_collect_searches_the_split_it_is_given():
    """bench/probe_traces.py searches held-out episodes: collect(split=) must play that split's rooms."""
    _, tok = agent.load_model("tiny", **TINY)
    seeds = envs.split_seeds("ood", 1)
    recs, stats = resim.collect("sokoban", {}, seeds, tokenizer=tok, aggregate=resim.template_aggregate,
                                act=search_tree.expert_policy(0.0), value=search_tree.expert_value(0.9),
                                system=False, progress=False, b=2, d=1, b_train=2, split="ood")
    obs = envs.make_env("sokoban", "ood").reset(seeds[0])
    assert stats["solved"] == 1 and obs in recs[0].prompt


def test_textphone_traces_write_each_future_as_its_change_and_score_against_the_real_change():
    """env option future_lines: the trace, the refinement prompt and the simulation score all write a future
    screen as its changed lines; verify still finds every state real, and a trace that copies whole screens
    no longer scores 1."""
    _, tok = agent.load_model("tiny", **TINY)
    seeds = envs.split_seeds("train", 3)
    kw = dict(tokenizer=tok, aggregate=resim.template_aggregate, act=search_tree.expert_policy(0.5),
              value=search_tree.expert_value(0.9), system=False, progress=False, b=3, d=1, b_train=2,
              refine_frac=1.0)
    short, _ = resim.collect("android", {"compact": True, "future_lines": 3}, seeds, **kw)
    whole, _ = resim.collect("android", {"compact": True}, seeds, **kw)
    assert short and [r.action for r in short] == [r.action for r in whole]       # the same search
    checked, wrong = resim.verify(short)
    assert checked >= len(short) and wrong == []
    states = [s for r in short for p in agent.parse_response(r.response).plans for s in p.states]
    assert all(len(s.splitlines()) <= 4 for s in states)
    assert sum(map(len, (r.response for r in short))) < 0.8 * sum(map(len, (r.response for r in whole)))
    refine = [r for r in short if r.kind == "refine"]
    assert refine and all(len(r.prompt.split("Real states after your plan:\n")[1].split("\nWrite")[0]
                              .splitlines()) <= 5 for r in refine)
    env = envs.make_env("android", "train", compact=True, future_lines=3)
    first = [r for r in short if r.kind == "resim" and r.seed == seeds[0]]
    copied = [r for r in whole if r.kind == "resim" and r.seed == seeds[0]]
    assert evaluate.replay(env, _episode(first, [r.response for r in first]))[0] == [1.0] * len(first)
    assert min(evaluate.replay(env, _episode(copied, [r.response for r in copied]))[0]) < 1.0


def test_relative_values_score_each_plan_against_its_root_and_choose_as_before():
    """resim.value_scale=relative: a written value is gamma ** (moves the plan loses against an optimal one), so an
    optimal first move reads 1.00 on a 3-step task and on an 8-step one alike (absolute values carry the task's
    length); the search, the choice and the states are those of the absolute traces."""
    _, tok = agent.load_model("tiny", **TINY)
    seeds = envs.split_seeds("train", 6)
    kw = dict(tokenizer=tok, aggregate=resim.template_aggregate, act=search_tree.expert_policy(0.5),
              value=search_tree.expert_value(0.9), system=False, progress=False, b=3, d=1, b_train=2)
    rel, _ = resim.collect("android", {"compact": True}, seeds, value_scale="relative", gamma=0.9, **kw)
    ab, _ = resim.collect("android", {"compact": True}, seeds, **kw)
    assert rel and [(r.seed, r.action) for r in rel] == [(r.seed, r.action) for r in ab]
    env = envs.make_env("android", "train", compact=True)
    best_rel, best_abs = set(), set()
    for r, a in zip(rel, ab):
        got, old = agent.parse_response(r.response), agent.parse_response(a.response)
        assert [p.states for p in got.plans] == [p.states for p in old.plans] and got.best == old.best
        env.reset(r.seed)
        for x in r.prefix:
            env.step(x)
        root, plan = env.get_state(), env.expert_plan()
        n, optimal = len(plan), plan[0]
        for p in got.plans:
            env.set_state(root)
            _, _, done, info = env.step(p.actions[0])
            m = 0 if info["success"] else (None if done else len(env.expert_plan()))
            want = 0.0 if m is None else min(1.0, 0.9 ** (1 + m - n))
            assert abs(p.value - round(want, 2)) < 1e-9
        if r.action == optimal:
            best_rel.add(got.plans[got.best].value)
            best_abs.add(old.plans[old.best].value)
    assert best_rel == {1.0} and len(best_abs) >= 3


def test_relative_values_keep_best_the_highest_over_plans_of_several_depths():
    recs, _, _ = _collect(8, eps=0.6, b=4, d=3, b_train=3, value_scale="relative", gamma=0.9)
    assert recs
    for r in recs:
        p = agent.parse_response(r.response)
        assert p.plans[p.best].value == max(q.value for q in p.plans) and max(q.value for q in p.plans) <= 1.0
    checked, wrong = resim.verify(recs)
    assert checked and wrong == []


def test_distinct_draws_rollouts_until_every_trace_compares_two_plans():
    """An eps-expert repeats itself: with b=3 about a third of TextPhone trees hold one rollout, and their traces
    compare nothing. resim.distinct=2 draws past b until two differ; the states stay real."""
    _, tok = agent.load_model("tiny", **TINY)
    seeds = envs.split_seeds("train", 8)
    kw = dict(tokenizer=tok, aggregate=resim.template_aggregate, act=search_tree.expert_policy(0.3),
              value=search_tree.expert_value(0.9), system=False, progress=False, b=3, d=1, b_train=2)
    plain, _ = resim.collect("android", {"compact": True}, seeds, **kw)
    two, _ = resim.collect("android", {"compact": True}, seeds, distinct=2, **kw)
    n_plans = lambda recs: [len(agent.parse_response(r.response).plans) for r in recs]
    assert n_plans(plain).count(1) > 0.2 * len(plain)
    assert n_plans(two).count(1) == 0 and two
    checked, wrong = resim.verify(two)
    assert checked >= 2 * len(two) and wrong == []


def test_an_episode_ends_where_no_rollout_and_no_expert_plan_leads_on():
    """A state whose leaves are all valued 0 and where the expert has no plan (a Sokoban deadlock; an ALFWorld
    expert past its cap) ends the ReSim episode: it is lost, and its traces are dropped. (Leaves an LLM judge
    values 0 with an expert plan at the root search on.) The search once went on to the step cap, asking the
    expert again at every leaf (in a 53-receptacle ALFWorld kitchen, about a minute a call)."""
    _, tok = agent.load_model("tiny", **TINY)
    env, calls = envs.make_env("sokoban", "train"), []
    seed = next(s for s in envs.split_seeds("train", 50) if env.reset(s) and len(env.expert_plan()) >= 4)
    env.expert_plan = lambda: calls.append(1) and None           # the expert finds no plan from any state
    recs, ok = resim.resim_episode(env, seed, b=2, d=1, b_train=2, plan_order="shuffled",
                                   act=search_tree.random_policy, value=search_tree.expert_value(0.9),
                                   aggregate=resim.template_aggregate, rng=np.random.default_rng(0), tokenizer=tok,
                                   history_k=0, system=False)
    assert not ok and recs == [] and len(calls) <= 3, (len(recs), len(calls))
    recs, stats, _ = _collect(3, b=2, d=1, b_train=2)     # a solvable root searches on as before
    assert stats["solved"] == 3 and len(recs) == stats["steps"] > 3


def test_an_episode_past_episode_minutes_is_cut_lost_and_not_saved():
    """resim.episode_minutes: an episode still unsolved after that long ends, lost, and on_episode is not told,
    so a rerun tries it again (one ALFWorld kitchen took 33 min for 4 steps of its search). 0 cuts nothing."""
    saved = []
    recs, stats, _ = _collect(3, b=4, d=1, b_train=2, episode_minutes=1e-9, on_episode=lambda s, r, ok: saved.append(s))
    assert stats["cut"] == 3 and stats["solved"] == 0 and recs == [] and saved == []
    recs, stats, _ = _collect(3, b=4, d=1, b_train=2, on_episode=lambda s, r, ok: saved.append(s))
    assert stats["cut"] == 0 and stats["solved"] == 3 and recs and len(saved) == 3
