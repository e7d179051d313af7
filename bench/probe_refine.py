"""Does SimRollout's refinement pick better moves than the draft it refines? One simulation step's rollouts from a
model (G/2 SimRollouts + G/2 plain rollouts per task, as train.simulation_phase runs them), replayed on Sokoban:
at every SimRollout turn the draft's action and the refined action are scored against the BFS-optimal moves of
the real state they were chosen in (a move is optimal when it keeps the shortest solution shortest); plain
rollouts' actions beside them. "consistent": the answer's action is the first action of the plan its `Best:`
line names (a trace written as ReSim writes them).

    python bench/probe_refine.py runs/resim_sokoban/model [--tasks 16] [--min-moves 4]
"""
import argparse
import copy
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import common  # noqa: E402
import envs  # noqa: E402
import sokoban  # noqa: E402
import train  # noqa: E402
from simrollout import REFINE  # noqa: E402


def optimal_moves(env):
    """The moves from env's state after which the optimal solution is one move shorter (env restored)."""
    root, left = env.get_state(), {}
    for a in sokoban.ACTIONS:
        env.step(a)
        plan = [] if env.success else sokoban.solve(env)
        if plan is not None:
            left[a] = len(plan)
        env.set_state(root)
    best = min(left.values(), default=None)
    return {a for a, n in left.items() if n == best}


def draft_text(tok, refine_ids):
    """The draft a, read back out of s_ref (the chat's assistant turn before the refinement request)."""
    text = tok.decode(refine_ids)
    head = text[:text.rfind(REFINE.split("{")[0])]
    return head[head.rfind("assistant") + len("assistant"):]


def consistent(text):
    p = agent.parse_response(text)
    plan = p.chosen_plan()
    return p.action is not None and plan is not None and bool(plan.actions) and plan.actions[0] == p.action


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--min-moves", type=int, default=0, help="rl.min_moves: only rooms at least this long")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    saved = common.prompt_settings(args.model)
    cfg = copy.deepcopy(train.DEFAULTS)
    cfg.update({k: saved[k] for k in common.PROMPT_KEYS if k in saved})
    cfg["rl"].update(group=args.group, min_moves=args.min_moves)
    model, tok = agent.load_model(args.model)
    model.eval()
    tasks = train.rl_task_pool(cfg, args.tasks)
    eps, _, _ = train.simulation_phase(common.inference_copy(model, True), tok, tasks, cfg, lambda role: args.seed,
                                       lambda ep: 0.0)      # the rollouts of one simulation step, as training runs it
    env = envs.make_env(cfg["env"], "train", **cfg["env_kwargs"])
    rows = {"draft": [], "refined": [], "plain": []}
    same = {"draft": [], "refined": [], "plain": []}
    changed = []
    for ep in eps:
        env.reset(ep.seed)
        for t in ep.turns:
            best = optimal_moves(env)
            if t.refine_prompt_ids is None:
                rows["plain"].append(t.action in best)
                same["plain"].append(consistent(t.text))
            else:
                text = draft_text(tok, t.refine_prompt_ids)
                draft = agent.parse_response(text).action
                same["draft"].append(consistent(text))
                same["refined"].append(consistent(t.text))
                rows["draft"].append(draft in best)
                rows["refined"].append(t.action in best)
                changed.append((draft != t.action, draft in best, t.action in best))
            if t.action is not None:
                env.step(t.action)
    sim = [ep for ep in eps if ep.turns[0].refine_prompt_ids is not None]
    plain = [ep for ep in eps if ep.turns[0].refine_prompt_ids is None]
    print(f"{args.model}: {args.tasks} tasks (min_moves {args.min_moves}) x {args.group}; episode success "
          f"SimRollout {np.mean([e.success for e in sim]):.2f}, plain {np.mean([e.success for e in plain]):.2f}")
    for name, xs in rows.items():
        print(f"{name:8s} actions optimal: {np.mean(xs):.3f} of {len(xs)} turns; consistent {np.mean(same[name]):.3f}")
    ch = [c for c in changed if c[0]]
    print(f"refinement changed the draft's action on {len(ch)} of {len(changed)} SimRollout turns "
          f"({len(ch) / max(len(changed), 1):.3f}); of those: optimal -> not {sum(d and not r for _, d, r in ch)}, "
          f"not -> optimal {sum(r and not d for _, d, r in ch)}, both optimal {sum(d and r for _, d, r in ch)}, "
          f"neither {sum(not d and not r for _, d, r in ch)}")


if __name__ == "__main__":
    main()
