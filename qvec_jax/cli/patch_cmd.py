"""``qvec patch``: ``FP_R + lam * QV_D``, with ``lam`` given or chosen without receiver
labels (``--lam auto``: a :mod:`qvec_jax.select` strategy on the images ``--proxy`` names).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import qvec_jax as q
from qvec_jax import checkpoints, select
from qvec_jax.cli import sources
from qvec_jax.cli.common import (
    QvecError,
    add_parser,
    bit_width,
    check_output,
    finite_float,
    positive_int,
    refuse_quantized,
    restore,
    restore_qv,
    same_backbone,
    save,
)
from qvec_jax.data import overlap

# ----------------------------------------------------------------------------- patch

#: The strategy of ``qvec patch --lam auto`` when ``--strategy`` is not given, and the
#: images it reads when ``--proxy`` is not: the winner of ``qvec tune`` on the demo's DEV
#: task set (``proxy-pretext-kl:margin=0.05``, docs/results.md).
DEFAULT_AUTO_STRATEGY = "proxy-kl:margin=0.05"
DEFAULT_PROXY = "pretext"
#: ``--strategy`` choices: weight-only strategies (no data), and ``proxy-<measure>``:
#: ``select.Proxy`` with that measure on the ``--proxy`` inputs. Every name ``qvec tune``
#: prints is accepted too (:data:`NAMED_PROXY`).
AUTO_STRATEGIES = ("lam=1", "norm-ratio", "alignment", "model-stock", "rtn-error") + tuple(
    f"proxy-{m}" for m in select.MEASURES
)
#: A proxy named as ``qvec tune`` and the grid name it: its images' kind, then their
#: number (none: 256), then the measure: ``proxy-pretext-kl``, ``proxy-donor64-agree``,
#: ``proxy-rx32-cos`` (the receiver's own images: not zero-shot).
NAMED_PROXY = re.compile(r"proxy-(donor|pretext|noise|rx)(\d*)-(kl|agree|cos)")
#: The ``--proxy`` keyword of each kind a named proxy reads.
_PROXY_OF = {"donor": "donor", "pretext": "pretext", "noise": "noise", "rx": "receiver"}
_KIND_OF = {"donor": "donor", "pretext": "pretext", "noise": "noise", "rx": "unlabelled receiver"}


def add_patch(sub) -> None:
    p = add_parser(
        sub,
        "patch",
        "patch a receiver: FP_R + lam * QV_D (lam given, or chosen without receiver labels)",
        "qvec patch runs/fashion/fp/params qvs/digits --lam auto --proxy pretext out/fd",
        "Add lam times a quantization vector to a receiver's FP params. lam=1 is zero-shot "
        "(no receiver data); PTQ the result with `qvec ptq`. --lam auto chooses lam from "
        f"{list(select.CANDIDATES)} with --strategy (default {DEFAULT_AUTO_STRATEGY} on "
        f"--proxy {DEFAULT_PROXY}: the KL of PTQ(FP_R + lam QV) to FP_R on pretext images, "
        "staying at lam=1 unless another lam is 5% closer; chosen on the demo's DEV task "
        "set) and prints the choice, why, and the data it used.",
    )
    p.add_argument("fp", help="receiver FP checkpoint")
    p.add_argument("qv", help="QV checkpoint from `qvec extract` or `qvec merge`")
    p.add_argument("out", help="output checkpoint dir")
    p.add_argument(
        "--lam", type=_lam, default=1.0, help="scale of the QV, finite, or 'auto' (default 1.0)"
    )
    p.add_argument(
        "--strategy",
        type=_auto_strategy,
        default=None,
        help=f"--lam auto: how to choose, one of {', '.join(AUTO_STRATEGIES)}, with tunable "
        "constants as ':name=value' (e.g. proxy-kl:margin=0.2, norm-ratio:multiple=0.5; "
        f"default {DEFAULT_AUTO_STRATEGY}), or any name `qvec tune` prints, e.g. "
        "proxy-pretext-kl:margin=0.05 (its images: --proxy pretext, 256 of them) or "
        "proxy-donor64-kl",
    )
    p.add_argument(
        "--proxy",
        default=None,
        help="--lam auto, proxy-* strategies: the unlabelled images: a task name (view syntax "
        f"works), 'donor' (the QV's task), 'pretext' (default {DEFAULT_PROXY}; the donor's "
        "images when the pretext task is not known) or 'noise'. The receiver's own "
        "task is receiver data (not zero-shot) and is labelled so.",
    )
    p.add_argument(
        "--proxy-size",
        type=positive_int,
        default=None,
        help="proxy images (default: the strategy name's number, else 256)",
    )
    p.add_argument(
        "--bits", type=bit_width, default=None, help="--lam auto: PTQ width (default: the QV's)"
    )
    p.add_argument("--granularity", default=None, choices=("channel", "tensor"))
    p.add_argument("--data-dir", default=None, help="where the --proxy task's data lives")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_patch)


def _auto_strategy(text: str) -> str:
    try:
        family, _ = select.split_name(text)
    except select.SelectError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if family not in AUTO_STRATEGIES and not NAMED_PROXY.fullmatch(family):
        raise argparse.ArgumentTypeError(
            f"{family!r}: use one of {', '.join(AUTO_STRATEGIES)}, or a name `qvec tune` "
            "prints (e.g. proxy-pretext-kl, proxy-donor64-kl)"
        )
    return text


def _lam(text: str):
    return "auto" if text == "auto" else finite_float(text)


def _check_patch_options(args) -> None:
    options = ("strategy", "proxy", "proxy_size", "bits", "granularity")
    auto_only = [o.replace("_", "-") for o in options if getattr(args, o)]
    if args.lam != "auto" and auto_only:
        raise QvecError(
            f"--{auto_only[0]} applies with --lam auto only; drop it or pass --lam auto"
        )
    strategy = args.strategy or DEFAULT_AUTO_STRATEGY
    for option in ("proxy", "proxy_size"):
        if args.lam == "auto" and getattr(args, option) and not strategy.startswith("proxy-"):
            flag = "--" + option.replace("_", "-")
            raise QvecError(f"{flag}: strategy {strategy} uses no images; drop {flag}")


def _cmd_patch(args) -> int:
    _check_patch_options(args)
    out = check_output(args.out, [args.fp, args.qv], args.overwrite)
    fp, fmeta = restore(args.fp)
    refuse_quantized(args.fp, fmeta, "patch")
    qv, vmeta = restore_qv(args.qv)
    same_backbone(fmeta, vmeta, args.fp, args.qv)
    info = {"qv": str(Path(args.qv).resolve()), "donor": _donor(vmeta)}
    if args.lam == "auto":
        choice, used = _auto_lambda(args, fp, fmeta, qv, vmeta)
        lam, zero_shot = choice.lam, not (used and used.receiver_data)
        info["select"] = choice.to_dict() | {"inputs": used.to_dict() if used else None}
    else:
        lam, zero_shot = args.lam, args.lam == 1.0
    try:
        patched = q.patch(fp, qv, lam)
    except ValueError as e:
        raise QvecError(f"{args.fp} + {args.qv}: {e}") from None
    meta = {**fmeta, "mode": "patched", "patch": info | {"lam": lam, "zero_shot": zero_shot}}
    save(out, patched, meta)
    return 0


def _donor(vmeta: dict) -> str | None:
    """The donor task of a QV; a merged QV's donors joined by '+'."""
    inputs = (vmeta.get("merge") or {}).get("inputs")
    return "+".join(str(i.get("task")) for i in inputs) if inputs else vmeta.get("task")


def _auto_lambda(args, fp, fmeta, qv, vmeta):
    """``(select.Choice, sources.Images or None)`` of ``--lam auto``; prints both."""
    bits = args.bits or vmeta.get("bits")
    if not bits:
        raise QvecError(f"--bits: {args.qv} names no bit width in its meta; pass --bits B")
    spec = q.QuantSpec(int(bits), args.granularity or vmeta.get("granularity") or "channel")
    name, used, inputs = args.strategy or DEFAULT_AUTO_STRATEGY, None, None
    model = checkpoints.model_from_meta(fmeta)
    try:
        if name.startswith("proxy-"):
            family, constants = select.split_name(name)
            kind, n, measure = _proxy_spec(family, args.proxy_size)
            used = _proxy_images(args, fmeta, vmeta, model.image_size, kind, n)
            if args.proxy and kind is not None and used.kind != _KIND_OF[kind]:
                raise QvecError(
                    f"--proxy {args.proxy}: strategy {name} reads {_KIND_OF[kind]} images, but "
                    f"these are {used.kind} images; drop --proxy or use --strategy "
                    f"proxy-{measure}"
                )
            strategy = select.Proxy(used.kind, measure, n=n).with_constants(constants)
            inputs = {used.kind: used.images}
        else:
            strategy = select.get_strategy(name)
    except select.SelectError as e:
        raise QvecError(f"--strategy: {e}") from None
    try:
        choice = select.select_lambda(fp, qv, spec, model, strategy=strategy, inputs=inputs)
    except ValueError as e:
        raise QvecError(f"--lam auto ({name}) on {args.fp} + {args.qv}: {e}") from None
    data = used.label if used else "none (weights only)"
    print(f"lambda {choice.lam:g} chosen by {choice.strategy} at {spec.bits} bits: {choice.why}")
    print(f"data: {data}")
    if used and used.receiver_data and used.kind == "unlabelled receiver":
        print("note: the receiver's own images were used: this choice is not zero-shot")
    elif used and used.receiver_data:
        counts = used.overlap
        what = "some may be" if counts is None else f"{sum(counts.values())} are"
        split = "" if counts is None else f" ({overlap.describe(counts)})"
        print(f"note: of these {used.kind} images, {what} the receiver's own images{split}: "
              "this choice is not zero-shot")  # fmt: skip
    pairs = zip(choice.candidates, choice.scores)
    scores = ", ".join(f"{c:g}: {'-' if s is None else f'{s:.4g}'}" for c, s in pairs)
    print(f"scores (higher is better): {scores}")
    return choice, used


def _proxy_spec(family: str, size: int | None) -> tuple[str | None, int, str]:
    """``(kind, n, measure)`` of a proxy strategy's family: ``proxy-<measure>`` (kind None:
    ``--proxy``'s, ``n``: ``--proxy-size`` or 256) or a name as ``qvec tune`` prints it
    (its kind, its number or 256; a ``--proxy-size`` that differs is refused)."""
    m = NAMED_PROXY.fullmatch(family)
    if m is None:
        return None, size or 256, family[len("proxy-") :]
    n = int(m[2]) if m[2] else 256
    if m[1] == "rx" and not m[2]:
        raise QvecError(
            f"--strategy {family}: name the number of receiver images, e.g. proxy-rx32-kl"
        )
    if size is not None and size != n:
        raise QvecError(
            f"--proxy-size {size}: strategy {family} reads {n} images; drop --proxy-size or "
            f"name proxy-{m[1]}{size}-{m[3]}"
        )
    return m[1], n, m[3]


def _proxy_images(args, fmeta, vmeta, image_size: int, kind: str | None, n: int):
    """The ``--proxy`` images (default: ``kind``'s keyword, else ``DEFAULT_PROXY``)."""
    donor = vmeta.get("task")
    fp_meta = _read_fp_meta(vmeta)
    text = args.proxy or (_PROXY_OF[kind] if kind else DEFAULT_PROXY)
    if args.proxy is None and kind is None and sources.pretext_task(fmeta, fp_meta) is None:
        print("note: the pretext task is not known from the checkpoints' configs; using the "
              "donor's images (pass --proxy TASK|pretext|donor|noise to choose)")  # fmt: skip
        text = "donor"
    if text == "donor" and not donor:
        raise QvecError(
            f"--proxy: {args.qv} names no single donor task (a merged QV?); pass --proxy "
            "TASK, pretext or noise"
        )
    return sources.resolve(
        text,
        option="--proxy",
        n=n,
        image_size=image_size,
        own_task=fmeta.get("task"),
        own="receiver",
        donor_task=donor,
        metas=(fmeta, fp_meta),
        data_dir=args.data_dir,
    )


def _read_fp_meta(vmeta: dict) -> dict:
    """The meta of the donor's FP checkpoint (for its config), or {} if it is gone."""
    try:
        return checkpoints.read_meta(vmeta["fp"]) if vmeta.get("fp") else {}
    except (OSError, ValueError):
        return {}
