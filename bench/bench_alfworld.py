"""ALFWorld env costs (game generation, engine steps, reset, get/set_state branching, expert plans) and the shape
of the generated games per room type (receptacles, objects, expert plan length).

    python bench/bench_alfworld.py [--games 12] [--steps 150] [--table 60]
Generation writes into a fresh temporary cache (nothing is kept)."""
import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import alfworld_env as A  # noqa: E402
import envs  # noqa: E402

ROOMS = ["Kitchen", "LivingRoom", "Bedroom", "Bathroom"]


def timed(fn, n=1):
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    return (time.perf_counter() - t) / n, out


def costs(cache, n_games, n_steps):
    rows = []
    seeds = envs.split_seeds("train", n_games)
    t, _ = timed(lambda: [A.generate_game("train", s, cache_dir=cache) for s in seeds])
    rows.append(("games generated / s (incl. expert check)", f"{n_games / t:.2f}", f"{n_games} games, {dict(A.GEN_STATS)}"))
    env = A.make_env("train", cache_dir=cache, data="generated")
    t, _ = timed(lambda: env.reset(seeds[0]))
    rows.append(("reset, same game (ms)", f"{1e3 * t:.0f}", "SAS load, translation memoised"))
    A._pddl2sas.cache_clear()  # forget the translations done while generating
    env2 = A.make_env("train", cache_dir=cache, data="generated")
    t, _ = timed(lambda: env2.reset(seeds[3]))
    rows.append(("reset, new game, first load (ms)", f"{1e3 * t:.0f}", "PDDL->SAS translation x2 (kitchen)"))

    rng, n, i = np.random.default_rng(0), 0, 0
    env.reset(seeds[i])
    t0 = time.perf_counter()
    while n < n_steps:
        va = env.valid_actions()
        _, _, done, _ = env.step(va[rng.integers(len(va))])
        n += 1
        if done:
            i = (i + 1) % n_games
            env.reset(seeds[i])
    t = time.perf_counter() - t0
    rows.append(("engine steps / s (random valid actions)", f"{n / t:.1f}", f"{1e3 * t / n:.1f} ms/step, {n_games} games"))

    for k in (0, 10, 25, 49):
        env.reset(seeds[3])
        for _ in range(k):
            va = env.valid_actions()
            env.step(va[rng.integers(len(va))])
        snap = env.get_state()
        env.step(env.valid_actions()[0])  # branch away, then come back
        t, _ = timed(lambda: (env.set_state(snap), env.step(env.valid_actions()[0])), n=3)
        rows.append((f"set_state after {k} steps (ms)", f"{1e3 * t:.0f}", "replay operator ids from reset, +1 step"))
    rows.append(("get_state (us)", f"{1e6 * timed(env.get_state, 1000)[0]:.1f}", "dict of the command prefix"))
    for expert in ("handcoded", "planner", "explorer"):   # heavy-tailed: the planner's search grows with the problem
        e = A.make_env("train", cache_dir=cache, data="generated", expert=expert)
        ms, plans = [], []
        for s in seeds:
            t, (_, plan) = timed(lambda: (e.reset(s), e.expert_plan()))
            ms.append(1e3 * t)
            plans += [plan] if plan else []
        # leaves as bench/alfworld_traces.py counts them: at a receptacle gone to or opened, on to another
        leaves = sum(a.startswith(("go to ", "open ")) and b.startswith("go to ") for p in plans for a, b in zip(p, p[1:]))
        rows.append((f"expert_plan {expert} at reset (ms)", f"{np.median(ms):.0f}",
                     f"median; max {max(ms):.0f} ms over {n_games} games (incl. a ~150 ms reset); "
                     f"{n_games - len(plans)} failed; plans of {np.mean([len(p) for p in plans]):.1f} steps, "
                     f"{leaves} leaves (on from a receptacle without taking)"))
    return rows


def shape(cache, n_games):
    """Per room type: receptacles per scene (-openable.json alone, as before, and now), objects per game and
    per receptacle, and the expert's plan lengths, over `n_games` generated train games."""
    per_room = defaultdict(lambda: defaultdict(list))
    for split in ("train", "ood"):
        for scene in A.scenes(split):
            types, recs, _ = A.scene_layout(scene)
            poses = json.load(open(os.path.join(A.PKG, "gen", "layouts", f"FloorPlan{scene}-openable.json")))
            per_room[A.ROOM[scene]]["openable"].append(len(poses))
            per_room[A.ROOM[scene]]["receptacles"].append(len(recs))
    planner = A.make_env("train", cache_dir=cache, data="generated", expert="planner")
    for seed in envs.split_seeds("train", n_games):
        game = A.generate_game("train", seed, cache_dir=cache)
        g, traj = json.load(open(game)), json.load(open(os.path.join(os.path.dirname(game), "traj_data.json")))
        room = A.ROOM[int(traj["scene"]["floor_plan"][len("FloorPlan"):])]
        objects, receps = g["pddl_problem"].count("(objectType "), g["pddl_problem"].count("(receptacleType ")
        planner.reset(seed)
        for key, val in (("games", 1), ("objects", objects), ("per_recep", objects / receps),
                         ("handcoded", len(g["walkthrough"])), ("planner", len(planner.expert_plan()))):
            per_room[room][key].append(val)
        per_room[room]["per_visit"] += seen_per_visit(planner, g["walkthrough"])
    lines = ["| room | scenes | receptacles / scene (openable.json only -> now) | games | objects / game "
             "| objects / receptacle | objects seen per expert visit | hand-coded expert plan | optimal plan |",
             "|---" * 9 + "|"]
    for room in ROOMS:
        d = per_room[room]
        m = lambda k: f"{np.mean(d[k]):.1f} ({min(d[k]):.3g}-{max(d[k]):.3g})" if d[k] else "-"
        lines.append(f"| {room} | {len(d['receptacles'])} | {np.mean(d['openable']):.1f} -> {m('receptacles')} "
                     f"| {len(d['games'])} | {m('objects')} | {m('per_recep')} | {m('per_visit')} | {m('handcoded')} "
                     f"| {m('planner')} |")
    return lines


def seen_per_visit(env, walkthrough):
    """Objects listed on arriving at or opening a receptacle along the walkthrough (0 for "you see nothing")."""
    env.reset(env.seed)
    counts = []
    for a in walkthrough:
        obs = env.step(a)[0]
        if a.startswith(("go to ", "open ")) and "you see" in obs:
            seen = obs.split("you see", 1)[1].split(".")[0].strip()
            counts.append(0 if seen == "nothing" else seen.count(", ") + 1)
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--games", type=int, default=12, help="games generated for the cost rows")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--table", type=int, default=60, help="generated games behind the per-room table (0: none)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        rows = costs(cache, args.games, args.steps)
        w = max(len(r[0]) for r in rows)
        print(f"{'measure':<{w}} | {'value':>8} | note\n" + "-" * (w + 40))
        for name, val, note in rows:
            print(f"{name:<{w}} | {val:>8} | {note}")
        if args.table:
            print("\n" + "\n".join(shape(cache, args.table)))


if __name__ == "__main__":
    main()
