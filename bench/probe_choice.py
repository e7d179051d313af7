"""Where a Sokoban model's decision goes wrong: its imagined values or its comparison of them.
Plays held-out ID puzzles greedily and, at every step (and at first steps only: failed episodes repeat
stuck states), replays the real state and checks each written plan:

    value exact   the plan's written value equals the real one (expert gamma ** steps-to-go, two decimals)
    picks argmax  `Best: Plan k` names a plan with the highest written value
    optimal move  the chosen action starts an optimal path from the real state
    follows Best  the <action> is the first action of the plan `Best: Plan k` names (every trace trains this)
    differ        where they differ: how many turns, how often Best's plan starts an optimal path, how often the
                  action does
    on Best       success when the env takes Best's plan's first action instead of the <action>

    python bench/probe_choice.py runs/reuse_s0/model runs/hide_s0/model [--episodes 200]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import envs  # noqa: E402
import evaluate  # noqa: E402
import search_tree  # noqa: E402

GAMMA = 0.9


def real_value(env, state, actions):
    env.set_state(state)
    for a in actions:
        env.step(a)
    v = search_tree.expert_value(GAMMA)(env)
    env.set_state(state)
    return v


def play(model_dir, episodes, on_best=False):
    """Greedy episodes; on_best: the env takes the first action of the plan "Best:" names instead of the
    <action> (through a local wrapper of agent.parse_response, restored after)."""
    model, tok = agent.load_model(model_dir)
    seeds = envs.split_seeds("id", episodes)
    parse = agent.parse_response

    def parse_best(text):
        p = parse(text)
        plan = p.chosen_plan()
        return agent.Parsed(p.plans, p.best, plan.actions[0] if plan and plan.actions else p.action)
    agent.parse_response = parse_best if on_best else parse
    try:
        return evaluate.play(model, tok, "sokoban", "id", seeds, system=False, max_new_tokens=320,
                             progress=False)[1]
    finally:
        agent.parse_response = parse


def probe(eps, first_only):
    n = exact = vals = argmax = optimal = follows = 0
    differ = {"best": 0, "action": 0}
    env = envs.make_env("sokoban", "id")
    for ep in eps:
        env.reset(ep.seed)
        for turn in ep.turns[:1] if first_only else ep.turns:
            parsed = agent.parse_response(turn.text)
            state = env.get_state()
            best_now = search_tree.expert_value(GAMMA)(env)
            written = [p.value for p in parsed.plans]
            if parsed.plans and parsed.best is not None and None not in written:
                n += 1
                real = [real_value(env, state, p.actions) for p in parsed.plans]
                exact += sum(round(w, 2) == round(r, 2) for w, r in zip(written, real))
                vals += len(real)
                argmax += written[parsed.best] == max(written)
                good = lambda a: real_value(env, state, [a]) >= round(best_now / GAMMA, 6) - 1e-9  # noqa: E731
                optimal += turn.action is not None and good(turn.action)
                chosen = parsed.plans[parsed.best].actions[:1]   # in range: written[parsed.best] read it above
                follows += chosen == [turn.action]
                if chosen and turn.action is not None and chosen != [turn.action]:
                    differ["best"] += good(chosen[0])
                    differ["action"] += good(turn.action)
            env.step(turn.action if turn.action is not None else turn.text)
    success = sum(e.success for e in eps) / len(eps)
    return dict(success=success, steps=n, value_exact=exact / max(vals, 1), picks_argmax=argmax / max(n, 1),
                optimal_move=optimal / max(n, 1), follows_best=follows / max(n, 1),
                differ=f"{n - follows}: {differ['best']} / {differ['action']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--episodes", type=int, default=200)
    args = ap.parse_args()
    print(f"{'model':<52}{'success':>8}{'steps':>7}{'value exact':>13}{'picks argmax':>14}{'optimal move':>14}"
          f"{'follows Best':>14}{'on Best':>9}   differ: n, Best right / action right")
    for m in args.models:
        eps = play(m, args.episodes)
        on_best = play(m, args.episodes, on_best=True)
        for first_only in (False, True):
            r = probe(eps, first_only)
            name = m + (" (first steps)" if first_only else " (all steps)")
            print(f"{name:<52}{r['success']:>8.3f}{r['steps']:>7}{r['value_exact']:>13.3f}"
                  f"{r['picks_argmax']:>14.3f}{r['optimal_move']:>14.3f}{r['follows_best']:>14.3f}"
                  f"{sum(e.success for e in on_best) / len(on_best):>9.3f}   {r['differ']}")


if __name__ == "__main__":
    main()
