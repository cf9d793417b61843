"""The ``prag`` command line: a thin layer over the library.

Each pipeline package registers its own subcommands (``register(subparsers)`` in its ``cli``
module); handlers only translate flags into a typed config and call one library function.
"""

from __future__ import annotations

import argparse
import sys

from prag import __version__
from prag.errors import PragError
from prag.logs import setup_logging


def _fixture_model(args: argparse.Namespace) -> int:
    from prag.fixture_model import build_fixture_model, parameter_count

    out = build_fixture_model(args.out, size=args.size, corpus=args.corpus, seed=args.seed,
                              overwrite=args.overwrite)
    print(f"wrote {args.size} fixture model ({parameter_count(out):,} parameters) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from engine.cli import register as register_engine
    from offline_encode.cli import register as register_offline
    from retrieval.cli import register as register_retrieval

    parser = argparse.ArgumentParser(
        prog="prag",
        description="Parametric RAG: per-document LoRA adapters, dense retrieval and batched vLLM serving.",
    )
    parser.add_argument("--version", action="version", version=f"prag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fixture-model", help="build a small local Llama-architecture model + tokenizer (no network)")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny",
                   help="tiny: ~0.6M parameters (tests); small: ~35M (CPU benchmarks). Default: tiny")
    p.add_argument("--out", required=True, help="output directory (written atomically); must be new or empty, "
                   "or a previous fixture model with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous fixture model at --out (never a folder of other files)")
    p.add_argument("--corpus", help="train the tokenizer on this corpus (JSONL or DPR TSV) as well as the built-in text")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.set_defaults(func=_fixture_model)

    register_retrieval(sub)
    register_offline(sub)
    register_engine(sub)
    parser.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    _add_verbose(sub)
    return parser


_VERBOSE_HELP = "full logs from vLLM, transformers and Ray (default: warnings that matter and prag's own lines)"


def _add_verbose(sub: argparse._SubParsersAction) -> None:
    """``--verbose`` after any (sub)command too; SUPPRESS keeps a ``prag --verbose CMD`` from being reset."""
    for p in sub.choices.values():
        if "--verbose" not in p._option_string_actions:
            p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_verbose(action)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)  # before any command imports vLLM, torch or Ray
    try:
        return int(args.func(args) or 0)
    except PragError as exc:
        print(f"prag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prag {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
