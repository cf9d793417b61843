"""``prag eval|serve`` (filled in by the engine milestone)."""

from __future__ import annotations

import argparse

from prag.errors import NotImplementedYet


def _todo(args: argparse.Namespace) -> int:
    raise NotImplementedYet(f"'{args.command}' is not implemented yet")


def register(sub) -> None:
    for name, help_ in [("eval", "evaluate none/rag/prag/combine on a QA dataset"),
                        ("serve", "OpenAI-compatible HTTP server")]:
        sub.add_parser(name, help=f"{help_} (not implemented yet)").set_defaults(func=_todo)
