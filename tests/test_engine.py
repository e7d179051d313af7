"""engine.py: the hand-written generation loop against Hugging Face's generate and a full forward; fresh noise;
the lean decode step against the fallback."""
import pytest
import torch

import agent
import engine

torch.set_num_threads(1)   # 2 shared cores: one thread avoids oversubscription stalls


@pytest.fixture(scope="module")
def tiny():
    return agent.load_model("tiny", dtype=torch.float32)


def _hf_greedy(model, tok, ids, n, eos):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def _expected(tok, hf, stop, eos):
    """Reference semantics: cut at the first token whose text completes a stop string, or at EOS (kept)."""
    for k, t in enumerate(hf):
        if t in eos:
            return hf[:k + 1], "eos"
        if any(s in tok.decode(hf[:k + 1]) for s in stop):
            return hf[:k + 1], "stop"
    return hf, "length"


@pytest.mark.parametrize("prefill_group", [8, 2])   # 2: prefill caches of several length groups
@pytest.mark.parametrize("lean", [True, False])     # the lean decode step, and Hugging Face's forward
def test_greedy_matches_hf_generate(tiny, prefill_group, lean, monkeypatch):
    model, tok = tiny
    if not lean:
        monkeypatch.setattr(engine, "LEAN_TYPES", ())
    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a",
               "a much longer prompt " * 6, "xyz √√ 123", "the quick brown fox"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = 40
    free = [_hf_greedy(model, tok, p, n, [tok.eos_token_id]) for p in ids]
    # make rows end at different steps: an extra EOS taken from row 0, a stop string from row 1
    extra_eos = free[0][17]
    stop = (tok.decode(free[1][9:12]), "</action>")
    eos = [tok.eos_token_id, extra_eos]
    model.generation_config.eos_token_id = eos
    try:
        hf = [_hf_greedy(model, tok, p, n, eos) for p in ids]
        ours = engine.generate(model, tok, prompts, max_new_tokens=n, temperature=0, stop=stop,
                               prefill_group=prefill_group)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    reasons = set()
    for h, g in zip(hf, ours):
        want, why = _expected(tok, h, stop, eos)
        assert g.token_ids == want and g.finish_reason == why
        body = g.token_ids[:-1] if why == "eos" else g.token_ids
        assert g.text == tok.decode(body) and len(g.logprobs) == len(g.token_ids)
        reasons.add(why)
    assert len({len(g.token_ids) for g in ours}) >= 3 and {"eos", "stop"} <= reasons


@pytest.mark.parametrize("prefill_group", [8, 2])
def test_a_shared_prefix_is_prefilled_once_and_changes_nothing(tiny, prefill_group, monkeypatch):
    """Prompts sharing a system prompt: the lean prefill runs the shared tokens once, then each group's own
    (a short row's cache has a padding hole after the prefix); greedy output still equals HF's, and sampled
    log-probs equal a full forward's."""
    model, tok = tiny
    system = "<|im_start|>system\nYou solve Sokoban puzzles. Think, then act.<|im_end|>\n<|im_start|>user\n"
    prompts = [system + s for s in ("hi", "a much longer question " * 4, "", "xyz √√ 123", "the quick brown fox")]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # the shared tokens: one prompt is the shared part itself, so all but its last token (each row keeps one)
    P = min(next((i for i in range(len(ids[0])) if len({tuple(r[:i + 1]) for r in ids}) > 1), len(ids[0])),
            min(map(len, ids)) - 1)
    assert P == len(ids[2]) - 1 >= engine.SHARE_MIN
    fed, forward = [], type(model).forward

    def counting(self, input_ids=None, **kw):
        fed.append(input_ids.numel())
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(model), "forward", counting)
    ours = engine.generate(model, tok, ids, max_new_tokens=20, temperature=0, stop=(), prefill_group=prefill_group)
    groups = [[ids[i] for i in g] for g in engine.prefill_groups([len(p) - P for p in ids], prefill_group)]
    assert fed == [P] + [len(g) * (len(g[-1]) - P) for g in groups]   # prefill only: decoding is lean
    for p, g in zip(ids, ours):
        assert g.token_ids == _hf_greedy(model, tok, p, 20, [tok.eos_token_id])
    for g, p in zip(engine.generate(model, tok, ids, max_new_tokens=16, temperature=0.7, seed=1, stop=(),
                                    prefill_group=prefill_group), ids):
        assert torch.allclose(torch.tensor(g.logprobs), _full_logprobs(model, p, g.token_ids, 0.7), atol=1e-4)


def test_prefill_groups_fill_up_to_most_rows_and_bound_their_padding():
    """Equal lengths fill groups of `most` rows (fewer, larger forwards); mixed lengths close a group before its
    padding passes PAD_SLACK of its real tokens; every row once, shortest first."""
    assert engine.prefill_groups([60] * 70, 32) == [list(range(32)), list(range(32, 64)), list(range(64, 70))]
    lengths = [233, 40, 41, 300, 39, 250, 242, 40, 900]
    groups = engine.prefill_groups(lengths, 4)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [lengths[i] for g in groups for i in g] == sorted(lengths)
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert len(g) <= 4 and max(lengths[i] for i in g) * len(g) <= (1 + engine.PAD_SLACK) * real
    assert [len(g) for g in groups] == [4, 3, 1, 1]   # 39-41 | 233-250 | 300 | 900


def test_a_row_that_ends_on_eos_keeps_it(tiny):
    model, tok = tiny
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    first = _hf_greedy(model, tok, ids, 1, [tok.eos_token_id])[0]
    model.generation_config.eos_token_id = [tok.eos_token_id, first]   # the greedy first token ends the row
    try:
        g, = engine.generate(model, tok, [ids], max_new_tokens=8, temperature=0)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert g.finish_reason == "eos" and g.token_ids == [first] and g.text == "" and len(g.logprobs) == 1


def _full_logprobs(model, prompt_ids, resp, temperature):
    x = torch.tensor([prompt_ids + resp])
    with torch.no_grad():
        logits = model(x).logits[0, len(prompt_ids) - 1:-1].float()
    lp = (logits / (temperature or 1.0)).log_softmax(-1)
    return lp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)


@pytest.mark.parametrize("lean", [True, False])
def test_logprobs_match_a_full_forward(tiny, lean, monkeypatch):
    model, tok = tiny
    if not lean:
        monkeypatch.setattr(engine, "LEAN_TYPES", ())
    prompts = ["short", "a somewhat longer prompt here", "mid √ size"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for temperature in (0.0, 0.7):
        gens = engine.generate(model, tok, ids, max_new_tokens=24, temperature=temperature, seed=1, stop=(),
                               prefill_group=2)
        for p, g in zip(ids, gens):
            assert g.finish_reason == "length" and len(g.token_ids) == 24
            ref = _full_logprobs(model, p, g.token_ids, temperature)
            assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-4)


@pytest.mark.slow
def test_compiled_step_matches_a_full_forward_without_recompiling(monkeypatch):
    """engine.COMPILE: the same log-probs as a full forward, through one graph for every batch size and cache
    width (a graph specialised on the cache column would recompile at every step)."""
    from torch._dynamo.utils import counters
    model, tok = agent.load_model("tiny", dtype=torch.float32, num_hidden_layers=2)   # 2 layers: compiles faster
    monkeypatch.setattr(engine, "COMPILE", True)
    graphs = counters["stats"]["unique_graphs"]
    for prompts in (["short", "a somewhat longer prompt here", "mid √ size"], ["two", "rows, longer ones"]):
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        gens = engine.generate(model, tok, ids, max_new_tokens=16, temperature=0.7, seed=1, stop=())
        for p, g in zip(ids, gens):
            assert torch.allclose(torch.tensor(g.logprobs), _full_logprobs(model, p, g.token_ids, 0.7), atol=1e-4)
    assert counters["stats"]["unique_graphs"] - graphs == 1   # one dynamic graph (no call here has one row)


def test_bf16_lean_step_agrees_with_hf_forward():
    """In bf16 the lean step (float32 attention) and Hugging Face's forward differ only by rounding."""
    model, tok = agent.load_model("tiny", dtype=torch.bfloat16)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in ("one prompt", "another, longer prompt")]
    with torch.inference_mode():
        lean, logits = engine._prefill(model, ids, tok.pad_token_id, 8, 64)
        nxt = logits.argmax(-1)
        pos, col = torch.tensor([len(p) for p in ids]), max(map(len, ids))
        a = lean.step(nxt, pos, col).float()
        cache_model = agent.load_model("tiny", dtype=torch.bfloat16)[0]
        cache_model.config.model_type = "other"          # the same weights through the fallback
        hf, _ = engine._prefill(cache_model, ids, tok.pad_token_id, 8, 64)
        b = hf.step(nxt, pos, col).float()
    assert isinstance(lean, engine.LeanDecoder) and isinstance(hf, engine.HFDecoder)
    assert (a - b).abs().max() < 0.1 * b.abs().max()


@pytest.mark.slow   # compiling takes about 20 s
def test_lean_forward_equals_hf_forward_with_its_gradients():
    """engine.LeanForward (train.compiled's SFT forward): Hugging Face's logits at the kept positions of
    right-padded rows, and the same gradients, for grouped-query attention with Qwen2's q / k / v biases."""
    model, tok = agent.load_model("tiny", dtype=torch.float32, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, seed=3)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    lean = engine.LeanForward(model)
    torch.manual_seed(0)
    ids, keep = torch.randint(0, 250, (3, 16)), torch.randint(0, 16, (3, 5))   # kept positions, as SFT passes
    w = torch.randn(3, 5, model.config.vocab_size)
    out = []
    for f in (model, lean):
        model.zero_grad()
        logits = f(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
        (logits * w).sum().backward()
        out.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = out
    assert a.shape == b.shape == (3, 5, model.config.vocab_size)
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(ga, gb))


@pytest.mark.slow   # compiling takes about 30 s
def test_lean_forward_gradients_are_finite_under_bf16_autocast_with_64_wide_heads():
    """SmolLM2's head width (64) under bf16 autocast, as sft_step runs it: the compiled LeanForward's gradients
    equal its eager ones. With Hugging Face's rotate_half form of RoPE, inductor's vectorised CPU code made every
    key-projection gradient below the last layer NaN (torch 2.13), which AdamW spreads to the weights even at lr 0."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, rope_theta=100000.0))
    lean = engine.LeanForward(model)
    ids, keep = torch.randint(0, 300, (2, 128)), torch.arange(88, 127).repeat(2, 1)
    out = []
    for f in (lean.forward, engine._lean_logits):          # compiled, then the same function eager
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = f(model, ids, keep, *lean.table(128, ids.device))
        logits.float().logsumexp(-1).mean().backward()
        out.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.isfinite(g).all() for g in out[0])
    assert all((a - b).norm() <= 0.05 * b.norm() + 1e-6 for a, b in zip(*out))


def test_top_p_logprobs_are_renormalised(tiny):
    model, tok = tiny
    g = engine.generate(model, tok, ["abc"] * 4, max_new_tokens=16, temperature=1.0, top_p=0.3, seed=0, stop=())
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    for x in g:   # the truncated distribution puts more mass on each kept token than the full one
        full = _full_logprobs(model, ids, x.token_ids, 1.0)
        assert all(a > b for a, b in zip(x.logprobs, full.tolist()))


def test_seeded_sampling_is_reproducible_and_a_shared_generator_advances(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=30, temperature=1.0, stop=("e",))
    a = engine.generate(model, tok, ["one", "two two"] * 3, seed=7, **kw)
    b = engine.generate(model, tok, ["one", "two two"] * 3, seed=7, **kw)
    c = engine.generate(model, tok, ["one", "two two"] * 3, seed=8, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    gen = torch.Generator().manual_seed(7)                 # one stream across calls: never the same noise twice
    first = engine.generate(model, tok, ["one"], generator=gen, **kw)[0].token_ids
    second = engine.generate(model, tok, ["one"], generator=gen, **kw)[0].token_ids
    assert first == engine.generate(model, tok, ["one"], seed=7, **kw)[0].token_ids and second != first
    chunked = engine.generate(model, tok, ["one", "two two"] * 3, seed=7, batch_size=2, **kw)
    assert all(g.finish_reason in ("stop", "length", "eos") for g in chunked) and len(chunked) == 6


def test_stop_tokens_cover_every_token_that_ends_a_stop_string(tiny):
    _, tok = tiny
    cand = set(engine.stop_tokens(tok, ("</action>", "\n\n")).tolist())
    assert tok.convert_tokens_to_ids(">") in cand and tok(">", add_special_tokens=False)["input_ids"][0] in cand
    assert tok("\n", add_special_tokens=False)["input_ids"][0] in cand
    assert tok("a", add_special_tokens=False)["input_ids"][0] not in cand


def test_unsupported_models_fall_back_and_say_so_once(tiny, monkeypatch, capsys):
    model, tok = tiny
    monkeypatch.setattr(engine, "LEAN_TYPES", ())
    monkeypatch.setattr(engine, "_SAID", set())
    a = engine.generate(model, tok, ["abc"], max_new_tokens=5, temperature=0)
    b = engine.generate(model, tok, ["abc"], max_new_tokens=5, temperature=0)
    assert a[0].token_ids == b[0].token_ids
    assert capsys.readouterr().out.count("no lean decode step") == 1


def test_generate_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError):
        engine.generate(model, tok, [[]], max_new_tokens=4)
    with pytest.raises(ValueError):
        engine.generate(model, tok, ["a"], max_new_tokens=4, top_p=0)
    assert engine.generate(model, tok, ["a"], max_new_tokens=0)[0].finish_reason == "length"


def test_sampling_draws_from_the_softmax_distribution():
    """The inverse-CDF draw has the distribution of torch.multinomial: frequencies over 40,000 draws are within
    4 standard errors of the probabilities, and a zero-probability (top-p cut) token is never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40000, 1)
    gen = torch.Generator().manual_seed(0)
    for top_p, temperature in ((1.0, 1.0), (0.8, 0.7)):
        tok, lp = engine._sample(logits, temperature, top_p, gen)
        p = lp.exp()
        probs = {int(t): float(q) for t, q in zip(tok, p)}
        freq = torch.bincount(tok, minlength=5).float() / len(tok)
        for t, q in probs.items():
            assert abs(freq[t] - q) < 4 * (q * (1 - q) / len(tok)) ** 0.5 + 1e-9
        kept = (logits[0] / temperature).softmax(-1).sort(descending=True)
        cut = int(((kept.values.cumsum(0) - kept.values) < top_p).sum())
        assert set(probs) <= set(kept.indices[:cut].tolist()) and 4 not in probs


@pytest.mark.parametrize("prefix_len", [1, 9])   # 1: no cache to repeat
def test_continuation_logprobs_match_a_full_forward(tiny, prefix_len):
    """agent.admit's scores: the prefix's cache repeated over right-padded continuations of several lengths, in
    chunks, gives each token the log-prob a full forward of prefix + continuation gives it."""
    model, tok = tiny
    prefix = tok("Current observation: at 1 <action>", add_special_tokens=False)["input_ids"][-prefix_len:]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in ["Inc</action>", "Dec</action>", "go to a 1", "x"]]
    got = engine.continuation_logprobs(model, prefix, conts, chunk=3)
    for c, lp in zip(conts, got):
        full = torch.log_softmax(model(torch.tensor([prefix + c])).logits[0, :-1].float(), -1)
        want = [full[len(prefix) - 1 + j, t].item() for j, t in enumerate(c)]
        assert lp == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError):
        engine.continuation_logprobs(model, prefix, [[]])
