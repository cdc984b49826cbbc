"""The ``qvec`` command.

Each subcommand lives next to the code it drives: a module listed in ``COMMANDS``
exposes ``add_cli(subparsers)``, which registers its parser(s) and sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning
an exit code. This file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order `qvec --help` lists them.
COMMANDS: list[str] = [
    "qvec_jax.demo",
    "qvec_jax.checkpoints",
    "qvec_jax.data",
    "qvec_jax.train",
    "qvec_jax.commands",
]


class QvecError(Exception):
    """An error whose message tells the user what to do next (printed without a traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvec",
        description=(
            "Zero-shot quantization via weight-space arithmetic: extract a quantization "
            "vector QV = QAT - FP on a donor task, add it to a receiver's FP model, then "
            "post-training quantize (arXiv 2604.03420)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `qvec demo` for the whole pipeline on the offline embedded default.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (QvecError, FileNotFoundError, ValueError) as e:
        print(f"qvec {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
