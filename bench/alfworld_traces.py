"""What an ALFWorld ReSim run's traces teach about searching: does the real path ever leave a receptacle without
taking, and does it ever take an object the task does not name? Reads the run's traces.jsonl (no model, no env).

    takes              `take` actions on the real path; "named": the object's type is a word of the task
    first-stop takes   episodes whose first `take` is at the first receptacle they went to
    leaves             the path arrived at a receptacle (go to / open) and the trace chose another `go to` there
    detours            real steps whose action is not the trace's choice (resim.detour; resim.hide_best too). The
                       last step's executed action is not in the records: it counts as the choice

    python bench/alfworld_traces.py runs/resim25d_alfworld_smollm2 [runs/other ...]

With --evals, what a trained agent did in evaluated games (evaluate.py --out's per_episode rows), summed over the
files: games that take anything, that take an object the task names, and of those the games that write a
move / put / heat / cool / clean / use command after that take (the agent that took its object and then
shuttled between two receptacles wrote none: RESULTS.md).

    python bench/alfworld_traces.py --evals runs/X/eval_id_0.json runs/X/eval_id_12.json
"""
import argparse
import json
import re
import sys
from collections import defaultdict

TAKE = re.compile(r"^take (\w+) \d+ from ")


def episodes(path):
    """seed -> (task, [(executed action, the trace's choice)]) from a run's resim records, in step order."""
    by_seed = defaultdict(list)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "resim":
                by_seed[r["seed"]].append(r)
    out = {}
    for seed, recs in by_seed.items():
        recs.sort(key=lambda r: r["step"])
        m = re.findall(r"Your task is to: ([^\n.]*)", recs[0]["prompt"])
        path = list(recs[-1]["prefix"]) + [recs[-1]["action"]]    # the last step's own action is not known
        out[seed] = (m[-1] if m else "", [(path[r["step"]], r["action"]) for r in recs])
    return out


def stats(eps):
    takes = named = first_stop = leaves = detours = steps = 0
    for task, path in eps.values():
        words = set(task.lower().split())
        gone = 0                      # receptacles gone to before the first take
        took = False
        for i, (done, chosen) in enumerate(path):
            steps += 1
            detours += done != chosen
            m = TAKE.match(done)
            if m:
                takes += 1
                named += m.group(1) in words
                if not took:
                    first_stop += gone == 1
                    took = True
            if done.startswith("go to ") and not took:
                gone += 1
            if i and path[i - 1][0].startswith(("go to ", "open ")) and chosen.startswith("go to "):
                leaves += 1
    n = len(eps)
    return dict(episodes=n, steps=steps, detours=detours, takes=takes, takes_named=named,
                first_stop_takes=first_stop, leaves=leaves, leaves_per_episode=leaves / max(1, n))


AFTER_TAKE = ("move ", "put ", "heat ", "cool ", "clean ", "use ")


def played(rows):
    """Counts over evaluated games (per_episode rows: task, success, actions)."""
    out = dict(games=len(rows), success=0, took=0, took_named=0, acted_after_named=0)
    for r in rows:
        words, acts = set(r["task"].lower().split()), [str(a) for a in r["actions"]]
        named = [i for i, a in enumerate(acts) if (m := TAKE.match(a)) and m.group(1) in words]
        out["success"] += bool(r["success"])
        out["took"] += any(TAKE.match(a) for a in acts)
        out["took_named"] += bool(named)
        out["acted_after_named"] += bool(named) and any(a.startswith(AFTER_TAKE) for a in acts[named[0] + 1:])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run directories holding traces.jsonl")
    ap.add_argument("--evals", nargs="+", default=[], help="evaluate.py --out files of ALFWorld games")
    args = ap.parse_args()
    if args.evals:
        rows = [r for f in args.evals for r in json.load(open(f))["per_episode"]]
        print(" + ".join(args.evals), json.dumps(played(rows)))
    for run in args.runs:
        print(run, json.dumps(stats(episodes(f"{run.rstrip('/')}/traces.jsonl"))))


if __name__ == "__main__":
    sys.exit(main())
