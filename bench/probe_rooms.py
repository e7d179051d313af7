"""Where a Sokoban model's out-of-distribution failure comes from: greedy success on other room types.
The OOD split (8x8, two boxes) combines a bigger room with a second box. This plays the same model on rooms
that change one of them at a time (and on any other room asked for), so a failure can be read as size, box
count, or their combination. Every room type plays the same seeds (the ID split's, from --start, rooms
overridden), with the OOD split's step cap (30) unless --max-steps says otherwise.

--deadlocks replays every turn and asks the expert (gamma ** steps-to-go, 0 for an unsolvable room) about it:
    deadlocked by the move   of the turns in a solvable room, those whose chosen action makes it unsolvable
    deadlocking plans        plans written in a solvable room whose real end state is unsolvable, and of those
                             the share whose written value is 0.00 (what a trace writes there: is it learnt?)

    python bench/probe_rooms.py runs/resim_sokoban_mix/model [--rooms 7x7x2 8x8x1 8x8x2] [--episodes 100]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import common  # noqa: E402
import envs  # noqa: E402
import evaluate  # noqa: E402
import search_tree  # noqa: E402
from probe_choice import GAMMA, real_value as value_after  # noqa: E402  (bench/ is this script's path)

VALUE = search_tree.expert_value(GAMMA)   # the traces' value (resim.gamma)


def deadlocks(episodes, kw):
    """(turns whose move deadlocks a solvable room, turns; deadlocking written plans, of them written 0.00)."""
    env = envs.make_env("sokoban", "id", **kw)
    moved = turns = plans = zeros = 0
    for ep in episodes:
        env.reset(ep.seed)
        for turn in ep.turns:
            state, parsed = env.get_state(), agent.parse_response(turn.text)
            if VALUE(env) > 0:   # a room still solvable: what does this turn's answer do to it?
                if turn.action is not None:
                    turns += 1
                    moved += value_after(env, state, [turn.action]) == 0
                for plan in parsed.plans:
                    if plan.actions and plan.value is not None and value_after(env, state, plan.actions) == 0:
                        plans += 1
                        zeros += round(plan.value, 2) == 0
            env.step(turn.action if turn.action is not None else turn.text)
    return moved, turns, plans, zeros


def parse_room(text):
    """'8x8x2' -> (8, 8, 2): height, width, boxes."""
    try:
        h, w, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"a room is HxWxBOXES, e.g. 8x8x2; got {text!r}")
    if min(h, w) < 4 or b < 1:
        raise SystemExit(f"room {text!r}: at least 4x4 and one box")
    return h, w, b


def probe(model_dir, rooms, episodes, start, max_steps, check_deadlocks=False):
    saved = common.prompt_settings(model_dir)
    if saved.get("env", "sokoban") != "sokoban":
        raise SystemExit(f"{model_dir} is a {saved['env']} model; this probe is for Sokoban")
    model, tok = agent.load_model(model_dir, dtype="bfloat16")   # as evaluate.py and training
    seeds = envs.split_seeds("id", episodes, start=start)
    for h, w, b in rooms:
        t0 = time.time()
        kw = dict(dim=(h, w), num_boxes=b, max_steps=max_steps, max_solution=max_steps)
        made, eps = evaluate.play(model, tok, "sokoban", "id", seeds, env_kwargs=kw, progress=False,
                                  history_k=saved.get("history_k", 0), system=saved.get("system", False),
                                  max_new_tokens=saved.get("max_new_tokens", 320))
        m = evaluate.summarize(evaluate.episode_rows(made, eps))
        lo, hi = m["success_ci95"]
        by_len = " / ".join(f"{k} {100 * v:.0f}%" for k, v in m.get("success_by_length", {}).items())
        print(f"{h}x{w}, {b} box{'es' if b > 1 else ''}: success {100 * m['success']:.1f}% [{100 * lo:.0f}, "
              f"{100 * hi:.0f}] ({by_len}); sim {m['sim']:.2f}; revisit {m['revisit']:.2f}; invalid "
              f"{m['invalid']:.3f}; {time.time() - t0:.0f} s", flush=True)
        if check_deadlocks:
            moved, turns, plans, zeros = deadlocks(eps, kw)
            print(f"    deadlocked by the move: {moved} of {turns} turns ({100 * moved / max(1, turns):.1f}%); "
                  f"deadlocking plans written: {plans}, valued 0.00: {zeros} ({100 * zeros / max(1, plans):.0f}%)",
                  flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a Sokoban run's model directory")
    ap.add_argument("--rooms", nargs="+", default=["6x6x2", "7x7x2", "8x8x1", "8x8x2"], help="HxWxBOXES")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--start", type=int, default=5000, help="first ID seed index (evaluation uses 0-199)")
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--deadlocks", action="store_true", help="replay the turns: moves and plans that deadlock")
    args = ap.parse_args()
    probe(args.model, [parse_room(r) for r in args.rooms], args.episodes, args.start, args.max_steps,
          args.deadlocks)


if __name__ == "__main__":
    main()
