"""The ``qvec`` command: every argparse parser of the project lives in this package.

Library modules hold no argparse. One module per group of commands:

- :mod:`.common`: what all subcommands share (``QvecError``, output checks, restore);
- :mod:`.model_cmds`: convert, extract, eval; :mod:`.patch_cmd`: patch;
- :mod:`.quant_cmds`: merge, ptq, export; :mod:`.bank_cmds`: qv-bank (build, show);
- :mod:`.quantize_cmd`: quantize (the dev-chosen data-free recipe, a packed export);
- :mod:`.run_cmds`: tasks, finetune, demo;
- :mod:`.grid_cmds`: grid, report;
- :mod:`.study_cmd`: tune, study (choose on dev, report on test).
"""

from __future__ import annotations

import argparse
import os
import sys

from qvec_jax.cli import (
    bank_cmds,
    grid_cmds,
    model_cmds,
    patch_cmd,
    quant_cmds,
    quantize_cmd,
    run_cmds,
    study_cmd,
)
from qvec_jax.cli.common import QvecError

__all__ = [
    "COMMANDS",
    "EXIT_ERROR",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "QvecError",
    "build_parser",
    "main",
    "run",
]

#: Subcommand registrars, in the order `qvec --help` lists them.
COMMANDS = (
    run_cmds.add_demo,
    model_cmds.add_convert,
    run_cmds.add_tasks,
    run_cmds.add_finetune,
    model_cmds.add_extract,
    quant_cmds.add_merge,
    bank_cmds.add_qv_bank,
    patch_cmd.add_patch,
    quant_cmds.add_ptq,
    quant_cmds.add_export,
    quantize_cmd.add_quantize,
    model_cmds.add_eval,
    grid_cmds.add_grid,
    grid_cmds.add_report,
    study_cmd.add_tune,
    study_cmd.add_study,
)


#: Exit codes of ``qvec`` (listed in ``qvec --help``).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_EPILOG = f"""\
Run `qvec demo` for the whole pipeline on the offline embedded default.

exit codes:
  {EXIT_OK}    success
  {EXIT_ERROR}    the command refused its input or could not finish (the message names the
       file or option and says what to do); `qvec grid` also when checkpoints are missing
  {EXIT_USAGE}    usage error: unknown option, missing argument or bad option value
  {EXIT_INTERNAL}    internal error, a bug in qvec: rerun with --debug (or QVEC_DEBUG=1) for the
       traceback and please report it
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); finetune, grid and demo resume when rerun
"""


_DEBUG_HELP = "show the traceback of any error (also: environment QVEC_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvec",
        description=(
            "Zero-shot quantization via weight-space arithmetic: extract a quantization "
            "vector QV = QAT - FP on a donor task, add it to a receiver's FP model, then "
            "post-training quantize (arXiv 2604.03420)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    for p in sub.choices.values():  # `qvec CMD ... --debug` works too
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("QVEC_DEBUG", "") not in ("", "0")


def _message(e: BaseException) -> str:
    """What to print for a handled error: OS errors as 'FILE: reason', others as they are."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    """Run ``qvec`` with ``argv``; returns the exit code (argparse exits itself on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Call ``args.func(args)``; returns the exit code.

    Errors of input and environment (:class:`QvecError`, ``ValueError``, ``OSError``) print
    one line; any other exception is a bug: one line asking for a report, or its traceback
    under ``--debug`` / ``QVEC_DEBUG=1``."""
    prefix = f"qvec {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if _debug(args):
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (QvecError, ValueError, OSError) as e:
        if _debug(args):
            raise
        print(f"{prefix}: error: {_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        if _debug(args):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(
            f"{prefix}: internal error: {type(e).__name__}: {first} (rerun with --debug for "
            "the traceback; please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
