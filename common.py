"""What train.py stands on but is not the method: the config, torchrun (DDP / FSDP2), the run directory
(metrics, checkpoints, --resume, the saved model, plots) and Ctrl-C / SIGTERM handling."""
import copy
import itertools
import json
import os
import random
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import yaml

PROMPT_KEYS = ("env", "env_kwargs", "history_k", "system", "max_new_tokens")   # saved beside a model


# ---- config -------------------------------------------------------------------------------------------

def same_type(default, value):
    """A value may replace a default of its type; an int may stand for a float, a bool for nothing else."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def merge(base, new, where="config", free=("env_kwargs",)):
    """Merge `new` into a copy of `base`; unknown keys and mismatched types raise ValueError. Keys in `free`
    are mappings whose own keys are not checked here (the env checks its options); they merge key by key too,
    so `env_kwargs.future_lines=3` on the command line keeps the config file's other env options."""
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
        if isinstance(b, dict):
            if not isinstance(v, dict):
                raise ValueError(f"{where}.{k}: expected a mapping, got {v!r}")
            out[k] = {**b, **v} if k in free else merge(b, v, f"{where}.{k}", free)
        elif not same_type(b, v):
            raise ValueError(f"{where}.{k}: expected {type(b).__name__}, got {v!r}")
        else:
            out[k] = float(v) if isinstance(b, float) else v
    return out


def load_config(defaults, path=None, overrides=()):
    """defaults, then a YAML file, then key=value overrides (dotted keys, YAML values)."""
    cfg = defaults
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


def prompt_settings(model_dir):
    """The prompt settings a trained model was trained with (dynamind.json beside the weights), or {}."""
    path = os.path.join(model_dir, "dynamind.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


# ---- distributed ----------------------------------------------------------------------------------------

# How long a collective waits for the slowest rank. torch's default, 30 min, is less than ranks of a ReSim search
# may finish apart: with ALFWorld ranks of 15 and over 45 min, the first timed out at the gather and the whole
# search was lost (RESULTS.md, The text environments).
DIST_TIMEOUT = timedelta(hours=6)


def setup_dist(device_pref):
    """(rank, world, device). torchrun sets WORLD_SIZE; one process needs no process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
    return rank, world, device


_claims = itertools.count()   # every rank makes its claim() calls in the same order: the same counter names


def claim(items, world):
    """`items` handed out one at a time to whichever rank asks next, through a counter in the process group's store:
    a rank whose episodes run long takes fewer. ALFWorld's search runs 3 s to 20 min an episode; dealt 20 each,
    one rank had searched 18 while the other was on its third. Each item goes to one rank; one process takes all."""
    if world == 1:
        yield from items
        return
    store, key = torch.distributed.distributed_c10d._get_default_store(), f"claim{next(_claims)}"
    while (i := store.add(key, 1) - 1) < len(items):
        yield items[i]


def gather(obj, world):
    """All ranks' lists, concatenated (identity for one process)."""
    if world == 1:
        return obj
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return [x for part in out for x in part]


def allsum(x, world, op="sum"):
    """A number summed (or maxed) over ranks."""
    if world == 1:
        return x
    # NCCL reduces CUDA tensors only (the current device, set in setup_dist); gloo reduces CPU ones
    cuda = torch.distributed.get_backend() == "nccl"
    t = torch.tensor(float(x), device="cuda" if cuda else "cpu")
    torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return t.item()


def allreduce_grads(model, world):
    """Sum gradients over ranks once per optimizer step (no sync on accumulation micro-batches, so ranks
    with different numbers of micro-batches never wait on each other). FSDP reduce-scatters in backward."""
    if world > 1 and not sharded(model):
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)


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


def full_state(model, opt=None):
    """Unsharded (model, optimizer) state dicts keyed by parameter name, on CPU. Under FSDP this is a
    collective: every rank calls it and rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if opt is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, opt, options=options)


def load_full_state(model, opt, model_state, opt_state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=opt_state,
                   options=StateDictOptions(full_state_dict=True))


def inference_copy(model, bf16, into=None):
    """The weights generation runs on: a bfloat16 copy when bf16 is on, refreshed in place with `into` so RL
    rollouts always use the current policy. Under FSDP every rank gathers a full copy, so decoding needs no
    collectives (ranks finish their episodes at different times)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    if sharded(model):
        if into is None:
            from transformers import AutoModelForCausalLM
            with torch.device(next(model.parameters()).device):
                into = AutoModelForCausalLM.from_config(model.config, dtype=dtype).eval()
        with torch.no_grad():       # one parameter gathered at a time: no full fp32 copy in memory
            for name, p in model.named_parameters():
                into.get_parameter(name).copy_(p.full_tensor())
        return into
    if not bf16 or next(model.parameters()).dtype == torch.bfloat16:
        return model
    if into is None:
        into = copy.deepcopy(model).eval()
        for p in into.parameters():   # weights only: buffers (RoPE's inv_freq) stay float32, as training has them
            p.data = p.data.to(torch.bfloat16)
        return into
    into.load_state_dict(model.state_dict())
    return into


# ---- RNG states and signals -----------------------------------------------------------------------------

def rng_state():
    """Every RNG this process draws from, as plain data that torch.load(weights_only=True) can read back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=(name, keys.tolist(), pos, has_gauss, gauss),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(st):
    random.setstate(st["python"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
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


# ---- the run directory ------------------------------------------------------------------------------------

class Run:
    """The run directory: run.json (stage), config.yaml, metrics.jsonl, checkpoint.pt, model/, eval.json,
    curves.png. Rank 0 writes. With resume=True it keeps what is there and drops the metrics lines logged
    after the last checkpoint (the resumed run logs them again)."""

    def __init__(self, out_dir, cfg, rank, stage, world=1, resume=False):
        self.dir, self.rank, self.cfg, self.world = Path(out_dir), rank, cfg, world
        self.ckpt, self.last_save, self.lines = None, time.time(), 0
        if resume:
            self.ckpt = self.load_checkpoint()
            if rank == 0 and self.ckpt:
                print(f"resuming from {self.ckpt['phase']} step {self.ckpt['step']} ({self.dir / 'checkpoint.pt'})")
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
        """weights_only: unpickling a copied or downloaded checkpoint can run no code."""
        path = self.dir / "checkpoint.pt"
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:     # a torn file cannot happen (rename), but a copied / corrupt one can
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
        if os.environ.get("DYNAMIND_PAUSE_AT") == f"{phase}:{step}":   # tests: freeze at an exact step (SIGCONT
            os.kill(os.getpid(), signal.SIGSTOP)                        # resumes), so a signal can't race the run

    def save_model(self, model, tokenizer, cfg, name="model"):
        """save_pretrained into a temporary directory, then rename: a killed run never leaves half a model."""
        state = full_state(model)[0] if sharded(model) else None     # a collective under FSDP
        if self.rank != 0:
            return
        final, tmp, old = self.dir / name, self.dir / f".{name}.tmp", self.dir / f".{name}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        (tmp / "dynamind.json").write_text(json.dumps({k: cfg[k] for k in PROMPT_KEYS}, indent=1))
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
        plt.close(fig)
