"""Smoke test of the encode throughput benchmark on the tiny fixture model (the real run uses --size small)."""

from __future__ import annotations

import json

from benchmarks.encode_throughput import main


def test_encode_benchmark_writes_json_and_table(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    result = main(["--out", str(out), "--model", str(tiny_model_dir), "--docs", "3", "--ref-docs", "1",
                   "--ref-padded-steps", "1", "--pad-to", "1024", "--docs-per-step", "1,3", "--device", "cpu"])
    saved = json.loads((out / "results.json").read_text())
    assert [r["path"] for r in saved["rows"]] == ["reference-padded", "reference", "batched-1", "batched-3"]
    assert saved["rows"][0]["docs"] == 0.2 and 0.2 < saved["rows"][0]["padding_fraction"] < 1
    for row in saved["rows"]:
        assert row["docs_per_s"] > 0 and row["tflops"] > 0
    # The batched trainer is the paper's loop: same adapters as the unpadded reference (fp32, CPU).
    assert saved["max_abs_diff_batched_vs_reference"] < 1e-5
    table = (out / "results.md").read_text()
    assert "| batched-3 | 3 |" in table and "reference-padded was timed on 1 padded step(s)" in table
    assert result["rows"] == saved["rows"]
