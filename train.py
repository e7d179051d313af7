"""Train Dyna-Mind. One entry point for every stage, one process on a CPU or many GPUs under torchrun:

    torchrun --nproc_per_node=1 train.py --stage resim                      # stage 1: ReSim -> SFT -> eval
    torchrun --nproc_per_node=1 train.py --stage dyna_grpo                  # stage 2 from the ReSim model
    python train.py --stage grpo --config configs/android.yaml rl.steps=10  # plain python works too
    torchrun --nproc_per_node=8 train.py --stage dyna_grpo dist=fsdp ...    # FSDP2 for big models
    python train.py --resume runs/resim_sokoban                             # continue a killed run exactly

The config is DEFAULTS below (the embedded default: Sokoban, tiny model, CPU), then --config YAML, then
key=value overrides (dotted keys, YAML values). Unknown keys and wrong types are errors before any work.

Stage 1, ReSim (stage_resim): real search trees -> traces (resim.py) -> SFT (sft_step).
Stage 2 (stage_rl), the paper's Algorithm 1; grpo and rloo run phase (B) only:
    for it in 1..N:
        (A) n_T simulation-improvement steps: per task G/2 SimRollouts (tau', tau'_refine) + G/2 plain
            rollouts; GRPO on the group tau U tau', then on tau'_refine with A_refine     simulation_phase
        (B) n_pi policy-improvement steps: G plain rollouts per task, GRPO (or RLOO)      policy_phase
Both stages train grpo.Sample's with grpo.policy_loss: SFT is the RL loss with A = 1 and no ratio.
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

import agent
import common
import engine
import envs
import evaluate
import grpo
import resim
import search_tree
import simrollout
from common import allreduce_grads, allsum, gather, sharded

DEFAULTS = {
    "env": "sokoban",             # sokoban | alfworld | android (envs.ENVS)
    "env_kwargs": {},             # the env's own options, given to its make_env (e.g. {max_steps: 10})
    "model": "tiny",              # stage 1's model: tiny | smollm2 | a save_pretrained directory | a hub id
    "tiny": {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 4,  # the tiny model's shape:
             "num_key_value_heads": 1, "intermediate_size": 512},  # deep and narrow; one KV head decodes fastest
    "init_from": "",              # RL stages: the model to start from (default: runs/resim_<env>/model)
    "out_dir": "",                # the run directory (default: runs/<stage>_<env>)
    "seed": 0,                    # model init, data order, trees and sampling noise all derive from it
    "device": "auto",             # auto | cpu | cuda
    "dist": "ddp",                # ddp: a full model per rank | fsdp: FSDP2 fully_shard (torchrun, N > 1)
    "checkpoint_minutes": 10.0,   # checkpoint.pt at most this often, and on Ctrl-C / SIGTERM (see --resume)
    "bf16": True,                 # bfloat16 autocast for training, a bfloat16 copy for generation
    "attn": "eager",              # attention of training forwards: eager | sdpa. On CPU eager is 1.3x faster on
                                  # short sequences (Sokoban, 16 x 234 tokens), sdpa 2x on long ones (570 tokens)
    "decode_compile": False,      # torch.compile the lean (Llama / Qwen2) decode step, compiled once per process:
                                  # for RL runs (cost and gain: engine.LeanDecoder; RESULTS.md, Speed)
    "history_k": 0,               # (action, observation) pairs shown in the prompt; Sokoban is Markov
    "system": False,              # system prompt with the rules and the format (a from-scratch model can't read it)
    "max_new_tokens": 320,        # generation budget per response (also Dr. GRPO's constant length)
    "admissible": False,          # ALFWorld, RL rollouts and evaluation: an action the game would reject is
                                  # replaced by the model's likeliest admissible command (agent.admit; a separate
                                  # results row: it changes what an invalid action is)
    "resim": {                    # stage 1: the search trees and the traces written from them
        "episodes": 11500,        # train episodes searched; only the solved ones become traces (the main job:
                                  # what the lean compiled SFT fits in about 15 minutes of this project's CPU)
        "first": 0,               # the first train episode's index: first=400 with model=<a 400-episode run's
                                  # model> continues stage 1 on 400 fresh episodes (RESULTS.md, The text environments)
        "b": 4,                   # rollouts per real state
        "d": 1,                   # rollout depth (the paper caps it at 5)
        "b_train": 2,             # rollouts kept in a trace: the best and b_train - 1 others
        "distinct": 1,            # draw rollouts past b (4 b at most) until this many differ (search_tree.expand)
        "plan_order": "shuffled",  # shuffled: the best plan's place is random | best_first (the ablation)
        "rollout": "expert",      # rollout policy: expert (with eps-random deviations) | random | llm
        "eps": 0.3,               # the expert's deviation probability
        "value": "expert",        # leaf value: expert (gamma ** steps-to-go) | mc (Appendix D.3) | llm
        "gamma": 0.9,             # the value's discount
        "value_scale": "absolute",  # absolute: V(leaf) | relative: against the root's value, 1.00 = an optimal
                                  # plan whatever the task's length (search_tree.relative_to_root; README)
        "refine_frac": 0.05,      # share of steps that also give a SimRollout-format example (README)
        "refine_keep": 0.5,       # share of those whose previous answer already chose the best plan (kept)
        "detour": 0.0,            # share of steps where the real env takes another plan's action (off-path states)
        "hide_best": 0.0,         # share of traces listing only non-best rollouts: the action must follow "Best:"
        "aggregator": "template",  # template | llm: a model writes the comparison between the plans
        "aggregator_model": "",   # the model for the llm aggregator / rollout / value ("": the one trained)
        "action_only": False,     # the ablation: train on the chosen action alone, no simulation
        "reuse_traces": True,     # reuse the run directory's traces.jsonl when it was made with this config
        "episode_minutes": 0.0,   # > 0: an episode still unsolved after this long is cut, lost (a slow expert's
                                  # stall; the cut depends on the machine's speed, so 0, none, is the default)
    },
    "sft": {                      # stage 1: distilling the traces (train.sft_step)
        "epochs": 1,              # passes over the traces (fresh episodes beat repeated epochs)
        "batch_size": 16,         # samples per optimiser step per rank
        "micro_batch": 16,        # samples per forward / backward (gradient accumulation)
        "lr": 2e-3,               # AdamW peak learning rate
        "warmup": 0.05,           # share of steps of linear warm-up, then cosine decay to 0
        "weight_decay": 0.0,      # AdamW's decoupled weight decay
        "grad_clip": 1.0,         # max gradient norm
        "compile": True,          # the compiled SFT forward for micro-batches below sdpa_from (train.compiled; not
                                  # with FSDP): 1.4x faster steps for ~15 s compiling each of the main job's two
                                  # shapes; the text-env configs, of many long lengths, turn it off
        "pad_to": 64,             # with compile: lengths padded up to a multiple of this (few shapes to compile)
        "sdpa_from": 384,         # a micro-batch this long (tokens) or longer runs sdpa attention whatever `attn`
                                  # says: on CPU eager wins below, sdpa is 2x faster on the main job's 574-token
                                  # batches (bench/bench_sft.py); 0: never
    },
    "rl": {                       # stage 2: GRPO / RLOO / Dyna-GRPO (train.stage_rl)
        "steps": 12,              # RL steps; each takes one optimiser step (two in a simulation step)
        "tasks": 4,               # train tasks per step per rank
        "group": 8,               # G: rollouts per task (phase A: G/2 SimRollouts + G/2 plain rollouts)
        "lr": 1e-4,               # AdamW learning rate (constant)
        "ppo_epochs": 1,          # optimiser steps per batch (old log-probs fixed before the first)
        "micro_batch": 16,        # samples per forward / backward
        "clip_low": 0.2,          # ratio clip: [1 - clip_low, 1 + clip_high] (DAPO's asymmetric clip)
        "clip_high": 0.28,        # (clip_high > clip_low lets unlikely good tokens grow faster)
        "clip_c": 3.0,            # dual clip: a negative advantage stops pushing at ratio clip_c (veRL's default)
        "beta": 0.0,              # k3 KL to the initial policy (0: no reference model)
        "turn_weight": "episode",  # episode: every episode weighs the same | turn: every turn (grpo.episode_samples)
        "agg": "token-mean",      # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr. GRPO)
        "temperature": 1.0,       # sampling temperature; the update's log-probs use it too (as veRL)
        "tau_prime_old": "s_ref",  # Dyna-GRPO's tau' (a_ref trained under s_t): old log-probs under s_ref, the
                                  # prompt a_ref was drawn from (the importance ratio) | s_t (ratio 1: no clip)
        "n_T": 1,                 # Dyna-GRPO: simulation-improvement steps per iteration
        "n_pi": 1,                # Dyna-GRPO: policy-improvement steps per iteration
        "sim_depth": 5,           # SimRollout: at most this many actions of a plan are executed
        "format_penalty": 0.0,    # subtracted from the return per invalid step
        "fail_return": "paper",   # paper: -0.1 a step | cap: a failure costs the whole step budget
        "grad_clip": 1.0,         # max gradient norm
        "task_offset": 100000,    # RL tasks are train seeds from here on (ReSim searched the first ones)
        "min_moves": 0,           # RL tasks: only rooms whose optimal solution takes at least this many moves
                                  # (0: every room; Sokoban, env.solution_length; train.rl_task_pool)
    },
    "eval": {                     # held-out evaluation after training (evaluate.py)
        "id": 200,                # held-out ID episodes (0: skip)
        "ood": 100,               # held-out OOD episodes (0: skip)
        "temperature": 0.0,       # 0: greedy
        "batch": 256,             # episodes played in lockstep
    },
}
STAGES = ("resim", "grpo", "rloo", "dyna_grpo")
ROLES = ("plain", "sim")          # sampling streams of an RL step
SORT_WINDOW = 32                  # SFT: batches sorted by length inside windows of this many batches


def make_optimizer(model, lr, weight_decay=0.0):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def logprobs(net, chunk, pad, bf16, temperature=1.0, pad_to=1):
    dev = next(net.parameters()).device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        return grpo.response_logprobs(net, [s.prompt_ids for s in chunk], [s.response_ids for s in chunk], pad,
                                      temperature=temperature, pad_to=pad_to)


def micro_batches(samples, size):
    """Samples of similar length together (less padding)."""
    order = sorted(samples, key=lambda s: len(s.prompt_ids) + len(s.response_ids))
    return [order[i:i + size] for i in range(0, len(order), size)]


@contextlib.contextmanager
def attention(model, impl):
    """Forwards inside run with attention impl (None: the model's own), then the model's own again. Eager
    attention materialises [B, heads, T, T] scores: cheapest on short CPU batches, 2x sdpa's cost at 574 tokens."""
    own = model.config._attn_implementation
    if impl and impl != own:
        model.set_attn_implementation(impl)
    try:
        yield
    finally:
        if model.config._attn_implementation != own:
            model.set_attn_implementation(own)


# ---- the two updates, side by side ----------------------------------------------------------------------

def sft_step(model, opt, sched, batch, pad, sc, bf16, world, fwd=None):
    """One SFT optimiser step: -log p of the trace tokens (A = 1, no ratio), token-mean over the global batch,
    so N ranks with batch B equal one process with batch N x B. fwd: what runs the forward (a compiled model,
    fed lengths padded to sft.pad_to), else the model; a micro-batch of sft.sdpa_from tokens or more runs the
    model itself with sdpa attention."""
    n_tok = allsum(sum(len(s.response_ids) for s in batch), world)
    total = 0.0
    for k in range(0, len(batch), sc["micro_batch"]):
        chunk = batch[k:k + sc["micro_batch"]]
        long = 0 < sc["sdpa_from"] <= max(len(s.prompt_ids) + len(s.response_ids) for s in chunk)
        net, pad_to = (model, 1) if fwd is None or long else (fwd, sc["pad_to"])   # compiled: short shapes only
        with attention(model, "sdpa" if long else None):
            logp, mask = logprobs(net, chunk, pad, bf16, pad_to=pad_to)
        loss, _ = grpo.policy_loss(logp.float(), None, torch.ones(len(chunk), device=logp.device), mask, n_tok=n_tok)
        loss.backward()
        total += loss.item()
    total = allsum(total, world)
    if not math.isfinite(total):
        raise FloatingPointError(f"SFT loss is {total}; stopped before the update")
    allreduce_grads(model, world)
    gnorm = clip_or_stop(model, sc["grad_clip"], "SFT")
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return dict(loss=total, grad_norm=float(gnorm), lr=sched.get_last_lr()[0])


def clip_or_stop(model, clip, what):
    """Clip the gradients to norm `clip`; a NaN or inf gradient (the loss can be finite while it is) stops the run
    before the update: AdamW would write NaN into every weight it touches, whatever the learning rate."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if not math.isfinite(float(gnorm)):
        raise FloatingPointError(f"{what} gradient norm is {float(gnorm)}; stopped before the update")
    return gnorm


TAU_PRIME_OLD = ("s_ref", "s_t")


def drawn_logprobs(model, chunk, pad, bf16, temperature, collective=False):
    """{row: log pi_old(response | the prompt it was drawn under)} for a chunk's rows sampled under another prompt
    than they are trained under (tau': a_ref was drawn from pi(. | s_ref)). As their old log-probs they make the
    ratio pi(a_ref | s_t) / pi_old(a_ref | s_ref), the importance weight of the distribution that drew the
    tokens, and the clips act on it: a negative advantage stops pushing a token down once s_t finds it much less
    likely than the sampler did (ratio < 1 - clip_low) or much likelier (ratio > clip_c, the dual clip); how far
    apart the two are: bench/probe_tau_prime.py. collective (FSDP): every rank runs one forward per chunk."""
    rows = [b for b, s in enumerate(chunk) if s.drawn_under is not None]
    if not rows and not collective:
        return {}
    batch = [grpo.Sample(chunk[b].drawn_under, chunk[b].response_ids) for b in rows] or [grpo.Sample([pad], [pad])]
    with torch.no_grad():
        lp, _ = logprobs(model, batch, pad, bf16, temperature)
    return {b: lp[k, :len(chunk[b].response_ids)].float() for k, b in enumerate(rows)}


def rl_update(model, ref, opt, samples, pad, rc, bf16, world, budget):
    """ppo_epochs optimiser steps of the clipped-ratio loss on the samples, in micro-batches.
    - Old log-probs are the first pass's: the weights have not moved yet, so they are exact and cost no extra
      forward. tau' is the exception: with rl.tau_prime_old = s_ref they are taken under s_ref, the prompt a_ref
      was drawn under (drawn_logprobs), in a pass before the first, as the reference's are.
    - The loss is normalised by the whole batch's tokens / sequences over all ranks, zero-advantage samples
      included (veRL), so micro_batch and the rank count do not change the update. With beta = 0 a
      zero-advantage sample has no gradient, so its forward and backward are skipped (not its tokens)."""
    norm = dict(n_tok=max(1, allsum(sum(len(s.response_ids) for s in samples), world)),
                n_seq=max(1, allsum(sum(len(s.response_ids) > 0 for s in samples), world)), budget=budget)
    use_drawn = rc["tau_prime_old"] == "s_ref" and allsum(sum(s.drawn_under is not None for s in samples), world) > 0
    if rc["beta"] == 0:
        samples = [s for s in samples if s.advantage != 0.0]
    chunks = micro_batches(samples, rc["micro_batch"])
    real = len(chunks)
    if sharded(model):   # FSDP forwards / backwards are collectives: pad to the same micro-batch count
        n = int(allsum(len(chunks), world, op="max"))
        chunks += [chunks[0] if chunks else [grpo.Sample([pad], [pad], 0.0)]] * (n - len(chunks))
    if not chunks:
        return {}
    refs = [None] * len(chunks)
    if ref is not None:
        with torch.no_grad():
            refs = [logprobs(ref, c, pad, bf16, rc["temperature"])[0].float() for c in chunks]
    drawn = [{}] * len(chunks)
    if use_drawn:
        drawn = [drawn_logprobs(model, c, pad, bf16, rc["temperature"], collective=sharded(model)) for c in chunks]
    old, stats, dev = [None] * len(chunks), [], next(model.parameters()).device
    for epoch in range(rc["ppo_epochs"]):
        for i, c in enumerate(chunks):
            logp, mask = logprobs(model, c, pad, bf16, rc["temperature"])
            if epoch == 0:
                old[i] = logp.detach().float().clone()
                for b, lp in drawn[i].items():
                    old[i][b, :len(lp)] = lp
            if i >= real:                        # padding: the same collectives, zero gradient
                (logp.float().sum() * 0.0).backward()
                continue
            adv = torch.tensor([s.advantage for s in c], device=dev)
            loss, st = grpo.policy_loss(logp.float(), old[i], adv, mask, ref_logp=refs[i], beta=rc["beta"],
                                        clip_low=rc["clip_low"], clip_high=rc["clip_high"], clip_c=rc["clip_c"],
                                        agg=rc["agg"], **norm)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite RL loss {loss.item()}")
            loss.backward()
            stats.append(st)
        allreduce_grads(model, world)
        gnorm = clip_or_stop(model, rc["grad_clip"], "RL")
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {k: float(np.mean([s[k] for s in stats])) for k in (stats[0] if stats else {})}
    out["pg_loss"] = float(sum(s["pg_loss"] for s in stats)) / rc["ppo_epochs"]   # shares of the batch loss
    return dict(out, grad_norm=float(gnorm), trained_samples=len(samples))


# ---- stage 1: ReSim -----------------------------------------------------------------------------------------

def search_parts(cfg, model, tok, device):
    """The rollout policy, value function and aggregator of ReSim's trees. The llm choices use
    resim.aggregator_model, or else the model being trained."""
    rc = cfg["resim"]
    helper = (model, tok)
    if "llm" in (rc["rollout"], rc["value"], rc["aggregator"]) and rc["aggregator_model"]:
        helper = agent.load_model(rc["aggregator_model"], device=device)
    llm = dict(model=helper[0], tokenizer=helper[1])
    act = search_tree.make_policy(rc["rollout"], eps=rc["eps"], history_k=cfg["history_k"], system=cfg["system"],
                                  max_new_tokens=cfg["max_new_tokens"], **(llm if rc["rollout"] == "llm" else {}))
    value = search_tree.make_value(rc["value"], gamma=rc["gamma"], act=act, **(llm if rc["value"] == "llm" else {}))
    if rc["aggregator"] not in ("template", "llm"):
        raise ValueError(f"resim.aggregator must be template or llm, got {rc['aggregator']!r}")
    aggregate = resim.llm_aggregator(*helper) if rc["aggregator"] == "llm" else resim.template_aggregate
    return act, value, aggregate


def collect_stats(stats, world):
    """resim.collect's counts summed over ranks; its seconds the slowest rank's (the ranks ran side by side)."""
    return {k: allsum(v, world, "max" if k == "seconds" else "sum") for k, v in stats.items()}


def search_key(cfg, *free):
    """What a ReSim search's records depend on; `free`: resim keys left out besides those that only act after it."""
    skip = ("action_only", "reuse_traces") + free
    return json.dumps([agent.PROMPT_FORMAT, cfg["env"], cfg["env_kwargs"], cfg["model"], cfg["history_k"],
                       cfg["system"], cfg["seed"], {k: v for k, v in cfg["resim"].items() if k not in skip}],
                      sort_keys=True)


def traces(cfg, model, tok, device, rank, world, run):
    """ReSim records of this run: collected over ranks (sharded by episode), or reused from traces.jsonl when it
    was made with the same settings (its key file is written last, so a killed write is never reused)."""
    rc = cfg["resim"]
    path, key_path = run.dir / "traces.jsonl", run.dir / "traces.key"
    key = search_key(cfg)
    if rc["reuse_traces"] and key_path.exists() and key_path.read_text() == key and path.exists():
        records = resim.read_jsonl(path)
        if rank == 0:
            print(f"reusing {len(records)} ReSim steps from {path}")
        return records
    act, value, aggregate = search_parts(cfg, model, tok, device)
    seeds = common.claim(envs.split_seeds("train", rc["episodes"], rc["first"]), world)
    done, on_episode = searched(cfg, run.dir, rank)
    records, stats = resim.collect(cfg["env"], cfg["env_kwargs"], seeds, act=act, value=value, aggregate=aggregate,
                                   tokenizer=tok, b=rc["b"], d=rc["d"], b_train=rc["b_train"],
                                   plan_order=rc["plan_order"], refine_frac=rc["refine_frac"],
                                   refine_keep=rc["refine_keep"], detour=rc["detour"], hide_best=rc["hide_best"],
                                   value_scale=rc["value_scale"], gamma=rc["gamma"], distinct=rc["distinct"],
                                   history_k=cfg["history_k"], system=cfg["system"], seed=cfg["seed"],
                                   progress=rank == 0, done=done, on_episode=on_episode,
                                   episode_minutes=rc["episode_minutes"])
    records = sorted(gather(records, world), key=lambda r: (r.seed, r.step))   # stable: a step's refine after it
    stats = collect_stats(stats, world)
    run.log(dict(stage="resim_collect", step=0, **stats))
    if rank == 0:
        print(f"ReSim: {stats['solved']:.0f}/{stats['episodes']:.0f} episodes solved, {stats['steps']:.0f} steps "
              f"kept (+{stats['refine_examples']:.0f} refinement examples), {stats['seconds']:.0f} s"
              + (f"; {stats['resumed']:.0f} episodes searched before, reused" if stats["resumed"] else "")
              + (f"; {stats['cut']:.0f} cut at resim.episode_minutes" if stats["cut"] else ""))
        key_path.unlink(missing_ok=True)
        resim.write_jsonl(path, records)
        key_path.write_text(key)
    return records


def searched(cfg, run_dir, rank):
    """Episodes are saved as they are searched (traces.parts/<settings>/rank<r>.jsonl, a line each), so a killed
    search loses at most one episode a rank: the same command again, or one with more episodes or another
    episode_minutes, reuses them (the trees of an episode depend on its seed and the settings alone, not on the
    rank or the episode count).
    Returns (done: seed -> (records, success), on_episode) for resim.collect."""
    rc, key = cfg["resim"], search_key(cfg, "episodes", "first", "episode_minutes")   # a cut episode is not saved
    folder = run_dir / "traces.parts" / hashlib.sha1(key.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (folder / "key.json").write_text(key)
    done = {}
    for part in sorted(folder.glob("rank*.jsonl")) if rc["reuse_traces"] else []:
        for line in part.read_text().splitlines():
            try:
                ep = json.loads(line)
                done[ep["seed"]] = ([resim.Record(**r) for r in ep["records"]], ep["success"])
            except (ValueError, KeyError, TypeError):
                pass          # the line a kill cut short
    out = open(folder / f"rank{rank}.jsonl", "a+")
    out.seek(max(out.tell() - 1, 0))
    out.write("\n" if out.read(1) not in ("", "\n") else "")   # a kill mid-line: the next episode starts a new one

    def on_episode(seed, records, success):
        out.write(json.dumps(dict(seed=int(seed), success=bool(success),
                                  records=[dataclasses.asdict(r) for r in records])) + "\n")
        out.flush()       # a killed process loses nothing the OS has (no fsync: the main job writes 7,000 a run)
    return done, on_episode


def sft_plan(n, batch_size, epochs, lengths, seed):
    """Every rank draws the same global batches (index lists): per epoch a shuffle, then length-sorted inside
    windows of SORT_WINDOW batches (less padding), then the batches shuffled."""
    rng, plan = np.random.default_rng(seed), []
    for _ in range(epochs):
        idx = rng.permutation(n).tolist()
        win = batch_size * SORT_WINDOW
        idx = [i for w in range(0, n, win) for i in sorted(idx[w:w + win], key=lambda i: lengths[i])]
        bs = [idx[k:k + batch_size] for k in range(0, n - batch_size + 1, batch_size)]
        random.Random(int(rng.integers(2**31))).shuffle(bs)
        plan += bs
    return plan


def compiled(model):
    """The SFT forward compiled for fixed shapes. Llama / Qwen2: engine.LeanForward (the model's layers without
    Hugging Face's overhead: main job's model, 2 threads, 16 x 256 tokens, 1.2x the compiled Hugging Face
    forward's steps, 1.4x the eager ones; RESULTS.md, Speed); any other model: Hugging Face's forward compiled."""
    if engine.lean_ok(model) and not getattr(model.config, "attention_dropout", 0.0):
        return engine.LeanForward(model)
    return torch.compile(model, dynamic=False)


def stage_resim(cfg, rank, world, device, run):
    from transformers import get_cosine_schedule_with_warmup
    torch.manual_seed(cfg["seed"])
    model, tok = agent.load_model(cfg["model"], device=device, attn=cfg["attn"],
                                  **(cfg["tiny"] if cfg["model"] == "tiny" else {}))
    model = common.shard(model, cfg, world)
    samples = resim.samples(tok, traces(cfg, model, tok, device, rank, world, run), cfg["resim"]["action_only"])
    sc = cfg["sft"]
    plan = sft_plan(len(samples), sc["batch_size"] * world, sc["epochs"],
                    [len(s.prompt_ids) + len(s.response_ids) for s in samples], cfg["seed"])
    if not plan:
        raise ValueError(f"no SFT batch: {len(samples)} examples < batch_size {sc['batch_size']} x world {world}")
    if rank == 0:
        per = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples) / len(samples)
        kind = "action only" if cfg["resim"]["action_only"] else "ReSim traces"
        print(f"SFT on {len(samples)} examples ({kind}), {per:.0f} tokens each, {len(plan)} steps")
    opt = make_optimizer(model, sc["lr"], sc["weight_decay"])
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(sc["warmup"] * len(plan)), len(plan))
    first = 0
    if run.ckpt:
        run.restore(model, opt, sched)
        first = run.ckpt["step"]
    model.train()
    fwd = compiled(model) if sc["compile"] and not sharded(model) else None
    t0, ntok = time.time(), 0
    for step in tqdm(range(first, len(plan)), desc="SFT", initial=first, total=len(plan), disable=rank != 0):
        batch = [samples[i] for i in plan[step][rank::world]]
        st = sft_step(model, opt, sched, batch, tok.pad_token_id, sc, cfg["bf16"], world, fwd)
        ntok += sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)
        run.log(dict(stage="sft", step=step + 1, tokens_per_s=allsum(ntok, world) / (time.time() - t0), **st))
        run.after_step(model, opt, sched, "sft", step + 1)
    model.eval()
    run.log(dict(stage="sft_done", step=0, seconds=time.time() - t0))
    run.save_model(model, tok, cfg)
    run.save_checkpoint(None, None, None, "done", len(plan))
    return model, tok


# ---- stage 2: GRPO / RLOO / Dyna-GRPO -----------------------------------------------------------------------

def sampling_seed(seed, step, rank, role):
    """Independent noise per (run seed, RL step, rank, role): no two rollout batches share it, and a resumed
    step draws exactly what it drew the first time."""
    return int(np.random.SeedSequence([seed, step, rank, ROLES.index(role)]).generate_state(1)[0])


def policy_phase(stage, policy, tok, tasks, cfg, seed_of, returns, progress=False):
    """(B) policy improvement: G plain rollouts per task; GRPO (or RLOO) advantages on the return."""
    rc = cfg["rl"]
    seeds = [s for s in tasks for _ in range(rc["group"])]
    eps = agent.run_episodes(policy, tok, [envs.make_env(cfg["env"], "train", **cfg["env_kwargs"]) for _ in seeds],
                             seeds, gen_kwargs=gen_kwargs(cfg), seed=seed_of("plain"), history_k=cfg["history_k"],
                             system=cfg["system"], admissible=cfg["admissible"], progress=progress)
    adv_fn = grpo.rloo_advantages if stage == "rloo" else grpo.group_advantages
    adv = adv_fn(torch.tensor([returns(ep) for ep in eps]), [ep.seed for ep in eps])
    return eps, [grpo.episode_samples(eps, adv.tolist(), rc["turn_weight"], mean_turns=mean_turns(eps))], {}


def simulation_phase(policy, tok, tasks, cfg, seed_of, returns, progress=False):
    """(A) simulation improvement: per task G/2 SimRollouts and G/2 plain rollouts; two updates, as
    Algorithm 1 lists them: tau U tau' with the group advantage, then tau'_refine with A_refine."""
    rc, make = cfg["rl"], lambda: envs.make_env(cfg["env"], "train", **cfg["env_kwargs"])
    seeds = [s for s in tasks for _ in range(rc["group"] // 2)]
    kw = dict(gen_kwargs=gen_kwargs(cfg), history_k=cfg["history_k"], system=cfg["system"],
              admissible=cfg["admissible"], progress=progress)
    eps = simrollout.simrollout(policy, tok, [make() for _ in seeds * 2], seeds * 2, plain=len(seeds),
                                seed=seed_of("sim"), d=rc["sim_depth"], **kw)
    sim, plain = eps[:len(seeds)], eps[len(seeds):]
    group, refine, extra = simrollout.simulation_samples(plain, sim, returns, rc["turn_weight"],
                                                         mean_turns(plain + sim))
    return plain + sim, [group, refine], extra


def mean_turns(eps):
    """Turns per episode over every rank's episodes of this step (grpo.episode_samples' weights)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return allsum(sum(len(ep.turns) for ep in eps), world) / max(1, allsum(len(eps), world))


def gen_kwargs(cfg):
    return dict(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["rl"]["temperature"])


def load_init(cfg, device):
    """The RL stages' starting model, with the prompt settings it was trained with."""
    init = cfg["init_from"] or f"runs/resim_{cfg['env']}/model"
    if not os.path.isdir(init):
        raise SystemExit(f"no checkpoint at {init!r}; run `train.py --stage resim` first or set init_from")
    for k, v in common.prompt_settings(init).items():
        if k in ("history_k", "system") and v != cfg[k]:
            print(f"note: using the checkpoint's {k}={v} (config had {cfg[k]})")
            cfg[k] = v
    return agent.load_model(init, device=device, attn=cfg["attn"])


def check_rl_config(rc):
    """The RL options that are choices, checked before a run directory is touched."""
    if rc["turn_weight"] not in grpo.TURN_WEIGHTS:
        raise ValueError(f"rl.turn_weight must be one of {grpo.TURN_WEIGHTS}, got {rc['turn_weight']!r}")
    if rc["fail_return"] not in ("paper", "cap"):
        raise ValueError(f"rl.fail_return must be paper or cap, got {rc['fail_return']!r}")
    if rc["clip_c"] <= 1:
        raise ValueError(f"rl.clip_c must be > 1 (the dual clip caps ratios above it), got {rc['clip_c']}")
    if rc["tau_prime_old"] not in TAU_PRIME_OLD:
        raise ValueError(f"rl.tau_prime_old must be one of {TAU_PRIME_OLD}, got {rc['tau_prime_old']!r}")


def rl_task_pool(cfg, n):
    """The first n train seeds from rl.task_offset on that the RL stage plays, in order; step k takes the k-th
    slice. With rl.min_moves, only rooms whose optimal solution is at least that long: 30% of the train rooms
    take one move, where every rollout of a group succeeds alike and carries no gradient, while the greedy
    policy's failures are the long rooms. Needs an env that knows its optimal length (Sokoban)."""
    rc = cfg["rl"]
    if rc["min_moves"] <= 0:
        return envs.split_seeds("train", n, start=rc["task_offset"])
    env, seeds, seed = envs.make_env(cfg["env"], "train", **cfg["env_kwargs"]), [], rc["task_offset"]
    if not hasattr(env, "solution_length"):
        raise ValueError(f"rl.min_moves needs an env that knows its optimal solution length "
                         f"(env.solution_length: sokoban); {cfg['env']} does not")
    while len(seeds) < n:
        [s] = envs.split_seeds("train", 1, start=seed)
        env.reset(s)
        if (env.solution_length or 0) >= rc["min_moves"]:     # None: unsolvable
            seeds.append(s)
        seed += 1
    return seeds


def stage_rl(stage, cfg, rank, world, device, run):
    rc = cfg["rl"]
    model, tok = load_init(cfg, device)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if rc["beta"] > 0 else None   # the initial policy
    model = common.shard(model, cfg, world)
    ref = common.shard(ref, cfg, world) if ref is not None else None
    opt = make_optimizer(model, rc["lr"])
    first = 0
    if run.ckpt:
        run.restore(model, opt)
        first = run.ckpt["step"]

    def returns(ep):   # the return the RL stage trains on (rl.format_penalty, rl.fail_return)
        return agent.episode_return(ep.steps, ep.success, invalid=ep.invalid, format_penalty=rc["format_penalty"],
                                    cap=ep.max_steps if rc["fail_return"] == "cap" else None)
    policy = common.inference_copy(model, cfg["bf16"])
    compile_s = engine.warm_up(policy, tok) if engine.COMPILE else 0.0   # so that no step's rollout pays for it
    phases = (["sim"] * rc["n_T"] + ["pi"] * rc["n_pi"]) if stage == "dyna_grpo" else ["pi"]
    per_step = rc["tasks"] * world
    pool = rl_task_pool(cfg, rc["steps"] * per_step)                  # fresh train tasks every step
    for step in tqdm(range(first, rc["steps"]), desc=stage, initial=first, total=rc["steps"], disable=rank != 0):
        phase, t0 = phases[step % len(phases)], time.time()
        tasks = pool[step * per_step:(step + 1) * per_step][rank::world]
        seed_of = lambda role: sampling_seed(cfg["seed"], step, rank, role)   # noqa: E731
        policy = common.inference_copy(model, cfg["bf16"], into=policy)
        if phase == "sim":
            eps, batches, extra = simulation_phase(policy, tok, tasks, cfg, seed_of, returns, progress=rank == 0)
        else:
            eps, batches, extra = policy_phase(stage, policy, tok, tasks, cfg, seed_of, returns, progress=rank == 0)
        t1, upd = time.time(), {}
        model.train()
        for i, samples in enumerate(batches):
            st = rl_update(model, ref, opt, samples, tok.pad_token_id, rc, cfg["bf16"], world, cfg["max_new_tokens"])
            upd.update({(f"refine_{k}" if i else k): v for k, v in st.items()})
        model.eval()
        rows = gather([(ep.seed, returns(ep), ep.success, float(np.mean([len(t.response_ids) for t in ep.turns])))
                       for ep in eps], world)
        by_task = {}
        for seed, ret, _, _ in rows:
            by_task.setdefault(seed, []).append(ret)
        rec = dict(stage=f"rl_{stage}", step=step + 1, phase=phase, success=float(np.mean([r[2] for r in rows])),
                   ret=float(np.mean([r[1] for r in rows])), response_tokens=float(np.mean([r[3] for r in rows])),
                   zero_var_groups=float(np.mean([np.ptp(v) == 0 for v in by_task.values()])),
                   rollout_s=t1 - t0, update_s=time.time() - t1, step_s=time.time() - t0, **extra, **upd)
        if step == first and engine.COMPILE:
            rec["decode_compile_s"] = compile_s
        run.log(rec)
        if rank == 0:
            tqdm.write(f"{stage} step {step + 1} ({phase}): success {rec['success']:.2f} return {rec['ret']:.2f} "
                       f"tokens {rec['response_tokens']:.0f} (rollout {rec['rollout_s']:.0f} s, "
                       f"update {rec['update_s']:.0f} s)")
        run.after_step(model, opt, None, "rl", step + 1)
    run.save_model(model, tok, cfg)
    run.save_checkpoint(None, None, None, "done", rc["steps"])
    return model, tok


# ---- evaluation on the held-out splits ----------------------------------------------------------------------

def evaluate_splits(model, tok, cfg, rank, world, run, tag):
    """ID and OOD test splits, sharded over ranks; rank 0 prints and writes eval.json."""
    results, policy = {}, common.inference_copy(model, cfg["bf16"])
    for split in ("id", "ood"):
        n = cfg["eval"][split]
        if n <= 0:
            continue
        seeds = envs.split_seeds(split, n)[rank::world]
        made, eps = evaluate.play(policy, tok, cfg["env"], split, seeds, env_kwargs=cfg["env_kwargs"],
                                  history_k=cfg["history_k"], system=cfg["system"],
                                  max_new_tokens=cfg["max_new_tokens"], temperature=cfg["eval"]["temperature"],
                                  batch=cfg["eval"]["batch"], progress=rank == 0, admissible=cfg["admissible"])
        results[split] = evaluate.summarize(gather(evaluate.episode_rows(made, eps), world))
    if rank == 0 and results:
        print(f"\n[{tag}] held-out evaluation ({cfg['env']})\n" + evaluate.format_table(results))
        (run.dir / "eval.json").write_text(json.dumps(results, indent=1))
        run.log(dict(stage="eval", step=0, tag=tag, **{f"{s}_{k}": v for s, m in results.items()
                                                      for k, v in m.items() if isinstance(v, float)}))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=STAGES)
    ap.add_argument("--config", default=None, help="a YAML file under configs/")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or interrupted run from its "
                    "checkpoint, with its own stage and config")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. rl.steps=10 sft.epochs=1")
    args = ap.parse_intermixed_args(argv)   # overrides may come before or after the options
    if args.resume and (args.stage or args.config or args.overrides):
        ap.error("--resume takes the run's own stage and config; give nothing else")
    if not args.resume and not args.stage:
        ap.error("--stage is required (or --resume RUN_DIR)")
    try:
        if args.resume:
            stage = json.loads((Path(args.resume) / "run.json").read_text())["stage"]
            cfg = common.load_config(DEFAULTS, str(Path(args.resume) / "config.yaml"))
            cfg["out_dir"] = args.resume
        else:
            stage, cfg = args.stage, common.load_config(DEFAULTS, args.config, args.overrides)
        if cfg["dist"] not in ("ddp", "fsdp"):
            raise ValueError(f"dist must be ddp or fsdp, got {cfg['dist']!r}")
        if cfg["attn"] not in ("eager", "sdpa"):
            raise ValueError(f"attn must be eager or sdpa, got {cfg['attn']!r}")
        envs.check_env_config(cfg["env"], cfg["env_kwargs"])      # an unknown env fails here, before any work
        if cfg["admissible"] and cfg["env"] != "alfworld":   # only ALFWorld lists every valid command
            raise ValueError(f"admissible: true is for env alfworld (its admissible commands), not {cfg['env']!r}")
        check_rl_config(cfg["rl"])
        if not 0 <= cfg["resim"]["refine_keep"] <= 1:
            raise ValueError(f"resim.refine_keep is a share in [0, 1], got {cfg['resim']['refine_keep']}")
        if not 0 <= cfg["resim"]["hide_best"] <= 1:
            raise ValueError(f"resim.hide_best is a share in [0, 1], got {cfg['resim']['hide_best']}")
        if not isinstance(cfg["resim"]["distinct"], int) or cfg["resim"]["distinct"] < 1:
            raise ValueError(f"resim.distinct is a count of rollouts >= 1, got {cfg['resim']['distinct']!r}")
        if cfg["resim"]["episode_minutes"] < 0:
            raise ValueError(f"resim.episode_minutes is >= 0 (0: no cut), got {cfg['resim']['episode_minutes']}")
        if cfg["resim"]["value_scale"] not in ("absolute", "relative"):
            raise ValueError(f"resim.value_scale must be absolute or relative, got {cfg['resim']['value_scale']!r}")
        if cfg["resim"]["hide_best"] and cfg["resim"]["action_only"]:   # its traces' actions are not the best move
            raise ValueError("resim.hide_best needs the traces: with action_only it would teach non-best moves bare")
        if stage != "resim" and cfg["rl"]["min_moves"] > 0:
            rl_task_pool(cfg, 1)             # an env that cannot filter by length fails here, not mid-run
    except (ValueError, KeyError, OSError, yaml.YAMLError) as e:
        raise SystemExit(f"{'resume' if args.resume else 'config'} error: {e}")
    rank, world, device = common.setup_dist(cfg["device"])
    torch.manual_seed(cfg["seed"] + rank)
    run = common.Run(cfg["out_dir"] or f"runs/{stage}_{cfg['env']}", cfg, rank, stage, world, bool(args.resume))
    handlers = {s: signal.signal(s, common.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    compile_before = engine.COMPILE          # DYNAMIND_COMPILE=1 also compiles; put back when the run ends
    try:
        engine.COMPILE = compile_before or cfg["decode_compile"]
        t0 = time.time()
        if run.ckpt and run.ckpt["phase"] == "done":     # training had finished: evaluate the saved model
            cfg.update({k: v for k, v in common.prompt_settings(str(run.dir / "model")).items()
                        if k in ("history_k", "system")})
            model, tok = agent.load_model(str(run.dir / "model"), device=device)
        elif stage == "resim":
            model, tok = stage_resim(cfg, rank, world, device, run)
        else:
            model, tok = stage_rl(stage, cfg, rank, world, device, run)
        results = evaluate_splits(model, tok, cfg, rank, world, run, stage)
        run.plot()
        if rank == 0:
            print(f"{stage} done in {(time.time() - t0) / 60:.1f} min; run directory {run.dir}")
    except FloatingPointError as e:
        raise SystemExit(f"{e}; {run.dir / 'checkpoint.pt'} keeps the last good step (lower the learning rate "
                         f"in {run.dir / 'config.yaml'}, then --resume {run.dir})")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        common.STOP["signal"] = 0
        engine.COMPILE = compile_before
    if world > 1:     # free FSDP's gloo work handles while the interpreter is alive (else a rare SIGABRT at exit)
        del model
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
