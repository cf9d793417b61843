"""One script per figure the README shows; ``make bench`` runs them all (benchmarks/run_all.py)."""

from __future__ import annotations

from pathlib import Path


def save_results(out: Path, result: dict, table: str) -> dict:
    """Every benchmark's outputs: ``results.json`` and the markdown ``results.md`` (also printed)."""
    from prag.io import atomic_write_json, atomic_write_text

    atomic_write_json(Path(out) / "results.json", result)
    atomic_write_text(Path(out) / "results.md", table)
    print(table)
    return result
