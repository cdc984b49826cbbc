"""The ``qvec`` subcommands over checkpoints: extract, patch, ptq, eval, grid, report.

Inputs and outputs are orbax checkpoint directories written by
``checkpoints.save_params`` (params + ``qvec_meta.json``). Outputs are written
atomically, and an output that equals, contains or lies inside an input is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qvec_jax.cli import QvecError

_FMT = argparse.RawDescriptionHelpFormatter


def _parser(sub, name: str, help: str, example: str, description: str = ""):
    return sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog="example:\n  " + example,
        formatter_class=_FMT,
    )


def _check_output(out: str, inputs: list[str], overwrite: bool) -> Path:
    """Refuse an OUT that equals/contains/lies inside an input, or exists (unless overwrite)."""
    o = Path(out).resolve()
    for i in inputs:
        p = Path(i).resolve()
        if o == p or p in o.parents or o in p.parents:
            raise QvecError(
                f"output {out} would overwrite input {i} (equal, inside it, or containing it); "
                "choose another output path"
            )
    if o.exists() and not overwrite:
        raise QvecError(f"output {out} already exists; choose another path or pass --overwrite")
    return o


def _restore(path: str):
    from qvec_jax import checkpoints

    if not Path(path).exists():
        raise QvecError(f"{path}: no such checkpoint directory")
    try:
        return checkpoints.restore_params(path)
    except checkpoints.CheckpointError as e:
        raise QvecError(str(e)) from None


def _same_backbone(meta_a: dict, meta_b: dict, a: str, b: str) -> None:
    ia, ib = meta_a.get("backbone_id"), meta_b.get("backbone_id")
    if ia and ib and ia != ib:
        raise QvecError(
            f"{a} (backbone_id {ia}) and {b} (backbone_id {ib}) were fine-tuned from different "
            "pretrained backbones; a quantization vector only transfers within one backbone"
        )


def _host(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def _save(out: Path, params, meta: dict) -> None:
    from qvec_jax import checkpoints

    checkpoints.save_params(out, _host(params), meta)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- extract


def _cmd_extract(args) -> int:
    import qvec_jax as q

    out = _check_output(args.out, [args.qat, args.fp], args.overwrite)
    qat, qmeta = _restore(args.qat)
    fp, fmeta = _restore(args.fp)
    if qmeta.get("mode") == "fp" and fmeta.get("mode") == "qat":
        raise QvecError(f"{args.qat} is an FP run and {args.fp} a QAT run: the order is QAT FP")
    if qmeta.get("task") != fmeta.get("task"):
        raise QvecError(
            f"{args.qat} is task {qmeta.get('task')!r} but {args.fp} is task "
            f"{fmeta.get('task')!r}; QV_D = QAT_D - FP_D needs both fine-tunes of one task"
        )
    _same_backbone(qmeta, fmeta, args.qat, args.fp)
    try:
        qv = q.quantization_vector(qat, fp)
    except ValueError as e:
        raise QvecError(f"{args.qat} vs {args.fp}: {e}") from None
    meta = {
        "kind": "qv",
        "task": fmeta.get("task"),
        "backbone_id": fmeta.get("backbone_id"),
        "variant": fmeta.get("variant"),
        "image_size": fmeta.get("image_size"),
        "bits": qmeta.get("bits"),
        "granularity": qmeta.get("granularity"),
        "qat": str(Path(args.qat).resolve()),
        "fp": str(Path(args.fp).resolve()),
        "global_norm": q.global_norm(qv),
    }
    _save(out, qv, meta)
    print(
        f"QV of task {meta['task']}: {len(q.flatten(qv))} leaves (head excluded), "
        f"global L2 norm {meta['global_norm']:.4g}"
    )
    return 0


# ----------------------------------------------------------------------------- patch


def _cmd_patch(args) -> int:
    import qvec_jax as q

    out = _check_output(args.out, [args.fp, args.qv], args.overwrite)
    fp, fmeta = _restore(args.fp)
    qv, vmeta = _restore(args.qv)
    if vmeta.get("kind") != "qv":
        raise QvecError(
            f"{args.qv} is not a quantization vector (kind={vmeta.get('kind')!r}); make one "
            "with `qvec extract QAT FP OUT`"
        )
    _same_backbone(fmeta, vmeta, args.fp, args.qv)
    try:
        patched = q.patch(fp, qv, args.lam)
    except ValueError as e:
        raise QvecError(f"{args.fp} + {args.qv}: {e}") from None
    meta = {
        **fmeta,
        "mode": "patched",
        "patch": {
            "qv": str(Path(args.qv).resolve()),
            "donor": vmeta.get("task"),
            "lam": args.lam,
            "zero_shot": args.lam == 1.0,
        },
    }
    _save(out, patched, meta)
    return 0


# ----------------------------------------------------------------------------- ptq


def _cmd_ptq(args) -> int:
    import qvec_jax as q

    out = _check_output(args.out, [args.inp], args.overwrite)
    params, meta = _restore(args.inp)
    if meta.get("kind") == "qv":
        raise QvecError(f"{args.inp} is a quantization vector; PTQ applies to model params")
    qparams = q.ptq(params, args.bits, granularity=args.granularity)
    size = q.size_report(params, args.bits, granularity=args.granularity)
    meta = {**meta, "ptq": {"bits": args.bits, "granularity": args.granularity}}
    _save(out, qparams, meta)
    print(json.dumps(size))
    return 0


# ----------------------------------------------------------------------------- eval


def _cmd_eval(args) -> int:
    from qvec_jax import checkpoints, data
    from qvec_jax.evaluate import accuracy

    params, meta = _restore(args.ckpt)
    if meta.get("kind") == "qv":
        raise QvecError(f"{args.ckpt} is a quantization vector, not a model; patch it first")
    task = args.task or meta.get("task")
    if not task:
        raise QvecError(f"{args.ckpt} names no task in its meta; pass --task")
    model = checkpoints.model_from_meta(meta)
    out = {
        "checkpoint": str(args.ckpt),
        "task": task,
        "bits": args.bits,
        "granularity": args.granularity if args.bits else None,
    }
    for split in args.splits.split(","):
        s = data.load_split(
            task, split, image_size=int(meta["image_size"]), data_dir=args.data_dir or None
        )
        out[split] = accuracy(
            model,
            params,
            s,
            batch_size=args.batch_size,
            bits=args.bits,
            granularity=args.granularity,
        )
        out[f"n_{split}"] = len(s)
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


# ----------------------------------------------------------------------------- grid/report


def _print_headline(result: dict) -> None:
    """The zero-shot and lambda_best tables of summary.md, then where every file is."""
    from qvec_jax import report as rp

    lines = result["summary"].splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith((f"| {rp.ZERO_SHOT} |", f"| {rp.LAMBDA_BEST} |")):
            print("\n".join(lines[i - 2 : i + 1]) + "\n")
    for name, p in result["paths"].items():
        print(f"  {name}: {p}")


def _cmd_grid(args) -> int:
    from qvec_jax import report, transfer

    bits, gran, batch, data_dir = args.bits, args.granularity, args.batch_size, args.data_dir
    if args.config:
        from qvec_jax.config import load_config

        cfg = load_config(args.config, args.overrides)
        bits = bits or cfg.quant.bits
        gran = gran or cfg.quant.granularity
        batch = batch or cfg.eval_batch_size
        data_dir = data_dir or cfg.data.data_dir or None
    elif args.overrides:
        raise QvecError("key=value overrides need --config")
    if bits is None:
        raise QvecError("no bit width: pass --bits B or --config C")
    tasks = [t for t in args.tasks.split(",") if t]
    lambdas = (
        [float(x) for x in args.lambdas.split(",")] if args.lambdas else transfer.DEFAULT_LAMBDAS
    )
    workdir = Path(args.workdir)
    missing = None
    try:
        transfer.run_grid(
            tasks,
            args.runs or workdir,
            workdir,
            bits=bits,
            granularity=gran or "channel",
            lambdas=lambdas,
            batch_size=batch or 256,
            allow_missing=args.allow_missing,
            data_dir=data_dir,
            progress=not args.no_progress,
        )
    except transfer.MissingCheckpoints as e:
        missing = e
    except transfer.GridError as e:
        raise QvecError(str(e)) from None
    result = report.write_report(workdir)
    _print_headline(result)
    if missing is not None:
        print(f"qvec grid: error: {missing}", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args) -> int:
    from qvec_jax import report

    _print_headline(report.write_report(args.run_dir))
    return 0


# ----------------------------------------------------------------------------- wiring


def add_cli(sub) -> None:
    p = _parser(
        sub,
        "extract",
        "extract a quantization vector QV = QAT - FP (head excluded)",
        "qvec extract runs/digits/qat/params runs/digits/fp/params qvs/digits",
    )
    p.add_argument("qat", help="QAT fine-tune checkpoint (params dir)")
    p.add_argument("fp", help="FP fine-tune checkpoint of the same task and backbone")
    p.add_argument("out", help="output checkpoint dir for the QV")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_extract)

    p = _parser(
        sub,
        "patch",
        "patch a receiver: FP_R + lam * QV_D",
        "qvec patch runs/fashion/fp/params qvs/digits --lam 1.0 patched/fashion_digits",
        "Add lam times a quantization vector to a receiver's FP params. lam=1 is zero-shot "
        "(no receiver data); PTQ the result with `qvec ptq`.",
    )
    p.add_argument("fp", help="receiver FP checkpoint")
    p.add_argument("qv", help="QV checkpoint from `qvec extract`")
    p.add_argument("out", help="output checkpoint dir")
    p.add_argument("--lam", type=float, default=1.0, help="scale of the QV (default 1.0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_patch)

    p = _parser(
        sub,
        "ptq",
        "post-training quantize (round-to-nearest, weights only)",
        "qvec ptq patched/fashion_digits --bits 2 patched/fashion_digits_w2",
        "Fake-quantize the encoder-block kernels (METHOD.md quantizer) and write the "
        "dequantized params, ready for `qvec eval`; prints the packed model size.",
    )
    p.add_argument("inp", metavar="IN", help="input checkpoint")
    p.add_argument("out", help="output checkpoint dir")
    p.add_argument("--bits", type=int, required=True, help="bit width, 2..8")
    p.add_argument("--granularity", default="channel", choices=("channel", "tensor"))
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_ptq)

    p = _parser(
        sub,
        "eval",
        "top-1 accuracy of a checkpoint on a task's splits",
        "qvec eval patched/fashion_digits --task digits --bits 2",
    )
    p.add_argument("ckpt", help="checkpoint dir")
    p.add_argument("--task", default=None, help="task (default: the one in the checkpoint meta)")
    p.add_argument("--bits", type=int, default=None, help="evaluate PTQ(params) at this width")
    p.add_argument("--granularity", default="channel", choices=("channel", "tensor"))
    p.add_argument("--splits", default="val,test", help="comma-separated (default val,test)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = _parser(
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
    p.add_argument("--bits", type=int, default=None, help="bit width (default: the config's)")
    p.add_argument("--granularity", default=None, choices=("channel", "tensor"))
    p.add_argument(
        "--lambdas",
        default=None,
        help="comma-separated (default: the paper's 0.15,...,1.5); 1 is always added",
    )
    p.add_argument("--batch-size", type=int, default=None, help="eval batch size")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="exit 0 even if some checkpoints are missing (still listed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_cmd_grid)

    p = _parser(
        sub,
        "report",
        "regenerate grid.csv, summary.md and the plots of a grid",
        "qvec report runs",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="grid workdir holding cells.jsonl")
    p.set_defaults(func=_cmd_report)
