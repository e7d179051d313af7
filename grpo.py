"""Hand-written policy-gradient math for SFT, GRPO, RLOO and Dyna-GRPO (numerics follow veRL's core_algos).

One sample type runs from trace to loss: Sample(prompt_ids, response_ids, advantage). Every turn of an episode
is one sample carrying its episode's advantage; a ReSim trace is a sample with advantage 1. The loss is one
function: with old log-probs it is GRPO's clipped ratio, without them (SFT) it is -A * log p.

Shapes: B sequences (one turn each), L = longest response in the batch. `mask` is 1 on real response tokens.
"""
from collections import defaultdict
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt_ids: list        # what the policy saw (s_t, or s_ref for a refinement)
    response_ids: list      # the tokens it wrote (or the ReSim trace), EOS included
    advantage: float = 1.0  # the episode's advantage, A_refine, or 1 for SFT
    drawn_under: list = None  # the prompt the response was sampled under, when not prompt_ids (tau': s_ref)


def response_logprobs(model, prompt_ids, response_ids, pad_id, *, temperature=1.0, pad_to=1):
    """log p(response token | prompt + earlier response tokens) for a right-padded batch; keeps grad.

    Returns (logp [B, L], mask [B, L]). `temperature` divides the logits, as veRL does, so the log-probs are
    those of the distribution the sampler drew from (its temperature). pad_to > 1: the batch is padded up to a
    length T that is a multiple of it, and L = T (a compiled model then meets one shape per length bucket).
    Right padding needs no attention mask: a real token attends only to earlier positions, all real, so the
    plain causal forward gives the same log-probs, and it is the faster path (no [B, T, T] mask).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} rows but response_ids has {len(response_ids)}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
    device = next(model.parameters()).device
    B = len(prompt_ids)
    P = [len(p) for p in prompt_ids]
    R = [len(r) for r in response_ids]
    if max(R) == 0:  # nothing to score
        return torch.zeros(B, 0, device=device), torch.zeros(B, 0, device=device)
    T = -(-max(p + r for p, r in zip(P, R)) // pad_to) * pad_to
    L = T if pad_to > 1 else max(R)   # padded: one shape per length bucket
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    resp = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[b, : P[b] + R[b]] = torch.tensor(list(p) + list(r), dtype=torch.long)
        resp[b, : R[b]] = torch.tensor(list(r), dtype=torch.long)
        mask[b, : R[b]] = 1
    ids, resp, mask = ids.to(device), resp.to(device), mask.to(device)
    # Response token j of row b is predicted by the hidden state at position P[b]-1+j. Passing these positions
    # as logits_to_keep projects only B x L states onto the vocab, never the B x T x V prompt logits.
    pos = torch.tensor(P).unsqueeze(1) - 1 + torch.arange(L).unsqueeze(0)
    pos = pos.clamp(max=T - 1).to(device)  # padded slots point at any valid position; masked out below
    logits = model(input_ids=ids, logits_to_keep=pos, use_cache=False).logits
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # fp32: bf16 log-probs are too coarse
    return logprobs.gather(-1, resp.unsqueeze(-1)).squeeze(-1) * mask, mask  # padded slots are exactly 0


def _groups(rewards, group_ids):
    """rewards as float64 (less rounding in the group means) and {group id: [row indices]}."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if hasattr(group_ids, "tolist"):  # tensors / arrays hash by identity, not value: use python scalars
        group_ids = group_ids.tolist()
    if len(group_ids) != len(r):
        raise ValueError(f"{len(r)} rewards but {len(group_ids)} group ids")
    rows = defaultdict(list)
    for i, g in enumerate(group_ids):
        rows[g].append(i)
    return r, rows


def group_advantages(rewards, group_ids, eps=1e-6):
    """GRPO: (r - mean_g) / (std_g + eps), unbiased std. A size-1 or all-equal group gives 0.

    (veRL gives a size-1 group r / (1 + eps); we give 0: a lone sample has no baseline. An all-equal group is
    forced to 0 because float rounding in mean_g would otherwise be amplified by 1/eps.)
    """
    r, rows = _groups(rewards, group_ids)
    adv = torch.zeros_like(r)
    for idx in rows.values():
        g = r[idx]
        if len(idx) < 2 or bool((g == g[0]).all()):
            continue
        adv[idx] = (g - g.mean()) / (g.std() + eps)
    return adv.float()


def rloo_advantages(rewards, group_ids):
    """RLOO: r_i - mean of the other rewards in its group (= n/(n-1) * (r_i - mean_g), as veRL). Size-1 -> 0."""
    r, rows = _groups(rewards, group_ids)
    adv = torch.zeros_like(r)
    for idx in rows.values():
        n = len(idx)
        if n < 2:
            continue
        g = r[idx]
        adv[idx] = g - (g.sum() - g) / (n - 1)
    return adv.float()


TURN_WEIGHTS = ("episode", "turn")


def episode_samples(episodes, advantages, turn_weight="episode", refine=False, mean_turns=None):
    """One Sample per turn, carrying its episode's advantage (refine: the turn's s_ref prompt, for tau'_refine;
    otherwise a SimRollout turn gives tau': a_ref under s_t, drawn_under s_ref).

    turn_weight "episode": each turn's advantage is scaled by (mean turns) / (its episode's turns), so every
    episode weighs the same however many turns it took: the paper's 1/(G*T) sum over trajectories and turns,
    read with T as each trajectory's own length. "turn": every turn weighs the same, so a failed episode (run to
    the step cap) outweighs a short success, and since a group's advantages sum to 0 the batch then pushes every
    token it shares (the format) down: -0.35 per response token on the main job's model (README, Decisions).
    The scale is exact for the clipped loss too: max(-wAr, -wA clip(r)) = w max(-Ar, -A clip(r)) for w > 0.
    mean_turns: the whole batch's over all ranks (default: these episodes'), so rank count changes nothing."""
    if turn_weight not in TURN_WEIGHTS:
        raise ValueError(f"unknown turn_weight {turn_weight!r}: use one of {TURN_WEIGHTS}")
    if len(episodes) != len(advantages):
        raise ValueError(f"{len(episodes)} episodes but {len(advantages)} advantages")
    if mean_turns is None:
        mean_turns = sum(len(ep.turns) for ep in episodes) / max(1, len(episodes))
    out = []
    for ep, a in zip(episodes, advantages):
        w = mean_turns / len(ep.turns) if turn_weight == "episode" and ep.turns else 1.0
        for t in ep.turns:
            if refine:   # tau'_refine: a_ref under s_ref, where it was drawn
                out.append(Sample(t.refine_prompt_ids, t.response_ids, float(a) * w))
            else:        # tau (drawn under s_t), or tau' (a_ref under s_t, drawn under s_ref)
                out.append(Sample(t.prompt_ids, t.response_ids, float(a) * w, drawn_under=t.refine_prompt_ids))
    return out


def a_refine(ret_refine, success_refine, mean_plain, mean_sim):
    """Paper's binary refinement advantage: 1 iff the refined episode succeeded AND beat both group means
    (R̄ of the G/2 plain rollouts, R̄_refine of the G/2 SimRollouts); a tie is not an improvement."""
    return 1.0 if success_refine and ret_refine > max(mean_plain, mean_sim) else 0.0


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def agg_loss(loss_mat, mask, agg="token-mean", *, n_tok=None, n_seq=None, budget=None):
    """Reduce a [B, L] per-token loss to this batch's share of the loss (veRL's loss_agg_mode names).

    n_tok / n_seq: response tokens / non-empty sequences of the WHOLE batch the optimiser step takes (all
    micro-batches, all ranks), so that summing the shares of the micro-batches gives the batch's loss whatever
    the micro-batch size or rank count; default: this micro-batch alone. budget: Dr. GRPO's constant length
    (the generation budget, max_new_tokens); default: this micro-batch's longest response."""
    n = mask.sum(-1)
    n_tok = mask.sum().clamp(min=1) if n_tok is None else n_tok
    n_seq = (n > 0).sum().clamp(min=1) if n_seq is None else n_seq
    if agg == "token-mean":  # every token weighs the same: long responses weigh more
        return (loss_mat * mask).sum() / n_tok
    if agg == "seq-mean-token-mean":  # every sequence weighs the same; empty sequences add nothing
        return ((loss_mat * mask).sum(-1) / n.clamp(min=1)).sum() / n_seq
    if agg == "seq-mean-token-sum-norm":  # Dr. GRPO: a constant normaliser, so no length bias
        return (loss_mat * mask).sum() / (n_seq * (budget or mask.shape[1]))
    raise ValueError(f"unknown agg {agg!r}: use one of {AGG_MODES}")


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, beta=0.0, clip_low=0.2, clip_high=0.2,
                clip_c=3.0, agg="token-mean", n_tok=None, n_seq=None, budget=None):
    """The clipped PPO/GRPO surrogate (+ beta * k3 KL to the reference), aggregated by `agg` (see agg_loss for
    n_tok, n_seq, budget). old_logp None: no ratio, the per-token loss is -A * log p (SFT when A = 1).
    clip_c: dual clip (veRL's clip_ratio_c): where A < 0 the loss is at most -A * clip_c, so a token whose
    ratio is already above clip_c is not pushed down further (on-policy ratios start at 1 and never reach it;
    Dyna-GRPO's tau' ratios, against the prompt a_ref was drawn under, do).
    advantages: [B] (one per sequence, broadcast over its tokens) or [B, L]. Returns (loss, stats)."""
    if agg not in AGG_MODES:  # fail before any work
        raise ValueError(f"unknown agg {agg!r}: use one of {AGG_MODES}")
    if clip_c <= 1:
        raise ValueError(f"clip_c must be > 1, got {clip_c}")
    if logp.shape != mask.shape or (old_logp is not None and old_logp.shape != logp.shape):
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {None if old_logp is None else tuple(old_logp.shape)}"
                         f" and mask {tuple(mask.shape)} must have the same shape")
    adv = torch.as_tensor(advantages, dtype=logp.dtype, device=logp.device)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    if adv.shape[0] != logp.shape[0] or adv.shape[1] not in (1, logp.shape[1]):
        raise ValueError(f"advantages {tuple(adv.shape)} do not fit logp {tuple(logp.shape)}")
    m = mask.bool()
    mask = m.to(logp.dtype)
    # Zero padded slots first: masked tokens then get exactly zero gradient, and garbage there can't make NaNs.
    logp = torch.where(m, logp, 0.0)
    kw = dict(n_tok=n_tok, n_seq=n_seq, budget=budget)
    if old_logp is None:
        pg = -adv * logp
        ratio = log_ratio = clipped = torch.zeros_like(logp)
    else:
        old_logp = torch.where(m, old_logp.detach(), 0.0)
        log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)  # exp overflow guard (veRL)
        ratio = torch.exp(log_ratio)
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        pg = torch.maximum(pg1, pg2)  # pessimistic bound: clip only takes away the incentive to move further
        clipped = (pg2 > pg1).to(logp.dtype)
        dual = (adv < 0) & (pg > -adv * clip_c)
        pg = torch.where(dual, -adv * clip_c, pg)   # dual clip
        clipped = torch.maximum(clipped, dual.to(logp.dtype))   # no gradient either way
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = torch.clamp(torch.where(m, ref_logp.detach(), 0.0) - logp, -20.0, 20.0)
        kl = torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)  # k3 "low_var_kl": unbiased, always >= 0
        if beta > 0:
            per_token = per_token + beta * kl  # agg is linear, so this equals veRL's pg_loss + beta * kl_loss
    loss = agg_loss(per_token, mask, agg, **kw)
    with torch.no_grad():
        stats = {"pg_loss": agg_loss(pg, mask, agg, **kw).item(), "clip_frac": _masked_mean(clipped, mask).item(),
                 "ratio_mean": _masked_mean(ratio, mask).item(), "kl": _masked_mean(kl, mask).item(),
                 "approx_kl": _masked_mean(-log_ratio, mask).item()}  # old vs new, as veRL's ppo_kl
    return loss, stats
