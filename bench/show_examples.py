"""Print the README's worked examples from real runs: a ReSim search tree, the trace built from it, and a
SimRollout refinement prompt written by a trained model.

    python bench/show_examples.py --seed-index 1 --model runs/resim_sokoban/model
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import engine  # noqa: E402
import envs  # noqa: E402
import resim  # noqa: E402
import search_tree  # noqa: E402
import simrollout  # noqa: E402
import sokoban  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed-index", type=int, default=1)
    ap.add_argument("--d", type=int, default=1, help="rollout depth (the default config uses 1)")
    ap.add_argument("--model", default=None, help="a trained model directory for the refinement example")
    args = ap.parse_args()
    env = sokoban.make_env("train")
    seed = envs.split_seeds("train", args.seed_index + 1)[-1]
    print(f"== ReSim search tree from train seed {seed} (b=4, d={args.d}, expert rollouts eps=0.3, expert value)")
    print(env.reset(seed))
    tree = search_tree.best_first(search_tree.expand(
        env, b=4, d=args.d, act=search_tree.expert_policy(0.3), value=search_tree.expert_value(0.9),
        rng=np.random.default_rng(0)))
    for k, r in enumerate(tree, 1):
        print(f"rollout {k}: {r.actions} value {r.value:.2f}")
    plans, best = resim.order_plans(tree[0], tree[1:2], "shuffled", np.random.default_rng(args.seed_index))
    print("\n== the ReSim trace (template aggregator, b_train=2, plans shuffled)")
    print(resim.template_aggregate(plans, best))
    if args.model:
        model, tok = agent.load_model(args.model)
        settings = dict(history_k=0, system=False)
        obs = env.reset(seed)
        g = engine.generate(model, tok, [agent.build_prompt(tok, env, [], obs, **settings)], max_new_tokens=400,
                            temperature=0.0)[0]
        fut = simrollout.real_futures(env, simrollout.extract_plan(g.text, 5))
        print("\n== SimRollout refinement prompt s_ref (the model's own response, then the real futures)")
        print(simrollout.refinement_prompt(tok, env, [], obs, g.text, fut, **settings))


if __name__ == "__main__":
    main()
