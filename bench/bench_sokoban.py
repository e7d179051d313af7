"""Sokoban speed: env steps/s, rooms/s, solver ms per room; --gym compares with gym-sokoban 0.0.6.

    python bench/bench_sokoban.py                       # our numbers only (the project's venv)
    .venv-gym/bin/python bench/bench_sokoban.py --gym   # + identical-trajectory check and gym timings
(the gym venv, from the repository root: python3 -m venv .venv-gym && .venv-gym/bin/pip install gym-sokoban numpy
gym imageio pillow)
Each timing runs for about --secs seconds on one core.
"""
import argparse
import io
import os
import random
import sys
import time
from contextlib import redirect_stdout

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
import sokoban as S  # noqa: E402

CASES = [("6x6/1 box", "id"), ("8x8/2 boxes", "ood")]


def timed(fn, secs):
    """Call fn() until secs have passed; fn returns how many units it did. -> units per second."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < secs:
        n += fn()
    return n / (time.perf_counter() - t0)


def our_steps_per_s(split, secs):
    env = S.make_env(split, max_steps=10**9)
    env.reset(envs.split_seeds(split, 1)[0])
    start, rnd = env.get_state(), random.Random(0)
    acts = [rnd.choice(S.ACTIONS) for _ in range(1000)]

    def run():
        env.set_state(start)
        for a in acts:
            if env.step(a)[2]:
                env.set_state(start)
        return len(acts)
    return timed(run, secs)


def our_state_copies_per_s(split, secs):
    env = S.make_env(split)
    env.reset(envs.split_seeds(split, 1)[0])

    def run():
        for _ in range(1000):
            env.set_state(env.get_state())
        return 1000
    return timed(run, secs)


def our_rooms_per_s(split, secs, filtered=True):
    env, seeds = S.make_env(split), iter(envs.split_seeds(split, 10**6))
    if filtered:
        return timed(lambda: (env.reset(next(seeds)), 1)[1], secs)
    rng = np.random.default_rng(0)
    cfg = S.SPLITS[split]

    def run():
        try:
            S.generate_room(rng, cfg["dim"], cfg["num_boxes"])
        except RuntimeError:
            pass
        return 1
    return timed(run, secs)


def solver_ms(split, n):
    env, out = S.make_env(split), []
    for seed in envs.split_seeds(split, n):
        env.reset(seed)
        t0 = time.perf_counter()
        S.solve(env)
        out.append((time.perf_counter() - t0) * 1e3)
    return np.median(out), np.percentile(out, 90)


def bench_ours(secs):
    print("## ours (sokoban.py)\n")
    print("| room | env steps/s | get+set_state/s | rooms/s (with BFS length filter) | rooms/s (generator only) "
          "| solver ms median | solver ms p90 |")
    print("|---|---|---|---|---|---|---|")
    for name, split in CASES:
        med, p90 = solver_ms(split, 300)
        print(f"| {name} | {our_steps_per_s(split, secs):,.0f} | {our_state_copies_per_s(split, secs):,.0f} "
              f"| {our_rooms_per_s(split, secs):,.0f} | {our_rooms_per_s(split, secs, False):,.0f} "
              f"| {med:.3f} | {p90:.3f} |")


# ------------------------------------------------------------------------------------------
# gym-sokoban comparison (run with the gym venv's python)

def gym_equivalence(n_rooms, dim, num_boxes, max_steps=60):
    """Same room, same random actions: room_state, reward and done must agree at every step."""
    from gym_sokoban.envs.sokoban_env import SokobanEnv
    genv = SokobanEnv(dim_room=dim, num_boxes=num_boxes, max_steps=max_steps, reset=False)
    ours = S.Sokoban(dim=dim, num_boxes=num_boxes, max_steps=max_steps)
    rnd, steps, mism = random.Random(0), 0, 0
    for _ in range(n_rooms):
        with redirect_stdout(io.StringIO()):               # gym prints on its own retries
            genv.reset(render_mode="tiny_rgb_array")
        ours.load_arrays(genv.room_fixed, genv.room_state)
        assert tuple(genv.player_position) == ours.player_position
        while True:
            a = rnd.randint(1, 4)
            _, g_r, g_done, _ = genv.step(a, observation_mode="tiny_rgb_array")
            _, r, done, _ = ours.step(S.ACTIONS[a - 1])
            steps += 1
            if r != g_r or done != g_done or not (ours.room_state == genv.room_state).all():
                mism += 1
                break
            if done:
                break
    return steps, mism


def reverse_play_equivalence(n, dim, num_boxes):
    """Feed gym's reverse_playing and ours the same pre-reverse room; compare room and score."""
    from gym_sokoban.envs import room_utils as R
    rng, same, tried = np.random.default_rng(1), 0, 0
    while tried < n:
        try:
            room = S.place_boxes_and_player(rng, S.room_topology(rng, dim, 0.35, int(1.7 * sum(dim))), num_boxes)
        except RuntimeError:
            continue
        fixed = room.copy()
        fixed[fixed == 5] = 1
        state = room.copy()
        state[state == 2] = 4
        with redirect_stdout(io.StringIO()):
            g_state, g_score, _ = R.reverse_playing(state.copy(), fixed.copy())
        g_state = g_state.copy()
        g_state[g_state == 3] = 4
        o_state, o_score = S.reverse_play(fixed, state)
        tried += 1
        same += int(g_score == o_score and (g_state == o_state).all())
    return same, tried


def gym_rooms_per_s(dim, num_boxes, secs):
    from gym_sokoban.envs import room_utils as R
    random.seed(0)
    np.random.seed(0)

    def run():
        try:
            R.generate_room(dim=dim, num_steps=int(1.7 * sum(dim)), num_boxes=num_boxes)
        except (RuntimeError, RuntimeWarning):
            pass
        return 1
    return timed(run, secs)


def gym_steps_per_s(dim, num_boxes, secs, mode):
    from gym_sokoban.envs.sokoban_env import SokobanEnv
    random.seed(0)
    np.random.seed(0)
    genv = SokobanEnv(dim_room=dim, num_boxes=num_boxes, max_steps=10**9, reset=False)
    with redirect_stdout(io.StringIO()):
        genv.reset(render_mode="tiny_rgb_array")
    fixed, state = genv.room_fixed.copy(), genv.room_state.copy()
    rnd = random.Random(0)
    acts = [rnd.randint(1, 4) for _ in range(200)]

    def run():
        genv.room_state[:] = state
        genv.player_position = np.argwhere(state == 5)[0]
        genv.boxes_on_target = 0
        for a in acts:
            if genv.step(a, observation_mode=mode)[2]:
                genv.room_state[:] = state
                genv.player_position = np.argwhere(state == 5)[0]
                genv.boxes_on_target = 0
        return len(acts)
    return timed(run, secs)


def bench_gym(secs):
    import warnings
    warnings.filterwarnings("ignore")
    print("\n## vs gym-sokoban 0.0.6 (same machine, same python)\n")
    print("| room | identical steps (mismatches) | reverse-play identical | our steps/s | gym steps/s "
          "(tiny_rgb_array) | gym steps/s (rgb_array) | our rooms/s (generator only) | gym rooms/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, split in CASES:
        cfg = S.SPLITS[split]
        dim, nb = cfg["dim"], cfg["num_boxes"]
        steps, mism = gym_equivalence(300, dim, nb)
        same, tried = reverse_play_equivalence(100 if nb == 1 else 30, dim, nb)
        print(f"| {name} | {steps} ({mism}) | {same}/{tried} | {our_steps_per_s(split, secs):,.0f} "
              f"| {gym_steps_per_s(dim, nb, secs, 'tiny_rgb_array'):,.0f} "
              f"| {gym_steps_per_s(dim, nb, min(secs, 1.0), 'rgb_array'):,.0f} "
              f"| {our_rooms_per_s(split, secs, False):,.1f} | {gym_rooms_per_s(dim, nb, secs):,.1f} |", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gym", action="store_true", help="compare with gym-sokoban (needs it importable)")
    ap.add_argument("--secs", type=float, default=2.0, help="seconds per timing")
    args = ap.parse_args()
    bench_ours(args.secs)
    if args.gym:
        bench_gym(args.secs)
