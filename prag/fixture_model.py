"""A small Llama-architecture model built locally, so tests and the demo need no downloads.

The weights are random from a fixed seed and the tokenizer is a byte-level BPE trained on the
given corpus (or a built-in text). Both are deterministic: building the same size twice gives
byte-identical files. head_dim is 64 because vLLM's CPU attention rejects small head sizes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from prag.errors import PragError
from prag.io import OutputKind, atomic_output_dir, atomic_write_json, check_output_dir, json_marker
from prag.prompt import DEFAULT_COT_USER_TEMPLATE, DEFAULT_USER_TEMPLATE

FIXTURE_FILE = "fixture.json"
# only a folder holding our fixture.json is a previous fixture model; --overwrite never replaces anything else
FIXTURE_OUTPUT = OutputKind("a fixture model", "prag fixture-model", json_marker(FIXTURE_FILE, "size", "parameters"))

BOS, EOS, PAD, UNK = "<s>", "<|end|>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]

# A plain-text chat format: every turn is "<|role|>\n content <|end|>\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class FixtureSize:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 64
    max_position_embeddings: int = 2048


SIZES: dict[str, FixtureSize] = {
    # ~0.6M parameters: fast enough for every test.
    "tiny": FixtureSize(1024, 128, 256, 2, 2, 2),
    # ~35M parameters: big enough that CPU benchmarks measure compute, not overhead.
    "small": FixtureSize(8192, 512, 1408, 8, 8, 8),
}

BUILTIN_TEXT = [
    DEFAULT_USER_TEMPLATE,
    DEFAULT_COT_USER_TEMPLATE,
    "The answer is",
    "Passage 1: Passage 2: Passage 3: Question: Answer:",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Who was born in the city of Varnholt in 1854? When was the bridge completed? What is the capital of the province?",
    "In 1923 the painter moved to the coast, where she founded a small school of landscape art.",
    "The river flows north through three valleys before it reaches the sea near the old harbour town.",
    "He served as mayor for twelve years and was succeeded by his daughter, an engineer and inventor.",
    "The company was founded on 4 March 1901 by two brothers who had studied chemistry in Berlin.",
    "January February March April May June July August September October November December",
    "zero one two three four five six seven eight nine ten hundred thousand million",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 1900 1950 2000 2020",
]


def _train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _corpus_texts(corpus: str | Path) -> Iterator[str]:
    from retrieval.corpus import iter_corpus  # local import: retrieval depends on prag, not vice versa

    for doc in iter_corpus(corpus):
        yield f"{doc.title}\n{doc.text}" if doc.title else doc.text


def build_fixture_model(out_dir: str | Path, size: str = "tiny", corpus: str | Path | None = None,
                        seed: int = 0, extra_texts: Iterable[str] = (), overwrite: bool = False) -> Path:
    """Write a HF-format Llama model + tokenizer to ``out_dir`` (atomically) and return the path.

    ``out_dir`` must be new or empty; a previous fixture model is replaced only with ``overwrite``,
    and any other folder or file is refused (never deleted).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise PragError(f"--size must be one of {sorted(SIZES)}, got {size!r}")
    spec = SIZES[size]
    check_output_dir(out_dir, FIXTURE_OUTPUT, overwrite=overwrite, inputs=(corpus,))  # before the slow part
    texts = list(BUILTIN_TEXT) + list(extra_texts)
    if corpus is not None:
        texts += list(_corpus_texts(corpus))
    tokenizer = _train_tokenizer(texts, spec.vocab_size)
    if len(tokenizer) > spec.vocab_size:
        raise PragError(f"tokenizer has {len(tokenizer)} tokens, more than the model's {spec.vocab_size}")

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    with atomic_output_dir(out_dir, FIXTURE_OUTPUT, overwrite=overwrite, inputs=(corpus,)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / FIXTURE_FILE, {"size": size, "seed": seed, **asdict(spec),
                                                 "parameters": sum(p.numel() for p in model.parameters())})
    return Path(out_dir)


def parameter_count(model_dir: str | Path) -> int:
    return json.loads((Path(model_dir) / FIXTURE_FILE).read_text())["parameters"]
