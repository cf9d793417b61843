"""Answer extraction and EM/F1 scoring, following the paper's evaluation code (docs/method.md, section 4).

* Extraction: with chain of thought, keep the text after the first "the answer is"
  (case-insensitive; the paper matches lower case only, which this includes); then cut at the
  first '.', newline or ','.
* Normalisation (SQuAD): lower case, drop punctuation, drop articles (a/an/the), collapse spaces.
* EM: 1 if the normalised prediction equals any normalised gold alias.
* F1 / precision / recall: token overlap, best over aliases (each metric maximised separately,
  as the paper does). If either side normalises to yes/no/noanswer, that alias scores 0 unless
  both are identical.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_STOPS = (".", "\n", ",")
_SPECIAL = {"yes", "no", "noanswer"}
COT_MARKER = "the answer is"


def extract_answer(text: str, chain_of_thought: bool = False) -> str:
    """The short answer inside a generated continuation."""
    pred = text
    if chain_of_thought:
        pos = pred.lower().find(COT_MARKER)
        if pos != -1:
            pred = pred[pos + len(COT_MARKER):]
    pred = pred.strip()
    cut = min((p for p in (pred.find(s) for s in _STOPS) if p != -1), default=-1)
    if cut != -1:
        pred = pred[:cut]
    return pred.strip()


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _aliases(gold: str | Iterable[str]) -> list[str]:
    if isinstance(gold, str):
        return [gold]
    out = [g for g in gold if isinstance(g, str)]
    return out


def exact_match(prediction: str, gold: str | Iterable[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _aliases(gold)))


@dataclass(frozen=True)
class Score:
    em: float
    f1: float
    precision: float
    recall: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def f1_precision_recall(prediction: str, gold: str | Iterable[str]) -> tuple[float, float, float]:
    pred = normalize_answer(prediction)
    pred_tokens = pred.split()
    best_f1 = best_p = best_r = 0.0
    for g in _aliases(gold):
        ref = normalize_answer(g)
        if (pred in _SPECIAL or ref in _SPECIAL) and pred != ref:
            continue
        ref_tokens = ref.split()
        common = Counter(pred_tokens) & Counter(ref_tokens)
        same = sum(common.values())
        if same == 0:
            continue
        p = same / len(pred_tokens)
        r = same / len(ref_tokens)
        best_p, best_r = max(best_p, p), max(best_r, r)
        best_f1 = max(best_f1, 2 * p * r / (p + r))
    return best_f1, best_p, best_r


def score(prediction: str, gold: str | Sequence[str]) -> Score:
    """EM, F1, precision and recall of one (already extracted) prediction against its aliases."""
    f1, p, r = f1_precision_recall(prediction, gold)
    return Score(em=exact_match(prediction, gold), f1=f1, precision=p, recall=r)


def mean_scores(scores: Sequence[Score]) -> dict[str, float]:
    n = len(scores)
    if n == 0:
        return {"em": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    return {k: sum(getattr(s, k) for s in scores) / n for k in ("em", "f1", "precision", "recall")}
