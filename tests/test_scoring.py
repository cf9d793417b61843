"""Answer extraction and EM/F1/precision/recall against hand-computed cases (the paper's rules)."""

from __future__ import annotations

import pytest

from engine.eval.scoring import exact_match, extract_answer, f1_precision_recall, mean_scores, normalize_answer, score


@pytest.mark.parametrize("text,cot,want", [
    (" Paris.", False, "Paris"),
    (" Paris, the capital of France.", False, "Paris"),
    (" 4 March 1901\nQuestion: next", False, "4 March 1901"),
    (" Neil Armstrong", False, "Neil Armstrong"),
    ("", False, ""),
    # chain of thought: the text after "the answer is", then the same cut
    (" The tower is in France. So the answer is Paris. Done", True, "Paris"),
    (" So The Answer Is Lyon, France.", True, "Lyon"),
    (" I do not know", True, "I do not know"),
    # without chain of thought "the answer is" is not special (the prefix was pre-filled)
    (" the answer is Paris.", False, "the answer is Paris"),
])
def test_extract_answer(text, cot, want):
    assert extract_answer(text, chain_of_thought=cot) == want


def test_normalize_answer_squad_rules():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("  THE   end ") == "end"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_best_over_aliases():
    assert exact_match("the Big Apple", ["New York City", "big apple"]) == 1.0
    assert exact_match("New York", ["New York City", "NYC"]) == 0.0
    assert exact_match("Paris", "paris.") == 1.0


def test_f1_precision_recall_known_values():
    # pred "new york" vs gold "new york city": 2 common, p = 2/2, r = 2/3, f1 = 0.8
    f1, p, r = f1_precision_recall("New York", ["New York City"])
    assert (f1, p, r) == pytest.approx((0.8, 1.0, 2 / 3))
    # best over aliases, each metric maximised separately (as the paper's code does)
    f1, p, r = f1_precision_recall("new york city hall", ["New York City", "York"])
    assert f1 == pytest.approx(2 * (3 / 4) * 1.0 / (3 / 4 + 1.0))
    assert p == pytest.approx(3 / 4)
    assert r == pytest.approx(1.0)
    assert f1_precision_recall("Berlin", ["Paris"]) == (0.0, 0.0, 0.0)
    assert f1_precision_recall("", ["Paris"]) == (0.0, 0.0, 0.0)


def test_yes_no_noanswer_must_match_exactly():
    assert score("yes", ["yes"]).f1 == 1.0
    assert score("yes", ["no"]).f1 == 0.0
    # token overlap does not rescue a yes/no mismatch ...
    assert score("no", ["no way"]).f1 == 0.0
    assert score("yes it is", ["yes"]).f1 == 0.0
    # ... but another, non-yes/no alias still scores
    assert score("no way", ["no", "no way out"]).f1 == pytest.approx(0.8)
    assert score("noanswer", ["noanswer"]).em == 1.0


def test_score_and_mean():
    a = score("Neil Armstrong", ["Neil Armstrong", "Armstrong"])
    b = score("Buzz", ["Neil Armstrong"])
    assert a.em == 1.0 and a.f1 == 1.0 and b.em == 0.0 and b.f1 == 0.0
    assert mean_scores([a, b]) == {"em": 0.5, "f1": 0.5, "precision": 0.5, "recall": 0.5}
    assert mean_scores([])["em"] == 0.0
