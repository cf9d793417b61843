"""`make bench`: run every benchmark in one process tree and collect their tables.

Each benchmark module exposes ``main(argv) -> dict`` and writes JSON + a markdown table
(``results.md``) into its own folder under ``--out``; this script concatenates the tables.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from prag.io import atomic_write_text

BENCHMARKS = ["retrieval", "encode_throughput", "serve_throughput", "server_load", "serve_affinity", "sizing"]  # sizing reads the first and last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run all benchmarks (retrieval, encode, serve).")
    parser.add_argument("--out", default="bench-output", help="output folder (default bench-output)")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    args = parser.parse_args(argv)
    out = Path(args.out)
    sections, failed = [], []
    for name in args.only or BENCHMARKS:
        t0 = time.perf_counter()
        print(f"== benchmark {name} ==", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        try:
            module.main(["--out", str(out / name)])
        except SystemExit as exc:  # argparse or an explicit exit inside the benchmark
            if exc.code:
                failed.append(name)
        table = out / name / "results.md"
        body = table.read_text() if table.exists() else "(no table written)\n"
        sections.append(f"## {name} ({time.perf_counter() - t0:.0f} s)\n\n{body}")
    atomic_write_text(out / "SUMMARY.md", "# Benchmarks\n\n" + "\n".join(sections))
    print((out / "SUMMARY.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
