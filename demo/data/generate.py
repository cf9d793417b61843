"""Deterministic generator of the demo's fictional corpus, its questions and the pre-training set.

Everything is invented (people, towns, years), so a model can only answer from the documents.
The demo corpus and the pre-training documents use disjoint names: pre-training teaches the
question/answer *format*, never the demo's facts. Run ``python -m demo.data.generate`` to
rewrite the committed files; the output is byte-identical for the same seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
DEMO_CORPUS = DATA_DIR / "corpus.jsonl"
DEMO_QUESTIONS = DATA_DIR / "questions.jsonl"
PRETRAIN = DATA_DIR / "pretrain.jsonl"

N_DEMO_DOCS = 60
N_PRETRAIN_DOCS = 600
SEED = 20261128

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st",
           "t", "th", "v", "w", "z", "sh", "c", "j", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "v", "x", "ck"]
_TOWN_ENDINGS = ["ford", "wick", "holm", "stead", "mere", "dale", "bury", "haven", "gate", "moor"]

OCCUPATIONS = ["clockmaker", "botanist", "sculptor", "cartographer", "violinist", "astronomer", "glassblower",
               "beekeeper", "shipwright", "poet", "architect", "chemist", "weaver", "surgeon", "bookbinder",
               "potter", "engineer", "painter", "geologist", "librarian", "baker", "lighthouse keeper",
               "mathematician", "tailor", "blacksmith", "pianist", "novelist", "brewer", "jeweller", "falconer"]

# Several phrasings per fact, so the text and its rewrites are not one fixed template. Every sentence
# names the person (no pronouns) and keeps its time adverbial last, the shape the rule augmenter
# turns into clean questions ("When was X born?", "X married whom?").
_BORN_SENTENCES = [
    "{name} was born in {year} in the town of {town}.",
    "{name} was born in the town of {town} in {year}.",
]
_WORK_SENTENCES = [
    "{name} worked as a {job} in the city of {city}.",
    "{name} was a {job} in the city of {city}.",
]
_SPOUSE_SENTENCES = [
    "{name} married {spouse}.",
    "{name} married {spouse} in the spring.",
]
_FOUNDED_SENTENCES = [
    "{name} founded the {org} in {founded}.",
    "{name} established the {org} in {founded}.",
]

# The demo asks these questions (natural wording, not the augmenter's); pre-training asks the same
# kinds about other people.
QUESTION_TEMPLATES = {
    "birth_year": "When was {name} born?",
    "birth_town": "In which town was {name} born?",
    "work_city": "In which city did {name} work?",
    "spouse": "Who did {name} marry?",
    "organisation": "What did {name} found?",
    "founded_year": "When was the {org} founded?",
}
_ORG_KINDS = ["Company", "Society", "Museum", "Library", "Academy", "Observatory", "Brewery", "Theatre"]


@dataclass(frozen=True)
class Person:
    name: str
    year: int
    town: str
    job: str
    city: str
    spouse: str
    org: str
    founded: int


class _Names:
    """Invented names, never handed out twice, so demo and pre-training entities are disjoint."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _word(self, syllables: int) -> str:
        parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables)]
        return ("".join(parts) + self.rng.choice(_CODAS)).capitalize()

    def _unique(self, make) -> str:
        while True:
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name

    def person(self) -> str:
        return self._unique(lambda: f"{self._word(2)} {self._word(self.rng.choice([2, 3]))}")

    def town(self) -> str:
        return self._unique(lambda: self._word(self.rng.choice([1, 2])) + self.rng.choice(_TOWN_ENDINGS))

    def org(self) -> str:
        return self._unique(lambda: f"{self._word(2)} {self.rng.choice(_ORG_KINDS)}")


def _people(n: int, names: _Names, rng: random.Random) -> list[Person]:
    people = []
    for _ in range(n):
        year = rng.randint(1650, 1950)
        people.append(Person(name=names.person(), year=year, town=names.town(), job=rng.choice(OCCUPATIONS),
                             city=names.town(), spouse=names.person(), org=names.org(),
                             founded=year + rng.randint(20, 60)))
    return people


def document_text(p: Person, rng: random.Random) -> str:
    fields = dict(name=p.name, year=p.year, town=p.town, job=p.job, city=p.city, spouse=p.spouse, org=p.org,
                  founded=p.founded)
    sentences = [rng.choice(t).format(**fields) for t in (_BORN_SENTENCES, _WORK_SENTENCES, _SPOUSE_SENTENCES,
                                                            _FOUNDED_SENTENCES)]
    return " ".join([sentences[0], *rng.sample(sentences[1:], 3)])


def qa_pairs(p: Person) -> list[dict]:
    answers = {"birth_year": str(p.year), "birth_town": p.town, "work_city": p.city, "spouse": p.spouse,
               "organisation": p.org, "founded_year": str(p.founded)}
    return [{"type": t, "question": QUESTION_TEMPLATES[t].format(name=p.name, org=p.org), "answer": answers[t]}
            for t in QUESTION_TEMPLATES]


def generate(n_demo: int = N_DEMO_DOCS, n_pretrain: int = N_PRETRAIN_DOCS, seed: int = SEED):
    """Return (demo corpus, demo questions, pre-training records) as lists of dicts."""
    rng = random.Random(seed)
    names = _Names(rng)
    demo_people = _people(n_demo, names, rng)
    pre_people = _people(n_pretrain, names, rng)
    corpus, questions, pretrain = [], [], []
    for i, p in enumerate(demo_people):
        doc_id = f"demo-{i:03d}"
        corpus.append({"id": doc_id, "title": p.name, "text": document_text(p, rng)})
        for qa in qa_pairs(p):
            questions.append({"id": f"{doc_id}-{qa['type']}", "question": qa["question"], "answer": qa["answer"],
                              "type": qa["type"], "doc_id": doc_id})
    for i, p in enumerate(pre_people):
        pretrain.append({"id": f"pre-{i:04d}", "title": p.name, "text": document_text(p, rng),
                         "rewrite": document_text(p, rng), "qa": qa_pairs(p)})
    return corpus, questions, pretrain


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    corpus, questions, pretrain = generate()
    _write_jsonl(DEMO_CORPUS, corpus)
    _write_jsonl(DEMO_QUESTIONS, questions)
    _write_jsonl(PRETRAIN, pretrain)
    print(f"wrote {len(corpus)} documents, {len(questions)} questions, {len(pretrain)} pre-training documents")


if __name__ == "__main__":
    main()
