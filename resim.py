"""ReSim, stage 1 of Dyna-Mind: reasoning traces from real search trees (the paper's Algorithm 3), then SFT.

At every real state s_t:  tree = b real rollouts of depth <= d  ->  keep the best one and b_train - 1 others
->  summarise each as a plan with its REAL future states and value  ->  aggregate into one response
a_t^ReSim (agent.format_response)  ->  execute its immediate action in the real env.
Only successful episodes are kept (the paper). The student is then trained by SFT to write a_t^ReSim from the
plain prompt (task + short history + current observation): Distill(ReSim).

    python resim.py --verify runs/resim_sokoban/traces.jsonl   # replay every imagined state of a trace file
"""
import argparse
import json
import math
import random
import time

import numpy as np
import torch
from tqdm import tqdm

import agent
import grpo
import search_tree
import simrollout
from evaluate import env_module


# ---- Algorithm 3: one ReSim episode ----------------------------------------------------------------

def template_aggregate(plans, state_text=""):
    """The deterministic aggregator: best plan first (plans arrive best-first), chosen action = its first."""
    return agent.format_response(plans, best=0, action=plans[0].actions[0])


AGGREGATE_PROMPT = (
    "You are helping an agent plan. Current state:\n{state}\n\nCandidate plans, each executed in the real "
    "environment, with the real resulting states and a value (1 = solved):\n{plans}\n\nIn two sentences, "
    "compare the plans and say why Plan 1 is best.")


def llm_aggregator(model, tokenizer, max_new_tokens=96):
    """An LLM writes the comparison between plans; the plans, states and values stay the real ones.
    Its text is inserted before the "Best:" line; if the result no longer parses back to the same plans
    and action (or the text is empty), the template trace is used instead."""
    def aggregate(plans, state_text=""):
        base = template_aggregate(plans)
        listing = base.split("<think>\n", 1)[-1].split("Best:", 1)[0]
        msgs = [{"role": "user", "content": AGGREGATE_PROMPT.format(state=state_text, plans=listing)}]
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        text = agent.generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=0.0,
                              stop=("\n\n",))[0].text
        text = " ".join(text.replace("<", " ").replace(">", " ").split())   # one safe line: no tags, no "> "
        if not text:
            return base
        out = base.replace("Best:", f"{text}\nBest:", 1)
        p, q = agent.parse_response(out), agent.parse_response(base)
        return out if (p.plans, p.best, p.action) == (q.plans, q.best, q.action) else base
    return aggregate


def refinement_example(env, history, obs, plans, tree, *, tokenizer, history_k, system):
    """A SimRollout-format example from the same real tree: the "previous answer" prefers a worse rollout,
    the prompt shows that rollout's real future states, and the target is the ReSim trace. A pretrained LLM
    can follow a refinement prompt zero-shot; a model trained from scratch has never seen one, so without
    these its SimRollout answers are unreadable and A_refine never fires."""
    alt = tree[1]
    worse = [agent.Plan(list(alt.actions), list(alt.observations), round(alt.value, 2)), plans[0]]
    previous = agent.format_response(worse, best=0, action=alt.actions[0])
    futures = list(zip(alt.actions, alt.observations))
    return simrollout.refinement_messages(tokenizer, env, history, obs, previous, futures,
                                          history_k=history_k, system=system)


def resim_episode(env, seed, *, b, d, b_train, act, value, aggregate, rng, tokenizer, history_k, system,
                  refine_frac=0.0):
    """Run Algorithm 3 on one episode. Returns (records, success); one record per real step, plus a
    refinement-format record (kind "refine") for a `refine_frac` share of steps."""
    obs, history, records = env.reset(seed), [], []
    while not env.done:
        tree = search_tree.best_first(search_tree.expand(env, b=b, d=d, act=act, value=value, rng=rng))
        if not tree:
            break
        others = tree[1:]
        keep = [tree[0]] + [others[i] for i in sorted(rng.permutation(len(others))[:b_train - 1])]
        plans = [agent.Plan(list(r.actions), list(r.observations), round(r.value, 2)) for r in keep]
        response = aggregate(plans, obs)
        action = plans[0].actions[0]
        rec = dict(env=env.name, seed=int(seed), step=len(history), task=env.task, kind="resim",
                   prompt=agent.build_prompt(tokenizer, env, history, obs, history_k=history_k, system=system),
                   response=response, action=action, prefix=[a for a, _ in history],
                   metadata=dict(tree_size=len(tree), values=[r.value for r in tree]))
        records.append(rec)
        if len(tree) > 1 and rng.random() < refine_frac:
            records.append(dict(rec, kind="refine", prompt=refinement_example(
                env, history, obs, plans, tree, tokenizer=tokenizer, history_k=history_k, system=system)))
        obs, _, _, _ = env.step(action)
        history.append((action, obs))
    return records, bool(env.success)


def collect(env_name, env_kwargs, seeds, *, tokenizer, aggregate, b=4, d=2, b_train=2, rollout="expert", eps=0.25,
            value="expert", gamma=0.9, refine_frac=0.0, history_k=0, system=True, seed=0, progress=True, **_):
    """ReSim data for many train-split episodes; keeps successful ones only. Returns (records, stats)."""
    env = env_module(env_name).make_env("train", **env_kwargs)
    act = search_tree.make_policy(rollout, eps=eps)
    val = search_tree.make_value(value, gamma=gamma)
    records, solved, t0 = [], 0, time.time()
    for s in tqdm(seeds, desc="ReSim trees", disable=not progress):
        rng = np.random.default_rng([seed, s])   # per episode: the same trees however seeds are sharded
        recs, ok = resim_episode(env, s, b=b, d=d, b_train=b_train, act=act, value=val, aggregate=aggregate,
                                 rng=rng, tokenizer=tokenizer, history_k=history_k, system=system,
                                 refine_frac=refine_frac)
        solved += ok
        if ok:
            records += [dict(r, env_kwargs=env_kwargs) for r in recs]
    stats = dict(episodes=len(seeds), solved=solved, steps=sum(r["kind"] == "resim" for r in records),
                 refine_examples=sum(r["kind"] == "refine" for r in records), seconds=time.time() - t0)
    return records, stats


def verify(records):
    """Replay every plan of every record from its seed and prefix; count imagined states that differ from
    the real ones. A ReSim trace must have none."""
    checked, wrong, envs = 0, [], {}
    for rec in records:
        key = (rec["env"], json.dumps(rec.get("env_kwargs", {}), sort_keys=True))
        if key not in envs:
            envs[key] = env_module(rec["env"]).make_env("train", **rec.get("env_kwargs", {}))
        env = envs[key]
        env.reset(rec["seed"])
        for a in rec["prefix"]:
            env.step(a)
        root = env.get_state()
        for plan in agent.parse_response(rec["response"]).plans:
            env.set_state(root)
            for a, imagined in zip(plan.actions, plan.states):
                real, _, _, _ = env.step(a)
                checked += 1
                if imagined.strip() != real.strip():
                    wrong.append((rec["seed"], rec["step"], a))
    return checked, wrong


# ---- distillation (SFT) -----------------------------------------------------------------------------

def encode(tokenizer, records, action_only=False):
    """(prompt_ids, response_ids) pairs. action_only is the ablation: the same states, no simulation
    (and no refinement examples, which only exist to read simulations)."""
    out = []
    for r in records:
        if action_only and r.get("kind") == "refine":
            continue
        resp = f"<action>{r['action']}</action>" if action_only else r["response"]
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        q = tokenizer(resp, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p, q))
    return out


def batches(pairs, batch_size, rng):
    """Shuffled batches of similar length (less padding): shuffle, then sort inside windows of 32 batches."""
    idx = rng.permutation(len(pairs)).tolist()
    win = batch_size * 32
    idx = [i for w in range(0, len(idx), win)
           for i in sorted(idx[w:w + win], key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))]
    bs = [idx[k:k + batch_size] for k in range(0, len(idx) - batch_size + 1, batch_size)]
    random.Random(int(rng.integers(2**31))).shuffle(bs)
    return bs


def sft(model, tokenizer, pairs, *, epochs=1, batch_size=32, micro_batch=16, lr=1e-3, warmup=0.05,
        weight_decay=0.0, grad_clip=1.0, bf16=True, seed=0, rank=0, world=1, log=None, progress=True,
        allreduce=lambda: None, allsum=lambda x: x, start_step=0, restore=None, on_step=None):
    """Response-only next-token loss; AdamW, warm-up + cosine; bf16 autocast; gradient accumulation.
    Every rank draws the same batches and takes its slice; gradients are summed over ranks once per step
    (`allreduce`), normalised by the global number of response tokens, so N ranks = one process, N x batch.
    Resume: `restore(opt, sched)` loads a checkpoint and the first `start_step` batches of the same
    seeded plan are skipped; `on_step(step, opt, sched)` runs after every update (checkpoints, Ctrl-C)."""
    from transformers import get_cosine_schedule_with_warmup
    dev = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    plan = [batches(pairs, batch_size * world, rng) for _ in range(epochs)]
    total = sum(len(p) for p in plan)
    if total == 0:
        raise ValueError(f"no SFT batch: {len(pairs)} examples < batch_size {batch_size} x world {world}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(warmup * total), total)
    if restore:
        restore(opt, sched)
    model.train()
    bar = tqdm(total=total, initial=start_step, desc="SFT", disable=not progress)
    step, t0, ntok = start_step, time.time(), 0
    for gb in [b for ep in plan for b in ep][start_step:]:
        mine = gb[rank::world]
        n_resp = allsum(sum(len(pairs[i][1]) for i in mine))
        loss_sum = 0.0
        for k in range(0, len(mine), micro_batch):
            mb = mine[k:k + micro_batch]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                logp, mask = grpo.response_logprobs(model, [pairs[i][0] for i in mb], [pairs[i][1] for i in mb],
                                                    tokenizer.pad_token_id)
            loss = -(logp.float() * mask).sum() / n_resp
            loss.backward()
            loss_sum += loss.item()
            ntok += sum(len(pairs[i][0]) + len(pairs[i][1]) for i in mb)
        loss_sum = allsum(loss_sum)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"SFT loss is {loss_sum} at step {step}; stopped before the update")
        allreduce()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if log:
            log(dict(stage="sft", step=step, loss=loss_sum, lr=sched.get_last_lr()[0], grad_norm=float(gnorm),
                     tokens_per_s=allsum(ntok) / (time.time() - t0)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if on_step:
            on_step(step, opt, sched)
    bar.close()
    model.eval()
    return step


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", required=True, help="a traces.jsonl written by train.py --stage resim")
    args = ap.parse_args()
    recs = read_jsonl(args.verify)
    checked, wrong = verify(recs)
    print(f"{len(recs)} steps, {checked} imagined states checked, {len(wrong)} differ from the real env")
    for w in wrong[:10]:
        print("  differs: seed %s step %s action %r" % w)
    raise SystemExit(1 if wrong or not checked else 0)
