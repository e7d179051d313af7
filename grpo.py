"""Hand-written policy-gradient math for GRPO / RLOO / Dyna-GRPO (numerics follow veRL's core_algos).

Shapes: B sequences (one turn each), L = longest response in the batch. `mask` is 1 on real response tokens.
"""
from collections import defaultdict

import torch


def response_logprobs(model, prompt_ids, response_ids, pad_id, *, with_entropy=False, temperature=1.0):
    """log p(response token | prompt + earlier response tokens) for a right-padded batch; keeps grad.

    Returns (logp [B, L], mask [B, L]) and entropy [B, L] (detached, for stats) when with_entropy.
    `temperature` divides the logits, as veRL does, so the log-probs match a sampler run at that temperature.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} rows but response_ids has {len(response_ids)}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
    device = next(model.parameters()).device
    B = len(prompt_ids)
    P = [len(p) for p in prompt_ids]
    R = [len(r) for r in response_ids]
    T, L = max(p + r for p, r in zip(P, R)), max(R)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    resp = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[b, : P[b] + R[b]] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[b, : P[b] + R[b]] = 1
        resp[b, : R[b]] = torch.tensor(list(r), dtype=torch.long)
        mask[b, : R[b]] = 1
    ids, attn, resp, mask = ids.to(device), attn.to(device), resp.to(device), mask.to(device)
    if L == 0:  # nothing to score
        out = (torch.zeros(B, 0, device=device), mask)
        return out + (torch.zeros(B, 0, device=device),) if with_entropy else out
    # Response token j of row b is predicted by the hidden state at position P[b]-1+j. Passing these positions
    # as logits_to_keep projects only B x L states onto the vocab, never the B x T x V prompt logits.
    pos = torch.tensor(P).unsqueeze(1) - 1 + torch.arange(L).unsqueeze(0)
    pos = pos.clamp(max=T - 1).to(device)  # padded slots point at any valid position; masked out below
    logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=pos, use_cache=False).logits
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # fp32: bf16 log-probs are too coarse
    logp = logprobs.gather(-1, resp.unsqueeze(-1)).squeeze(-1) * mask  # padded slots are exactly 0
    if not with_entropy:
        return logp, mask
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1) * mask
    return logp, mask, entropy


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


def group_advantages(rewards, group_ids, norm_std=True, eps=1e-6):
    """GRPO: (r - mean_g) / (std_g + eps), unbiased std. A size-1 or all-equal group gives 0.

    (veRL gives a size-1 group r / (1 + eps); we give 0: a lone sample has no baseline. An all-equal group is
    forced to 0 because float rounding in mean_g would otherwise be amplified by 1/eps.)
    norm_std=False is Dr. GRPO's unscaled r - mean_g.
    """
    r, rows = _groups(rewards, group_ids)
    adv = torch.zeros_like(r)
    for idx in rows.values():
        g = r[idx]
        if len(idx) < 2 or bool((g == g[0]).all()):
            continue
        a = g - g.mean()
        adv[idx] = a / (g.std() + eps) if norm_std else a
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


def a_refine(ret_refine, success_refine, mean_plain, mean_sim):
    """Paper's binary refinement advantage: 1 iff the refined episode succeeded AND beat both group means
    (R̄ of the G/2 plain rollouts, R̄_refine of the G/2 SimRollouts); a tie is not an improvement."""
    return 1.0 if success_refine and ret_refine > max(mean_plain, mean_sim) else 0.0


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def agg_loss(loss_mat, mask, agg="token-mean"):
    """Reduce a [B, L] per-token loss to a scalar (veRL's loss_agg_mode names)."""
    if agg == "token-mean":  # every token weighs the same: long responses weigh more
        return _masked_mean(loss_mat, mask)
    if agg == "seq-mean-token-mean":  # every sequence weighs the same; empty sequences are skipped
        n = mask.sum(-1)
        seq = (loss_mat * mask).sum(-1) / n.clamp(min=1)
        has = (n > 0).to(seq.dtype)
        return (seq * has).sum() / has.sum().clamp(min=1)
    if agg == "seq-mean-token-sum-norm":  # Dr. GRPO: a constant normaliser, so no length bias
        return (loss_mat * mask).sum() / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"unknown agg {agg!r}: use one of {AGG_MODES}")


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, beta=0.0, clip_low=0.2, clip_high=0.2,
                agg="token-mean", clip_ratio_c=None):
    """Clipped PPO/GRPO surrogate (+ beta * k3 KL to the reference), aggregated by `agg`. Returns (loss, stats).

    advantages: [B] (one per sequence, broadcast over its tokens) or [B, L].
    clip_ratio_c: optional veRL dual-clip bound for A < 0 (e.g. 3.0); None (default) = plain clipping.
    """
    if agg not in AGG_MODES:  # fail before any work
        raise ValueError(f"unknown agg {agg!r}: use one of {AGG_MODES}")
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    adv = torch.as_tensor(advantages, dtype=logp.dtype, device=logp.device)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    if adv.shape[0] != logp.shape[0] or adv.shape[1] not in (1, logp.shape[1]):
        raise ValueError(f"advantages {tuple(adv.shape)} do not fit logp {tuple(logp.shape)}")
    m = mask.bool()
    mask = m.to(logp.dtype)
    # Zero padded slots first: masked tokens then get exactly zero gradient, and garbage there can't make NaNs.
    logp = torch.where(m, logp, 0.0)
    old_logp = torch.where(m, old_logp.detach(), 0.0)

    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)  # exp overflow guard (veRL)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)  # pessimistic bound: clip only takes away the incentive to move further
    if clip_ratio_c is not None:  # dual clip: cap the loss of a negative-advantage token at -A * c
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * clip_ratio_c), pg)
    per_token = pg

    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = torch.clamp(torch.where(m, ref_logp.detach(), 0.0) - logp, -20.0, 20.0)
        kl = torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)  # k3 "low_var_kl": unbiased, always >= 0
        if beta > 0:
            per_token = per_token + beta * kl  # agg is linear, so this equals veRL's pg_loss + beta * kl_loss

    loss = agg_loss(per_token, mask, agg)
    with torch.no_grad():
        stats = {
            "pg_loss": agg_loss(pg, mask, agg).item(),
            "clip_frac": _masked_mean((pg2 > pg1).to(logp.dtype), mask).item(),
            "ratio_mean": _masked_mean(ratio, mask).item(),
            "kl": _masked_mean(kl, mask).item(),
            "approx_kl": _masked_mean(-log_ratio, mask).item(),  # old vs new, as veRL's ppo_kl
        }
    return loss, stats


def sft_loss(logp, mask):
    """Negative log-likelihood, token-mean over response tokens (ReSim distillation)."""
    m = mask.bool()
    return -_masked_mean(torch.where(m, logp, 0.0), m.to(logp.dtype))
