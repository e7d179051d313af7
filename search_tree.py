"""ReSim's search tree: b partial rollouts of depth <= d from a real state, executed in the REAL environment.

Every node keeps the real observation the environment produced, so a trace written from the tree
contains only true future states. Branching uses the protocol's env.get_state()/env.set_state().

Rollout policies (`act(env, rng) -> action`):   expert (expert plan with epsilon-random deviations),
                                                 random, llm (a model through engine.generate).
Value functions (`value(env) -> float`):        expert (gamma ** steps-to-go, 0 when unsolvable),
                                                 mc (Monte-Carlo success, the paper's Appendix D.3 form),
                                                 llm (a prompted judge).
"""
from dataclasses import dataclass, field, replace

import numpy as np

import agent
import engine
import envs


@dataclass
class Rollout:
    actions: list = field(default_factory=list)       # â_1..â_n, n <= d
    observations: list = field(default_factory=list)  # the real observation after each action (future_text)
    value: float = 0.0                                 # V(leaf)
    success: bool = False                              # the rollout itself solved the task
    done: bool = False


def expand(env, *, b, d, act, value, rng, distinct=1):
    """Algorithm 3's inner loop: b rollouts of depth <= d from env's current state, deduplicated by action
    sequence, each leaf scored by `value`. The env is left in the state it started from. With distinct > 1,
    rollouts are drawn past b (4 b in all at most) until that many differ: an eps-expert often repeats itself,
    and a tree of one rollout gives a trace that compares nothing."""
    root = env.get_state()
    tree, seen, drawn = [], set(), 0
    while drawn < b or (len(tree) < distinct and drawn < 4 * b):
        drawn += 1
        env.set_state(root)
        r = Rollout()
        while len(r.actions) < d and not env.done:
            a, prev = act(env, rng), env.obs
            obs, _, done, info = env.step(a)
            r.actions.append(a)
            r.observations.append(envs.future_text(env, prev, obs))
            r.success, r.done = bool(info["success"]), done
        key = tuple(r.actions)
        if key in seen:
            continue
        seen.add(key)
        r.value = 1.0 if r.success else (0.0 if r.done else float(value(env)))
        tree.append(r)
    env.set_state(root)
    return tree


def relative_to_root(tree, root_value, gamma):
    """Each rollout's value as a share of the best its root allows: gamma ** depth * V(leaf) / V(root), at most 1
    (resim.value_scale: relative). With the expert value that is gamma ** (moves the plan loses against an optimal
    one): 1.00 for an optimal plan whatever the task's length, 0.90 for a wasted move, 0 for a dead end. From one
    root the ranking is the discounted return's (V(leaf)'s for plans of one depth): the choice is the same, only
    the numbers written differ, and they no longer carry the task's length. A root valued 0 keeps V(leaf)."""
    if root_value <= 0:
        return tree
    return [replace(r, value=min(1.0, gamma ** len(r.actions) * r.value / root_value)) for r in tree]


def best_first(tree):
    """Order the tree best rollout first: highest value, then shortest (a plan that solves sooner wins)."""
    return sorted(tree, key=lambda r: (-r.value, len(r.actions)))


# ---- rollout policies -------------------------------------------------------------------------------

def random_policy(env, rng):
    acts = env.valid_actions()
    return acts[rng.integers(len(acts))]


def expert_policy(eps):
    """The expert's next action, replaced by a random valid action with probability eps. Deviations make
    the tree diverse; the expert keeps it informative (most branches go somewhere useful)."""
    def act(env, rng):
        if rng.random() >= eps:
            plan = env.expert_plan()
            if plan:
                return plan[0]
        return random_policy(env, rng)
    return act


def llm_policy(model, tokenizer, *, history_k=0, system=True, temperature=1.0, max_new_tokens=256):
    """The current model as the rollout policy (one generate call per step; for GPU runs)."""

    def act(env, rng):
        prompt = agent.build_prompt(tokenizer, env, [], env.obs, history_k=history_k, system=system)
        g = engine.generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=int(rng.integers(2**31)))[0]   # fresh noise: rng advances every call
        return agent.parse_response(g.text).action or g.text
    return act


# ---- value functions --------------------------------------------------------------------------------

def expert_value(gamma):
    """gamma ** (steps the expert still needs); 0 for an unsolvable state (a Sokoban deadlock)."""
    def value(env):
        plan = env.expert_plan()
        return 0.0 if plan is None else float(gamma ** len(plan))
    return value


def mc_value(act, *, n=8, horizon=20, gamma=0.95, seed=0):
    """Appendix D.3: the discounted Monte-Carlo success rate of n rollouts from the state.
    (We discount by the steps each rollout needed, the conventional reading of gamma^(t_max - t).)"""
    def value(env):
        root, rng, total = env.get_state(), np.random.default_rng(seed), 0.0
        for _ in range(n):
            env.set_state(root)
            for t in range(horizon):
                _, _, done, info = env.step(act(env, rng))
                if done:
                    total += gamma ** (t + 1) if info["success"] else 0.0
                    break
        env.set_state(root)
        return total / n
    return value


JUDGE = ("Rate how close this state is to completing the task, from 0 (hopeless) to 1 (done).\n"
         "Task: {task}\nState:\n{obs}\nAnswer with one number.")


def llm_value(model, tokenizer, max_new_tokens=8):
    """A prompted judge; an answer that is not a number in [0, 1] counts as 0."""

    def value(env):
        msgs = [{"role": "user", "content": JUDGE.format(task=env.task, obs=env.obs)}]
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        text = engine.generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=0.0,
                               stop=("\n",))[0].text
        try:
            v = float(text.strip().split()[0])
        except (ValueError, IndexError):
            return 0.0
        return v if 0.0 <= v <= 1.0 else 0.0
    return value


def make_policy(name, *, eps=0.25, model=None, tokenizer=None, **llm_kw):
    """The rollout policy by name; "llm" needs a model and its tokenizer."""
    if name == "llm" and model is None:
        raise ValueError("rollout policy 'llm' needs a model")
    if name == "expert":
        return expert_policy(eps)
    if name == "random":
        return random_policy
    if name == "llm":
        return llm_policy(model, tokenizer, **llm_kw)
    raise ValueError(f"unknown rollout policy {name!r}: use expert, random or llm")


def make_value(name, *, gamma=0.9, act=None, model=None, tokenizer=None, mc_n=8, mc_horizon=20):
    """The value function by name; "llm" needs a model and its tokenizer."""
    if name == "llm" and model is None:
        raise ValueError("value function 'llm' needs a model")
    if name == "expert":
        return expert_value(gamma)
    if name == "mc":
        return mc_value(act or random_policy, n=mc_n, horizon=mc_horizon, gamma=gamma)
    if name == "llm":
        return llm_value(model, tokenizer)
    raise ValueError(f"unknown value function {name!r}: use expert, mc or llm")
