"""Which moves does a held-out (OOD) TextPhone template need that no ID template's oracle ever makes?

A ReSim trace's decision is the oracle-valued plan's first action, so SFT teaches the moves the ID oracles make.
A "skill" here is one oracle move with its names abstracted away: (screen, what the move does), for example
("clock", "click toggle_alarm") or ("contact", "click push contact_form"). The probe runs every oracle on
`--train` train-split episodes and on the OOD episodes evaluation plays, and lists per OOD template the skills
its oracle needs that the ID oracles never showed: a move a trained model has never been taught to choose.

    python bench/probe_ood_skills.py [--train 800] [--ood 20]
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
from android_env import parse_action  # noqa: E402
from textphone import make_env  # noqa: E402


def skill(env, action):
    """(screen, the move without its names) of one action on env's current screen."""
    a, screen = parse_action(action), env.stack[-1]["name"]
    kind = a["action_type"]
    if kind == "click":
        do = env.elements()[a["index"]]["do"] or ("nothing",)
        target = do[1].get("name") if do[0] == "push" and isinstance(do[1], dict) else None
        return screen, " ".join(["click", do[0]] + ([target] if target else []))
    if kind == "input_text":
        label = env.elements()[a["index"]].get("hint_text")
        return screen, f"type {label}" + (" (replace)" if a.get("clear_text") else "")
    if kind == "open_app":
        return "any", f"open {a['app_name']}"
    return screen, kind


def oracle_skills(env, seed):
    """The skills of the oracle's plan for the episode of seed (an empty list: no plan)."""
    env.reset(seed)
    out = []
    for action in env.expert_plan() or []:
        out.append(skill(env, action))
        env.step(action)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=800, help="train-split episodes (ID templates) to run")
    ap.add_argument("--ood", type=int, default=20, help="OOD episodes (evaluation's seeds)")
    args = ap.parse_args()
    env = make_env("train")
    seen = {s for seed in envs.split_seeds("train", args.train) for s in oracle_skills(env, seed)}
    print(f"{len(seen)} distinct skills in the oracle plans of {args.train} train episodes")
    env, rows = make_env("ood"), collections.defaultdict(list)
    for seed in envs.split_seeds("ood", args.ood):
        skills = oracle_skills(env, seed)
        rows[env.task_type].append([s for s in skills if s not in seen])
    print("| OOD template | tasks | tasks needing an unseen skill | unseen skills (screen: move) |")
    print("|---|---|---|---|")
    for t in sorted(rows):
        unseen = sorted({s for r in rows[t] for s in r})
        print(f"| {t} | {len(rows[t])} | {sum(bool(r) for r in rows[t])} | "
              f"{'; '.join(f'{s}: {m}' for s, m in unseen) or '-'} |")


if __name__ == "__main__":
    main()
