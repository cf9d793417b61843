"""The serving benchmark runs end to end at toy size and writes what `make bench` reports."""

from __future__ import annotations

import json

from tests.conftest import shared_data_file


def test_serve_benchmark_writes_json_table_and_chart(tmp_path):
    shared_data_file("nq_open_oracle.jsonl.gz")
    from benchmarks.serve_throughput import main

    out = tmp_path / "serve"
    result = main(["--out", str(out), "--size", "tiny", "--n", "4", "--corpus-size", "12", "--reference-n", "2",
                   "--dtype", "float32", "--max-loras", "4", "--repeats", "2",
                   "--no-compare-driver"])  # the AsyncLLM driver has its own tests (test_driver.py)
    modes = result["modes"]
    # the other hand-over is timed beside the main one when vLLM's worker is in this process (memory
    # possible); in a test session that already holds an in-process engine, this one runs out of process
    other = {"prag (dir hand-over)"} if modes["prag"]["handover"] == "memory" else set()
    assert modes["prag"]["handover"] in ("memory", "dir")
    assert set(modes) == {"none", "rag", "prag", "combine", "prag (warm cache)", "reference (PEFT, batch 1)"} | other
    for name in {"prag"} | other:  # the cold-batch breakdown: store read, merge, hand-over, slot fill, model
        b = modes[name]["breakdown_s"]
        assert b["store_read"] > 0 and b["merge"] > 0 and b["model"] > 0
        assert (b["dir_write"] > 0) == (modes[name]["handover"] == "dir")
    for name, row in modes.items():
        assert row["questions"] == (2 if name.startswith("reference") else 4)
        assert row["questions_per_s"] > 0 and row["generated_tokens"] > 0
    # fp32: the engine (grouped CPU LoRA ops) and the PEFT loop give the same tokens
    assert modes["reference (PEFT, batch 1)"]["identical_to_engine"] == "2/2"
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["dtype"] == "float32" and saved["meta"]["repeats"] == 2
    for name, row in modes.items():  # the table row is the median run of the repeats
        assert len(row["runs_questions_per_s"]) == 2
        assert round(row["questions_per_s"], 3) == min(row["runs_questions_per_s"])
    assert len(saved["ratio_runs"]["prag_vs_reference"]) == 2
    lo, hi = sorted(saved["ratio_runs"]["prag_vs_reference"])
    assert lo - 1e-3 <= saved["ratios"]["prag_vs_reference"] <= hi + 1e-3
    assert modes["prag"]["vs_reference"] == saved["ratios"]["prag_vs_reference"]  # table and ratio agree
    assert modes["rag"]["vs_rag"] == 1.0
    md = (out / "results.md").read_text()
    assert "| prag |" in md and "| vs none |" in md and f"| {modes['prag']['handover']} |" in md
    assert (out / "throughput.png").stat().st_size > 1000
