"""``prag index build|search`` (filled in by the retrieval milestone)."""

from __future__ import annotations

import argparse

from prag.errors import NotImplementedYet


def _todo(args: argparse.Namespace) -> int:
    raise NotImplementedYet(f"'{args.command}' is not implemented yet")


def register(sub) -> None:
    p = sub.add_parser("index", help="build or search a dense retrieval index")
    p.set_defaults(func=_todo)
