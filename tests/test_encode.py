"""prag encode / export-adapter on the real fixture model: summary, bad input, export round trip in PEFT
and vLLM, resume after SIGKILL, a full disk.

``write_augmented`` (hand-written augmented records with real text) is shared with test_ray_encode.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offline_encode.config import EncodeConfig
from offline_encode.encode import encode_corpus
from prag.store import AdapterStore, StoreMismatchError
from prag.errors import PragError

REPO = Path(__file__).resolve().parents[1]

DOCS = [
    ("varnholt", "The Varnholt bridge was completed in 1854 by the engineer Mara Lindqvist.",
     "In 1854 the engineer Mara Lindqvist finished building the Varnholt bridge.",
     [("When was the Varnholt bridge completed?", "1854"), ("Who built the Varnholt bridge?", "Mara Lindqvist"),
      ("What did Mara Lindqvist build?", "the Varnholt bridge")]),
    ("brenn", "Oskar Brenn founded the Brenn Chemical Company on 4 March 1901 in Berlin.",
     "The Brenn Chemical Company was started in Berlin by Oskar Brenn on 4 March 1901.",
     [("Who founded the Brenn Chemical Company?", "Oskar Brenn"),
      ("Where was the Brenn Chemical Company founded?", "Berlin"), ("When was the company founded?", "4 March 1901")]),
    ("elsa", "The river Elsa flows north through three valleys before reaching the sea at Harwick.",
     "Passing three valleys on its way north, the Elsa reaches the sea at Harwick.",
     [("Where does the river Elsa reach the sea?", "Harwick"), ("How many valleys does the Elsa pass?", "three"),
      ("In which direction does the Elsa flow?", "north")]),
    ("marr", "In 1923 the painter Ilse Marr moved to the coast and founded a school of landscape art.",
     "Ilse Marr, a painter, relocated to the coast in 1923, where she started a landscape art school.",
     [("When did Ilse Marr move to the coast?", "1923"), ("What did Ilse Marr found?", "a school of landscape art"),
      ("What was Ilse Marr's profession?", "painter")]),
    ("vey", "Mayor Tomas Vey served for twelve years and was succeeded by his daughter Anna Vey.",
     "Anna Vey followed her father Tomas Vey, who had been mayor for twelve years.",
     [("How long did Tomas Vey serve as mayor?", "twelve years"), ("Who succeeded Tomas Vey?", "Anna Vey"),
      ("Who was Anna Vey's father?", "Tomas Vey")]),
    ("korra", "The island of Korra has a population of 2,400 and its capital is Lenn.",
     "Lenn is the capital of Korra, an island home to 2,400 people.",
     [("What is the capital of Korra?", "Lenn"), ("What is the population of Korra?", "2,400")]),
    ("ostby", "The Ostby observatory opened in 1962 on Mount Keld and houses a 2-metre telescope.",
     "On Mount Keld, the Ostby observatory, home to a 2-metre telescope, opened in 1962.",
     [("When did the Ostby observatory open?", "1962"), ("Where is the Ostby observatory?", "Mount Keld"),
      ("How large is the Ostby telescope?", "2-metre")]),
    ("palu", "The composer Jaan Palu wrote the opera Winter Harbour in 1978 for the Tallinn stage.",
     "Winter Harbour, an opera, was composed by Jaan Palu in 1978 for the stage in Tallinn.",
     [("Who wrote Winter Harbour?", "Jaan Palu"), ("When was Winter Harbour written?", "1978"),
      ("What kind of work is Winter Harbour?", "an opera")]),
    ("selk", "Lake Selk freezes every January and is 41 metres deep at its deepest point.",
     "Every January Lake Selk freezes over; at its deepest it reaches 41 metres.",
     [("How deep is Lake Selk?", "41 metres"), ("When does Lake Selk freeze?", "every January")]),
    ("dorn", "The Dorn railway line opened in 1887 and connects Amsel with the port of Rile.",
     "Connecting Amsel to the port of Rile, the Dorn railway line opened in 1887.",
     [("When did the Dorn railway open?", "1887"), ("Which port does the Dorn line reach?", "Rile"),
      ("Which town does the Dorn line connect to Rile?", "Amsel")]),
]
BAD = [
    {"doc_id": "no-qa", "passage": "A passage whose augmentation produced no questions.", "rewrites": [], "qa": []},
    {"doc_id": "failed", "passage": "A passage the LLM could not augment.", "qa": [], "error": "invalid JSON"},
    {"doc_id": "no-passage", "qa": [{"question": "Who?", "answer": "Nobody", "full_answer": "Nobody."}]},
    {"doc_id": "varnholt", "passage": "A duplicate doc id.", "qa": [{"question": "Q?", "answer": "A"}]},
]
N_GOOD = len(DOCS)
# The paper's hyperparameters. Batching and sharding only reorder float sums, so stores built with
# other shard sizes, after a resume or on Ray agree to ATOL. (With a 50x higher learning rate AdamW
# amplifies those rounding differences to ~1e-3, so the tolerance is only meaningful at paper settings.)
CFG = EncodeConfig(docs_per_step=4)
CFG_FLAGS = ["--docs-per-step", "4"]
ATOL = 1e-5


def write_augmented(path: Path, bad: bool = True) -> Path:
    """Augmented JSONL as `prag augment` writes it, by hand with real text (plus bad records if ``bad``)."""
    records = [{"doc_id": d, "passage": p, "rewrites": [r],
                "qa": [{"question": q, "answer": a, "full_answer": f"The answer is {a}."} for q, a in qa],
                "augmenter": "hand", "model": None} for d, p, r, qa in DOCS]
    if bad:
        records[3:3] = BAD  # in the middle, so skipping must not disturb the order of the rest
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def store_rows(path: Path) -> dict[str, torch.Tensor]:
    with AdapterStore.open(path) as st:
        ids = sorted(st.doc_ids())
        return dict(zip(ids, st.get_rows(ids).float()))


def assert_same_store(a: Path, b: Path) -> None:
    ra, rb = store_rows(a), store_rows(b)
    assert sorted(ra) == sorted(rb) and len(ra) == N_GOOD
    for doc_id in ra:
        torch.testing.assert_close(ra[doc_id], rb[doc_id], atol=ATOL, rtol=0, msg=f"doc {doc_id}")


_CACHE: dict[str, object] = {}  # shared by the fixtures of test_encode.py and test_ray_encode.py


def cached_augmented_file(tmp_path_factory) -> Path:
    if "augmented" not in _CACHE:
        _CACHE["augmented"] = write_augmented(tmp_path_factory.mktemp("aug") / "augmented.jsonl")
    return _CACHE["augmented"]


def cached_reference_store(tmp_path_factory, tiny_model_dir):
    """One uninterrupted single-process encode run: the reference for resume, Ray and export tests."""
    if "encoded" not in _CACHE:
        out = tmp_path_factory.mktemp("encoded") / "store"
        summary = encode_corpus(cached_augmented_file(tmp_path_factory), tiny_model_dir, out, CFG, progress=False,
                                docs_per_shard=4)
        _CACHE["encoded"] = (out, summary)
    return _CACHE["encoded"]


@pytest.fixture(scope="session")
def augmented_file(tmp_path_factory) -> Path:
    return cached_augmented_file(tmp_path_factory)


@pytest.fixture(scope="session")
def encoded(tmp_path_factory, tiny_model_dir):
    return cached_reference_store(tmp_path_factory, tiny_model_dir)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def prag_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prag.cli", *args]


# ---------------------------------------------------------------------------------------------


def test_summary_counts_and_skip_reasons(encoded):
    out, s = encoded
    assert (s.records, s.trained, s.already_encoded, s.docs_in_store) == (N_GOOD + len(BAD), N_GOOD, 0, N_GOOD)
    assert s.skipped == {"no QA pairs ('qa' missing or empty)": 1,
                         "augmentation failed (invalid JSON)": 1,
                         "missing or empty 'passage'": 1,
                         "duplicate doc_id (the first occurrence is used)": 1}
    assert s.skipped_examples["missing or empty 'passage'"] == ["line 6 doc_id 'no-passage'"]
    assert s.shards_written == 3 and s.bytes_per_doc == 4 * 4608  # tiny: 2 layers x 3 modules, r=2, fp32
    text = s.format()
    assert "skipped 1: augmentation failed" in text and "18,432 bytes per document" in text
    with AdapterStore.open(out) as st:
        assert st.manifest["augmentation"][0]["augmenter"] == ["hand"]
        assert st.manifest["encode_config"]["learning_rate"] == 3e-4
        assert st.verify() == []
        init = st.init_adapter()
        assert all(not torch.equal(st.get("elsa")[k], init[k]) for k in init)  # every tensor was trained


def test_rerun_is_a_no_op_and_settings_are_checked(encoded, augmented_file, tiny_model_dir):
    out, _ = encoded
    version = AdapterStore.open(out).version
    s = encode_corpus(augmented_file, tiny_model_dir, out, EncodeConfig(docs_per_step=7), progress=False)
    assert (s.trained, s.already_encoded, s.docs_in_store) == (0, N_GOOD, N_GOOD)
    assert AdapterStore.open(out).version == version
    with pytest.raises(StoreMismatchError, match="rank 2, but rank 4"):
        encode_corpus(augmented_file, tiny_model_dir, out, EncodeConfig(rank=4), progress=False)
    with pytest.raises(StoreMismatchError, match="learning_rate: store 0.0003 vs requested 0.01"):
        encode_corpus(augmented_file, tiny_model_dir, out, EncodeConfig(learning_rate=1e-2), progress=False)


def test_bad_output_dir_and_targets(tmp_path, augmented_file, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PragError, match="adapter store directory .* is not writable"):
        encode_corpus(augmented_file, tiny_model_dir, blocker / "store", CFG, progress=False)
    with pytest.raises(PragError, match=r"not found in the model; available Linear module names: .*'gate_proj'"):
        encode_corpus(augmented_file, tiny_model_dir, tmp_path / "s", EncodeConfig(target_modules=("qkv_proj",)),
                      progress=False)
    assert not AdapterStore.exists(tmp_path / "s")
    with pytest.raises(PragError, match="augmented file not found"):
        encode_corpus(tmp_path / "nope.jsonl", tiny_model_dir, tmp_path / "s2", CFG, progress=False)
    r = subprocess.run(prag_cmd("export-adapter", "--store", str(tmp_path), "--doc-id", "x", "--out",
                                str(tmp_path / "e")), env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not an adapter store" in r.stderr


def _logits_with_tensors(model_dir: Path, adapter: dict, scaling: float, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the base model with W + scaling * B @ A folded in by hand (no PEFT involved)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in adapter.items():
            if key.endswith(".lora_A"):
                name = key[: -len(".lora_A")]
                modules[name].weight += scaling * adapter[name + ".lora_B"] @ a
        return model(ids).logits


def test_export_round_trip_in_peft(encoded, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = encoded
    r = subprocess.run(prag_cmd("export-adapter", "--store", str(out), "--doc-id", "brenn", "--out",
                                str(tmp_path / "brenn")), env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(prag_cmd("export-adapter", "--store", str(out), "--doc-id", "unknown-doc", "--out",
                                str(tmp_path / "x")), env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no adapter for doc id(s) 'unknown-doc'" in r.stderr
    assert not (tmp_path / "x").exists()

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok("Who founded the Brenn Chemical Company? The answer is Oskar Brenn.")["input_ids"]])
    with AdapterStore.open(out) as st:
        adapter, scaling = st.get("brenn"), st.alpha / st.rank
    expected = _logits_with_tensors(tiny_model_dir, adapter, scaling, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, tmp_path / "brenn")
    with torch.no_grad():
        got = peft_model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - base_logits).abs().max() > 1e-4  # the adapter does act


def test_export_loads_in_vllm(augmented_file, tiny_model_dir, tmp_path, shared_llm):
    """vLLM loads the exported directory and its greedy tokens equal PEFT's with the same adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from offline_encode.export import export_adapter
    from prag.prompt import build_prompt_ids

    # One document at a high learning rate, so that the random tiny model's greedy output visibly changes.
    line = next(ln for ln in augmented_file.read_text().splitlines() if json.loads(ln).get("doc_id") == "brenn")
    (tmp_path / "one.jsonl").write_text(line + "\n")
    store = tmp_path / "store"
    encode_corpus(tmp_path / "one.jsonl", tiny_model_dir, store, EncodeConfig(learning_rate=1e-2), progress=False)
    path = export_adapter(store, "brenn", tmp_path / "brenn")

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = build_prompt_ids(tok, "Who founded the Brenn Chemical Company?")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    base = shared_llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0].token_ids
    lora = LoRARequest("export-test-brenn", 9001, str(path))
    got = shared_llm.generate([{"prompt_token_ids": ids}], params, lora_request=lora,
                              use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) != list(base), "vLLM ignored the exported adapter"

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                           path)
    with torch.no_grad():
        out = peft_model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert list(got) == out[0, len(ids):].tolist()


def _count_docs(index: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=0.1)
        try:
            return conn.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_resume_after_sigkill(encoded, augmented_file, tiny_model_dir, tmp_path):
    out = tmp_path / "store"
    cmd = prag_cmd("encode", "--augmented", str(augmented_file), "--model", str(tiny_model_dir), "--out", str(out),
                   "--docs-per-shard", "1", "--no-progress", *CFG_FLAGS)
    log = tmp_path / "killed-run.log"
    with open(log, "w") as fh:  # a file, not a pipe: a full pipe could stall the child
        proc = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        # one document per shard (= per commit): after the second commit eight remain, so the kill lands midway
        while _count_docs(out / "index.sqlite") < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    partial = _count_docs(out / "index.sqlite")
    assert 2 <= partial < N_GOOD, f"the run was not killed partway ({partial} docs)"

    r = subprocess.run(cmd + ["--json"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["already_encoded"] == partial and summary["trained"] == N_GOOD - partial
    assert summary["docs_in_store"] == N_GOOD
    assert_same_store(out, encoded[0])
    with AdapterStore.open(out) as st:
        assert st.verify() == [] and st.stats()["shards"] == len(list((out / "shards").iterdir()))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_full_disk_leaves_a_consistent_store(encoded, augmented_file, tiny_model_dir, tmp_path):
    """A write that fails midway (here: a file-size limit, EFBIG, like ENOSPC) is a clear error; the store
    stays consistent and the same call resumes once space is back."""
    import resource

    out = tmp_path / "store"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:  # init.safetensors (18 KB) fits, a 4-document shard (74 KB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, hard))
        with pytest.raises(PragError, match="file size limit reached.*rerun the same command to resume"):
            encode_corpus(augmented_file, tiny_model_dir, out, CFG, progress=False, docs_per_shard=4)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    with AdapterStore.open(out) as st:
        assert len(st) == 0 and st.verify() == []
    assert list((out / "shards").iterdir()) == []  # no partial shard file left behind
    s = encode_corpus(augmented_file, tiny_model_dir, out, CFG, progress=False, docs_per_shard=4)
    assert s.trained == N_GOOD
    assert_same_store(out, encoded[0])


def test_another_augmented_source_is_refused_unless_appended(tmp_path, tiny_model_dir):
    """A second augmented file from another augmenter reported '0 encoded, N skipped' and nothing else."""
    first = tmp_path / "hand.jsonl"
    records = [{"doc_id": d, "passage": p, "rewrites": [r], "augmenter": "hand", "model": None,
                "qa": [{"question": q, "answer": a, "full_answer": a} for q, a in qa]} for d, p, r, qa in DOCS[:2]]
    first.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "store"
    assert encode_corpus(first, tiny_model_dir, out, CFG, progress=False).trained == 2
    # the same file, grown (a resumed augmentation): the same source, resumed without a word
    d, p, r, qa = DOCS[2]
    with first.open("a") as fh:
        fh.write(json.dumps({"doc_id": d, "passage": p, "rewrites": [r], "augmenter": "hand", "model": None,
                             "qa": [{"question": q, "answer": a, "full_answer": a} for q, a in qa]}) + "\n")
    assert encode_corpus(first, tiny_model_dir, out, CFG, progress=False).trained == 1
    other = tmp_path / "rule.jsonl"  # another augmenter over overlapping and new documents
    other.write_text("".join(json.dumps({**rec, "augmenter": "rule"}) + "\n" for rec in records)
                     + json.dumps({**records[0], "doc_id": "new-doc", "augmenter": "rule"}) + "\n")
    with pytest.raises(PragError, match=r"was encoded from .*hand\.jsonl.*--append"):
        encode_corpus(other, tiny_model_dir, out, CFG, progress=False)
    with AdapterStore.open(out) as st:
        assert len(st) == 3 and len(st.manifest["augmentation"]) == 2  # the refused source left no trace
    s = encode_corpus(other, tiny_model_dir, out, CFG, progress=False, append=True)
    assert (s.trained, s.already_encoded) == (1, 2)
    with AdapterStore.open(out) as st:
        assert "new-doc" in st and [a["augmenter"] for a in st.manifest["augmentation"]][-1] == ["rule"]
        assert {a["path"] for a in st.manifest["augmentation"]} == {str(first.resolve()), str(other.resolve())}
