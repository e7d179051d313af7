"""Evaluate an agent: success rate (95% interval), steps, return, invalid actions, response tokens, and the
simulation score: how well the states imagined in the agent's reasoning match the real ones.

Simulation score: at every step, the chosen plan is executed from the real state in a branched copy of the
env; each imagined state is compared with the real one by env.state_similarity (Sokoban: exact grid match;
text envs: token F1); a step scores the mean over its plan (missing or unreadable states score 0); the
score averages over steps, then episodes.

    python evaluate.py --model tiny --env sokoban --split id --episodes 20
    python evaluate.py --model runs/resim_sokoban/model --split ood --episodes 100 --show 1
"""
import argparse
import json
import math
import time

import numpy as np

import agent
import common
import envs
import simrollout


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return 0.0, 0.0
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def plan_similarity(env, plan, branch=None):
    """Execute `plan` from env's current state in a branch; mean similarity of imagined vs real states
    (missing imagined states score 0). Returns (score, [(action, imagined, real)]); env is left as it was.
    branch: a second env of the same kind to run the plan in, set to env's state first. It is not restored,
    and that is the point: where the plan is the one action the episode then plays (d=1), the branch already
    stands at the next real state, so its next set_state costs nothing (an ALFWorld restore replays the game
    from reset, about 0.6 s)."""
    if plan is None or not plan.actions:
        return 0.0, []
    if branch is not None:
        branch.set_state(env.get_state())
        futures = simrollout.real_futures(branch, plan.actions, restore=False)
    else:
        futures = simrollout.real_futures(env, plan.actions)
    pairs = [(a, plan.states[i] if i < len(plan.states) else "", real) for i, (a, real) in enumerate(futures)]
    total = sum(env.state_similarity(im, real) if im.strip() else 0.0 for _, im, real in pairs)
    return total / len(plan.actions), pairs


def replay(env, episode, show=False, branch=None):
    """Replay an episode from its seed: per-step simulation scores (and side-by-side text when show)."""
    env.reset(episode.seed)
    scores, lines = [], []
    for t, turn in enumerate(episode.turns):
        parsed = agent.parse_response(turn.text)
        s, pairs = plan_similarity(env, parsed.chosen_plan(), branch)
        scores.append(s)
        if show:
            lines.append(f"--- step {t}: action {turn.action!r}, simulation {s:.2f}")
            lines += [side_by_side(a, im, re) for a, im, re in pairs] or ["(no imagined states)"]
        env.step(turn.action if turn.action is not None else turn.text)
    return scores, "\n".join(lines)


def side_by_side(action, imagined, real):
    """Imagined | real, with differing characters marked by ^ under a grid line (text envs: both lines)."""
    a, b = imagined.splitlines(), real.splitlines()
    w = max([len(x) for x in a + b] + [8])
    out = [f"> {action}", f"{'imagined':<{w}}   {'real':<{w}}"]
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else ""
        y = b[i] if i < len(b) else ""
        out.append(f"{x:<{w}}   {y:<{w}}")
        if x != y and len(x) == len(y):
            out.append("".join("^" if c != d else " " for c, d in zip(x, y)))
    return "\n".join(out)


def episode_rows(made, episodes, branch=None):
    """One dict of metrics per episode (simulation score by replay; `branch`: see plan_similarity)."""
    rows = []
    for env, ep in zip(made, episodes):
        sims, _ = replay(env, ep, branch=branch)
        rows.append(dict(seed=ep.seed, success=bool(ep.success), steps=ep.steps, ret=ep.ret,
                         invalid=ep.invalid / max(1, ep.steps),
                         replaced=sum(t.replaced is not None for t in ep.turns) / max(1, ep.steps),   # admissible
                         tokens=float(np.mean([len(t.response_ids) for t in ep.turns])) if ep.turns else 0.0,
                         sim=float(np.mean(sims)) if sims else 0.0, task_type=ep.task_type or None,
                         # a state shown twice: under greedy decoding and a Markov prompt, a loop to the step cap
                         revisit=len({t.obs for t in ep.turns}) < len(ep.turns),
                         optimal=getattr(env, "solution_length", None),   # Sokoban: BFS-optimal length
                         task=getattr(env, "task", ""),                   # what a failure is read against
                         actions=[t.action if t.action is not None else t.text for t in ep.turns]))
    return rows


def summarize(rows):
    n, k = len(rows), sum(r["success"] for r in rows)
    lo, hi = wilson(k, n)
    out = dict(episodes=n, success=k / max(1, n), success_ci95=[lo, hi],
               steps=float(np.mean([r["steps"] for r in rows])) if rows else 0.0)
    for key in ("ret", "invalid", "replaced", "tokens", "sim", "revisit"):
        out[key] = float(np.mean([r[key] for r in rows])) if rows else 0.0
    types = sorted({r["task_type"] for r in rows if r["task_type"]})
    if types:
        out["success_by_task_type"] = {t: float(np.mean([r["success"] for r in rows if r["task_type"] == t]))
                                       for t in types}
    if rows and all(r["optimal"] for r in rows):   # success by optimal solution length (Sokoban)
        buckets = {"1": (1, 1), "2-4": (2, 4), "5+": (5, 10**9)}
        out["success_by_length"] = {b: float(np.mean([r["success"] for r in rows if lo <= r["optimal"] <= hi]))
                                    for b, (lo, hi) in buckets.items()
                                    if any(lo <= r["optimal"] <= hi for r in rows)}
    return out


def play(model, tokenizer, env_name, split, seeds, *, env_kwargs=None, history_k=0, system=True,
         max_new_tokens=512, temperature=0.0, batch=256, progress=True, admissible=False):
    """Play `seeds` of a split (greedy by default), `batch` episodes in lockstep. Returns (envs, episodes).
    admissible: a rejected action is replaced by the model's likeliest admissible one (agent.admit)."""
    made, eps = [], []
    for i in range(0, len(seeds), batch):
        chunk = seeds[i:i + batch]
        made += [envs.make_env(env_name, split, **(env_kwargs or {})) for _ in chunk]
        eps += agent.run_episodes(model, tokenizer, made[i:], chunk, history_k=history_k, system=system, seed=i,
                                  gen_kwargs=dict(max_new_tokens=max_new_tokens, temperature=temperature),
                                  progress=progress, admissible=admissible)
    return made, eps


def pass_at_k(episodes):
    """(tasks solved by at least one of their episodes, tasks): an episode's seed is its task."""
    return len({ep.seed for ep in episodes if ep.success}), len({ep.seed for ep in episodes})


def format_table(results):
    """The metrics of each split, then success per task type and per optimal length where there are any."""
    head = f"{'split':<6}{'n':>5}{'success':>9}{'95% CI':>14}{'steps':>7}{'return':>8}{'invalid':>9}" \
           f"{'tokens':>8}{'sim':>6}{'revisit':>9}"
    lines = [head]
    for split, m in results.items():
        lo, hi = m["success_ci95"]
        lines.append(f"{split:<6}{m['episodes']:>5}{m['success']:>9.3f}{f'[{lo:.2f},{hi:.2f}]':>14}"
                     f"{m['steps']:>7.1f}{m['ret']:>8.2f}{m['invalid']:>9.3f}{m['tokens']:>8.1f}{m['sim']:>6.2f}"
                     f"{m['revisit']:>9.2f}")
    for split, m in results.items():
        for key in ("success_by_task_type", "success_by_length"):
            if key in m:
                lines.append(f"  {split} {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in m[key].items()))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | a run's model directory | hub id")
    ap.add_argument("--env", default=None, help="sokoban | alfworld | android (default: the checkpoint's)")
    ap.add_argument("--split", default="id", choices=["id", "ood", "train"])
    ap.add_argument("--episodes", type=int, default=None, help="default 20, or every game with --official")
    ap.add_argument("--official", action="store_true", help="ALFWorld: play the official games (valid_seen for "
                    "id: 140, valid_unseen for ood: 134), each once")
    ap.add_argument("--start", type=int, default=0, help="first seed index of the split")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="weights to generate with: bfloat16 is what a training run (bf16: true) evaluates with; "
                    "float32 rounds close greedy choices differently (a few points)")
    ap.add_argument("--history-k", type=int, default=None)
    ap.add_argument("--system", type=int, default=None, help="1/0: include the system prompt")
    ap.add_argument("--admissible", action="store_true", help="ALFWorld: an action the game would reject is "
                    "replaced by the model's likeliest admissible command (agent.admit); a separate results row")
    ap.add_argument("--out", default=None, help="write the metrics JSON here")
    ap.add_argument("--show", type=int, default=0, help="print the first K episodes, imagined vs real")
    ap.add_argument("--samples", type=int, default=1, help="play every task K times (needs --temperature > 0): "
                    "success is then per sample, and pass@K the share of tasks solved at least once")
    ap.add_argument("--templates", nargs="+", default=None, help="TextPhone: play only these task templates "
                    "(of the split's), e.g. --split ood --templates disable_alarm")
    args = ap.parse_args()

    saved = common.prompt_settings(args.model)
    env_name = args.env or saved.get("env", "sokoban")
    history_k = args.history_k if args.history_k is not None else saved.get("history_k", 0)
    system = bool(args.system) if args.system is not None else saved.get("system", args.model != "tiny")
    max_new = args.max_new_tokens or saved.get("max_new_tokens", 256)   # a d=1 Sokoban trace is ~190
    env_kwargs = saved.get("env_kwargs", {}) if saved.get("env") == env_name else {}
    if args.official:
        if env_name != "alfworld":
            raise SystemExit("--official is for --env alfworld")
        env_kwargs = dict(env_kwargs, data="official")
        args.episodes = args.episodes or len(envs.make_env(env_name, args.split, **env_kwargs).games)
    if args.admissible and env_name != "alfworld":
        raise SystemExit("--admissible is for --env alfworld")
    if args.templates:
        env_kwargs = dict(env_kwargs, templates=args.templates)
    args.episodes = args.episodes or 20
    if args.samples < 1 or (args.samples > 1 and args.temperature <= 0):
        raise SystemExit("--samples K needs K >= 1, and --temperature > 0 when K > 1 (greedy repeats one answer)")
    t0 = time.time()
    model, tok = agent.load_model(args.model, dtype=args.dtype)
    seeds = [s for s in envs.split_seeds(args.split, args.episodes, start=args.start) for _ in range(args.samples)]
    made, eps = play(model, tok, env_name, args.split, seeds, env_kwargs=env_kwargs, history_k=history_k,
                     system=system, max_new_tokens=max_new, temperature=args.temperature, admissible=args.admissible)
    # ALFWorld's restore replays the game from reset: score plans in a second env (plan_similarity). Not for a
    # real phone: a second AndroidWorld env would drive the same emulator.
    branch = envs.make_env(env_name, args.split, **env_kwargs) if env_name == "alfworld" else None
    rows = episode_rows(made, eps, branch=branch)
    metrics = summarize(rows)
    metrics.update(model=args.model, env=env_name, split=args.split, seconds=time.time() - t0)
    if args.samples > 1:
        k, n = pass_at_k(eps)
        metrics.update(samples=args.samples, pass_at_k=k / n)
        print(f"pass@{args.samples}: {k} of {n} tasks")
    print(format_table({args.split: metrics}))
    for ep, env in list(zip(eps, made))[:args.show]:
        print(f"\n=== episode seed {ep.seed}: success {ep.success}, steps {ep.steps}  {env.task}")
        print(replay(env, ep, show=True, branch=branch)[1])
    if args.out:
        with open(args.out, "w") as f:   # per episode too: failures read from actions, not only from --show
            json.dump(dict(metrics, per_episode=rows), f, indent=1)


if __name__ == "__main__":
    main()
