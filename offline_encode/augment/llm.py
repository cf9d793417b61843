"""The paper's augmentation with an LLM: one rewrite and n QA pairs per document, batched in vLLM.

A whole chunk of documents (default 256) goes to vLLM in ONE ``generate`` call (rewrite and QA
prompts together), so continuous batching keeps the device busy; the chunk is also the unit
written to disk, so a killed run loses at most one chunk.

QA uses structured output: a JSON schema for exactly ``n_qa`` objects with bounded string
lengths, so even a random model emits parsable JSON that ends before ``max_tokens`` (given
enough tokens for the bounds). No retry loop: a document whose output was still cut off, or
whose prompt does not fit the model, gets an error record with the reason.
Sampling uses a per-document seed derived from (seed, doc_id), so results do not depend on
how documents were sharded or resumed, nor (eager engine) batched: vLLM's compiled CPU model is not
batch-invariant, and there a document's tokens can change with the documents that share its batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from prag.errors import PragError
from offline_encode.augment.records import QA_KEYS, make_record, passage_of
from retrieval.corpus import Document

AUGMENTER_NAME = "llm"

# The paper's prompts (PRAG, augment step), with the QA count as a parameter.
DEFAULT_REWRITE_PROMPT = (
    "Rewrite the following passage. While keeping the entities, proper nouns, and key details such as "
    "names, locations, and terminology intact, create a new version of the text that expresses the same "
    "ideas in a different way. Make sure the revised passage is distinct from the original one, but "
    "preserves the core meaning and relevant information.\n{passage}"
)
DEFAULT_QA_PROMPT = (
    "I will provide a passage of text, and you need to generate {n_qa} different questions based on the "
    "content of this passage. Each question should be answerable using the information provided in the "
    "passage. Additionally, please provide an appropriate answer for each question derived from the "
    "passage.\nYou need to generate the question and answer in the following format:\n"
    '[{{"question": "What is the capital of France?", "answer": "Paris", '
    '"full_answer": "The capital of France is Paris."}}]\n\n'
    "This list should have exactly {n_qa} elements. You only need to output this list in the above "
    "format.\nPassage:\n{passage}"
)


@dataclass(frozen=True)
class LLMAugmenterConfig:
    model: str | None = None  # HF path/name; needed unless an engine is passed in
    n_rewrites: int = 1
    n_qa: int = 3
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    max_tokens: int = 512  # per generated rewrite / QA list
    seed: int = 0
    rewrite_prompt: str = DEFAULT_REWRITE_PROMPT  # placeholders: {passage}
    qa_prompt: str = DEFAULT_QA_PROMPT  # placeholders: {passage}, {n_qa}
    system_prompt: str | None = None
    max_question_chars: int = 150  # JSON-schema maxLength bounds: they make any model finish
    max_answer_chars: int = 60
    max_full_answer_chars: int = 200
    include_title: str = "auto"  # see records.passage_of
    chunk_size: int = 256  # documents per vLLM call and per written batch
    # engine settings used only when the augmenter builds its own engine
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's own context length
    engine_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.n_qa < 1 or self.n_rewrites < 0:
            raise PragError(f"n_qa must be >= 1 and n_rewrites >= 0 (got {self.n_qa}, {self.n_rewrites})")
        if self.max_tokens < 16:
            raise PragError(f"max_tokens must be >= 16, got {self.max_tokens}")
        if self.temperature < 0:
            raise PragError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("max_question_chars", "max_answer_chars", "max_full_answer_chars", "chunk_size"):
            if getattr(self, name) < 1:
                raise PragError(f"{name} must be >= 1")
        for name, tmpl in (("rewrite_prompt", self.rewrite_prompt), ("qa_prompt", self.qa_prompt)):
            if "{passage}" not in tmpl:
                raise PragError(f"{name} must contain the placeholder {{passage}}")


def qa_schema(n_qa: int, max_question_chars: int = 150, max_answer_chars: int = 60,
              max_full_answer_chars: int = 200) -> dict:
    """JSON schema of exactly ``n_qa`` {question, answer, full_answer} objects with bounded strings."""
    def text(max_len: int) -> dict:
        return {"type": "string", "minLength": 1, "maxLength": max_len}

    return {
        "type": "array", "minItems": n_qa, "maxItems": n_qa,
        "items": {
            "type": "object",
            "properties": {"question": text(max_question_chars), "answer": text(max_answer_chars),
                           "full_answer": text(max_full_answer_chars)},
            "required": list(QA_KEYS), "additionalProperties": False,
        },
    }


def doc_seed(seed: int, doc_id: str, salt: str) -> int:
    """A per-document sampling seed, independent of batching and resume order."""
    digest = hashlib.sha256(f"{seed}\0{salt}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def clean_text(text: str) -> str:
    """Drop what UTF-8 cannot hold: a weak model can emit lone surrogates through JSON escapes."""
    return text.encode("utf-8", "replace").decode("utf-8").strip()


def parse_qa(text: str, n_qa: int) -> list[dict]:
    """Parse a structured-output QA list (strict=False: the grammar lets control chars into strings)."""
    data = json.loads(text, strict=False)
    if not isinstance(data, list) or not data:
        raise ValueError("QA output is not a non-empty JSON list")
    pairs = []
    for item in data[:n_qa]:
        if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in QA_KEYS):
            raise ValueError("QA item lacks string question/answer/full_answer")
        pairs.append({k: clean_text(item[k]) for k in QA_KEYS})
    return pairs


def _engine_model_name(llm) -> str | None:
    for getter in (lambda: llm.llm_engine.model_config.model, lambda: llm.model_config.model):
        try:
            return str(getter())
        except AttributeError:
            continue
    return None


class LLMAugmenter:
    """Rewrite + QA generation on a vLLM engine (``llm``), or one built lazily from ``cfg.model``."""

    name = AUGMENTER_NAME

    def __init__(self, cfg: LLMAugmenterConfig, llm=None):
        cfg.validate()
        if llm is None and not cfg.model:
            raise PragError("the llm augmenter needs a model: pass --model (a Hugging Face name or local path)")
        self.cfg = cfg
        self._llm = llm
        self.batch_size = cfg.chunk_size
        self._model_name = cfg.model or _engine_model_name(llm)

    @property
    def model(self) -> str | None:
        return self._model_name

    @property
    def llm(self):
        if self._llm is None:  # built on first use: a fully resumed run never starts an engine
            from engine.vllm_backend.llm import LLMConfig, has_cuda, make_llm

            engine_args = dict(self.cfg.engine_args)
            if not has_cuda():
                # Per-document seeds give each request its own torch.Generator. When vLLM chunks a
                # prefill it rewinds that generator (set_offset), which CPU generators cannot do
                # ("CPU Generator does not use offset"), so on a CPU every prompt is prefilled whole;
                # vLLM then raises the step's token budget to max_model_len by itself.
                engine_args.setdefault("enable_chunked_prefill", False)
            self._llm = make_llm(LLMConfig(model=self.cfg.model, dtype=self.cfg.dtype, enable_lora=False,
                                           max_model_len=self.cfg.max_model_len, seed=self.cfg.seed,
                                           structured_output=True, engine_args=engine_args))
        return self._llm

    def _prompt_ids(self, tokenizer, user: str) -> list[int]:
        messages = [{"role": "user", "content": user}]
        if self.cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _sampling(self, kind: str, doc_id: str, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        cfg = self.cfg
        kw: dict[str, Any] = dict(temperature=cfg.temperature, top_k=cfg.top_k if cfg.top_k > 0 else -1,
                                  top_p=cfg.top_p, max_tokens=max_tokens, seed=doc_seed(cfg.seed, doc_id, kind))
        if kind == "rewrite":
            return SamplingParams(n=cfg.n_rewrites, **kw)
        schema = qa_schema(cfg.n_qa, cfg.max_question_chars, cfg.max_answer_chars, cfg.max_full_answer_chars)
        return SamplingParams(structured_outputs=StructuredOutputsParams(json=schema), **kw)

    def augment_documents(self, docs: list[Document]) -> list[dict]:
        """One vLLM call for the whole batch; each document gets a record (or an error record)."""
        cfg = self.cfg
        llm = self.llm
        tokenizer = llm.get_tokenizer()
        max_len = llm.llm_engine.model_config.max_model_len
        passages = [passage_of(d, cfg.include_title) for d in docs]
        errors: dict[int, str] = {}
        prompts, params, owners = [], [], []  # owners: (doc index, "rewrite"|"qa")
        for i, (doc, passage) in enumerate(zip(docs, passages)):
            jobs = [("qa", cfg.qa_prompt.format(passage=passage, n_qa=cfg.n_qa))]
            if cfg.n_rewrites:
                jobs.insert(0, ("rewrite", cfg.rewrite_prompt.format(passage=passage)))
            built = []
            for kind, user in jobs:
                ids = self._prompt_ids(tokenizer, user)
                room = max_len - len(ids)
                if room < 16:
                    errors[i] = (f"passage_too_long: the {kind} prompt has {len(ids)} tokens; "
                                 f"the model allows {max_len} in all")
                    break
                built.append((kind, ids, min(cfg.max_tokens, room)))
            if i in errors:
                continue
            for kind, ids, max_tokens in built:
                prompts.append({"prompt_token_ids": ids})
                params.append(self._sampling(kind, doc.id, max_tokens))
                owners.append((i, kind))
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
        except ValueError as exc:  # vLLM rejected the batch's input: record it, keep the run going
            reason = f"generation_rejected: {type(exc).__name__}: {exc}"
            return [make_record(d.id, p, [], [], self.name, self.model, error=errors.get(i, reason))
                    for i, (d, p) in enumerate(zip(docs, passages))]
        rewrites: dict[int, list[str]] = {}
        qas: dict[int, list[dict]] = {}
        for (i, kind), out in zip(owners, outputs):
            if kind == "rewrite":
                texts = [clean_text(c.text) for c in out.outputs]
                if not all(texts):
                    errors.setdefault(i, "empty_rewrite: the model returned an empty rewrite")
                rewrites[i] = texts
                continue
            comp = out.outputs[0]
            try:
                qas[i] = parse_qa(comp.text, cfg.n_qa)
            except ValueError as exc:
                why = ("qa_truncated: the QA list hit max_tokens before the JSON closed; raise --max-tokens"
                       if comp.finish_reason == "length" else f"qa_unparsable: {exc}")
                errors.setdefault(i, why)
        records = []
        for i, (doc, passage) in enumerate(zip(docs, passages)):
            records.append(make_record(doc.id, passage, rewrites.get(i, []), qas.get(i, []), self.name,
                                       self.model, error=errors.get(i)))
        return records
