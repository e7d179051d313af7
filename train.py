"""Train Dyna-Mind. One entry point for every stage, one process on a CPU or many GPUs under torchrun:

    torchrun --nproc_per_node=1 train.py --stage resim                      # stage 1: ReSim -> SFT -> eval
    torchrun --nproc_per_node=1 train.py --stage dyna_grpo                  # stage 2 from the ReSim model
    torchrun --nproc_per_node=1 train.py --stage grpo  --config configs/sokoban.yaml rl.steps=10
    python train.py --stage rloo ...                                        # plain python works too
    torchrun --nproc_per_node=8 train.py --stage dyna_grpo dist=fsdp ...    # FSDP2 for big models
    python train.py --resume runs/resim_sokoban                             # continue a killed run exactly

The config is DEFAULTS below (the embedded default: Sokoban, tiny model, CPU), then --config YAML, then
key=value overrides (dotted keys, YAML values). Unknown keys and wrong types are errors before any work.

RL stages (the paper's Algorithm 1; grpo/rloo skip phase A):
    for it in 1..N:
        (A) n_T simulation-improvement steps: G/2 SimRollouts (tau', tau'_refine) + G/2 plain rollouts per task;
            GRPO on the group tau U tau' (episode advantage), then on tau'_refine with A_refine
        (B) n_pi policy-improvement steps: G plain rollouts per task, GRPO (or RLOO) on outcome return
"""
import argparse
import copy
import gc
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

import agent
import evaluate
import grpo
import resim
import simrollout

DEFAULTS = {
    "env": "sokoban",
    "env_kwargs": {},             # passed to the env module's make_env (e.g. max_steps)
    "model": "tiny",              # tiny | smollm2 | a model directory | a hub id (resim stage)
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "intermediate_size": 768},
    "init_from": "",              # RL stages: a model directory (default: runs/resim_<env>/model)
    "out_dir": "",                # default: runs/<stage>_<env>
    "seed": 0,
    "device": "auto",             # auto | cpu | cuda
    "dist": "ddp",                # ddp: full model per rank | fsdp: FSDP2 fully_shard (torchrun, N > 1)
    "checkpoint_minutes": 10.0,   # training state saved at most this often (and on Ctrl-C / SIGTERM)
    "bf16": True,                 # autocast to bfloat16 (CPU AMX or GPU)
    "history_k": 0,               # (action, observation) pairs shown; Sokoban is Markov
    "system": False,              # system prompt: rules and format text (off for a from-scratch model)
    "max_new_tokens": 320,
    "resim": {"episodes": 7000, "b": 4, "d": 1, "b_train": 2, "rollout": "expert", "eps": 0.3,
              "value": "expert", "gamma": 0.9, "refine_frac": 0.15, "aggregator": "template",
              "aggregator_model": "", "action_only": False, "reuse_traces": True},
    "sft": {"epochs": 1, "batch_size": 16, "micro_batch": 16, "lr": 2e-3, "warmup": 0.05,
            "weight_decay": 0.0, "grad_clip": 1.0},
    "rl": {"steps": 12, "tasks": 4, "group": 8, "lr": 1e-4, "ppo_epochs": 1, "micro_batch": 16,
           "clip_low": 0.2, "clip_high": 0.28, "beta": 0.0, "agg": "token-mean", "temperature": 1.0,
           "n_T": 1, "n_pi": 1, "sim_depth": 5, "format_penalty": 0.0, "grad_clip": 1.0,
           "task_start": 100000},
    "eval": {"id": 200, "ood": 100, "temperature": 0.0, "batch": 256},
}
STAGES = ("resim", "grpo", "rloo", "dyna_grpo")


# ---- config -----------------------------------------------------------------------------------------

def same_type(default, value):
    """A value may replace a default of its type; an int may stand for a float, a bool for nothing else."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def merge(base, new, where="config"):
    """Merge `new` into a copy of `base`; unknown keys and mismatched types raise ValueError."""
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        if k not in base:
            raise ValueError(f"{where}: unknown key {k!r}; valid keys: {', '.join(sorted(base))}")
        b = base[k]
        if isinstance(b, float) and isinstance(v, str):   # YAML reads 1e-4 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(b, dict) and k != "env_kwargs":
            if not isinstance(v, dict):
                raise ValueError(f"{where}.{k}: expected a mapping, got {v!r}")
            out[k] = merge(b, v, f"{where}.{k}")
        elif not same_type(b, v):
            raise ValueError(f"{where}.{k}: expected {type(b).__name__}, got {v!r}")
        else:
            out[k] = float(v) if isinstance(b, float) else v
    return out


def load_config(path=None, overrides=()):
    cfg = DEFAULTS
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a YAML mapping")
        cfg = merge(cfg, data, path)
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r}: expected key=value")
        key, val = ov.split("=", 1)
        nested = yaml.safe_load(val)
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = merge(cfg, nested, "override")
    return cfg


# ---- distributed ------------------------------------------------------------------------------------

def setup_dist(cfg):
    """(rank, world, device). torchrun sets WORLD_SIZE; one process needs no process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and cfg["device"] in ("auto", "cuda")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def gather(obj, world):
    """All ranks' lists, concatenated (identity for one process)."""
    if world == 1:
        return obj
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return [x for part in out for x in part]


def allreduce_grads(model, world):
    """Sum gradients over ranks once per optimizer step (no sync on accumulation micro-batches, so ranks
    with different numbers of micro-batches never wait on each other)."""
    if world > 1 and not sharded(model):     # FSDP reduce-scatters in backward
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)


def allsum(x, world, op="sum"):
    if world == 1:
        return x
    t = torch.tensor(float(x))
    torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return t.item()


def shard(model, cfg, world):
    """FSDP2 for models whose weights, gradients and AdamW state do not fit on one device: every decoder
    layer, then the root, is fully_shard-ed; bf16 compute, fp32 master weights and gradient reduction."""
    if cfg["dist"] != "fsdp" or world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg["bf16"] else None, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.set_gradient_divide_factor(1.0)           # losses are normalised by global counts: sum, not mean
    model.set_force_sum_reduction_for_comms(True)   # gloo has no PREMUL_SUM
    return model


def sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_state(model, opt=None, everywhere=False):
    """Unsharded (model, optimizer) state dicts keyed by parameter name. Under FSDP this is a collective:
    every rank calls it; with everywhere=False only rank 0 receives the tensors (on CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    if opt is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, opt, options=options)


def load_full_state(model, opt, model_state, opt_state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=opt_state,
                   options=StateDictOptions(full_state_dict=True))


# ---- run directory, logging, checkpoints --------------------------------------------------------------

class Run:
    """The run directory: run.json (stage), config.yaml, metrics.jsonl, checkpoint.pt, model/, eval.json,
    curves.png. Rank 0 writes. With resume=True it keeps what is there and drops the metrics lines logged
    after the last checkpoint (the resumed run logs them again)."""

    def __init__(self, out_dir, cfg, rank, stage, world=1, resume=False):
        self.dir, self.rank, self.cfg, self.world = Path(out_dir), rank, cfg, world
        self.ckpt, self.last_save, self.lines = None, time.time(), 0
        if resume:
            self.ckpt = self.load_checkpoint()
            if rank == 0:
                lines = (self.dir / "metrics.jsonl").read_text().splitlines(keepends=True)
                self.lines = self.ckpt["metrics_lines"] if self.ckpt else 0
                (self.dir / "metrics.jsonl").write_text("".join(lines[:self.lines]))
        elif rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                probe = self.dir / ".write_test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise SystemExit(f"run directory {self.dir} is not writable: {e}")
            (self.dir / "run.json").write_text(json.dumps({"stage": stage}))
            (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            (self.dir / "metrics.jsonl").write_text("")
            (self.dir / "checkpoint.pt").unlink(missing_ok=True)

    def log(self, rec):
        if self.rank == 0:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.lines += 1

    def save_checkpoint(self, model, opt, sched, phase, step):
        """Everything needed to continue exactly: weights, AdamW moments, LR schedule, every rank's RNG
        states and the cursor (phase, step). Written to a temporary file, then renamed over the old one."""
        msd, osd = full_state(model, opt) if model is not None else (None, None)
        rngs = gather([rng_state()], self.world)
        if self.rank == 0:
            ck = dict(phase=phase, step=step, metrics_lines=self.lines, model=msd, opt=osd, rng=rngs,
                      sched=sched.state_dict() if sched is not None else None)
            torch.save(ck, self.dir / ".checkpoint.pt.tmp")
            os.replace(self.dir / ".checkpoint.pt.tmp", self.dir / "checkpoint.pt")
        self.last_save = time.time()

    def load_checkpoint(self):
        path = self.dir / "checkpoint.pt"
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:     # a torn file cannot happen (rename), but a copied/corrupt one can
            raise SystemExit(f"cannot read checkpoint {path}: {e}")

    def restore(self, model, opt, sched=None):
        """Load the checkpoint's weights, optimizer, schedule and this rank's RNG states."""
        ck = self.ckpt
        load_full_state(model, opt, ck["model"], ck["opt"])
        if sched is not None:
            sched.load_state_dict(ck["sched"])
        if len(ck["rng"]) == self.world:
            set_rng_state(ck["rng"][self.rank])

    def after_step(self, model, opt, sched, phase, step):
        """Checkpoint when checkpoint_minutes have passed or a stop signal came (decided together, so all
        ranks save and stop at the same step); on a signal, exit with a resume hint."""
        due = time.time() - self.last_save >= 60 * self.cfg["checkpoint_minutes"]
        stop = allsum(STOP["signal"], self.world, op="max")
        if allsum(float(due), self.world, op="max") or stop:
            self.save_checkpoint(model, opt, sched, phase, step)
        if stop:
            if self.rank == 0:
                print(f"\nstopped after {phase} step {step}; checkpoint saved. Continue with:\n"
                      f"  python train.py --resume {self.dir}", flush=True)
            raise SystemExit(128 + int(stop))

    def save_model(self, model, tokenizer, cfg, name="model"):
        """save_pretrained into a temporary directory, then rename: a killed run never leaves half a model."""
        state = full_state(model)[0] if sharded(model) else None     # a collective under FSDP
        if self.rank != 0:
            return
        final, tmp, old = self.dir / name, self.dir / f".{name}.tmp", self.dir / f".{name}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        settings = {k: cfg[k] for k in ("env", "env_kwargs", "history_k", "system", "max_new_tokens")}
        (tmp / "dynamind.json").write_text(json.dumps(settings, indent=1))
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def plot(self):
        if self.rank != 0:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        recs = [json.loads(x) for x in (self.dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        panels = [("sft", "loss"), ("rl", "success"), ("rl", "ret"), ("rl", "response_tokens")]
        panels = [(s, k) for s, k in panels if any(r.get("stage", "").startswith(s) and k in r for r in recs)]
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
        for ax, (s, k) in zip(axes[0], panels):
            for stage in sorted({r["stage"] for r in recs if r["stage"].startswith(s)}):
                pts = [(r["step"], r[k]) for r in recs if r["stage"] == stage and k in r]
                ax.plot(*zip(*pts), label=stage)
            ax.set_xlabel("step"), ax.set_title(k), ax.legend()
        fig.tight_layout()
        fig.savefig(self.dir / "curves.png", dpi=80)


def rng_state():
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(st):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if st["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


STOP = {"signal": 0}


def on_signal(signum, frame):
    """First Ctrl-C (or SIGTERM from torchrun or a scheduler): finish the step, checkpoint, exit.
    A second Ctrl-C stops at once."""
    if STOP["signal"] and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP["signal"] = signum
    print(f"\nsignal {signum}: stopping after this step with a checkpoint (Ctrl-C again to abort now)",
          file=sys.stderr, flush=True)


# ---- evaluation on held-out splits ------------------------------------------------------------------

def inference_copy(model, cfg, into=None):
    """The weights generation runs on: a bfloat16 copy when bf16 is on (decoding on CPU is ~1.3x faster),
    refreshed in place with `into` so RL rollouts always use the current policy. Under FSDP every rank
    gathers a full copy, so decoding needs no collectives (ranks finish their episodes at different times)."""
    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    if sharded(model):
        if into is None:
            from transformers import AutoModelForCausalLM
            with torch.device(next(model.parameters()).device):
                into = AutoModelForCausalLM.from_config(model.config, dtype=dtype).eval()
        with torch.no_grad():       # one parameter gathered at a time: no full fp32 copy in memory
            for name, p in model.named_parameters():
                into.get_parameter(name).copy_(p.full_tensor())
        return into
    if not cfg["bf16"] or next(model.parameters()).dtype == torch.bfloat16:
        return model
    if into is None:
        return copy.deepcopy(model).to(torch.bfloat16).eval()
    into.load_state_dict(model.state_dict())
    return into


def evaluate_splits(model, tok, cfg, rank, world, run, tag):
    """ID and OOD test splits, sharded over ranks; rank 0 prints and writes eval.json."""
    mod, results = evaluate.env_module(cfg["env"]), {}
    model = inference_copy(model, cfg)
    for split in ("id", "ood"):
        n = cfg["eval"][split]
        if n <= 0:
            continue
        seeds = mod.split_seeds(split, n)[rank::world]
        envs, eps = evaluate.play(model, tok, cfg["env"], split, seeds, env_kwargs=cfg["env_kwargs"],
                                  history_k=cfg["history_k"], system=cfg["system"],
                                  max_new_tokens=cfg["max_new_tokens"], temperature=cfg["eval"]["temperature"],
                                  batch=cfg["eval"]["batch"], progress=rank == 0)
        results[split] = evaluate.summarize(gather(evaluate.episode_rows(envs, eps), world))
    if rank == 0 and results:
        print(f"\n[{tag}] held-out evaluation ({cfg['env']})\n" + evaluate.format_table(results))
        for split, m in results.items():
            for key in ("success_by_task_type", "success_by_length"):
                if key in m:
                    print(f"  {split} {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in m[key].items()))
        (run.dir / "eval.json").write_text(json.dumps(results, indent=1))
        run.log(dict(stage="eval", step=0, tag=tag, **{f"{s}_{k}": v for s, m in results.items()
                                                      for k, v in m.items() if isinstance(v, float)}))
    return results


# ---- stage 1: ReSim ---------------------------------------------------------------------------------

def final_model(run, cfg, device):
    """A resumed run whose training had finished: the saved model and the prompt settings it was trained
    with (an RL stage may have taken them from its init checkpoint), ready for evaluation."""
    if run.rank == 0:
        print(f"resuming: training had finished; evaluating {run.dir / 'model'}")
    saved = evaluate.prompt_settings(str(run.dir / "model"))
    cfg.update({k: saved[k] for k in ("history_k", "system") if k in saved})
    return agent.load_model(str(run.dir / "model"), device=device)


def resume_note(run, phase):
    if run.ckpt and run.rank == 0:
        print(f"resuming from {phase} step {run.ckpt['step']} ({run.dir / 'checkpoint.pt'})")


def stage_resim(cfg, rank, world, device, run):
    ck = run.ckpt
    torch.manual_seed(cfg["seed"])
    model, tok = agent.load_model(cfg["model"], device=device, **(cfg["tiny"] if cfg["model"] == "tiny" else {}))
    model = shard(model, cfg, world)
    rc = cfg["resim"]
    traces = run.dir / "traces.jsonl"
    key = json.dumps([cfg["env"], cfg["env_kwargs"], cfg["model"], cfg["history_k"], cfg["system"],
                      {k: v for k, v in rc.items() if k not in ("action_only", "reuse_traces")}], sort_keys=True)
    cached = traces.exists() and rc["reuse_traces"] and (run.dir / "traces.key").exists() \
        and (run.dir / "traces.key").read_text() == key
    if cached:
        records = resim.read_jsonl(traces)
        if rank == 0:
            print(f"reusing {len(records)} ReSim steps from {traces}")
    else:
        aggregate = resim.template_aggregate
        if rc["aggregator"] == "llm":
            amodel, atok = agent.load_model(rc["aggregator_model"] or cfg["model"], device=device)
            aggregate = resim.llm_aggregator(amodel, atok)
        elif rc["aggregator"] != "template":
            raise ValueError(f"resim.aggregator must be template or llm, got {rc['aggregator']!r}")
        seeds = evaluate.env_module(cfg["env"]).split_seeds("train", rc["episodes"])[rank::world]
        records, stats = resim.collect(cfg["env"], cfg["env_kwargs"], seeds, tokenizer=tok, aggregate=aggregate,
                                       history_k=cfg["history_k"], system=cfg["system"],
                                       seed=cfg["seed"], progress=rank == 0, **rc)
        records = sorted(gather(records, world), key=lambda r: (r["seed"], r["step"]))
        stats = {k: allsum(v, world) for k, v in stats.items()}
        run.log(dict(stage="resim_collect", step=0, **stats))
        if rank == 0:
            print(f"ReSim: {stats['solved']:.0f}/{stats['episodes']:.0f} episodes solved, {stats['steps']:.0f} steps "
                  f"kept (+{stats['refine_examples']:.0f} refinement examples), {stats['seconds']:.0f} s")
            with open(run.dir / ".traces.tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(run.dir / ".traces.tmp", traces)      # the key last: a killed write is never reused
            (run.dir / "traces.key").write_text(key)
    pairs = resim.encode(tok, records, action_only=rc["action_only"])
    if rank == 0:
        n_tok = sum(len(p) + len(q) for p, q in pairs)
        print(f"SFT on {len(pairs)} examples ({'action only' if rc['action_only'] else 'ReSim traces'}), "
              f"{n_tok / max(1, len(pairs)):.0f} tokens each")
    t0 = time.time()
    resume_note(run, "sft")
    steps = resim.sft(model, tok, pairs, bf16=cfg["bf16"], seed=cfg["seed"], rank=rank, world=world, log=run.log,
                      progress=rank == 0, allreduce=lambda: allreduce_grads(model, world),
                      allsum=lambda x: allsum(x, world), start_step=ck["step"] if ck else 0,
                      restore=(lambda opt, sched: run.restore(model, opt, sched)) if ck else None,
                      on_step=lambda step, opt, sched: run.after_step(model, opt, sched, "sft", step),
                      **cfg["sft"])
    run.log(dict(stage="sft_done", step=0, seconds=time.time() - t0))
    run.save_model(model, tok, cfg)
    run.save_checkpoint(None, None, None, "done", steps)
    return model, tok


# ---- stage 2: GRPO / RLOO / Dyna-GRPO ---------------------------------------------------------------

def rollout_samples(episodes, advantages, turns_of=lambda ep: ep.turns):
    """Every turn is a sample sharing its episode's advantage: (prompt_ids, response_ids, advantage)."""
    return [(t.prompt_ids, t.response_ids, float(a)) for ep, a in zip(episodes, advantages)
            for t in turns_of(ep)]


def rl_update(model, ref, opt, tok, samples, rc, world, bf16=False):
    """Old log-probs fixed before the update, then ppo_epochs passes of clipped-ratio micro-batches."""
    if rc["beta"] == 0:
        samples = [s for s in samples if s[2] != 0.0]   # zero advantage and no KL: no gradient
    # global normalisers, computed once: a collective inside the loop would hang ranks with fewer chunks
    n_tok, n_seq = allsum(sum(len(s[1]) for s in samples), world), allsum(len(samples), world)
    if n_tok == 0:
        return {}
    pad, mb = tok.pad_token_id, rc["micro_batch"]
    chunks = [samples[i:i + mb] for i in range(0, len(samples), mb)]
    real = len(chunks)
    if sharded(model):   # FSDP forwards/backwards are collectives: pad to the same micro-batch count
        n = int(allsum(len(chunks), world, op="max"))
        chunks += [chunks[0] if chunks else [([pad], [pad], 0.0)]] * (n - len(chunks))

    def logps(net, chunk, grad):
        dev = next(net.parameters()).device
        with torch.set_grad_enabled(grad), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return grpo.response_logprobs(net, [s[0] for s in chunk], [s[1] for s in chunk], pad)

    old = [logps(model, c, False)[0].detach() for c in chunks]
    refs = [logps(ref, c, False)[0] for c in chunks] if ref is not None else [None] * len(chunks)
    stats, model_dev = [], next(model.parameters()).device
    for _ in range(rc["ppo_epochs"]):
        for i, (c, o, r) in enumerate(zip(chunks, old, refs)):
            logp, mask = logps(model, c, True)
            if i >= real:                        # padding: same collectives, zero gradient
                (logp.float().sum() * 0.0).backward()
                continue
            adv = torch.tensor([s[2] for s in c], device=model_dev)
            loss, st = grpo.policy_loss(logp.float(), o.float(), adv, mask, ref_logp=r, beta=rc["beta"],
                                        clip_low=rc["clip_low"], clip_high=rc["clip_high"], agg=rc["agg"])
            w = mask.sum().item() / n_tok if rc["agg"] == "token-mean" else len(c) / n_seq
            (loss * w).backward()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite RL loss {loss.item()}")
            stats.append(st)
        allreduce_grads(model, world)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), rc["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {k: float(np.mean([s[k] for s in stats])) for k in (stats[0] if stats else {})}
    out["grad_norm"] = float(gnorm)
    return out


def policy_phase(stage, policy, tok, mod, tasks, cfg, gen):
    """(B) policy improvement: G plain rollouts per task; GRPO (or RLOO) advantages on outcome return."""
    rc = cfg["rl"]
    seeds = [s for s in tasks for _ in range(rc["group"])]
    envs = [mod.make_env("train", **cfg["env_kwargs"]) for _ in seeds]
    eps = agent.run_episodes(policy, tok, envs, seeds, gen_kwargs=gen, history_k=cfg["history_k"],
                             system=cfg["system"], format_penalty=rc["format_penalty"])
    adv_fn = grpo.rloo_advantages if stage == "rloo" else grpo.group_advantages
    adv = adv_fn(torch.tensor([ep.ret for ep in eps]), [ep.seed for ep in eps])
    return eps, [rollout_samples(eps, adv)], {}


def simulation_phase(policy, tok, mod, tasks, cfg, gen):
    """(A) simulation improvement: per task G/2 SimRollouts (tau', tau'_refine) and G/2 plain rollouts (tau).
    tau U tau' is one GRPO group; tau'_refine is trained with the binary A_refine."""
    rc = cfg["rl"]
    seeds = [s for s in tasks for _ in range(rc["group"] // 2)]
    envs = [mod.make_env("train", **cfg["env_kwargs"]) for _ in seeds]
    sim = simrollout.simrollout(policy, tok, envs, seeds, gen_kwargs=gen, d=rc["sim_depth"],
                                history_k=cfg["history_k"], system=cfg["system"],
                                format_penalty=rc["format_penalty"])
    envs = [mod.make_env("train", **cfg["env_kwargs"]) for _ in seeds]
    plain = agent.run_episodes(policy, tok, envs, seeds, gen_kwargs=gen, history_k=cfg["history_k"],
                               system=cfg["system"], format_penalty=rc["format_penalty"])
    group = plain + sim
    adv = grpo.group_advantages(torch.tensor([ep.ret for ep in group]), [ep.seed for ep in group])
    mean = lambda eps, s: float(np.mean([e.ret for e in eps if e.seed == s]))   # noqa: E731
    a_ref = [grpo.a_refine(ep.ret, ep.success, mean(plain, ep.seed), mean(sim, ep.seed)) for ep in sim]
    samples = [rollout_samples(group, adv), rollout_samples(sim, a_ref, turns_of=lambda ep: ep.refine_turns)]
    return group, samples, dict(a_refine_mean=float(np.mean(a_ref)),
                                simrollout_success=float(np.mean([ep.success for ep in sim])))


def stage_rl(stage, cfg, rank, world, device, run):
    """GRPO / RLOO / Dyna-GRPO from a checkpoint. Algorithm 1's schedule: n_T simulation-improvement
    steps, then n_pi policy-improvement steps, repeated (grpo and rloo: policy improvement only)."""
    rc = cfg["rl"]
    init = cfg["init_from"] or f"runs/resim_{cfg['env']}/model"
    if not os.path.isdir(init):
        raise SystemExit(f"{stage}: no checkpoint at {init!r}; run `train.py --stage resim` first or set init_from")
    model, tok = agent.load_model(init, device=device)
    saved = evaluate.prompt_settings(init)
    for k in ("history_k", "system"):
        if k in saved and saved[k] != cfg[k]:
            print(f"note: using the checkpoint's {k}={saved[k]} (config had {cfg[k]})")
            cfg[k] = saved[k]
    ref = copy.deepcopy(model).eval().requires_grad_(False) if rc["beta"] > 0 else None   # the initial policy
    model = shard(model, cfg, world)
    ref = shard(ref, cfg, world) if ref is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=rc["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    first = 0
    if run.ckpt:
        resume_note(run, "rl")
        run.restore(model, opt)
        first = run.ckpt["step"]
    mod, policy = evaluate.env_module(cfg["env"]), inference_copy(model, cfg)
    phases = (["sim"] * rc["n_T"] + ["pi"] * rc["n_pi"]) if stage == "dyna_grpo" else ["pi"]
    for step in tqdm(range(first, rc["steps"]), desc=stage, initial=first, total=rc["steps"], disable=rank != 0):
        phase, t0 = phases[step % len(phases)], time.time()
        start = rc["task_start"] + step * rc["tasks"] * world          # fresh train tasks every step
        tasks = mod.split_seeds("train", rc["tasks"] * world, start=start)[rank::world]
        gen = dict(max_new_tokens=cfg["max_new_tokens"], temperature=rc["temperature"],
                   seed=cfg["seed"] * 100003 + step * 1009 + rank)
        policy = inference_copy(model, cfg, into=policy)
        if phase == "sim":
            eps, batches, extra = simulation_phase(policy, tok, mod, tasks, cfg, gen)
        else:
            eps, batches, extra = policy_phase(stage, policy, tok, mod, tasks, cfg, gen)
        t_roll = time.time() - t0
        upd = {}
        for i, samples in enumerate(batches):      # sim phase: two updates, as Algorithm 1 lists them
            st = rl_update(model, ref, opt, tok, samples, rc, world, cfg["bf16"])
            upd.update({(f"refine_{k}" if i else k): v for k, v in st.items()})
        rows = gather([(ep.seed, ep.ret, ep.success, float(np.mean([len(t.response_ids) for t in ep.turns])))
                       for ep in eps], world)
        by_task = {}
        for seed, ret, _, _ in rows:
            by_task.setdefault(seed, []).append(ret)
        rec = dict(stage=f"rl_{stage}", step=step + 1, phase=phase,
                   success=float(np.mean([r[2] for r in rows])), ret=float(np.mean([r[1] for r in rows])),
                   response_tokens=float(np.mean([r[3] for r in rows])),
                   zero_var_groups=float(np.mean([np.ptp(v) == 0 for v in by_task.values()])),
                   rollout_s=t_roll, step_s=time.time() - t0, **extra, **upd)
        run.log(rec)
        if rank == 0:
            tqdm.write(f"{stage} step {step + 1} ({phase}): success {rec['success']:.2f} return {rec['ret']:.2f} "
                       f"tokens {rec['response_tokens']:.0f} ({rec['step_s']:.0f} s)")
        run.after_step(model, opt, None, "rl", step + 1)
    run.save_model(model, tok, cfg)
    run.save_checkpoint(None, None, None, "done", rc["steps"])
    return model, tok


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
            cfg = load_config(str(Path(args.resume) / "config.yaml"))
            cfg["out_dir"] = args.resume
        else:
            stage, cfg = args.stage, load_config(args.config, args.overrides)
        if cfg["dist"] not in ("ddp", "fsdp"):
            raise ValueError(f"dist must be ddp or fsdp, got {cfg['dist']!r}")
    except (ValueError, KeyError, OSError, yaml.YAMLError) as e:
        raise SystemExit(f"{'resume' if args.resume else 'config'} error: {e}")
    evaluate.env_module(cfg["env"])      # an unknown env fails here, before any work
    rank, world, device = setup_dist(cfg)
    torch.manual_seed(cfg["seed"] + rank)
    run = Run(cfg["out_dir"] or f"runs/{stage}_{cfg['env']}", cfg, rank, stage, world, resume=bool(args.resume))
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        t0 = time.time()
        if run.ckpt and run.ckpt["phase"] == "done":
            model, tok = final_model(run, cfg, device)
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
        STOP["signal"] = 0
    if world > 1:     # free FSDP's gloo work handles while the interpreter is alive (else a rare SIGABRT at exit)
        del model
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
