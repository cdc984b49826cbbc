"""The ``qvec`` command: every argparse parser of the project lives in this package.

Library modules hold no argparse. :mod:`.common` has what all subcommands share
(``QvecError``, the output check, checkpoint restore), :mod:`.model_cmds` the commands
over checkpoints (convert, extract, patch, ptq, eval), :mod:`.run_cmds` the commands
that run experiments (tasks, finetune, grid, report, demo).
"""

from __future__ import annotations

import argparse
import sys

from qvec_jax.cli import model_cmds, run_cmds
from qvec_jax.cli.common import QvecError

__all__ = ["COMMANDS", "QvecError", "build_parser", "main"]

#: Subcommand registrars, in the order `qvec --help` lists them.
COMMANDS = (
    run_cmds.add_demo,
    model_cmds.add_convert,
    run_cmds.add_tasks,
    run_cmds.add_finetune,
    model_cmds.add_extract,
    model_cmds.add_patch,
    model_cmds.add_ptq,
    model_cmds.add_eval,
    run_cmds.add_grid,
    run_cmds.add_report,
)


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
    for register in COMMANDS:
        register(sub)
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
