"""Why RL turns are weighted per episode (rl.turn_weight): the net push a batch gives the tokens that every
response shares. Plays G rollouts of a few train tasks with the given model at temperature 1, takes GRPO's group
advantages, and prints sum(A x tokens) / tokens over the batch's turns for both weightings. A group's advantages
sum to 0, so any net push comes from episodes weighing by their number of turns: failures run to the step cap.

    python bench/turn_weight.py --model runs/resim_sokoban/model [--tasks 4 --group 8 --seed 1]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import agent  # noqa: E402
import common  # noqa: E402
import envs  # noqa: E402
import grpo  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=100000, help="first train seed (the RL stages' task_offset)")
    args = ap.parse_args()
    model, tok = agent.load_model(args.model)
    settings = common.prompt_settings(args.model)
    policy = common.inference_copy(model, True)
    seeds = [s for s in envs.split_seeds("train", args.tasks, start=args.start) for _ in range(args.group)]
    eps = agent.run_episodes(policy, tok, [envs.make_env("sokoban", "train") for _ in seeds], seeds,
                             gen_kwargs=dict(max_new_tokens=320, temperature=1.0), seed=args.seed,
                             history_k=settings.get("history_k", 0), system=settings.get("system", False))
    adv = grpo.group_advantages([ep.ret for ep in eps], [ep.seed for ep in eps]).tolist()
    won = [ep.steps for ep in eps if ep.success]
    lost = [ep.steps for ep in eps if not ep.success]
    print(f"{len(eps)} rollouts: {len(won)} solved in {np.mean(won or [0]):.1f} turns on average, "
          f"{len(lost)} failed in {np.mean(lost or [0]):.1f}")
    for weight in grpo.TURN_WEIGHTS:
        ss = grpo.episode_samples(eps, adv, weight)
        net = sum(s.advantage * len(s.response_ids) for s in ss) / sum(len(s.response_ids) for s in ss)
        print(f"turn_weight={weight:<8} net advantage per response token: {net:+.3f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
