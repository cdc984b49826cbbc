"""``qvec grid | report``: the donor x receiver x lambda transfer grid and its report.

``qvec grid`` reads the fine-tunes of ``qvec finetune`` and hands the cells to
``grid.run_grid`` (with the optional extras and GPTQ rows); ``qvec report``
rewrites the report of a grid workdir from its cells.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from qvec_jax import config as qconfig
from qvec_jax import grid, report, select, train
from qvec_jax.cli.common import (
    QvecError,
    add_parser,
    bit_width,
    check_folder,
    finite_floats,
    positive_int,
    task_names,
    writing,
)
from qvec_jax.grid.inputs import MODES, checkpoint_path


def print_headline(result: dict, command: str = "report") -> None:
    """The report's warnings (an incomplete grid, test-set tasks) loudly on stderr, then
    the zero-shot and lambda_best tables (from the metrics) and where every file is."""
    for line in result.get("warnings") or ():
        print(f"qvec {command}: WARNING: {line}", file=sys.stderr)
    print(report.headline(result["metrics"]))
    for name, p in result["paths"].items():
        print(f"  {name}: {p}")


def add_grid(sub) -> None:
    p = add_parser(
        sub,
        "grid",
        "the donor x receiver x lambda transfer grid, then the report",
        "qvec grid --config configs/demo_tiny.py --tasks digits,digits_rot90,digits_inv "
        "--workdir runs",
        "Evaluate PTQ(FP_R + lam * QV_D) for every donor D, receiver R and lam, plus FP_R, "
        "PTQ(FP_R) and PTQ(QAT_R), on each receiver's val and test splits. Fine-tunes are "
        "read from RUNS/<task>/{fp,qat}/params (`qvec finetune --workdir RUNS/<task>/<mode>`). "
        "Cells are appended to WORKDIR/cells.jsonl: a rerun resumes, and adding tasks or "
        "lambdas computes only the new cells. Missing checkpoints are listed in the report "
        "and make the command exit 1 unless --allow-missing.",
    )
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--workdir", required=True, help="grid output dir (cells, report)")
    p.add_argument("--runs", default=None, help="fine-tune runs dir (default: --workdir)")
    p.add_argument("--config", default=None, help="config file (bits, eval batch, data dir)")
    p.add_argument(
        "--bits", type=bit_width, default=None, help="bit width, 2..8 (default: the config's)"
    )
    p.add_argument("--granularity", default=None, choices=("channel", "tensor"))
    p.add_argument(
        "--lambdas",
        type=finite_floats,
        default=None,
        help="comma-separated finite numbers (default: the paper's 0.15,...,1.5); 1 is always "
        "added",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="eval batch size (default 256)"
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--compute-dtype",
        default=None,
        choices=train.COMPUTE_DTYPES,
        help="the model's activations and matmuls (default: the config's model.compute_dtype, "
        "else float32); params, QVs and PTQ stay float32",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="exit 0 even if some checkpoints are missing (still listed)",
    )
    add_scale_options(p)
    add_extras_options(p)
    add_gptq_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_cmd_grid)


def add_scale_options(p) -> None:
    """``qvec grid`` over many jobs: ``--shard I/N`` (independent jobs, one workdir) or
    ``--distributed`` (one multi-process JAX job)."""
    p.add_argument(
        "--shard",
        type=shard_spec,
        default=None,
        metavar="I/N",
        help="compute only shard I of N (0 <= I < N; by receiver) into "
        "cells.shard-I-of-N.jsonl, for N independent jobs (Slurm array, TPU VMs) over one "
        "workdir; no report: run `qvec report WORKDIR` once every shard is done",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize(): the processes split the cells, each on its "
        "local devices; process 0 writes the report",
    )


def add_extras_options(p) -> None:
    """``qvec grid``'s extras: lambda-strategy measurements and leave-one-out merges."""
    p.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also measure every lambda strategy per cross-task pair and run leave-one-out "
        "QV merges (report sections 'Lambda strategies' and 'Leave-one-out merges'; "
        "default off)",
    )
    p.add_argument(
        "--pretext",
        default=None,
        metavar="TASK",
        help="--extras: the pretext task (its train images feed the proxy-pretext-* "
        "strategies, the default --strategy among them; without it they are listed as not "
        "measured); --gptq: its train images calibrate the 'pretext' rows (without it "
        "there are none)",
    )
    p.add_argument(
        "--strategy",
        default=None,
        help="--extras: the no-receiver-data lambda strategy of the heatmap and the merge "
        "rows (--gptq: and of the GPTQ+QV and RTN+QV strategy rows), fixed in advance; "
        "constants as ':name=value'. Default auto: the dev-tuned "
        f"{grid.extras.DEFAULT_STRATEGY} with --pretext, else "
        f"{grid.extras.NO_PRETEXT_STRATEGY} (see `qvec tune`); a proxy named without a "
        "size reads --proxy-size images",
    )
    p.add_argument(
        "--merge-methods",
        default=None,
        help="--extras: comma-separated merge methods of the leave-one-out rows "
        f"(default {','.join(grid.extras.DEFAULT_METHODS)}; 'sum' also exists)",
    )
    p.add_argument(
        "--proxy-size",
        type=positive_int,
        default=None,
        help="--extras: donor / pretext / noise proxy images per pair (default 256)",
    )


#: Options of ``qvec grid`` that apply with --extras only, and with --extras or --gptq.
EXTRAS_ONLY = ("merge_methods", "proxy_size")
EXTRAS_OR_GPTQ = ("pretext", "strategy")


def extras_of(args) -> grid.extras.Extras | None:
    """The ``grid.extras.Extras`` the options ask for (None without --extras); an option
    that applies with --extras (or --gptq) only is refused without it, naming it."""
    if not args.extras:
        gptq = getattr(args, "gptq", False)
        for o in (*EXTRAS_OR_GPTQ, *EXTRAS_ONLY):
            flag = "--" + o.replace("_", "-")
            if getattr(args, o) is not None and not (gptq and o in EXTRAS_OR_GPTQ):
                which = "--extras or --gptq" if o in EXTRAS_OR_GPTQ else "--extras"
                raise QvecError(f"{flag} applies with {which} only; add {which.split()[0]}")
        return None
    pretext = task_names(args.pretext, "--pretext", one=True)[0] if args.pretext else None
    methods = args.merge_methods or ",".join(grid.extras.DEFAULT_METHODS)
    try:
        return grid.extras.Extras(
            strategy=args.strategy or "auto", methods=tuple(m for m in methods.split(",") if m),
            pretext=pretext, proxy_n=args.proxy_size or 256,
        )  # fmt: skip
    except ValueError as e:
        raise QvecError(f"--extras: {e}") from None


def add_gptq_options(p) -> None:
    """``qvec grid``'s GPTQ rows (``grid.gptq``): ``--gptq/--no-gptq``, ``--calib-size``."""
    p.add_argument(
        "--gptq",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also GPTQ rows: GPTQ(FP_R) calibrated on the receiver's train images, another "
        "task's, --pretext's and noise, and GPTQ(FP_R + lam QV_D) on the donor's images at "
        "lam=1 and at --strategy's lam (report section 'What each approach needs and what "
        "it gives'; default off)",
    )
    p.add_argument(
        "--calib-size",
        type=positive_int,
        default=None,
        help="--gptq: images per calibration set (default 128)",
    )


def gptq_of(args, extras: grid.extras.Extras | None = None) -> grid.gptq.GptqCells | None:
    """The ``grid.gptq.GptqCells`` the options ask for (None without --gptq); with
    ``extras``, their strategy (so its lambda comes from their scores cells)."""
    if not args.gptq:
        if args.calib_size is not None:
            raise QvecError("--calib-size applies with --gptq only; add --gptq")
        return None
    pretext = task_names(args.pretext, "--pretext", one=True)[0] if args.pretext else None
    strategy = extras.strategy if extras is not None else (args.strategy or "auto")
    try:
        return grid.gptq.GptqCells(
            calib_size=args.calib_size or 128, strategy=strategy, pretext=pretext
        )
    except ValueError as e:
        raise QvecError(f"--gptq: {e}") from None


def shard_spec(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    i, sep, n = text.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = None
    if not sep or i is None or not 0 <= i < n:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give I/N with whole numbers 0 <= I < N, e.g. 0/4 for the first of 4"
        )
    return i, n


def _grid_settings(args) -> tuple:
    """``(bits, granularity, batch_size, data_dir, compute_dtype)``: the flags, else the
    config's values, else the defaults (a flag given as 0 is refused by its type, never
    replaced)."""
    bits, gran, batch, data_dir = args.bits, args.granularity, args.batch_size, args.data_dir
    dtype = args.compute_dtype
    if args.config:
        cfg = qconfig.load_config(args.config, args.overrides)
        try:
            dtype = dtype or train.compute_dtype(cfg).name
        except train.TrainError as e:
            raise QvecError(f"{args.config}: {e}") from None
        bits = cfg.quant.bits if bits is None else bits
        gran = gran or cfg.quant.granularity
        batch = cfg.eval_batch_size if batch is None else batch
        data_dir = data_dir or cfg.data.data_dir or None
        if not 2 <= bits <= 8 or batch < 1:
            raise QvecError(
                f"{args.config}: quant.bits={bits} must be in 2..8 and eval_batch_size={batch} "
                "positive; fix the config or pass --bits / --batch-size"
            )
    elif args.overrides:
        raise QvecError("key=value overrides need --config")
    if bits is None:
        raise QvecError("no bit width: pass --bits B or --config C")
    return bits, gran or "channel", 256 if batch is None else batch, data_dir, dtype or "float32"


def _cmd_grid(args) -> int:
    train.maybe_initialize_distributed(args.distributed)
    tasks = task_names(args.tasks, "--tasks")
    bits, gran, batch, data_dir, dtype = _grid_settings(args)
    ex = extras_of(args)
    extras = [s for s in (ex, gptq_of(args, ex)) if s is not None] or None
    lambdas = grid.DEFAULT_LAMBDAS if args.lambdas is None else args.lambdas
    workdir, runs = Path(args.workdir), args.runs or args.workdir
    inputs = [checkpoint_path(runs, t, m) for t in tasks for m in MODES]
    check_folder(workdir, inputs + ([args.config] if args.config else []), "--workdir")
    missing = None
    with writing(workdir, "--workdir"):
        try:
            cells = grid.run_grid(
                tasks,
                runs,
                workdir,
                bits=bits,
                granularity=gran,
                lambdas=lambdas,
                batch_size=batch,
                allow_missing=args.allow_missing,
                data_dir=data_dir,
                progress=not args.no_progress,
                shard=args.shard,
                extras=extras,
                compute_dtype=dtype,
            )
        except grid.MissingCheckpoints as e:
            missing, cells = e, e.cells
        except grid.GridError as e:
            raise QvecError(str(e)) from None
        if args.shard is not None:
            expected = report.load_grid_meta(workdir).get("expected_cells", "?")
            print(
                f"shard {args.shard[0]}/{args.shard[1]} done; {workdir} holds {len(cells)} of "
                f"{expected} cells; once every shard is done: qvec report {workdir}"
            )
        elif jax.process_index() == 0:
            print_headline(report.write_report(workdir, cells=cells, extras=args.extras), "grid")
    if missing is not None:
        print(f"qvec grid: error: {missing}", file=sys.stderr)
        return 1
    return 0


def add_report(sub) -> None:
    p = add_parser(
        sub,
        "report",
        "regenerate grid.csv, summary.md and the plots of a grid",
        "qvec report runs",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="grid workdir holding cells.jsonl")
    p.add_argument("--out", default=None, help="folder for the report files (default: RUN_DIR)")
    p.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the lambda-strategy and merge sections, if the grid has their cells (default on)",
    )
    p.add_argument(
        "--strategy",
        default=None,
        help="the fixed strategy of those sections (default: the one the grid ran with)",
    )
    p.set_defaults(func=_cmd_report)


def grid_inputs(run_dir) -> list[str]:
    """The checkpoints a grid read (its grid.json): an --out may not lie inside one."""
    grid_ckpts = report.load_grid_meta(run_dir).get("checkpoints") or {}
    return [c["path"] for c in grid_ckpts.values() if isinstance(c, dict) and c.get("path")]


def _cmd_report(args) -> int:
    out = args.out or args.run_dir
    check_folder(out, grid_inputs(args.run_dir), "--out")
    with writing(out, "--out"):
        try:
            res = report.write_report(
                args.run_dir, args.out, extras=args.extras, strategy=args.strategy
            )
        except select.SelectError as e:
            raise QvecError(f"--strategy: {e}") from None
        print_headline(res)
    return 0
