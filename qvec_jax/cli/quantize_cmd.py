"""``qvec quantize``: quantize a model with no data of its task, by the recipe chosen on the
study's dev half (:mod:`qvec_jax.recipe`), and write a packed export one can ship.

It generalizes ``qvec export``: the recipe may add a QV bank's vector first and calibrate
GPTQ on noise or on the backbone's pretext images; the console says which recipe, why,
and on one ``data used:`` line what data went in.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import qvec_jax as q
from qvec_jax import bank, gptq, recipe, select
from qvec_jax.cli import sources
from qvec_jax.cli.common import (
    QvecError,
    add_parser,
    check_output,
    claim,
    positive_int,
    refuse_quantized,
    restore_model,
    say_packed,
    writing,
)
from qvec_jax.export import export_packed
from qvec_jax.recipe import RecipeError


def _bits(text: str) -> int:
    """2, 3 or 4: the widths ``qvec quantize`` has a dev-chosen recipe for (4 bits takes
    the nearest measured width's, ``recipe.ranked_bits``, and says so)."""
    if text not in ("2", "3", "4"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use 2, 3 or 4 (the recipes were measured at "
            f"{', '.join(map(str, sorted(recipe.DEV_RANKING)))} bits); for another width use "
            "`qvec export --bits B` (RTN or GPTQ, no recipe)"
        )
    return int(text)


def _lam(text: str) -> float | str:
    """A finite number, or a lambda-strategy name (checked when the bank is known)."""
    try:
        x = float(text)
    except ValueError:
        return text
    return x if math.isfinite(x) else text


def add_quantize(sub) -> None:
    p = add_parser(
        sub,
        "quantize",
        "quantize a model you have no data for, by the recipe chosen on the study's dev half",
        "qvec quantize runs/cifar10/fp/params c10_w3.safetensors --bits 3 --bank "
        "b16_bank.safetensors",
        "Quantize FP_CKPT by a recipe: optionally add a QV bank's vector (qvec qv-bank "
        "build), then RTN or GPTQ calibrated on synthetic noise or on the backbone's pretext "
        "images, never on the receiver's own task (a pretext sample that holds receiver "
        "images is said so). Without --calib the recipe is the dev study's default for "
        "--bits, or the next in its ranking that fits what you have (no bank, no pretext "
        "task known). Writes a packed export (as `qvec export`) with the recipe and "
        "the data it used in its meta; `qvec eval OUT` reads it.",
    )
    p.add_argument("inp", metavar="FP_CKPT", help="the FP checkpoint to quantize")
    p.add_argument("out", metavar="OUT", help="output file, e.g. model_w3.safetensors")
    p.add_argument("--bits", type=_bits, required=True, help="bit width: 2, 3 or 4")
    p.add_argument("--bank", default=None, metavar="FILE", help="a QV bank of the backbone")
    p.add_argument("--calib", choices=recipe.CALIBS, default=None,
                   help="none (RTN), noise or pretext (GPTQ); default: the dev-chosen "
                   "recipe's")  # fmt: skip
    p.add_argument("--lam", type=_lam, default=None, metavar="X|STRATEGY",
                   help="the bank's lambda: a number (1 = zero-shot) or a lambda strategy; "
                   "asks for the bank (default: the dev-best for the recipe and the bank's "
                   "merge method, recipe.DEV_BANK_LAMS)")  # fmt: skip
    p.add_argument("--calib-size", type=positive_int, default=128, help="GPTQ images (128)")
    p.add_argument("--granularity", default="channel", choices=("channel", "tensor"))
    p.add_argument("--data-dir", default=None, help="where the pretext task's data lives")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args) -> int:
    if Path(args.out).is_dir():
        raise QvecError(f"output {args.out} is a directory; name a file (e.g. model.safetensors)")
    if args.lam is not None and args.bank is None:
        raise QvecError("--lam: it is the bank's lambda; pass --bank FILE too, or drop --lam")
    if args.lam is not None:
        try:
            recipe.Recipe(bank=True, calib="none", lam=args.lam)
        except (RecipeError, TypeError, ValueError) as e:
            raise QvecError(f"--lam {args.lam}: {e}") from None
    inputs = [args.inp] + ([args.bank] if args.bank else [])
    out = check_output(args.out, inputs, args.overwrite)
    with claim(out, args.overwrite):
        params, meta = restore_model(args.inp)
        refuse_quantized(args.inp, meta, "quantize")
        b = _bank(args, meta, params)
        tree, record = _run(args, params, meta, b)
        _say(args, record, b)
        spec = q.QuantSpec(args.bits, args.granularity)
        ptq = record | {"packed": True}  # what `qvec eval` and checkpoints.quantized read
        with writing(out, "output"):
            disk = export_packed(tree, out, spec, meta={**meta, "ptq": ptq, "quantize": record})
    say_packed(out, disk, params, spec)
    return 0


def _bank(args, meta, params) -> bank.Bank | None:
    """The ``--bank`` file, checked against ``--bits``/``--granularity`` and the receiver."""
    if args.bank is None:
        return None
    try:
        b = bank.load_bank(args.bank)
        recipe.check_bank_fits(b, args.bits, args.granularity, opt="--")
        b.check_receiver(meta, params, where=args.inp)
    except (bank.BankError, RecipeError) as e:
        raise QvecError(f"--bank {args.bank}: {e}") from None
    return b


def _run(args, params, meta, b) -> tuple:
    """``recipe.quantize_model`` with the CLI's options; its refusals as QvecErrors."""
    pretext = sources.pretext_task(meta) or (b.pretext if b is not None else None)
    if args.calib == "pretext" and pretext is None:
        raise QvecError(
            f"--calib pretext: the pretext task is not known ({args.inp}'s config names no qvec "
            "checkpoint as init.path, and no --bank says); pass --calib noise"
        )
    try:
        return recipe.quantize_model(
            params, bits=args.bits, bank=b, calib=args.calib, lam=args.lam,
            granularity=args.granularity, pretext=pretext, calib_size=args.calib_size,
            data_dir=args.data_dir, meta=meta,
        )  # fmt: skip
    except select.SelectError as e:
        raise QvecError(f"--lam {args.lam}: {e}") from None
    except (RecipeError, bank.BankError, gptq.GPTQError) as e:
        raise QvecError(f"{args.inp}: {e}") from None


def _say(args, record: dict, b) -> None:
    """The recipe, why, the bank's lambda, and exactly one ``data used:`` line."""
    print(f"recipe: {record['recipe']} ({record['bits']}-bit {record['granularity']}); "
          f"chosen on {record['chosen_on']}: {record['why']}")  # fmt: skip
    if b is not None and record["bank"] is None:
        print(f"bank {args.bank} given but not used: {record['recipe']} ranks above every "
              "recipe with a bank on the dev half (docs/results.md); pass --lam X (e.g. 0.25) "
              "to add it anyway")  # fmt: skip
    rec = record["bank"] or {}
    if "lam_choice" in rec:
        c = rec["lam_choice"]
        print(f"bank lambda {rec['lam']:g} chosen by {c['strategy']}: {c['why']}")
    print("data used: " + _data_used(args, record))
    if record["receiver_data"]:
        print("NOT zero-shot: the calibration images hold (or may hold) the receiver's images")


def _data_used(args, record: dict) -> str:
    """What data went in, in one line (noise images are no data)."""
    parts = []
    rec, cal = record["bank"], record["calib"] or {}
    if rec is not None:
        n = len(rec["donors"])
        parts.append(f"donor QAT weights (bank {args.bank}: {n} donor{'s' * (n != 1)})")
        if "lam_images" in rec:
            li = rec["lam_images"]
            parts.append(f"{li['n']} pretext images of {li['task']} to choose lambda")
    if cal.get("source") in ("pretext", recipe.USER):
        parts.append(cal["label"])
    text = " + ".join(parts)
    if cal.get("source") == "noise":
        noise = f"GPTQ calibrated on {cal['n']} synthetic noise images, no data"
        return f"{text}; {noise}" if text else f"none ({noise})"
    return text or "none"
