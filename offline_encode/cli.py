"""``prag augment|encode|export-adapter`` (filled in by the offline-encoding milestone)."""

from __future__ import annotations

import argparse

from prag.errors import NotImplementedYet


def _todo(args: argparse.Namespace) -> int:
    raise NotImplementedYet(f"'{args.command}' is not implemented yet")


def register(sub) -> None:
    for name, help_ in [("augment", "augment documents with rewrites + QA pairs"),
                        ("encode", "train one LoRA adapter per document into an adapter store"),
                        ("export-adapter", "export one document's adapter as a PEFT directory")]:
        sub.add_parser(name, help=f"{help_} (not implemented yet)").set_defaults(func=_todo)
