"""How far is Dyna-GRPO's tau' from the policy it trains? One simulation step's rollouts from a model (G/2
SimRollouts + G/2 plain rollouts per task, as train.simulation_phase runs them), then the log-probs of:

    a_ref | s_t     tau': the refined answer under the plain prompt it is trained under
    a_ref | s_ref   the same tokens under the refinement prompt they were drawn from
    plain | s_t     an ordinary rollout's answer under its own prompt (on-policy)

per token (mean, share below p = 0.1), and the tau' ratio pi(a_ref | s_t) / pi(a_ref | s_ref) that
rl.tau_prime_old = s_ref puts under the clips (share below 1 - clip_low, above 1 + clip_high and above clip_c).

    python bench/probe_tau_prime.py runs/resim_sokoban/model [--tasks 8] [--group 8]
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402
import common  # noqa: E402
import envs  # noqa: E402
import grpo  # noqa: E402
import train  # noqa: E402


def token_logprobs(model, tok, prompts, responses, batch=16):
    """Per-token log-probs at the RL sampling temperature (as rl_update takes them), all rows concatenated."""
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = [grpo.Sample(p, r) for p, r in zip(prompts[i:i + batch], responses[i:i + batch])]
            lp, mask = train.logprobs(model, chunk, tok.pad_token_id, True, train.DEFAULTS["rl"]["temperature"])
            out += [lp[b, :int(mask[b].sum())].float().numpy() for b in range(len(chunk))]
    return np.concatenate(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    saved = common.prompt_settings(args.model)
    cfg = dict(train.DEFAULTS, **{k: saved[k] for k in common.PROMPT_KEYS if k in saved})
    cfg["rl"] = rc = dict(train.DEFAULTS["rl"], group=args.group)
    model, tok = agent.load_model(args.model)
    model.eval()
    tasks = envs.split_seeds("train", args.tasks, start=rc["task_offset"])
    eps, _, _ = train.simulation_phase(common.inference_copy(model, True), tok, tasks, cfg, lambda role: args.seed,
                                       lambda ep: 0.0)      # the rollouts of one simulation step, as training runs it
    sim = [ep for ep in eps if ep.turns[0].refine_prompt_ids is not None]
    plain = [ep for ep in eps if ep.turns[0].refine_prompt_ids is None]
    st = [t for ep in sim for t in ep.turns]
    pl = [t for ep in plain for t in ep.turns]
    under_st = token_logprobs(model, tok, [t.prompt_ids for t in st], [t.response_ids for t in st])
    under_ref = token_logprobs(model, tok, [t.refine_prompt_ids for t in st], [t.response_ids for t in st])
    own = token_logprobs(model, tok, [t.prompt_ids for t in pl], [t.response_ids for t in pl])
    print(f"{args.model}: {args.tasks} tasks x {args.group}; success SimRollout "
          f"{np.mean([e.success for e in sim]):.2f}, plain {np.mean([e.success for e in plain]):.2f}")
    print(f"{'log-probs':16s} {'tokens':>7s} {'mean/token':>10s} {'p < 0.1':>8s}")
    for name, x in (("a_ref | s_t", under_st), ("a_ref | s_ref", under_ref), ("plain | s_t", own)):
        print(f"{name:16s} {len(x):7d} {x.mean():10.3f} {np.mean(np.exp(x) < 0.1):8.3f}")
    r = np.exp(under_st - under_ref)
    lo, hi = 1 - rc["clip_low"], 1 + rc["clip_high"]
    print(f"tau' ratio: mean log {np.log(r).mean():.3f}; share < {lo:.2f}: {np.mean(r < lo):.3f}, "
          f"> {hi:.2f}: {np.mean(r > hi):.3f}, > clip_c {rc['clip_c']:.0f}: {np.mean(r > rc['clip_c']):.3f}")


if __name__ == "__main__":
    main()
