"""grpo.py against hand-computed numbers and a manual per-sequence forward pass."""
import math

import pytest
import torch

import agent
import grpo

EPS = 1e-6


# ---------- advantages ----------

def test_group_advantages_hand_computed():
    ids = ["a", "d", "a", "b", "c", "a", "b", "d"]
    r = [1.0, 0.0, 2.0, 5.0, 7.0, 3.0, 5.0, 4.0]
    # a: mean 2, unbiased std 1; d: mean 2, std sqrt(8); b equal -> 0; c size 1 -> 0
    s8 = math.sqrt(8.0)
    want = [-1 / (1 + EPS), -2 / (s8 + EPS), 0.0, 0.0, 0.0, 1 / (1 + EPS), 0.0, 2 / (s8 + EPS)]
    got = grpo.group_advantages(r, ids)
    assert got.shape == (8,)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert got[3] == 0 and got[4] == 0 and got[6] == 0  # exactly zero, not just small


def test_group_advantages_int_ids():
    got = grpo.group_advantages(torch.tensor([1.0, 0.0, 2.0, 4.0, 3.0]), [0, 1, 0, 1, 0])
    assert torch.allclose(got, torch.tensor([-1.0, -2.0 / 8 ** 0.5, 0.0, 2.0 / 8 ** 0.5, 1.0]), atol=1e-5)


def test_group_advantages_equal_rewards_are_exactly_zero():
    # in float32, 8 x 9.6 has mean 9.6 - 9.5e-7: without a guard, 1/eps would turn that into advantages near 1
    # and in float64 7 x 9.8 has mean 9.8 + 1.8e-15
    r = torch.cat([torch.full((8,), 9.6), torch.full((7,), 0.7), torch.tensor([9.6, 9.5])])
    got = grpo.group_advantages(r, [0] * 8 + [1] * 7 + [2] * 2)
    assert torch.equal(got[:15], torch.zeros(15))
    assert torch.equal(grpo.group_advantages([9.8] * 7, ["t"] * 7), torch.zeros(7))
    assert got[15] == pytest.approx(0.5 ** 0.5, abs=1e-4) and got[16] == -got[15]  # a real gap is kept


def test_group_advantages_tensor_ids_group_by_value():
    got = grpo.group_advantages([0.0, 1.0], torch.tensor([7, 7]))
    assert got[1] > 0 > got[0]


def test_group_advantages_length_mismatch():
    with pytest.raises(ValueError):
        grpo.group_advantages([1.0, 2.0], ["a"])


def test_rloo_hand_computed():
    ids = ["x", "y", "x", "z", "x", "y", "w", "w"]
    r = [1.0, 0.0, 2.0, 8.0, 3.0, 4.0, 5.0, 5.0]
    # x: 1-2.5, 2-2, 3-1.5 ; y: 0-4, 4-0 ; z size 1 -> 0 ; w equal -> 0
    want = [-1.5, -4.0, 0.0, 0.0, 1.5, 4.0, 0.0, 0.0]
    assert torch.allclose(grpo.rloo_advantages(r, ids), torch.tensor(want))


# ---------- A_refine ----------

def test_a_refine_edge_cases():
    assert grpo.a_refine(9.5, True, 5.0, 7.0) == 1.0     # beats both
    assert grpo.a_refine(9.5, False, 5.0, 7.0) == 0.0    # failure -> 0 even with a high return
    assert grpo.a_refine(7.0, True, 5.0, 7.0) == 0.0     # equal to the max is no improvement
    assert grpo.a_refine(6.0, True, 5.0, 7.0) == 0.0     # beats the plain mean only
    assert grpo.a_refine(6.0, True, 7.0, 5.0) == 0.0     # beats the SimRollout mean only


# ---------- policy loss ----------

def _agg_case():
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]])
    logp = torch.full((3, 3), -1.0)
    return logp, adv, mask


@pytest.mark.parametrize("agg,want", [
    ("token-mean", -(1 + 2 + 3 + 4) / 4),
    ("seq-mean-token-mean", (-2.0 + -4.0) / 2),        # the empty third row is skipped
    ("seq-mean-token-sum-norm", -(1 + 2 + 3 + 4) / (2 * 3)),   # 2 non-empty sequences x length 3
])
def test_aggregation_modes(agg, want):
    logp, adv, mask = _agg_case()  # ratio 1, so the per-token loss is -A
    loss, stats = grpo.policy_loss(logp, logp.clone(), adv, mask, agg=agg)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert stats["pg_loss"] == pytest.approx(want, abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_micro_batch_shares_add_up_to_the_batch_loss(agg):
    """With the batch's counts (and Dr. GRPO's constant budget) the micro-batches' shares sum to the loss of the
    whole batch; a per-micro-batch length normaliser would make Dr. GRPO depend on the split."""
    _, adv, mask = _agg_case()
    whole = grpo.agg_loss(-adv, mask, agg, budget=8)
    counts = dict(n_tok=mask.sum(), n_seq=(mask.sum(-1) > 0).sum(), budget=8)
    width = [max(1, int(m.sum())) for m in mask]             # each row alone, cut to its own length
    parts = sum(grpo.agg_loss(-adv[i:i + 1, :w], mask[i:i + 1, :w], agg, **counts) for i, w in enumerate(width))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_without_old_logprobs_the_loss_is_sft():
    logp = torch.tensor([[-1.0, -2.0, -100.0], [-3.0, float("nan"), 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    loss, _ = grpo.policy_loss(logp, None, torch.ones(2), mask)   # A = 1, no ratio: token-mean NLL
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.equal(logp.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]]))


def test_unknown_agg_raises():
    logp, adv, mask = _agg_case()
    with pytest.raises(ValueError, match="agg"):
        grpo.policy_loss(logp, logp, adv, mask, agg="seq-mean")
    with pytest.raises(ValueError):
        grpo.agg_loss(logp, mask, "token-sum")


def test_ratio_clipping_both_sides():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = grpo.policy_loss(logp, old, adv, torch.ones(1, 4))
    # per token: max(-A r, -A clip(r, .8, 1.2)) = [-1.2 (clipped), 1.5, -0.5, 0.8 (clipped)]
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["approx_kl"] == pytest.approx(-(2 * math.log(1.5) + 2 * math.log(0.5)) / 4, abs=1e-6)
    loss.backward()
    # clipped tokens get no gradient; the others get d(-A r)/dlogp / 4 = -A r / 4
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0]]), atol=1e-6)


def test_asymmetric_clip():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 5.0]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, _ = grpo.policy_loss(logp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.28, clip_c=10.0)
    assert loss.item() == pytest.approx((-1.28 + 5.0) / 2, abs=1e-6)


def test_dual_clip_stops_pushing_down_tokens_far_above_their_old_probability():
    """veRL's clip_ratio_c: for A < 0 the per-token loss is min(max(-A r, -A clip(r)), -A c). A token at ratio 5
    with A = -1 (tau': likelier under s_t than under the s_ref it was drawn from) costs 3 and gets no gradient;
    below c, and for A > 0, nothing changes."""
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[5.0, 2.0, 5.0]])).requires_grad_()
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, stats = grpo.policy_loss(logp, old, adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.28, clip_c=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.28) / 3, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 3)   # the dual-clipped token and the clipped A > 0 one
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="clip_c"):
        grpo.policy_loss(logp, old, adv, torch.ones(1, 3), clip_c=1.0)


def test_log_ratio_clamped():
    logp, old = torch.tensor([[0.0]]), torch.tensor([[-50.0]])
    loss, stats = grpo.policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), clip_c=3.0)
    assert stats["ratio_mean"] == pytest.approx(math.exp(20.0), rel=1e-5)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(3.0)   # A < 0: the dual clip's -A * c


def test_k3_kl_value_and_clamp():
    logp = torch.zeros(1, 4)
    ref = torch.tensor([[math.log(2.0), -1.0, 15.0, -30.0]])
    mask = torch.ones(1, 4)
    want = [2.0 - math.log(2.0) - 1.0, math.exp(-1.0), 10.0, 10.0]  # last two hit the [-10, 10] clamp
    _, stats = grpo.policy_loss(logp, logp, torch.zeros(1), mask, ref_logp=ref, beta=0.0)
    assert stats["kl"] == pytest.approx(sum(want) / 4, abs=1e-5)
    loss, _ = grpo.policy_loss(logp, logp, torch.zeros(1), mask, ref_logp=ref, beta=0.5)
    assert loss.item() == pytest.approx(0.5 * sum(want) / 4, abs=1e-5)
    loss, stats = grpo.policy_loss(logp, logp, torch.zeros(1), mask)
    assert loss.item() == 0.0 and stats["kl"] == 0.0


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_masked_tokens_get_exactly_zero_gradient(agg):
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    logp = -torch.rand(3, 5, generator=g) * 3
    old = logp + 0.3 * torch.randn(3, 5, generator=g)
    old[mask == 0] = float("nan")  # garbage in padding must not leak
    logp[mask == 0] = float("nan")
    logp.requires_grad_()
    ref = logp.detach() - 0.5 * torch.rand(3, 5, generator=g)  # nan where masked, too
    loss, stats = grpo.policy_loss(logp, old, torch.tensor([1.0, -2.0, 0.5]), mask, ref_logp=ref,
                                   beta=0.1, agg=agg)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in stats.values())
    assert torch.equal(logp.grad[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert (logp.grad[mask == 1] != 0).all()


def test_shape_errors():
    with pytest.raises(ValueError):
        grpo.policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError):
        grpo.policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


# ---------- with a tiny random Qwen2 ----------

@pytest.fixture(scope="module")
def tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64)
    return Qwen2ForCausalLM(cfg).float().eval()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [20, 21]]
RESPONSES = [[30, 31, 32, 33], [34], [35, 36, 37, 38, 39, 40], []]


def test_response_logprobs_matches_per_sequence_forward(tiny):
    with torch.no_grad():
        for temperature in (1.0, 0.7):
            logp, mask = grpo.response_logprobs(tiny, PROMPTS, RESPONSES, pad_id=0, temperature=temperature)
            assert logp.shape == mask.shape == (4, 6)
            for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
                lp = torch.log_softmax(tiny(torch.tensor([p + r])).logits[0] / temperature, -1)
                want = torch.tensor([lp[len(p) - 1 + j, t] for j, t in enumerate(r)])
                assert torch.allclose(logp[b, : len(r)], want, atol=1e-5)
                assert mask[b].tolist() == [1.0] * len(r) + [0.0] * (6 - len(r))
                assert torch.equal(logp[b, len(r):], torch.zeros(6 - len(r)))


def test_response_logprobs_pad_to_changes_only_the_padding(tiny):
    """Lengths padded up to a multiple of pad_to (the compiled SFT forward's few shapes): every real log-prob is
    the unpadded one, with either attention implementation (right padding needs no mask)."""
    with torch.no_grad():
        ref, _ = grpo.response_logprobs(tiny, PROMPTS, RESPONSES, pad_id=0)
        for impl in ("eager", "sdpa"):
            tiny.set_attn_implementation(impl)
            logp, mask = grpo.response_logprobs(tiny, PROMPTS, RESPONSES, pad_id=0, pad_to=8)
            assert logp.shape == mask.shape == (4, 8) and mask[:, 6:].sum() == 0            # T = 7 -> 8 = L
            assert torch.allclose(logp[:, :6], ref, atol=1e-5) and torch.equal(logp[:, 6:], torch.zeros(4, 2))
        tiny.set_attn_implementation("sdpa")


def test_response_logprobs_has_grad_and_validates(tiny):
    logp, mask = grpo.response_logprobs(tiny, PROMPTS[:2], RESPONSES[:2], pad_id=0)
    assert logp.requires_grad
    with pytest.raises(ValueError):
        grpo.response_logprobs(tiny, [[]], [[1]], pad_id=0)
    with pytest.raises(ValueError):
        grpo.response_logprobs(tiny, [[1], [2]], [[1]], pad_id=0)


def test_one_step_raises_logprob_of_positive_response(tiny):
    import copy
    model = copy.deepcopy(tiny)
    prompts, responses = [[5, 6, 7], [5, 6, 7]], [[40, 41, 42], [50, 51]]
    adv = grpo.group_advantages([1.0, 0.0], ["task0", "task0"])  # first response good, second bad
    with torch.no_grad():
        old, mask = grpo.response_logprobs(model, prompts, responses, pad_id=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logp, mask = grpo.response_logprobs(model, prompts, responses, pad_id=0)
    loss, _ = grpo.policy_loss(logp, old, adv, mask)
    loss.backward()
    opt.step()
    with torch.no_grad():
        new, _ = grpo.response_logprobs(model, prompts, responses, pad_id=0)
    assert new[0].sum() > old[0].sum() + 1e-3
    assert new[1].sum() < old[1].sum() - 1e-3


def _episode(turns, success, seed=0):
    ts = [agent.Turn([1, 2], [3] * 5, "", "", "Up", True, i == turns - 1, success and i == turns - 1)
          for i in range(turns)]
    return agent.Episode("sokoban", seed, ts, success, 20)


def test_episode_weighting_leaves_no_net_push_on_shared_tokens():
    """A group's advantages sum to 0; with a short success and a long failure, weighting every turn the same
    pushes the tokens all responses share down (the collapse README shows); weighting every episode the same
    does not, and keeps the batch's total weight."""
    eps = [_episode(2, True), _episode(20, False), _episode(3, True), _episode(20, False)]
    adv = grpo.group_advantages([agent.episode_return(e.steps, e.success) for e in eps], [0] * 4).tolist()
    net = lambda ss: sum(s.advantage * len(s.response_ids) for s in ss)   # noqa: E731
    by_turn, by_episode = grpo.episode_samples(eps, adv, "turn"), grpo.episode_samples(eps, adv, "episode")
    assert net(by_turn) < -20
    assert abs(net(by_episode)) < 1e-9
    assert len(by_episode) == 45 and by_episode[0].prompt_ids == [1, 2]
    w = [s.advantage / a for s, a in zip(by_episode, [a for e, a in zip(eps, adv) for _ in e.turns])]
    assert sum(w) == pytest.approx(45)                                      # total weight unchanged
    with pytest.raises(ValueError, match="turn_weight"):
        grpo.episode_samples(eps, adv, "trajectory")
