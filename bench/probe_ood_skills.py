"""Which moves does a held-out (OOD) TextPhone template need that no ID template's oracle ever makes?

A ReSim trace's decision is the oracle-valued plan's first action, so SFT teaches the moves the ID oracles make.
A "skill" here is one oracle move with its names abstracted away: (screen, what the move does), for example
("clock", "click toggle_alarm") or ("contact", "click push contact_form"). The probe runs every oracle on
`--train` train-split episodes and on the OOD episodes evaluation plays, and lists per OOD template the skills
its oracle needs that the ID oracles never showed: a move a trained model has never been taught to choose.
It also counts the tasks where the oracle types text that the agent's prompt (task, the last history_k steps,
the screen; agent.build_messages) does not hold at that step: text a policy without memory cannot know.

    python bench/probe_ood_skills.py [--train 800] [--ood 20] [--history_k 1]
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
from agent import build_messages  # noqa: E402
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


def oracle_skills(env, seed, history_k=1):
    """The skills of the oracle's plan for the episode of seed (an empty list: no plan), and the texts it types
    that the prompt of that step (history_k steps of history, as agent.run_episodes builds it) does not hold."""
    obs, hist, out, unseen_text = env.reset(seed), [], [], []
    for action in env.expert_plan() or []:
        out.append(skill(env, action))
        text = parse_action(action).get("text")
        if text and text not in build_messages(env, hist, obs, history_k=history_k, system=False)[-1]["content"]:
            unseen_text.append(text)
        obs = env.step(action)[0]
        hist.append((action, obs))
    return out, unseen_text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=800, help="train-split episodes (ID templates) to run")
    ap.add_argument("--ood", type=int, default=20, help="OOD episodes (evaluation's seeds)")
    ap.add_argument("--history_k", type=int, default=1, help="steps of history in the prompt (the SmolLM2 config's 1)")
    args = ap.parse_args()
    env, seen, blind_train = make_env("train", compact=True), set(), 0
    for seed in envs.split_seeds("train", args.train):
        skills, unseen_text = oracle_skills(env, seed, args.history_k)
        seen.update(skills)
        blind_train += bool(unseen_text)
    print(f"{len(seen)} distinct skills in the oracle plans of {args.train} train episodes; in {blind_train} of the "
          f"episodes the oracle types text its prompt (history_k={args.history_k}) does not hold")
    env, rows, blind = make_env("ood", compact=True), collections.defaultdict(list), collections.Counter()
    for seed in envs.split_seeds("ood", args.ood):
        skills, unseen_text = oracle_skills(env, seed, args.history_k)
        rows[env.task_type].append([s for s in skills if s not in seen])
        blind[env.task_type] += bool(unseen_text)
    print(f"| OOD template | tasks | tasks needing an unseen skill | unseen skills (screen: move) | tasks typing text "
          f"the prompt does not hold (history_k={args.history_k}) |")
    print("|---|---|---|---|---|")
    for t in sorted(rows):
        unseen = sorted({s for r in rows[t] for s in r})
        print(f"| {t} | {len(rows[t])} | {sum(bool(r) for r in rows[t])} | "
              f"{'; '.join(f'{s}: {m}' for s, m in unseen) or '-'} | {blind[t]} |")


if __name__ == "__main__":
    main()
