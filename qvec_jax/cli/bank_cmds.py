"""``qvec qv-bank build | show``: one file per backbone holding the merged QV of all its
donors (:mod:`qvec_jax.bank`), and what such a file holds.

``build`` reads donors as ``qvec finetune`` leaves them: a task dir ``RUN`` holding the
workdirs ``RUN/qat`` and ``RUN/fp`` (params at ``<workdir>/params``), or a dir of such
task dirs (``qvec study``'s and ``qvec demo``'s ``seed-<s>/``), or explicit ``--pair QAT
FP`` checkpoints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qvec_jax import bank, checkpoints, merge
from qvec_jax.cli.common import (
    QvecError,
    add_parser,
    check_output,
    claim,
    finite_float,
    restore_model,
    writing,
)

MODES = ("qat", "fp")  # a DonorPair's order
_DEBUG_HELP = "show the traceback of any error (also: environment QVEC_DEBUG=1)"


def add_qv_bank(sub) -> None:
    p = add_parser(
        sub,
        "qv-bank",
        "build or show a QV bank: the merged QV of a backbone's donors, in one file",
        "qvec qv-bank build bank.safetensors --runs runs/seed-0 && qvec qv-bank show "
        "bank.safetensors",
        "A QV bank holds the merged quantization vector of every donor (QAT, FP) pair of one "
        "backbone, with its provenance (donors, fingerprints, quant spec, merge recipe, "
        "default lambda) and a checksum. Layout: qvec_jax/bank.py.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = add_parser(
        actions,
        "build",
        "merge the QVs of donor (QAT, FP) fine-tunes into one bank file",
        "qvec qv-bank build bank.safetensors --runs runs/seed-0 --method ties",
        "Each --runs RUN is a task dir holding the `qvec finetune` workdirs qat/ and fp/, or "
        "a dir of such task dirs (every one is a donor, in name order); --pair QAT FP names "
        "two checkpoints. The donors must share one backbone and quant spec.",
    )
    b.add_argument("out", metavar="OUT", help="output file, e.g. bank.safetensors")
    b.add_argument("--runs", nargs="+", default=[], metavar="RUN", help="task dirs or dirs of them")
    b.add_argument(
        "--pair",
        nargs=2,
        action="append",
        default=[],
        metavar=("QAT", "FP"),
        help="a donor's QAT and FP checkpoints (repeatable)",
    )
    b.add_argument(
        "--method",
        default=None,
        choices=merge.METHODS,
        help="how two or more QVs are merged (default: chosen on the study's dev half per "
        f"bit width, {', '.join(f'{b} bits {m}' for b, m in bank.DEFAULT_METHODS.items())})",
    )
    b.add_argument(
        "--lam",
        type=finite_float,
        default=1.0,
        help="the lambda receivers are patched with by default (1: zero-shot)",
    )
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    b.set_defaults(func=_cmd_build)
    s = add_parser(
        actions,
        "show",
        "verify a QV bank's checksum and print what it holds and where it came from",
        "qvec qv-bank show bank.safetensors --json",
    )
    s.add_argument("file", metavar="FILE", help="a QV bank file")
    s.add_argument("--json", action="store_true", help="print the provenance as JSON")
    s.set_defaults(func=_cmd_show)
    for q in (b, s):  # `qvec qv-bank ACTION ... --debug` works, as for the other commands
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)


# ----------------------------------------------------------------------------- build


def donor_paths(runs: list[str], pairs: list[list[str]]) -> list[tuple[str, str]]:
    """``[(qat, fp)]`` checkpoint paths of the donors that ``--runs`` and ``--pair`` name,
    ``--runs`` first; QvecError naming a RUN that holds no donor or an unfinished one."""
    out = []
    for run in runs:
        root = Path(run)
        if not root.is_dir():
            raise QvecError(
                f"--runs {run}: no such directory; pass a task dir (qat/, fp/) or "
                "a dir of task dirs"
            )
        tasks = [root] if _is_task_dir(root) else sorted(filter(_is_task_dir, root.iterdir()))
        if not tasks:
            raise QvecError(
                f"--runs {run}: neither a task dir (qat/ and fp/ fine-tune workdirs) "
                "nor a dir of task dirs; pass one, or --pair QAT FP"
            )
        out += [tuple(str(_params(t / mode)) for mode in MODES) for t in tasks]
    return out + [tuple(p) for p in pairs]


def _is_task_dir(d: Path) -> bool:
    return any((d / mode).is_dir() for mode in MODES)


def _params(workdir: Path) -> Path:
    """``workdir``'s final params checkpoint (``qvec finetune`` writes ``params/`` last)."""
    if not workdir.is_dir():
        raise QvecError(
            f"--runs: {workdir} is missing, so task {workdir.parent.name} has no "
            f"{workdir.name} fine-tune; run it or leave the task out"
        )
    for path in (workdir / "params", workdir):
        if checkpoints.is_checkpoint(path):
            return path
    raise QvecError(
        f"--runs: {workdir} holds no finished fine-tune (no params checkpoint); "
        f"finish it (qvec finetune --workdir {workdir}) or leave the task out"
    )


def _cmd_build(args) -> int:
    paths = donor_paths(args.runs, args.pair)
    if not paths:
        raise QvecError("no donors: pass --runs RUN [RUN ...] or --pair QAT FP")
    if Path(args.out).is_dir():
        raise QvecError(f"output {args.out} is a directory; name a file (e.g. bank.safetensors)")
    out = check_output(args.out, [p for pair in paths for p in pair], args.overwrite)
    with claim(out, args.overwrite):
        pairs = []
        for i, (qat, fp) in enumerate(paths):
            pair = bank.DonorPair(restore_model(qat), restore_model(fp), qat, fp)
            print(f"donor {i + 1}/{len(paths)}: {pair.task or '(no task)'}  qat {qat}  fp {fp}")
            pairs.append(pair)
        try:
            built = bank.build_bank(pairs, method=args.method, lam=args.lam)
        except bank.BankError as e:
            raise QvecError(str(e)) from None
        with writing(out, "output"):
            size = bank.save_bank(built, out)
    donors = f"{len(pairs)} donor{'s' if len(pairs) != 1 else ''}"
    print(
        f"wrote {out} ({donors}, {built.method}, {built.bits}-bit {built.granularity}, "
        f"backbone {built.backbone_id or 'unknown'}, {size:,} bytes)"
    )
    return 0


# ----------------------------------------------------------------------------- show


def _cmd_show(args) -> int:
    try:
        b = bank.load_bank(args.file)
    except bank.BankError as e:
        raise QvecError(str(e)) from None
    print(json.dumps(b.provenance, indent=1) if args.json else bank.describe(b))
    return 0
