"""ReSim: real search trees, traces grounded in the real env, SFT on responses only."""
import numpy as np
import torch

import agent
import evaluate
import resim
import search_tree
import sokoban


def test_tree_rollouts_replay_to_the_same_real_states():
    env = sokoban.make_env("train")
    env.reset(sokoban.split_seeds("train", 1)[0])
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
    env.reset(sokoban.split_seeds("train", 2)[1])
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


def _collect(n=3, **kw):
    _, tok = agent.load_model("tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, intermediate_size=64)
    seeds = sokoban.split_seeds("train", n)
    recs, stats = resim.collect("sokoban", {}, seeds, tokenizer=tok, aggregate=resim.template_aggregate,
                                system=False, progress=False, **kw)
    return recs, stats, tok


def test_every_imagined_state_in_a_trace_is_real():
    recs, stats, _ = _collect(4, b=4, d=3, b_train=3)
    assert stats["solved"] >= 3 and recs
    checked, wrong = resim.verify(recs)
    assert checked >= 2 * len(recs) and wrong == []
    # a corrupted trace is caught
    p = agent.parse_response(recs[0]["response"])
    p.plans[0].states[0] = p.plans[0].states[0].replace("#", "_", 1)
    bad = dict(recs[0], response=agent.format_response(p.plans, p.best, p.action))
    assert resim.verify([bad])[1]


def test_trace_parses_back_to_what_the_aggregator_wrote():
    recs, _, _ = _collect(2, b=4, d=2, b_train=2)
    for r in recs:
        p = agent.parse_response(r["response"])
        assert p.action == r["action"] and p.best == 0
        assert p.plans[0].actions[0] == r["action"]
        assert agent.format_response(p.plans, p.best, p.action) == r["response"]


def test_perfect_trace_has_simulation_score_one_and_wrong_states_lower():
    recs, _, _ = _collect(1, b=4, d=2, b_train=2)
    env = sokoban.make_env("train")

    def episode(texts):
        turns = [agent.Turn(prompt_ids=[], response_ids=[], logprobs=[], text=t, obs="", action=r["action"],
                            valid=True, reward=0.0, done=False, success=False) for t, r in zip(texts, recs)]
        return agent.Episode(env_name="sokoban", seed=recs[0]["seed"], turns=turns, success=True,
                             steps=len(turns), ret=0.0)
    good, _ = evaluate.replay(env, episode([r["response"] for r in recs]))
    assert good == [1.0] * len(recs)
    wrong = [r["response"].replace("#", "_", 3) for r in recs]
    bad, _ = evaluate.replay(env, episode(wrong))
    assert max(bad) < 1.0
    none, _ = evaluate.replay(env, episode([f"<action>{r['action']}</action>" for r in recs]))
    assert none == [0.0] * len(recs)


def test_sft_learns_the_response_and_ignores_the_prompt():
    model, tok = agent.load_model("tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64)
    pairs = [(tok("noise " * 5)["input_ids"], tok("<action>Up</action>")["input_ids"])] * 8
    import grpo
    with torch.no_grad():
        before = -grpo.sft_loss(*grpo.response_logprobs(model, [p for p, _ in pairs[:1]],
                                                         [q for _, q in pairs[:1]], tok.pad_token_id)).item()
    resim.sft(model, tok, pairs, epochs=20, batch_size=8, micro_batch=4, lr=1e-2, bf16=False, progress=False)
    with torch.no_grad():
        after = -grpo.sft_loss(*grpo.response_logprobs(model, [p for p, _ in pairs[:1]],
                                                        [q for _, q in pairs[:1]], tok.pad_token_id)).item()
    assert after > before + 1.0


def test_summary_reports_success_by_optimal_length():
    rows = [dict(success=s, steps=1, ret=0.0, invalid=0.0, tokens=1.0, sim=0.0, task_type=None, optimal=o)
            for s, o in [(True, 1), (False, 1), (True, 3), (False, 7), (False, 9)]]
    m = evaluate.summarize(rows)
    assert m["success"] == 0.4 and m["success_by_length"] == {"1": 0.5, "2-4": 1.0, "5+": 0.0}
    lo, hi = m["success_ci95"]
    assert lo < 0.4 < hi


def test_llm_aggregator_never_changes_plans_states_or_action():
    model, tok = agent.load_model("tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64)
    recs, _, _ = _collect(2, b=4, d=2, b_train=2)
    aggregate = resim.llm_aggregator(model, tok, max_new_tokens=24)
    for r in recs:
        base = agent.parse_response(r["response"])
        out = aggregate(base.plans, "state")
        p = agent.parse_response(out)
        assert (p.plans, p.best, p.action) == (base.plans, base.best, base.action)
        lines, base_lines = out.splitlines(), r["response"].splitlines()
        if len(lines) != len(base_lines):     # at most one comparison line, right before "Best:"
            k = next(i for i, line in enumerate(lines) if line.startswith("Best:"))
            assert lines[:k - 1] + lines[k:] == base_lines
