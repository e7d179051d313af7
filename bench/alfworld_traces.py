"""What an ALFWorld ReSim run's traces teach about searching: does the real path ever leave a receptacle without
taking, and does it ever take an object the task does not name? Reads the run's traces.jsonl (no model, no env).

    takes              `take` actions on the real path; "named": the object's type is a word of the task
    first-stop takes   episodes whose first `take` is at the first receptacle they went to
    leaves             the path arrived at a receptacle (go to / open) and the trace chose another `go to` there
    detours            real steps whose action is not the trace's choice (resim.detour; resim.hide_best too). The
                       last step's executed action is not in the records: it counts as the choice

    python bench/alfworld_traces.py runs/resim25d_alfworld_smollm2 [runs/other ...]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories holding traces.jsonl")
    args = ap.parse_args()
    for run in args.runs:
        print(run, json.dumps(stats(episodes(f"{run.rstrip('/')}/traces.jsonl"))))


if __name__ == "__main__":
    sys.exit(main())
