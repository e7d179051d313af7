"""ALFWorld env costs: game generation, engine steps, reset, get/set_state branching, expert plans.

    python bench/bench_alfworld.py [--games 6] [--steps 150] [--trees 3]
Generation writes into a fresh temporary cache (nothing is kept)."""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import alfworld_env as A  # noqa: E402


def timed(fn, n=1):
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    return (time.perf_counter() - t) / n, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--games", type=int, default=6)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--trees", type=int, default=3, help="episodes searched for the ReSim tree cost")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        t, _ = timed(lambda: [A.generate_game("train", s, cache_dir=cache) for s in range(args.games)])
        rows.append(("games generated / s (incl. expert check)", f"{args.games / t:.2f}",
                     f"{args.games} games, {dict(A.GEN_STATS)}"))
        env = A.make_env("train", cache_dir=cache, data="generated")
        t, _ = timed(lambda: env.reset(0))
        rows.append(("reset, same game (ms)", f"{1e3 * t:.0f}", "SAS load, translation memoised"))
        env2 = A.make_env("train", cache_dir=cache, data="generated")
        from textworld.envs.pddl import logic
        logic.fast_downward.pddl2sas.cache_clear()  # forget the translation done while generating
        t, _ = timed(lambda: env2.reset(3))
        rows.append(("reset, new game, first load (ms)", f"{1e3 * t:.0f}", "PDDL->SAS translation x2 (kitchen)"))

        rng, n, seed = np.random.default_rng(0), 0, 0
        env.reset(seed)
        t0 = time.perf_counter()
        while n < args.steps:
            va = env.valid_actions()
            _, _, done, _ = env.step(va[rng.integers(len(va))])
            n += 1
            if done:
                seed = (seed + 1) % args.games
                env.reset(seed)
        t = time.perf_counter() - t0
        rows.append(("engine steps / s (random valid actions)", f"{n / t:.1f}", f"{1e3 * t / n:.1f} ms/step, {args.games} games"))

        for k in (0, 10, 25, 49):
            env.reset(3)
            for _ in range(k):
                va = env.valid_actions()
                env.step(va[rng.integers(len(va))])
            snap = env.get_state()
            env.step(env.valid_actions()[0])  # branch away, then come back
            t, _ = timed(lambda: (env.set_state(snap), env.step(env.valid_actions()[0])), n=3)
            rows.append((f"set_state after {k} steps (ms)", f"{1e3 * t:.0f}", "replay operator ids from reset, +1 step"))
        rows.append(("get_state (us)", f"{1e6 * timed(env.get_state, 1000)[0]:.1f}", "tuple of commands"))

        env.reset(3)
        t, plan = timed(env.expert_plan)
        rows.append(("expert_plan handcoded at reset (ms)", f"{1e3 * t:.0f}", f"{len(plan or [])} actions"))
        envp = A.make_env("train", cache_dir=cache, data="generated", expert="planner")
        envp.reset(3)
        t, plan = timed(envp.expert_plan)
        rows.append(("expert_plan planner at reset (ms)", f"{1e3 * t:.0f}", f"{len(plan or [])} actions"))

        # ReSim tree cost per real state, with configs/alfworld.yaml's tree (b=3 rollouts, depth <= 2)
        import agent
        import resim
        tok = agent.load_model("tiny")[1]
        _, st = resim.collect("alfworld", dict(cache_dir=cache, data="generated", expert="planner"),
                              list(range(args.trees)), tokenizer=tok, aggregate=resim.template_aggregate,
                              b=3, d=2, b_train=2, eps=0.3, gamma=0.95, history_k=2, system=False, progress=False)
        rows.append(("ReSim tree per real state, b=3 d=2 (s)", f"{st['seconds'] / max(1, st['steps']):.2f}",
                     f"{st['steps']:.0f} states in {args.trees} episodes, planner expert, replay branching"))

    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}} | {'value':>8} | note")
    print("-" * (w + 40))
    for name, val, note in rows:
        print(f"{name:<{w}} | {val:>8} | {note}")


if __name__ == "__main__":
    main()
