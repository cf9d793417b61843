"""The fixture model: deterministic, and vLLM and HF agree on its greedy output."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prag.fixture_model import SIZES, build_fixture_model
from prag.prompt import build_prompt_ids


def test_same_size_twice_is_byte_identical(tmp_path, tiny_model_dir):
    again = build_fixture_model(tmp_path / "again", size="tiny")
    for name in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_tiny_shape_and_tokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spec = SIZES["tiny"]
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 < n_params < 1_000_000
    assert model.config.head_dim == 64 and model.config.hidden_size == spec.hidden_size
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.chat_template
    ids = build_prompt_ids(tok, "Who built the bridge", ["It was built in 1854."])
    assert ids[0] == tok.bos_token_id
    assert "Question: Who built the bridge?" in tok.decode(ids)
    assert tok.decode(ids).endswith("The answer is")


def test_small_size_parameter_budget():
    s = SIZES["small"]
    per_layer = 4 * s.hidden_size * s.hidden_size + 3 * s.hidden_size * s.intermediate_size
    total = s.num_hidden_layers * per_layer + 2 * s.vocab_size * s.hidden_size
    assert 20e6 <= total <= 50e6


def test_vllm_and_hf_greedy_tokens_identical(tiny_model_dir, shared_llm):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    questions = ["Who founded the company", "When was the bridge completed?", "Where was Ana Varn born?",
                 "What river flows through the old harbour town?"]
    prompts = [build_prompt_ids(tok, q, ["The company was founded in 1901 in Berlin."] if i % 2 else None)
               for i, q in enumerate(questions)]
    outs = shared_llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
        assert list(out.outputs[0].token_ids) == hf
        assert len(hf) > 0
