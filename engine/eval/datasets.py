"""QA dataset loaders: each public file format -> ``{"id", "question", "answers": [str], "type"?}``.

Records are plain dicts so a shard of them can be shipped to another process (Ray) as is.
``load_dataset(name, path)`` is the one entry point; ``DATASETS`` lists the valid names.
Bad input fails with the file and the record (line or index) at fault; ids must be unique,
because resumable evaluation keys its progress by id.
"""

from __future__ import annotations

import ast
import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from prag.errors import PragError
from prag.io import check_readable, iter_jsonl, open_text, read_json

Example = dict[str, Any]


def _parse_list(value: Any, where: str, field: str) -> list:
    """PopQA stores alias lists as JSON (or Python-literal) strings inside TSV/JSON cells."""
    if isinstance(value, list):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, list):
                return parsed
    raise PragError(f"{where}: field {field!r} is not a list of strings: {str(value)[:80]!r}")


def _example(where: str, qid: Any, question: Any, answers: Iterable[Any], qtype: Any = None) -> Example:
    if not isinstance(question, str):
        raise PragError(f"{where}: field 'question' must be a string, got {type(question).__name__}")
    answers = list(answers)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise PragError(f"{where}: answers must be a non-empty list of strings, got {str(answers)[:80]!r}")
    seen: set[str] = set()
    uniq = [a for a in answers if not (a in seen or seen.add(a))]
    ex: Example = {"id": str(qid), "question": question, "answers": uniq}
    if qtype not in (None, ""):
        ex["type"] = str(qtype)
    return ex


def _require(rec: dict, where: str, *fields: str) -> None:
    for f in fields:
        if f not in rec:
            raise PragError(f"{where}: missing field {f!r}")


def _resolve(path: str | Path, default_name: str) -> Path:
    """Accept either the file itself or the folder the public release unpacks into."""
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    return check_readable(path, "dataset file")


def _json_list(path: Path) -> list:
    data = read_json(path, "dataset file")
    if not isinstance(data, list):
        raise PragError(f"{path}: expected a JSON list of question records, got {type(data).__name__}")
    return data


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".jsonl"):
        return True
    if name.endswith(".json"):
        with open_text(path) as fh:
            head = fh.read(4096).lstrip()
        return not head.startswith("[")
    raise PragError(f"cannot tell the format of {path}: use .json (a list) or .jsonl (one record a line)")


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` from a JSON list or a JSONL file (gz aware)."""
    if _is_jsonl(path):
        for lineno, rec in iter_jsonl(path, "dataset file"):
            yield f"{path}:{lineno}", rec
    else:
        for i, rec in enumerate(_json_list(path)):
            if not isinstance(rec, dict):
                raise PragError(f"{path}[{i}]: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}[{i}]", rec


def load_2wikimultihopqa(path: str | Path) -> Iterator[Example]:
    """``dev.json`` (with ``answer_id``) plus ``id_aliases.json`` (JSONL ``{Q_id, aliases}``) beside it."""
    path = _resolve(path, "dev.json")
    alias_file = path.parent / "id_aliases.json"
    aliases: dict[str, list[str]] = {}
    if alias_file.exists():
        for lineno, rec in iter_jsonl(alias_file, "2WikiMultihopQA alias file"):
            if "Q_id" in rec and isinstance(rec.get("aliases"), list):
                aliases[str(rec["Q_id"])] = [a for a in rec["aliases"] if isinstance(a, str)]
    else:
        print(f"warning: {alias_file} not found; scoring 2WikiMultihopQA against 'answer' only",
              file=sys.stderr)
    for i, rec in enumerate(_json_list(path)):
        where = f"{path}[{i}]"
        _require(rec, where, "_id", "question", "answer")
        ans_id = rec.get("answer_id")
        answers = aliases.get(str(ans_id)) if ans_id else None
        # The paper scores against the aliases of answer_id when it has one, else the answer text.
        yield _example(where, rec["_id"], rec["question"], answers or [rec["answer"]], rec.get("type"))


def load_hotpotqa(path: str | Path) -> Iterator[Example]:
    """The original distractor file (``context``, ``supporting_facts``); sub-type from ``type``."""
    path = _resolve(path, "hotpot_dev_distractor_v1.json")
    for i, rec in enumerate(_json_list(path)):
        where = f"{path}[{i}]"
        _require(rec, where, "_id", "question", "answer")
        yield _example(where, rec["_id"], rec["question"], [rec["answer"]], rec.get("type"))


def load_popqa(path: str | Path) -> Iterator[Example]:
    """PopQA as the TSV (``obj`` + ``o_aliases``) or as JSON/JSONL with ``possible_answers``; type = ``prop``."""
    path = _resolve(path, "popQA.tsv")
    if path.name.lower().removesuffix(".gz").endswith(".tsv"):
        csv.field_size_limit(sys.maxsize)
        with open_text(path) as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            missing = {"question", "obj"} - set(reader.fieldnames or [])
            if missing:
                raise PragError(f"{path}:1: PopQA TSV header lacks {sorted(missing)}")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                answers = [row["obj"], *_parse_list(row.get("o_aliases"), where, "o_aliases")]
                qid = row.get("id") or str(reader.line_num - 2)
                yield _example(where, qid, row["question"], answers, row.get("prop"))
        return
    for n, (where, rec) in enumerate(_records(path)):
        _require(rec, where, "question")
        if "possible_answers" in rec:
            answers = _parse_list(rec["possible_answers"], where, "possible_answers")
        elif "obj" in rec:
            answers = [rec["obj"], *_parse_list(rec.get("o_aliases"), where, "o_aliases")]
        else:
            raise PragError(f"{where}: missing field 'possible_answers' (or 'obj')")
        yield _example(where, rec.get("id", n), rec["question"], answers, rec.get("prop"))


def load_complexwebquestions(path: str | Path) -> Iterator[Example]:
    """``ComplexWebQuestions_dev.json``: ``answers`` = [{answer, aliases}]; type = compositionality_type."""
    path = _resolve(path, "ComplexWebQuestions_dev.json")
    for n, (where, rec) in enumerate(_records(path)):
        _require(rec, where, "question", "answers")
        if not isinstance(rec["answers"], list):
            raise PragError(f"{where}: field 'answers' must be a list of {{answer, aliases}} objects")
        answers: list[str] = []
        for a in rec["answers"]:
            if isinstance(a, dict):
                answers += [a.get("answer")] + list(a.get("aliases") or [])
            else:
                answers.append(a)
        answers = [a for a in answers if a is not None]
        qid = rec.get("ID", rec.get("id", n))
        yield _example(where, qid, rec["question"], answers, rec.get("compositionality_type"))


def load_nq(path: str | Path) -> Iterator[Example]:
    """NQ-open JSONL (``question`` + ``answer`` or ``answers``; gz accepted, e.g. the oracle file)."""
    path = check_readable(path, "dataset file")
    for n, (where, rec) in enumerate(_records(path)):
        _require(rec, where, "question")
        answers = rec.get("answers", rec.get("answer"))
        if answers is None:
            raise PragError(f"{where}: missing field 'answers' (or 'answer')")
        answers = [answers] if isinstance(answers, str) else answers
        yield _example(where, rec.get("id", f"nq-{n}"), rec["question"], answers)


def load_generic(path: str | Path) -> Iterator[Example]:
    """``{id?, question, answer: str | [str]}`` (``answers`` accepted too; optional ``type``), JSON or JSONL."""
    path = check_readable(path, "dataset file")
    for n, (where, rec) in enumerate(_records(path)):
        _require(rec, where, "question")
        if "answers" in rec:
            answers = rec["answers"]
        elif "answer" in rec:
            answers = rec["answer"]
        else:
            raise PragError(f"{where}: missing field 'answer' (or 'answers')")
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list):
            raise PragError(f"{where}: field 'answer' must be a string or a list of strings")
        yield _example(where, rec.get("id", n), rec["question"], answers, rec.get("type"))


DATASETS: dict[str, Callable[[str | Path], Iterator[Example]]] = {
    "2wikimultihopqa": load_2wikimultihopqa,
    "hotpotqa": load_hotpotqa,
    "popqa": load_popqa,
    "complexwebquestions": load_complexwebquestions,
    "nq": load_nq,
    "generic": load_generic,
}
ALIASES = {"2wiki": "2wikimultihopqa", "2wikimqa": "2wikimultihopqa", "cwq": "complexwebquestions",
           "nq-open": "nq", "nq_open": "nq", "nqopen": "nq", "hotpot": "hotpotqa"}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def resolve_dataset_name(name: str) -> str:
    """The canonical loader name for ``name`` (aliases like 'cwq' accepted); unknown names list the valid ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise PragError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    return key


def load_dataset(name: str, path: str | Path, limit: int | None = None) -> list[Example]:
    """All examples of ``path`` read as dataset ``name`` (first ``limit`` if given); ids must be unique."""
    key = resolve_dataset_name(name)
    if limit is not None and limit < 0:
        raise PragError(f"--limit must be >= 0, got {limit}")
    out: list[Example] = []
    seen: set[str] = set()
    for ex in DATASETS[key](path):
        if limit is not None and len(out) >= limit:
            break
        if ex["id"] in seen:
            raise PragError(f"{path}: duplicate question id {ex['id']!r}")
        seen.add(ex["id"])
        out.append(ex)
    return out
