"""Where a Sokoban model's out-of-distribution failure comes from: greedy success on other room types.
The OOD split (8x8, two boxes) combines a bigger room with a second box. This plays the same model on rooms
that change one of them at a time (and on any other room asked for), so a failure can be read as size, box
count, or their combination. Every room type plays the same seeds (the ID split's, from --start, rooms
overridden), with the OOD split's step cap (30) unless --max-steps says otherwise.

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


def parse_room(text):
    """'8x8x2' -> (8, 8, 2): height, width, boxes."""
    try:
        h, w, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"a room is HxWxBOXES, e.g. 8x8x2; got {text!r}")
    if min(h, w) < 4 or b < 1:
        raise SystemExit(f"room {text!r}: at least 4x4 and one box")
    return h, w, b


def probe(model_dir, rooms, episodes, start, max_steps):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a Sokoban run's model directory")
    ap.add_argument("--rooms", nargs="+", default=["6x6x2", "7x7x2", "8x8x1", "8x8x2"], help="HxWxBOXES")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--start", type=int, default=5000, help="first ID seed index (evaluation uses 0-199)")
    ap.add_argument("--max-steps", type=int, default=30)
    args = ap.parse_args()
    probe(args.model, [parse_room(r) for r in args.rooms], args.episodes, args.start, args.max_steps)


if __name__ == "__main__":
    main()
