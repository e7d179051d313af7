"""SimRollout (the paper's Algorithm 2): the policy's own plan is run in a branched copy of the REAL env, the
real future states are shown back to it, and it writes a refined response a_ref.

At each step t of an episode:
    a      = pi(s_t)                                   # a normal response: simulation + plan + action
    plan   = extract_plan(a)                           # its chosen plan, at most d actions
    s'     = execute plan from s_t in a branch         # REAL future states s'_{t+1..t+n}
    s_ref  = s_t (+) a (+) interleave(plan, s')        # the refinement prompt (a chat: user, assistant, user)
    a_ref  = pi(s_ref)                                 # the refined response
    tau'        gets (s_t,   a_ref)                    # learn the improved policy without future info
    tau'_refine gets (s_ref, a_ref)                    # learn to refine simulations given real futures
    s_{t+1} = env.step(action of a_ref)                # the real trajectory follows the REFINED action
Both lists share a_ref's token ids and the episode's outcome; they differ only in the prompt.
"""
from dataclasses import dataclass, field

import agent

REFINE = "Real states after your plan:\n{futures}\nWrite an improved answer."   # short: byte-level models pay per char


def real_futures(env, actions):
    """Execute `actions` from env's current state in a branch; the env is restored afterwards."""
    root, out = env.get_state(), []
    for a in actions:
        if env.done:
            break
        obs, _, _, _ = env.step(a)
        out.append((a, obs))
    env.set_state(root)
    return out


def extract_plan(text, d):
    """The chosen plan's actions (at most d); a response with no plan falls back to its action alone."""
    parsed = agent.parse_response(text)
    plan = parsed.chosen_plan()
    if plan is not None and plan.actions:
        return plan.actions[:d]
    return [parsed.action] if parsed.action else []


def refinement_messages(tokenizer, env, history, obs, response, futures, *, history_k, system):
    """s_ref = s (+) a (+) real futures, as a chat continuing the plain prompt's messages."""
    listing = "\n".join(f"> {a}\n{o}" for a, o in futures) or "(your response had no plan to execute)"
    msgs = agent.build_messages(env, history, obs, history_k=history_k, system=system)
    msgs += [{"role": "assistant", "content": response},
             {"role": "user", "content": REFINE.format(futures=listing)}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


@dataclass
class SimEpisode:
    env_name: str
    seed: int
    turns: list = field(default_factory=list)         # tau':        prompt s_t,   response a_ref
    refine_turns: list = field(default_factory=list)  # tau'_refine: prompt s_ref, response a_ref
    success: bool = False
    steps: int = 0
    ret: float = 0.0


def simrollout(model, tokenizer, envs, seeds, *, gen_kwargs, d=5, history_k=0, system=True,
               format_penalty=0.0):
    """SimRollout episodes for all envs in lockstep: two generate calls per turn (a, then a_ref)."""
    obs = [env.reset(s) for env, s in zip(envs, seeds)]
    hist = [[] for _ in envs]
    eps = [SimEpisode(env.name, int(s)) for env, s in zip(envs, seeds)]
    active = list(range(len(envs)))
    while active:
        plain = [agent.build_prompt(tokenizer, envs[i], hist[i], obs[i], history_k=history_k, system=system)
                 for i in active]
        first = agent.generate(model, tokenizer, plain, **gen_kwargs)
        refine = [refinement_messages(tokenizer, envs[i], hist[i], obs[i], g.text,
                                      real_futures(envs[i], extract_plan(g.text, d)),
                                      history_k=history_k, system=system)
                  for i, g in zip(active, first)]
        second = agent.generate(model, tokenizer, refine, **gen_kwargs)
        for i, s, s_ref, g in zip(active, plain, refine, second):
            action = agent.parse_response(g.text).action
            o, r, done, info = envs[i].step(action if action is not None else g.text)
            for turns, prompt in ((eps[i].turns, s), (eps[i].refine_turns, s_ref)):
                turns.append(agent.Turn(
                    prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"],
                    response_ids=list(g.token_ids), logprobs=list(g.logprobs), text=g.text, obs=obs[i],
                    action=action, valid=bool(info["action_is_valid"]), reward=r, done=done,
                    success=bool(info["success"])))
            hist[i].append((action if action is not None else g.text, o))
            obs[i] = o
        active = [i for i in active if not envs[i].done]
    for ep, env in zip(eps, envs):
        ep.success, ep.steps = bool(env.success), env.steps
        invalid = sum(not t.valid for t in ep.turns)
        ep.ret = agent.episode_return(ep.steps, ep.success, invalid, format_penalty)
    return eps
