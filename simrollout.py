"""SimRollout (the paper's Algorithm 2) and the samples of Dyna-GRPO's simulation-improvement phase.

At each step t of an episode:
    a      = pi(s_t)                                   # a normal response: simulation, choice, action
    plan   = extract_plan(a)                           # the chosen plan (it starts with a's action), <= d actions
    s'     = execute plan from s_t in a branch         # REAL future states s'_{t+1..t+n}; the env is restored
    s_ref  = s_t (+) a (+) interleave(plan, s')        # the refinement prompt (a chat: user, assistant, user)
    a_ref  = pi(s_ref)                                 # the refined response
    tau'        gets (s_t,   a_ref)                    # learn the improved policy without future information
    tau'_refine gets (s_ref, a_ref)                    # learn to refine simulations given real futures
    s_{t+1} = env.step(action of a_ref)                # the real trajectory follows the REFINED action
tau' and tau'_refine share a_ref's token ids and the episode's outcome; they differ only in the prompt, so one
Turn holds both (its refine_prompt_ids is s_ref).

Phase (A) of Dyna-GRPO trains tau U tau' as one GRPO group (the episode advantage) and tau'_refine with the
binary A_refine: `simulation_samples`.
"""
import numpy as np
import torch
from tqdm import tqdm

import agent
import engine
import envs
import grpo

REFINE = "Real states after your plan:\n{futures}\nWrite an improved answer."   # short: byte-level models pay per char


def real_futures(env, actions, restore=True):
    """Execute `actions` from env's current state in a branch: [(action, real observation)] until the episode
    ends, each observation as traces write it (envs.future_text); the env is restored afterwards (restore=False:
    it stays where the plan ended, for an env that is itself a throwaway branch)."""
    root, out = env.get_state(), []
    for a in actions:
        if env.done:
            break
        prev = env.obs
        obs, _, _, _ = env.step(a)
        out.append((a, envs.future_text(env, prev, obs)))
    if restore:
        env.set_state(root)
    return out


def extract_plan(text, d):
    """The plan whose first action is the one the response executes: its chosen plan if that starts with its
    action, else the action alone; cut to d actions. No action: nothing to execute."""
    parsed = agent.parse_response(text)
    if parsed.action is None:
        return []
    plan = parsed.chosen_plan()
    if plan is not None and plan.actions and plan.actions[0] == parsed.action:
        return plan.actions[:d]
    return [parsed.action][:d]


def refinement_prompt(tokenizer, env, history, obs, response, futures, *, history_k, system):
    """s_ref = s (+) a (+) real futures, as a chat continuing the plain prompt's messages."""
    listing = "\n".join(f"> {a}\n{o}" for a, o in futures) or "(your response had no plan to execute)"
    msgs = agent.build_messages(env, history, obs, history_k=history_k, system=system)
    msgs += [{"role": "assistant", "content": response},
             {"role": "user", "content": REFINE.format(futures=listing)}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def simrollout(model, tokenizer, envs, seeds, *, gen_kwargs, seed=0, d=5, history_k=0, system=True, plain=0,
               admissible=False, progress=False):
    """SimRollout episodes for the envs in lockstep, and plain rollouts for the last `plain` of them riding along:
    per turn one generate call for every active env's prompt (the drafts a and the plain answers), then one for
    the refinement prompts (a_ref). Phase (A) so waits on two calls a turn, not three. One generator seeded with
    `seed` advances over every call: no draft, refinement or plain answer shares noise. Returns agent.Episode
    objects; a SimRollout's turns carry refine_prompt_ids. admissible: the answer played (a_ref, or a plain
    rollout's) goes through agent.admit. progress: a bar of turns (an ALFWorld step is minutes of them)."""
    agent.check_envs(envs, seeds)
    if not 0 <= plain <= len(envs):
        raise ValueError(f"need 0 <= plain <= {len(envs)} envs, got plain={plain}")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    n_sim = len(envs) - plain
    obs = [env.reset(s) for env, s in zip(envs, seeds)]
    hist, turns = [[] for _ in envs], [[] for _ in envs]
    active = list(range(len(envs)))
    bar = tqdm(disable=not progress, desc="SimRollout turns", unit="turn", leave=None)
    while active:
        prompts = [agent.encode(tokenizer, agent.build_prompt(tokenizer, envs[i], hist[i], obs[i],
                                                              history_k=history_k, system=system)) for i in active]
        first = engine.generate(model, tokenizer, prompts, generator=gen, **gen_kwargs)
        refine = {k: agent.encode(tokenizer, refinement_prompt(
            tokenizer, envs[i], hist[i], obs[i], first[k].text, real_futures(envs[i], extract_plan(first[k].text, d)),
            history_k=history_k, system=system)) for k, i in enumerate(active) if i < n_sim}
        refined = dict(zip(refine, engine.generate(model, tokenizer, list(refine.values()), generator=gen,
                                                   **gen_kwargs))) if refine else {}
        for k, i in enumerate(active):   # a SimRollout follows a_ref; a plain rollout its own answer
            g, p = refined.get(k, first[k]), refine.get(k, prompts[k])
            g = agent.admit(model, tokenizer, envs[i], p, g) if admissible else g
            turns[i].append(agent.play_turn(envs[i], prompts[k], g, obs[i], hist[i], refine_prompt_ids=refine.get(k)))
            obs[i] = hist[i][-1][1]
        active = [i for i in active if not turns[i][-1].done]
        bar.update(1)
        bar.set_postfix(active=len(active))
    bar.close()
    return [agent.Episode(env.name, int(s), ts, ts[-1].success, env.max_steps, env.task_type)
            for env, s, ts in zip(envs, seeds, turns)]


def simulation_samples(plain, sim, returns, turn_weight="episode", mean_turns=None):
    """Phase (A)'s two batches. tau U tau': plain rollouts and SimRollouts of a task form one GRPO group (every
    turn a sample with its episode's advantage; tau' pairs a_ref with the plain prompt s_t). tau'_refine: the
    same a_ref under s_ref, with the binary A_refine = 1[success and R > max(mean R_tau, mean R_tau')].
    `returns(episode)` is the return the RL stage trains on; turn_weight and mean_turns (grpo.episode_samples)
    weigh the group's turns; A_refine stays the paper's binary value on every turn. Returns (group samples, refine
    samples, stats)."""
    group = plain + sim
    R = [returns(ep) for ep in group]
    adv = grpo.group_advantages(torch.tensor(R), [ep.seed for ep in group])
    r_plain, r_sim = R[:len(plain)], R[len(plain):]
    mean = lambda rs, eps, s: float(np.mean([r for r, e in zip(rs, eps) if e.seed == s]))   # noqa: E731
    a_ref = [grpo.a_refine(r, ep.success, mean(r_plain, plain, ep.seed), mean(r_sim, sim, ep.seed))
             for r, ep in zip(r_sim, sim)]
    group_samples = grpo.episode_samples(group, adv.tolist(), turn_weight, mean_turns=mean_turns)
    refine_samples = grpo.episode_samples(sim, a_ref, "turn", refine=True)   # binary, never negative: no drift
    stats = dict(a_refine_mean=float(np.mean(a_ref)) if a_ref else 0.0,
                 simrollout_success=float(np.mean([ep.success for ep in sim])) if sim else 0.0)
    return group_samples, refine_samples, stats
