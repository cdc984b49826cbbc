"""``qvec convert | extract | eval``: one command per step of the method (``patch`` is
:mod:`.patch_cmd`).

Each reads checkpoint directories and writes a new one (or prints accuracies); the
method itself is in :mod:`qvec_jax.trees` and :mod:`qvec_jax.quant`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

import qvec_jax as q
from qvec_jax import checkpoints, data, pretrained
from qvec_jax.cli.common import (
    QvecError,
    add_parser,
    bit_width,
    check_output,
    claim,
    nonnegative_int,
    positive_int,
    restore,
    restore_model,
    same_backbone,
    save,
    writing,
)
from qvec_jax.evaluate import accuracy
from qvec_jax.files import atomic_write_text
from qvec_jax.train import COMPUTE_DTYPES

# ----------------------------------------------------------------------------- convert


def add_convert(sub) -> None:
    p = add_parser(
        sub,
        "convert",
        "convert a pretrained ViT (.npz / .safetensors) into a qvec orbax checkpoint",
        "qvec convert ViT-B_16.npz runs/pretrained/b16 --num-classes 0",
        "Convert a Google .npz (original or big_vision layout), timm or Hugging Face "
        ".safetensors ViT into a qvec params checkpoint with qvec_meta.json.",
    )
    p.add_argument("input", help="checkpoint file (or Hugging Face model directory)")
    p.add_argument("output", help="output checkpoint directory")
    p.add_argument("--variant", help="e.g. B/16 (default: detected from the shapes)")
    p.add_argument(
        "--num-classes",
        type=nonnegative_int,
        default=None,
        help="replace the head by a fresh one with N classes, 0 for none (default: keep the "
        "checkpoint's)",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="resample position embeddings for this resolution (default: the checkpoint's)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of a fresh head")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument(
        "--num-heads",
        type=positive_int,
        default=None,
        help="attention heads of a timm file whose dims match no named variant (default: width/64)",
    )
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    out = check_output(args.output, [args.input], args.overwrite)
    with claim(out, args.overwrite):
        return _convert(args, out)


def _convert(args, out) -> int:
    model, params = pretrained.load_pretrained(
        args.input,
        variant=args.variant,
        num_classes=args.num_classes,
        image_size=args.image_size,
        seed=args.seed,
        num_heads=args.num_heads,
    )
    variant = model.variant
    meta = dict(  # model_meta: what model_from_meta rebuilds it from (eps, activation too)
        **checkpoints.model_meta(model),
        backbone_id=checkpoints.backbone_id(params),
        source=str(Path(args.input).absolute()),
    )
    save(out, params, meta)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(
        f"{out}: ViT {variant} @ {model.image_size}px, {n:,} params, "
        f"head {model.num_classes}, backbone_id {meta['backbone_id']}"
    )
    return 0


# ----------------------------------------------------------------------------- extract


def add_extract(sub) -> None:
    p = add_parser(
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


def _check_pair(args, qmeta: dict, fmeta: dict) -> None:
    """Refuse a QAT argument that its meta says is no QAT fine-tune (a packed export, a
    `qvec ptq` output, a patched model, a QV, an FP run, a model with no run mode), an FP
    argument that is no FP fine-tune, and a pair of two tasks or two backbones."""
    if Path(args.qat).resolve() == Path(args.fp).resolve():
        raise QvecError(f"{args.qat} is passed as QAT and as FP: the two checkpoints are the "
                        "same run; pass the QAT and the FP fine-tune")  # fmt: skip
    if qmeta.get("mode") == "fp" and fmeta.get("mode") == "qat":
        raise QvecError(f"{args.qat} is an FP run and {args.fp} a QAT run: the order is QAT FP")
    for path, meta, mode in ((args.qat, qmeta, "qat"), (args.fp, fmeta, "fp")):
        plain = not checkpoints.quantized(meta, path) and meta.get("kind") != "qv"
        if not (plain and not meta.get("patch") and meta.get("mode") == mode):
            want = "a QAT" if mode == "qat" else "an FP"
            raise QvecError(
                f"{path} is {checkpoints.describe(meta, path)}, not {want} fine-tune; `qvec "
                f"extract QAT FP OUT` takes the params of `qvec finetune --mode {mode}` "
                f"(runs/<task>/{mode}/params)"
            )
    if qmeta.get("task") != fmeta.get("task"):
        raise QvecError(
            f"{args.qat} is task {qmeta.get('task')!r} but {args.fp} is task "
            f"{fmeta.get('task')!r}; QV_D = QAT_D - FP_D needs both fine-tunes of one task"
        )
    same_backbone(qmeta, fmeta, args.qat, args.fp)
    for key in ("variant", "image_size"):
        if qmeta.get(key) != fmeta.get(key):
            raise QvecError(
                f"{args.qat} is a {key} {qmeta.get(key)!r} model but {args.fp} a {key} "
                f"{fmeta.get(key)!r} one; QV_D = QAT_D - FP_D needs two fine-tunes of one backbone"
            )


def _cmd_extract(args) -> int:
    out = check_output(args.out, [args.qat, args.fp], args.overwrite)
    with claim(out, args.overwrite):
        return _extract(args, out)


def _extract(args, out) -> int:
    qat, qmeta = restore(args.qat)
    fp, fmeta = restore(args.fp)
    _check_pair(args, qmeta, fmeta)
    try:
        qv = q.quantization_vector(qat, fp, require_nonzero=True)
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
    save(out, qv, meta)
    print(
        f"QV of task {meta['task']}: {len(q.flatten(qv))} leaves (head excluded), "
        f"global L2 norm {meta['global_norm']:.4g}"
    )
    return 0


# ----------------------------------------------------------------------------- eval


def add_eval(sub) -> None:
    p = add_parser(
        sub,
        "eval",
        "top-1 accuracy of a checkpoint on a task's splits",
        "qvec eval patched/fashion_digits --task digits --bits 2",
    )
    p.add_argument("ckpt", help="checkpoint dir")
    p.add_argument("--task", default=None, help="task (default: the one in the checkpoint meta)")
    p.add_argument(
        "--bits", type=bit_width, default=None, help="evaluate PTQ(params) at this width (2..8)"
    )
    p.add_argument("--granularity", default="channel", choices=("channel", "tensor"))
    p.add_argument("--splits", default="val,test", help="comma-separated (default val,test)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--compute-dtype",
        default="float32",
        choices=COMPUTE_DTYPES,
        help="the model's activations and matmuls (default float32); params, PTQ: float32",
    )
    p.add_argument(
        "--json",
        default=None,
        help="also write the result to this JSON file (replaced if it exists)",
    )
    p.set_defaults(func=_cmd_eval)


def _eval_splits(text: str) -> list[str]:
    splits = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in splits if s not in data.SPLITS]
    if bad or not splits:
        raise QvecError(
            f"--splits {text!r}: unknown split(s) {bad}; choose from {', '.join(data.SPLITS)}"
        )
    return splits


def _check_json(args) -> None:
    """``--json`` is a file outside the checkpoint (and the data) that can be written."""
    if not args.json:
        return
    if Path(args.json).is_dir():
        raise QvecError(f"--json {args.json} is a directory; name a file")
    inputs = [args.ckpt] + ([args.data_dir] if args.data_dir else [])
    check_output(args.json, inputs, overwrite=True, what="--json")


def _cmd_eval(args) -> int:
    splits = _eval_splits(args.splits)
    _check_json(args)
    params, meta = restore_model(args.ckpt)
    done = checkpoints.quantized(meta, args.ckpt)
    if args.bits is not None and done:
        raise QvecError(
            f"--bits: {args.ckpt} is {done}, already quantized; evaluate it without --bits "
            "(quantizing it again would re-round its values)"
        )
    task = args.task or meta.get("task")
    if not task:
        raise QvecError(f"{args.ckpt} names no task in its meta; pass --task")
    model = checkpoints.model_from_meta(meta)
    spec = None if args.bits is None else q.QuantSpec(args.bits, args.granularity)
    out = {
        "checkpoint": str(args.ckpt),
        "task": task,
        "bits": args.bits,
        "granularity": args.granularity if args.bits else None,
    }
    if args.compute_dtype != "float32":  # named only when not the default
        model = model.clone(dtype=jax.numpy.dtype(args.compute_dtype))
        out["compute_dtype"] = args.compute_dtype
    if meta.get("ptq"):  # already quantized (qvec ptq / a packed export): say how
        out["quantized"] = meta["ptq"]
    for split in splits:
        s = data.load_split(
            task, split, image_size=int(meta["image_size"]), data_dir=args.data_dir or None
        )
        out[split] = accuracy(model, params, s, spec, batch_size=args.batch_size)
        out[f"n_{split}"] = len(s)
    print(json.dumps(out))
    if args.json:
        with writing(args.json, "--json"):
            atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")
    return 0
