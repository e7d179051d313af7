"""Where a Sokoban model's decision goes wrong: its imagined values or its comparison of them.
Plays held-out ID puzzles greedily and, at every step (and at first steps only: failed episodes repeat
stuck states), replays the real state and checks each written plan:

    value exact   the plan's written value equals the real one (expert gamma ** steps-to-go, two decimals)
    picks argmax  `Best: Plan k` names a plan with the highest written value
    optimal move  the chosen action starts an optimal path from the real state

    python bench/probe_choice.py runs/resim_sokoban/model runs/ablation_best_first/model [--episodes 200]
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


def play(model_dir, episodes):
    model, tok = agent.load_model(model_dir)
    seeds = envs.split_seeds("id", episodes)
    return evaluate.play(model, tok, "sokoban", "id", seeds, system=False, max_new_tokens=320,
                         progress=False)[1]


def probe(eps, first_only):
    n = exact = vals = argmax = optimal = 0
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
                if turn.action is not None:
                    optimal += real_value(env, state, [turn.action]) >= round(best_now / GAMMA, 6) - 1e-9
            env.step(turn.action if turn.action is not None else turn.text)
    success = sum(e.success for e in eps) / len(eps)
    return dict(success=success, steps=n, value_exact=exact / max(vals, 1), picks_argmax=argmax / max(n, 1),
                optimal_move=optimal / max(n, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--episodes", type=int, default=200)
    args = ap.parse_args()
    print(f"{'model':<52}{'success':>8}{'steps':>7}{'value exact':>13}{'picks argmax':>14}{'optimal move':>14}")
    for m in args.models:
        eps = play(m, args.episodes)
        for first_only in (False, True):
            r = probe(eps, first_only)
            name = m + (" (first steps)" if first_only else " (all steps)")
            print(f"{name:<52}{r['success']:>8.3f}{r['steps']:>7}{r['value_exact']:>13.3f}"
                  f"{r['picks_argmax']:>14.3f}{r['optimal_move']:>14.3f}")


if __name__ == "__main__":
    main()
