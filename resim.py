"""ReSim, stage 1 of Dyna-Mind: reasoning traces from real search trees (the paper's Algorithm 3).

At every real state s_t of a train episode:
    tree   = b real rollouts of depth <= d from s_t, each leaf valued        search_tree.expand
    keep   = the best rollout + b_train - 1 others                           resim_episode
    a_t    = one response listing the kept plans, each with its REAL future states and value, in an order
             that does not reveal the best (a seeded shuffle); only then "Best: Plan k" and plan k's first
             action: the choice comes after the simulation                  template_aggregate / llm_aggregator
    s_t+1  = env.step(that action)
Only successful episodes are kept (the paper). train.py then distils the traces into the policy by SFT
(Distill(ReSim)): `samples` turns records into the one sample type of grpo.py, with advantage 1.

    python resim.py --verify runs/resim_sokoban/traces.jsonl   # replay every imagined state of a trace file
"""
import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import agent
import engine
import envs
import grpo
import search_tree
import simrollout


@dataclass
class Record:
    """One ReSim training example: the plain prompt of a real state and the trace written from its tree."""
    env: str
    env_kwargs: dict
    seed: int
    step: int       # the real step of the episode this state was reached at
    kind: str       # "resim", or "refine": a SimRollout-format example from the same tree (resim.refine_frac)
    prompt: str     # the chat-templated prompt the student sees
    response: str   # the trace it learns to write
    action: str     # the chosen plan's first action, executed in the real env
    prefix: list    # the actions before this step (verify replays them from the seed)


# ---- aggregation: the kept plans -> one response ------------------------------------------------------

def template_aggregate(plans, best, state_text=""):
    """The deterministic aggregator: every plan with its real states and value, then the choice, then the
    chosen plan's first action."""
    return agent.format_response(plans, best=best, action=plans[best].actions[0])


AGGREGATE_PROMPT = (
    "You are helping an agent plan. Current state:\n{state}\n\nCandidate plans, each executed in the real "
    "environment, with the real resulting states and a value (1 = solved):\n{plans}\nPlan {best} has the "
    "highest value. In two sentences, compare the plans and say why Plan {best} is the best choice.")


def llm_aggregator(model, tokenizer, max_new_tokens=96):
    """An LLM writes the comparison between the plans, placed after them and before "Best:"; the plans, states,
    values and the choice stay the real ones. If its text would change what the response parses to (or is
    empty), the template trace is used instead."""
    def aggregate(plans, best, state_text=""):
        base = template_aggregate(plans, best)
        listing = base.split("<think>\n", 1)[-1].split("Best:", 1)[0]
        msgs = [{"role": "user", "content": AGGREGATE_PROMPT.format(state=state_text, plans=listing, best=best + 1)}]
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        text = engine.generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=0.0,
                               stop=("\n\n",))[0].text
        text = " ".join(text.replace("<", " ").replace(">", " ").split())   # one safe line: no tags, no "> "
        if not text:
            return base
        out = base.replace("Best:", f"{text}\nBest:", 1)
        p, q = agent.parse_response(out), agent.parse_response(base)
        return out if (p.plans, p.best, p.action) == (q.plans, q.best, q.action) else base
    return aggregate


def as_plan(rollout):
    return agent.Plan(list(rollout.actions), list(rollout.observations), round(rollout.value, 2))


def order_plans(first, others, plan_order, rng):
    """The kept rollouts as plans, `first` among them, and the index where `first` ended up. "shuffled": a
    seeded permutation, so the position never gives the choice away; "best_first": first stays first (the
    ablation: the first token after "Plan 1:" then already decides the action)."""
    kept = [first] + list(others)
    perm = rng.permutation(len(kept)) if plan_order == "shuffled" else np.arange(len(kept))
    return [as_plan(kept[j]) for j in perm], int(np.flatnonzero(perm == 0)[0])


# ---- Algorithm 3: one ReSim episode --------------------------------------------------------------------

def refinement_example(env, history, obs, tree, *, plan_order, rng, tokenizer, history_k, system, keep=0.5):
    """A SimRollout-format prompt from the same real tree: the "previous answer" compares the best rollout with a
    worse one and chooses the best (a `keep` share: the refinement keeps its action) or the worse (it must
    switch); the refinement prompt shows the chosen rollout's real future states. (The target is the ReSim
    trace.) A model trained from scratch has never seen a refinement prompt; without these its SimRollout
    answers are unreadable and A_refine never fires. With keep = 0 every example switches, and the model learns
    that a refinement always changes the action, a right one too (RESULTS.md, Stage 2: bench/probe_refine.py)."""
    worse = tree[1]
    plans, i_worse = order_plans(worse, [tree[0]], plan_order, rng)
    chosen, shown = (1 - i_worse, tree[0]) if keep > 0 and rng.random() < keep else (i_worse, worse)
    previous = agent.format_response(plans, best=chosen, action=shown.actions[0])
    futures = list(zip(shown.actions, shown.observations))
    return simrollout.refinement_prompt(tokenizer, env, history, obs, previous, futures,
                                        history_k=history_k, system=system)


def resim_episode(env, seed, *, b, d, b_train, plan_order, act, value, aggregate, rng, tokenizer, history_k,
                  system, refine_frac=0.0, refine_keep=0.5, detour=0.0, hide_best=0.0, value_scale="absolute",
                  gamma=0.9, distinct=1, env_kwargs=None, deadline=None):
    """Algorithm 3 on one episode. Returns (records, success): one record per real step, plus a refinement
    record for a `refine_frac` share of the steps. With probability `detour` the real env takes the first
    action of another rollout whose leaf is still solvable instead of the chosen one: the trace still teaches
    the best choice, from states off the best path, where a policy finds itself after a mistake.
    With probability `hide_best` (where the tree has 3+ rollouts) the trace lists only rollouts other than the
    best and chooses the best of those; the real env still takes the best action. Everywhere else the best plan's
    action is also the state's usual move, so a model can write the action from the state alone and ignore its
    own "Best:" line; these traces are where only the simulation gives the action (RESULTS.md, Stage 1).
    value_scale "relative" writes each value against the root's (search_tree.relative_to_root); distinct: draw
    rollouts past b until that many differ (search_tree.expand). The episode ends, lost, at a state where no leaf
    is valued above 0 and the expert has no plan (a deadlock; an expert past its cap; a device with no oracle),
    or unsolved once time.monotonic() passes `deadline` (collect's episode_minutes)."""
    obs, history, records = env.reset(seed), [], []
    while not env.done and (deadline is None or time.monotonic() < deadline):
        tree = search_tree.expand(env, b=b, d=d, act=act, value=value, rng=rng, distinct=distinct)
        if value_scale == "relative":
            tree = search_tree.relative_to_root(tree, value(env), gamma)
        tree = search_tree.best_first(tree)
        if not tree or (tree[0].value <= 0 and env.expert_plan() is None):
            break   # no rollout and no expert plan leads on (a deadlock, the expert's cap): a failed episode
        hide = bool(hide_best) and len(tree) > 2 and rng.random() < hide_best   # no draw when off: same traces
        first, pool = (tree[1], tree[2:]) if hide else (tree[0], tree[1:])
        others = [pool[i] for i in sorted(rng.permutation(len(pool))[:b_train - 1])]
        plans, best = order_plans(first, others, plan_order, rng)
        action = plans[best].actions[0]
        rec = Record(env.name, dict(env_kwargs or {}), int(seed), len(history), "resim",
                     agent.build_prompt(tokenizer, env, history, obs, history_k=history_k, system=system),
                     aggregate(plans, best, obs), action, [a for a, _ in history])
        records.append(rec)
        if len(tree) > 1 and rng.random() < refine_frac:
            records.append(dataclasses.replace(rec, kind="refine", prompt=refinement_example(
                env, history, obs, tree, plan_order=plan_order, rng=rng, tokenizer=tokenizer,
                history_k=history_k, system=system, keep=refine_keep)))
        taken = tree[0].actions[0] if hide else action
        if detour and rng.random() < detour:
            alternatives = [r for r in tree[1:] if r.value > 0]
            if alternatives:
                taken = alternatives[int(rng.integers(len(alternatives)))].actions[0]
        obs, _, _, _ = env.step(taken)
        history.append((taken, obs))
    return records, bool(env.success)


def collect(env_name, env_kwargs, seeds, *, act, value, aggregate, tokenizer, b=4, d=1, b_train=2,
            plan_order="shuffled", refine_frac=0.0, refine_keep=0.5, detour=0.0, hide_best=0.0,
            value_scale="absolute", gamma=0.9, distinct=1, history_k=0, system=True, seed=0, progress=True,
            split="train", done=None, on_episode=None, episode_minutes=0.0):
    """ReSim data for many episodes of a split (train; a held-out one only to probe a model, as
    bench/probe_traces.py does); keeps the successful ones. Returns (records, stats). `done` maps a seed to the
    (records, success) of an episode searched before (a killed run's, train.searched); `on_episode(seed, records,
    success)` is told of each new one. episode_minutes > 0 cuts an episode still unsolved after that long: it
    counts as lost (stats["cut"]) and is not passed to on_episode, so a rerun tries it again. (ALFWorld's
    explorer took 33 min for 4 steps of one pick-two kitchen, while 41 other episodes took 44 min: RESULTS.md.)
    A cut depends on the machine's speed, so 0, no cut, is the default."""
    env = envs.make_env(env_name, split, **env_kwargs)
    done, played, cut = done or {}, [], 0
    records, solved, t0 = [], 0, time.time()
    for s in tqdm(seeds, desc="ReSim trees", disable=not progress):   # a list, or common.claim's handouts
        played.append(s)
        if s in done:
            recs, ok = done[s]
        else:
            rng = np.random.default_rng([seed, s])   # per episode: the same trees however seeds are sharded
            deadline = time.monotonic() + 60 * episode_minutes if episode_minutes else None
            recs, ok = resim_episode(env, s, b=b, d=d, b_train=b_train, plan_order=plan_order, act=act,
                                     value=value, aggregate=aggregate, rng=rng, tokenizer=tokenizer,
                                     history_k=history_k, system=system, refine_frac=refine_frac,
                                     refine_keep=refine_keep, detour=detour, hide_best=hide_best,
                                     value_scale=value_scale, gamma=gamma, distinct=distinct, env_kwargs=env_kwargs,
                                     deadline=deadline)
            was_cut = deadline is not None and not ok and time.monotonic() >= deadline
            cut += was_cut
            if on_episode and not was_cut:
                on_episode(s, recs, ok)
        solved += ok
        records += recs if ok else []
    stats = dict(episodes=len(played), solved=solved, steps=sum(r.kind == "resim" for r in records),
                 refine_examples=sum(r.kind == "refine" for r in records), seconds=time.time() - t0,
                 resumed=sum(s in done for s in played), cut=cut)
    return records, stats


def samples(tokenizer, records, action_only=False):
    """Records -> SFT samples (advantage 1). action_only is the ablation: the same states, no simulation
    (and no refinement examples, which only exist to read simulations)."""
    out = []
    for r in records:
        if action_only and r.kind == "refine":
            continue
        response = f"<action>{r.action}</action>" if action_only else r.response
        out.append(grpo.Sample(agent.encode(tokenizer, r.prompt),
                               agent.encode(tokenizer, response) + [tokenizer.eos_token_id], 1.0))
    return out


def verify(records):
    """Replay every plan of every record from its seed and prefix; list the imagined states that differ from
    the real ones. A ReSim trace must have none. Returns (states checked, [(seed, step, action)])."""
    checked, wrong, made = 0, [], {}
    for rec in records:
        key = (rec.env, json.dumps(rec.env_kwargs, sort_keys=True))
        env = made.setdefault(key, envs.make_env(rec.env, "train", **rec.env_kwargs))
        env.reset(rec.seed)
        for a in rec.prefix:
            env.step(a)
        for plan in agent.parse_response(rec.response).plans:
            for (a, real), imagined in zip(simrollout.real_futures(env, plan.actions), plan.states):
                checked += 1
                if imagined.strip() != real.strip():
                    wrong.append((rec.seed, rec.step, a))
    return checked, wrong


def write_jsonl(path, records):
    """Write to a temporary file, then rename: a killed run never leaves half a trace file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in records)
    os.replace(tmp, path)


def read_jsonl(path):
    with open(path) as f:
        return [Record(**json.loads(line)) for line in f if line.strip()]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", required=True, help="a traces.jsonl written by train.py --stage resim")
    recs = read_jsonl(ap.parse_args().verify)
    checked, wrong = verify(recs)
    print(f"{len(recs)} steps, {checked} imagined states checked, {len(wrong)} differ from the real env")
    for w in wrong[:10]:
        print("  differs: seed %s step %s action %r" % w)
    raise SystemExit(1 if wrong or not checked else 0)
