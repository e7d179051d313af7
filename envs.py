"""The bottom of the house: the environment protocol, the registry of environments, and what they share.

Every environment is text in, text out, and speaks the protocol below (`Env`), so every stage (ReSim trees,
SimRollout, GRPO, evaluation) runs on each of them unchanged:

    obs = env.reset(seed)                          # same seed, same episode
    obs, reward, done, info = env.step(action)     # info: exactly {"success": bool, "action_is_valid": bool}
    s = env.get_state(); env.set_state(s)          # branching: search trees, SimRollout, simulation score

The trainer computes the paper's return from the number of steps and success (agent.episode_return); an env's
own reward is returned untouched. An unparseable model output is still a step: nothing changes and
action_is_valid is False. A step after the episode ended changes and counts nothing (`after_done`).
"""
import importlib
import re
from collections import Counter
from typing import Protocol

ENVS = {"sokoban": "sokoban", "alfworld": "alfworld_env", "android": "android_env"}   # name -> module
SPLITS = ("train", "id", "ood")
SEED_BASE = {"train": 0, "id": 1_000_000, "ood": 2_000_000}   # disjoint seed ranges, one per split
SPLIT_SIZE = 1_000_000


class Env(Protocol):
    """What train.py, resim.py, simrollout.py and evaluate.py may use of an environment."""
    name: str         # the registry name ("sokoban", "alfworld", "android")
    rules: str        # the game's rules, for the system prompt of models that read instructions
    task: str         # the goal shown to the agent ("" where the observation says it all, as in Sokoban)
    obs: str          # the current observation
    steps: int        # steps taken in this episode (invalid ones included)
    max_steps: int    # the episode cap
    done: bool
    success: bool
    task_type: str    # a label evaluation groups success by (task family, template); "" if none
    # optional: future_lines (int), how traces write a future state (future_text); absent means 0, the whole state

    def reset(self, seed: int) -> str:
        """Start the episode of `seed` and return its first observation."""

    def step(self, action: str) -> tuple:
        """(obs, reward, done, info) with info = {"success": bool, "action_is_valid": bool}."""

    def get_state(self) -> dict:
        """A snapshot (plain data) that set_state restores exactly: the same actions then give the same
        observations."""

    def set_state(self, state: dict) -> None:
        """Go back to a snapshot of get_state (of this env or another env of the same kind)."""

    def expert_plan(self):
        """An oracle action list that solves the task from the current state, or None (no plan / no oracle)."""

    def valid_actions(self) -> list:
        """Actions that are valid now (the random rollout policy samples them)."""

    def action_hint(self) -> str:
        """A line appended to the prompt (e.g. ALFWorld's admissible commands); "" for none."""

    def state_similarity(self, imagined: str, real: str) -> float:
        """How well an imagined observation matches the real one, in [0, 1] (the simulation score)."""


def env_module(name):
    """The module of environment `name`; ValueError naming the known ones otherwise."""
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}: use one of {', '.join(sorted(ENVS))}")
    return importlib.import_module(ENVS[name])


def make_env(name, split, **kwargs):
    """A fresh env of `name` for `split` (train / id / ood); kwargs are the env's options (env_kwargs)."""
    check_split(split)
    return env_module(name).make_env(split, **kwargs)


def check_env_config(name, options):
    """An unknown env or env option is one clear error before any work (each env module lists its OPTIONS)."""
    mod = env_module(name)
    check_options(name, options, getattr(mod, "OPTIONS", options))


def check_split(split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def check_options(env_name, given, allowed):
    """One clear error for an option an env does not have."""
    bad = sorted(set(given) - set(allowed))
    if bad:
        raise ValueError(f"unknown {env_name} option(s) {bad}; allowed: {sorted(allowed)}")


def split_seeds(split, n, start=0):
    """Seeds start..start+n-1 of a split; the splits' ranges never overlap."""
    check_split(split)
    if n < 0 or start < 0 or start + n > SPLIT_SIZE:
        raise ValueError(f"seeds [{start}, {start + n}) outside a split's range [0, {SPLIT_SIZE})")
    return list(range(SEED_BASE[split] + start, SEED_BASE[split] + start + n))


def after_done(env):
    """The result of a step after the episode ended: nothing changes, nothing is counted or earned."""
    return env.obs, 0.0, True, {"success": bool(env.success), "action_is_valid": False}


def f1(a, b):
    """F1 of two multisets (lists of tokens or of lines); two empty ones match fully."""
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def future_text(env, prev, obs):
    """A future state as a trace, a refinement prompt and the simulation score write it: the observation `obs`
    reached from `prev`, whole, unless the env has `future_lines` = k > 0 (a text env's option). Then only the
    lines of `obs` that `prev` does not have, the first k of them and a count of the rest, or "(no change)".
    A ReSim trace of a 135M model is mostly unchanged screen lines copied from the prompt; the change is what
    tells two plans apart (RESULTS.md, The text environments). An env with `future_items` = k > 0 (ALFWorld)
    writes each "you see a, b, and c" list of `obs` as its first k items and a count of the rest (cut_lists).
    Lines that start with one of the env's `future_skip` prefixes are left out: bookkeeping the env appends to
    its observations (ALFWorld's looked line), which a plan does not need to imagine."""
    skip = getattr(env, "future_skip", ())
    if skip and any(line.startswith(skip) for line in obs.splitlines()):
        obs = "\n".join(line for line in obs.splitlines() if not line.startswith(skip))
    if getattr(env, "future_items", 0):
        return cut_lists(obs, env.future_items)
    k = getattr(env, "future_lines", 0)
    if not k:
        return obs
    before = set(prev.splitlines())
    new = [line for line in obs.splitlines() if line not in before]
    more = [f"(+{len(new) - k} more)"] if len(new) > k else []
    return "\n".join(new[:k] + more) or "(no change)"


def check_future_lines(k, name="future_lines"):
    """The future_lines (or future_items) option of a text env, checked: an int >= 0."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{name} must be an int >= 0 (0: the whole state), got {k!r}")
    return k


SEEN_LIST = re.compile(r"(you see )(.+?)(\.(?:\s|$))")


def cut_lists(text, k):
    """Each "you see a, b, and c." list of an ALFWorld observation cut to its first k items and a count of the
    rest ("you see a, b, and 3 more."). What an unvisited receptacle holds cannot be imagined right, and a 135M
    model that learns to imagine a long list loops on it until its token budget ends the answer with no action
    (RESULTS.md, The text environments)."""
    def cut(m):
        items = [i.strip().removeprefix("and ").strip() for i in m.group(2).split(", ")]
        if len(items) <= k:
            return m.group(0)
        return f"{m.group(1)}{', '.join(items[:k])}, and {len(items) - k} more{m.group(3)}"
    return SEEN_LIST.sub(cut, text)


def token_f1(a, b):
    """F1 over lower-cased word tokens (text observations)."""
    return f1(re.findall(r"\w+", str(a).lower()), re.findall(r"\w+", str(b).lower()))
