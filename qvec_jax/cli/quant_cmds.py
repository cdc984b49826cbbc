"""``qvec merge | ptq | export``: many QVs into one, quantize a model (RTN or GPTQ), and
write a model one can ship (bit-packed codes + scales, one ``.safetensors`` file).

The methods are in :mod:`qvec_jax.merge`, :mod:`qvec_jax.quant`, :mod:`qvec_jax.gptq`
and :mod:`qvec_jax.export`; these commands read and write checkpoints, name the data a
calibration uses, and print sizes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import qvec_jax as q
from qvec_jax import checkpoints, gptq, merge
from qvec_jax.cli import sources
from qvec_jax.cli.common import (
    QvecError,
    add_parser,
    bit_width,
    check_output,
    claim,
    finite_float,
    finite_floats,
    nonnegative_int,
    positive_int,
    refuse_quantized,
    restore_model,
    restore_qv,
    same_backbone,
    save,
    say_packed,
    writing,
)
from qvec_jax.export import export_packed

# ----------------------------------------------------------------------------- merge


class _Intermixed(argparse.ArgumentParser):
    """A parser that takes options between its positionals (``QV QV --method ties OUT``),
    which plain argparse cannot with a ``nargs="+"`` positional before another one, and
    negative numbers as the value of ``--weights`` (``--weights -1,1``, which argparse
    would take for an option)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        args = _glue_negative(sys.argv[1:] if args is None else list(args), "--weights")
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def _glue_negative(args: list, option: str) -> list:
    """``[option, "-1,1"]`` -> ``[option + "=-1,1"]``: a value that starts with a minus
    sign and a digit or a dot is a number list, never an option."""
    out = []
    for a in args:
        if out and out[-1] == option and re.match(r"-[\d.]", str(a)):
            out[-1] = f"{option}={a}"
        else:
            out.append(a)
    return out


def add_merge(sub) -> None:
    p = add_parser(
        sub,
        "merge",
        "merge several quantization vectors into one (mean, sum, TIES, DARE, Model Stock)",
        "qvec merge qvs/digits qvs/fashion qvs/kmnist --method ties --density 0.2 qvs/merged",
        "Merge QV checkpoints of `qvec extract` (one backbone) into one QV checkpoint in the "
        "same format, with the recipe and the inputs' fingerprints in its meta. Patch it "
        "like a single donor's QV (`qvec patch`).",
    )
    p.__class__ = _Intermixed
    p.add_argument("qvs", nargs="+", metavar="QV", help="QV checkpoints (two or more)")
    p.add_argument("out", help="output QV checkpoint dir")
    p.add_argument("--method", default="mean", choices=merge.METHODS, help="default mean")
    p.add_argument("--density", type=finite_float, help="ties: fraction kept per QV (0.2)")
    p.add_argument("--p", type=finite_float, help="dare: drop rate in [0, 1) (0.5)")
    p.add_argument("--seed", type=nonnegative_int, help="dare: seed of the drop masks (0)")
    p.add_argument("--combine", choices=merge.COMBINES, help="dare: how to combine (mean)")
    p.add_argument("--scope", choices=merge.SCOPES, help="ties/model_stock: global or leaf")
    p.add_argument("--weights", type=finite_floats, help="one weight per QV, e.g. 1,1,2 or -1,1")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_merge)


def _merge_spec(args) -> merge.MergeSpec:
    if args.weights is not None and len(args.weights) != len(args.qvs):
        raise QvecError(
            f"--weights: {len(args.weights)} weights for {len(args.qvs)} QVs; give one per QV"
        )
    kw = {k: getattr(args, k) for k in ("weights", "density", "p", "seed", "combine", "scope")}
    try:
        return merge.MergeSpec(args.method, **kw)
    except ValueError as e:  # "density: not a parameter of method 'mean' ..."
        raise QvecError(f"--{e}") from None


def _cmd_merge(args) -> int:
    if len(args.qvs) < 2:
        raise QvecError(f"merge needs two or more QVs, got {len(args.qvs)}; add QV checkpoints")
    _no_repeats(args.qvs)
    spec = _merge_spec(args)
    out = check_output(args.out, args.qvs, args.overwrite)
    with claim(out, args.overwrite):
        return _merge(args, spec, out)


def _no_repeats(paths) -> None:
    """Refuse a QV given twice (``sum`` would count it twice, ``mean`` weigh it double)."""
    seen: dict = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            raise QvecError(f"QV {p} is given twice ({seen[key]} and {p} are one checkpoint); "
                            "pass each QV once (--weights sets a QV's weight)")  # fmt: skip
        seen[key] = p


def _restore_qvs(paths) -> tuple[list, list]:
    """The QVs and their metas; two of different backbones, or two equal ones (same
    fingerprint: the hash of their leaves), are refused."""
    qvs, metas, prints = [], [], {}  # prints: {fingerprint: path}
    for path in paths:
        qv, meta = restore_qv(path)
        if metas:
            same_backbone(metas[0], meta, paths[0], path)
        fp = checkpoints.backbone_id(qv)
        if fp in prints:
            raise QvecError(
                f"QV {path} equals QV {prints[fp]} (same fingerprint {fp}: a copy of one QV); "
                "pass each QV once (--weights sets a QV's weight)"
            )
        prints[fp] = path
        qvs.append(qv)
        metas.append({**meta, "fingerprint": fp})  # read by _merged_meta only
    return qvs, metas


def _merge(args, spec, out) -> int:
    qvs, metas = _restore_qvs(args.qvs)
    try:
        merged = merge.merge_qvs(qvs, spec)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("weights:"):
            raise QvecError(f"--{msg}") from None
        msg = re.sub(r"qvs\[(\d+)\]", lambda m: args.qvs[int(m.group(1))], msg)
        raise QvecError(f"merging {', '.join(args.qvs)}: {msg}") from None
    meta = _merged_meta(args.qvs, metas, spec, merged)
    save(out, merged, meta)
    donors = ", ".join(str(i["task"]) for i in meta["merge"]["inputs"])
    print(
        f"merged QV ({spec.method}) of {len(qvs)} donors [{donors}]: {len(q.flatten(merged))} "
        f"leaves, global L2 norm {meta['global_norm']:.4g}; recipe {json.dumps(spec.to_dict())}"
    )
    return 0


def _merged_meta(paths, metas, spec, merged) -> dict:
    """A QV meta like `qvec extract`'s: model keys shared by the inputs (a key on which
    they differ is left out), the recipe and each input's path, task and fingerprint (the
    hash of its leaves, as checkpoints.backbone_id)."""
    shared = {}
    for key in ("backbone_id", "variant", "image_size", "bits", "granularity"):
        values = {json.dumps(m.get(key)) for m in metas}
        if len(values) == 1 and metas[0].get(key) is not None:
            shared[key] = metas[0][key]
    inputs = [
        {
            "path": str(Path(p).resolve()),
            "task": m.get("task"),
            "bits": m.get("bits"),
            "fingerprint": m["fingerprint"],
        }
        for p, m in zip(paths, metas)
    ]
    return {
        "kind": "qv",
        **shared,
        "global_norm": q.global_norm(merged),
        "merge": {"spec": spec.to_dict(), "inputs": inputs},
    }


# ----------------------------------------------------------------------------- quantizers

_CALIB_HELP = (
    "gptq only: calibration images: a task name (view syntax works: digits@rot90=1), "
    "'pretext' (the backbone's pretext task, from the checkpoint's config), 'donor' (a "
    "patched checkpoint's donor task) or 'noise' (synthetic). The checkpoint's own task "
    "is receiver data and is labelled so."
)


def _quant_options(p, out_help: str) -> None:
    """``IN OUT --bits --granularity --method --calib --calib-size --data-dir``."""
    p.add_argument("inp", metavar="IN", help="input checkpoint")
    p.add_argument("out", help=out_help)
    p.add_argument("--bits", type=bit_width, required=True, help="bit width, 2..8")
    p.add_argument("--granularity", default="channel", choices=("channel", "tensor"))
    p.add_argument(
        "--method", default="rtn", choices=("rtn", "gptq"), help="rtn (default; no data) or gptq"
    )
    p.add_argument("--calib", default=None, help=_CALIB_HELP)
    p.add_argument(
        "--calib-size", type=positive_int, default=128, help="gptq: calibration images (128)"
    )
    p.add_argument("--data-dir", default=None, help="where the calibration task's data lives")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _check_calib(args) -> None:
    if args.method == "rtn" and args.calib is not None:
        raise QvecError("--calib: RTN uses no data; drop --calib or pass --method gptq")
    if args.method == "gptq" and args.calib is None:
        raise QvecError("--calib: GPTQ needs calibration images: pass --calib TASK|pretext|noise")


def _quantize(args, params, meta):
    """``(tree, record)``: the RTN or GPTQ ``QTensor`` tree of ``params`` and what made it
    (method, spec, calibration data), printed and stored in the output's meta."""
    spec = q.QuantSpec(args.bits, args.granularity)
    record = {"bits": args.bits, "granularity": args.granularity}  # RTN's, as before GPTQ
    if args.method == "rtn":
        return q.quantize(params, spec), record
    model = checkpoints.model_from_meta(meta)
    calib = sources.resolve(
        args.calib,
        option="--calib",
        n=args.calib_size,
        image_size=int(meta["image_size"]),
        own_task=meta.get("task"),
        own="receiver",
        donor_task=(meta.get("patch") or {}).get("donor"),
        metas=(meta,),
        data_dir=args.data_dir,
    )
    print(f"GPTQ calibration data: {calib.label}")
    timings: dict = {}
    try:
        tree = gptq.gptq_quantize(params, model, calib.images, spec, timings=timings)
    except gptq.GPTQError as e:
        raise QvecError(f"{args.inp}: {e}") from None
    return tree, record | {"method": "gptq", "calib": calib.to_dict(), "seconds": timings}


def add_ptq(sub) -> None:
    p = add_parser(
        sub,
        "ptq",
        "post-training quantize, weights only: round-to-nearest or GPTQ",
        "qvec ptq patched/fashion_digits --bits 2 patched/fashion_digits_w2",
        "Fake-quantize the encoder-block kernels on the METHOD.md grid and write the "
        "dequantized params, ready for `qvec eval`; prints the packed model size. "
        "--method gptq picks the codes by GPTQ on --calib images (same grid). For a file "
        "one can ship, use `qvec export` (GPTQ's codes are not recovered from this output).",
    )
    _quant_options(p, "output checkpoint dir")
    p.set_defaults(func=_cmd_ptq)


def _cmd_ptq(args) -> int:
    _check_calib(args)
    out = check_output(args.out, [args.inp], args.overwrite)
    with claim(out, args.overwrite):
        params, meta = restore_model(args.inp)
        refuse_quantized(args.inp, meta, "ptq")
        tree, record = _quantize(args, params, meta)
        size = q.size_report(params, args.bits, granularity=args.granularity)
        save(out, q.dequantize(tree), {**meta, "ptq": record})
    print(json.dumps(size))
    return 0


# ----------------------------------------------------------------------------- export


def add_export(sub) -> None:
    p = add_parser(
        sub,
        "export",
        "write a quantized model one can ship: bit-packed codes + scales (.safetensors)",
        "qvec export patched/fashion_digits --bits 2 fashion_digits_w2.safetensors",
        "Quantize (RTN, or GPTQ with --calib) and write the packed codes, the scales, the "
        "unquantized leaves and the checkpoint's meta in one safetensors file (layout: "
        "qvec_jax/export.py). `qvec eval` and checkpoints.restore_params read it directly.",
    )
    _quant_options(p, "output file, e.g. model_w2.safetensors")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    _check_calib(args)
    if Path(args.out).is_dir():
        raise QvecError(f"output {args.out} is a directory; name a file (e.g. model.safetensors)")
    out = check_output(args.out, [args.inp], args.overwrite)
    with claim(out, args.overwrite):
        params, meta = restore_model(args.inp)
        refuse_quantized(args.inp, meta, "export")
        tree, record = _quantize(args, params, meta)
        spec = q.QuantSpec(args.bits, args.granularity)
        record |= {"method": args.method, "packed": True}
        with writing(out, "output"):
            disk = export_packed(tree, out, spec, meta={**meta, "ptq": record})
    print(json.dumps(say_packed(out, disk, params, spec)))
    return 0
