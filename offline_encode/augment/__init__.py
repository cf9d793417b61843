"""Augmentation: per document, rewrite(s) + QA pairs, as resumable JSONL (docs/method.md, section 1).

``augment_corpus(corpus, out, RuleAugmenter(cfg) | LLMAugmenter(cfg, llm=None))`` is the entry
point; ``augment_documents(docs)`` on either augmenter is the per-batch unit a Ray job can shard.
The LLM module imports vLLM lazily, so importing this package stays cheap.
"""

from offline_encode.augment.llm import LLMAugmenter, LLMAugmenterConfig, qa_schema
from offline_encode.augment.records import (ResumableJsonlWriter, iter_augmented, make_record, passage_of,
                                            record_problem)
from offline_encode.augment.rule import RuleAugmenter, RuleAugmenterConfig
from offline_encode.augment.run import AugmentSummary, Augmenter, augment_corpus

__all__ = ["AugmentSummary", "Augmenter", "LLMAugmenter", "LLMAugmenterConfig", "ResumableJsonlWriter",
           "RuleAugmenter", "RuleAugmenterConfig", "augment_corpus", "iter_augmented", "make_record",
           "passage_of", "qa_schema", "record_problem"]
