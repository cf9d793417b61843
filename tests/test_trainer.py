"""The batched multi-document trainer against the paper's per-document PEFT loop (docs/method.md, section 5).

Tolerance of the equivalence test: fp32 on CPU, ``atol=1e-5, rtol=1e-4`` on every A and B after
up to 12 AdamW steps at lr 3e-3 (the largest difference seen here is 1.4e-6). The two paths differ only in
summation order (``torch.bmm`` per row vs PEFT's Linear, chunked vs whole-sequence cross-entropy),
so anything beyond float rounding - a wrong row, a wrong step count, a document updated at a step
where it had no example - shows up as differences of order lr = 3e-3.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from offline_encode.config import EncodeConfig, lora_key
from offline_encode.lora_math import adamw_update_
from tests.helpers.encode_reference import train_reference
from offline_encode.trainer import BatchedLoraTrainer, make_init_adapter, split_by_padding, target_module_names
from offline_encode.training_data import build_training_sequences, skip_reason
from prag.errors import PragError
from prag.prompt import build_prompt_ids

ATOL, RTOL = 1e-5, 1e-4

# Fake augmented records with real text: different passage lengths, with and without rewrite, and
# 1 to 4 QA pairs, so the documents have 1, 3, 5, 5 and 6 training sequences.
RECORDS = [
    {"doc_id": "nobel",
     "passage": "The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, of Germany, "
                "who received 150,782 SEK. John Bardeen is the only laureate to win the prize twice, in 1956 "
                "and 1972.",
     "rewrites": ["John Bardeen won the physics prize twice, in 1956 and 1972. In 1901 the first Nobel Prize in "
                  "Physics went to Wilhelm Conrad Röntgen of Germany, who received 150,782 SEK."],
     "qa": [{"question": "who got the first nobel prize in physics", "answer": "Wilhelm Conrad Röntgen",
             "full_answer": "The first prize, in 1901, went to Wilhelm Conrad Röntgen."},
            {"question": "when was the first nobel prize in physics awarded", "answer": "1901",
             "full_answer": "It was awarded in 1901."},
            {"question": "who won the physics prize twice", "answer": "John Bardeen",
             "full_answer": "John Bardeen won it in 1956 and 1972."}]},
    {"doc_id": "river",
     "passage": "The river flows north through three valleys before it reaches the sea near the old harbour town.",
     "rewrites": ["Running north, the river crosses three valleys and meets the sea by the old harbour town."],
     "qa": [{"question": "Which way does the river flow?", "answer": "north", "full_answer": "It flows north."},
            {"question": "How many valleys does the river cross", "answer": "three", "full_answer": "Three."}]},
    {"doc_id": "painter",
     "passage": "In 1923 the painter moved to the coast, where she founded a small school of landscape art.",
     "rewrites": [],
     "qa": [{"question": "When did the painter move to the coast", "answer": "1923", "full_answer": "In 1923."}]},
    {"doc_id": "company",
     "passage": "The company was founded on 4 March 1901 by two brothers who had studied chemistry in Berlin. "
                "It built the harbour bridge in 1932 and employed 640 workers by 1940. The founders later "
                "opened a glassworks in Lindau, which closed in 1978 after the second brother died.",
     "rewrites": ["Two brothers trained in chemistry in Berlin founded the company on 4 March 1901; it had 640 "
                  "workers by 1940 and built the harbour bridge in 1932. Their glassworks in Lindau closed in 1978."],
     "qa": [{"question": "When was the company founded", "answer": "4 March 1901", "full_answer": "On 4 March 1901."},
            {"question": "Where did the brothers study chemistry", "answer": "Berlin", "full_answer": "In Berlin."},
            {"question": "How many workers did the company employ by 1940", "answer": "640",
             "full_answer": "It employed 640 workers."},
            {"question": "When did the glassworks close", "answer": "1978", "full_answer": "It closed in 1978."}]},
    {"doc_id": "mayor",
     "passage": "Ida Brenner served as mayor of Karsby for twelve years and was succeeded by her son.",
     "rewrites": ["For twelve years Ida Brenner was the mayor of Karsby; her son succeeded her."],
     "qa": [{"question": "Who was mayor of Karsby", "answer": "Ida Brenner", "full_answer": "Ida Brenner."},
            {"question": "How long was Ida Brenner mayor", "answer": "twelve years", "full_answer": "Twelve years."},
            {"question": "Who succeeded Ida Brenner", "answer": "her son", "full_answer": "Her son."}]},
]

# Larger than the paper's lr (3e-4) and 2 epochs, so any deviation from the reference would show.
CFG = EncodeConfig(learning_rate=3e-3, epochs=2, docs_per_step=4, device="cpu", compute_dtype="float32")


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    return BatchedLoraTrainer(tiny_model_dir, CFG)


@pytest.fixture(scope="module")
def sequences(trainer):
    return [build_training_sequences(trainer.tokenizer, r) for r in RECORDS]


@pytest.fixture(scope="module")
def batched(trainer, sequences):
    return trainer.train(sequences)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, trainer, sequences):
    return train_reference(tiny_model_dir, trainer.init_adapter, sequences, CFG)


def assert_adapters_close(got, want, atol=ATOL, rtol=RTOL):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for key in g:
            torch.testing.assert_close(g[key], w[key], atol=atol, rtol=rtol, msg=lambda m: f"doc {i} {key}: {m}")


# ----------------------------------------------------------------------------- training data
def test_three_qa_pairs_give_five_sequences_in_the_papers_order(trainer):
    rec, tok = RECORDS[0], trainer.tokenizer
    seqs = build_training_sequences(tok, rec)
    psg, rew = rec["passage"], rec["rewrites"][0]
    q = [p["question"] for p in rec["qa"]]
    a = [p["answer"] for p in rec["qa"]]
    assert seqs == [build_prompt_ids(tok, q[0], [psg], a[0]), build_prompt_ids(tok, q[0], [rew], a[0]),
                    build_prompt_ids(tok, q[1], [psg], a[1]), build_prompt_ids(tok, q[1], [rew], a[1]),
                    build_prompt_ids(tok, q[2], None, a[2])]
    cot = build_training_sequences(tok, rec, with_cot=True)
    assert cot[-1] == build_prompt_ids(tok, q[2], None, rec["qa"][2]["full_answer"])


def test_sequence_counts_without_rewrite_and_with_more_pairs(sequences):
    assert [len(s) for s in sequences] == [5, 3, 1, 6, 5]


@pytest.mark.parametrize("record, reason", [
    ({"doc_id": "x", "passage": "  ", "qa": [{"question": "q", "answer": "a"}]}, "passage"),
    ({"doc_id": "x", "passage": "text", "qa": []}, "no QA pairs"),
    ({"doc_id": "x", "passage": "text", "qa": [{"question": "q"}]}, "qa[0] has no 'answer'"),
])
def test_bad_record_is_refused_with_its_reason(trainer, record, reason):
    assert reason in skip_reason(record)
    with pytest.raises(PragError, match=r"'x'.*" + reason.replace("[", r"\[").replace("]", r"\]")):
        build_training_sequences(trainer.tokenizer, record)


# ----------------------------------------------------------------------------- pure maths
def test_adamw_on_prefix_rows_equals_torch_adamw_per_row():
    """Rows drop out of the prefix as their documents run out of examples, like the trainer does."""
    torch.manual_seed(0)
    steps_per_row = [6, 4, 4, 1]
    init = torch.randn(4, 3, 5)
    grads = [torch.randn(4, 3, 5) for _ in range(6)]
    p, m, v = init.clone(), torch.zeros_like(init), torch.zeros_like(init)
    for step in range(6):
        k = sum(1 for s in steps_per_row if s > step)
        adamw_update_([p[:k]], [grads[step][:k]], [m[:k]], [v[:k]], step + 1, lr=3e-3, weight_decay=0.01)
    for row, n_steps in enumerate(steps_per_row):
        q = init[row].clone().requires_grad_()
        opt = torch.optim.AdamW([q], lr=3e-3, weight_decay=0.01)
        for step in range(n_steps):
            q.grad = grads[step][row].clone()
            opt.step()
        torch.testing.assert_close(p[row], q.detach(), atol=0, rtol=1e-6)


def test_split_by_padding_bounds_each_runs_padding():
    lengths = [300, 290, 280, 120, 110, 100, 40]
    runs = split_by_padding(lengths, 0.2)
    assert runs == [(0, 4), (4, 6), (6, 7)]  # 300,290,280,120 pads 17.5%
    for lo, hi in runs:
        assert 1 - sum(lengths[lo:hi]) / ((hi - lo) * max(lengths[lo:hi])) <= 0.2
    assert split_by_padding(lengths, 1.0) == [(0, 7)]
    assert split_by_padding([5, 5, 5], 0.0) == [(0, 3)]


# ----------------------------------------------------------------------------- init and targets
def test_init_adapter_is_pefts_init_and_leaves_global_rng_alone(tiny_model_dir, trainer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    init = make_init_adapter(model, CFG)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(CFG.init_seed)
    peft_model = get_peft_model(model, LoraConfig(r=CFG.rank, lora_alpha=CFG.alpha,
                                                  target_modules=list(CFG.target_modules), lora_dropout=0.0))
    params = dict(peft_model.named_parameters())
    assert len(init) == 2 * 3 * 2  # 2 layers x 3 targets x (A, B)
    for key, value in init.items():
        module, which = key.rsplit(".lora_", 1)
        assert torch.equal(value, params[f"base_model.model.{module}.lora_{which}.default.weight"]), key
        if which == "B":
            assert not value.any()
    for key in init:
        assert torch.equal(trainer.init_adapter[key], init[key])


def test_missing_target_lists_available_module_names(trainer):
    assert trainer.module_names[:3] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                        "model.layers.0.mlp.down_proj"]
    with pytest.raises(PragError, match=r"\['w1'\] not found.*available Linear module names:.*'gate_proj'.*'q_proj'"):
        target_module_names(trainer.model, ["gate_proj", "w1"])


# ----------------------------------------------------------------------------- equivalence
def test_batched_trainer_matches_the_papers_peft_loop(batched, reference, trainer, sequences):
    assert_adapters_close(batched, reference)
    for i, adapter in enumerate(batched):  # the adapters did train
        for name in trainer.module_names:
            assert adapter[lora_key(name, "B")].abs().min() > 0, f"doc {i}: B of {name} still has zeros"
            assert (adapter[lora_key(name, "A")] - trainer.init_adapter[lora_key(name, "A")]).abs().max() > 1e-3
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for a in batched for t in a.values())
    stats = trainer.last_stats
    assert stats.docs == 5 and stats.steps == 12 + 2  # groups {company,nobel,mayor,river}, then {painter}
    assert stats.tokens == 2 * sum(len(s) for d in sequences for s in d)
    assert 0 <= stats.padding_fraction < 0.5


@pytest.mark.parametrize("change", [dict(docs_per_step=1, loss_chunk_tokens=16),
                                    dict(docs_per_step=5, max_padding=0.0)],
                         ids=["one-doc-per-step,chunked-loss", "all-docs,micro-batch-per-row"])
def test_batching_and_chunking_do_not_change_the_result(trainer, sequences, batched, change):
    other = BatchedLoraTrainer(trainer.model, replace(CFG, **change), init_adapter=trainer.init_adapter)
    try:
        assert_adapters_close(other.train(sequences), batched)
        if change.get("max_padding") == 0.0:
            assert other.last_stats.padded_tokens == 0
    finally:
        other.close()


def test_reference_padded_like_the_paper_matches_unpadded(tiny_model_dir, trainer, sequences, reference):
    padded = train_reference(tiny_model_dir, trainer.init_adapter, sequences[:2], CFG, pad_to=256)
    assert_adapters_close(padded, reference[:2])


def test_reference_accepts_the_init_as_a_peft_directory(tiny_model_dir, trainer, sequences, reference, tmp_path):
    from offline_encode.peft_format import write_peft_adapter

    init_dir = write_peft_adapter(trainer.init_adapter, tmp_path / "init", CFG.rank, CFG.alpha, CFG.target_modules)
    from_dir = train_reference(tiny_model_dir, init_dir, sequences[2:3], CFG)
    assert_adapters_close(from_dir, reference[2:3], atol=0, rtol=0)


def test_base_model_is_untouched_outside_training(tiny_model_dir, trainer, batched):
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(ids).logits, fresh(ids).logits, atol=1e-6, rtol=1e-6)


def test_bf16_compute_path_trains_close_to_fp32(tiny_model_dir, sequences, batched):
    """The CUDA default (bf16 activations, fp32 master weights and AdamW state), exercised on the CPU."""
    cfg = replace(CFG, compute_dtype="bfloat16")
    bf16 = BatchedLoraTrainer(tiny_model_dir, cfg)
    assert bf16.dtype == torch.bfloat16 and bf16.model.dtype == torch.bfloat16
    out = bf16.train(sequences[:2])
    for got, want in zip(out, batched[:2]):
        for key in got:
            assert got[key].dtype == torch.float32 and torch.isfinite(got[key]).all()
        b_got = torch.cat([got[k].flatten() for k in got if k.endswith("lora_B")])
        b_want = torch.cat([want[k].flatten() for k in want if k.endswith("lora_B")])
        assert torch.nn.functional.cosine_similarity(b_got, b_want, dim=0) > 0.9


def test_bad_inputs_fail_clearly(trainer):
    with pytest.raises(PragError, match="document 1 has no training sequences"):
        trainer.train([[[1, 2, 3]], []])
    with pytest.raises(PragError, match="init adapter: .*lora_A has shape"):
        bad = {k: (v[:1] if k.endswith("lora_A") else v) for k, v in trainer.init_adapter.items()}
        BatchedLoraTrainer(trainer.model, CFG, init_adapter=bad)
    with pytest.raises(PragError, match="does not exist"):
        BatchedLoraTrainer("/nonexistent/model", CFG)


def test_progress_is_reported_every_training_step_and_adds_up_to_the_documents(trainer, sequences, batched):
    """Encode progress used to move only when a whole shard (256 documents) finished."""
    calls: list[float] = []
    got = trainer.train(sequences, on_progress=calls.append)
    assert len(calls) == trainer.last_stats.steps > len(sequences)
    assert sum(calls) == pytest.approx(len(sequences), abs=1e-9)
    assert all(c > 0 for c in calls)
    assert_adapters_close(got, batched, atol=0, rtol=0)  # reporting does not change the training
