"""The data-free quantizer a user deploys: an FP model in, a quantized ``QTensor`` tree out,
by a *recipe* chosen on the study's dev half.

A :class:`Recipe`: ``bank``, add a QV bank's vector first (``FP + lam * QV``,
:mod:`qvec_jax.bank`); ``calib``, RTN (``"none"``) or GPTQ calibrated on synthetic
``"noise"`` or on the backbone's ``"pretext"`` task's train images; ``lam``, the bank's
lambda: a number (1 is zero-shot) or a strategy name reading no data, noise or pretext
images. None reads the receiver's data; :attr:`Recipe.data` says what each reads.

:func:`quantize_model` runs the default of the bit width (``DEFAULT_RECIPES``) unless told,
or the next recipe of ``DEV_RANKING`` that fits what the caller has (:func:`choose_recipe`).
A recipe is its definition: RTN is ``packing.quantize(params)``, RTN+bank
``packing.quantize(trees.patch(params, bank.qv, lam))``, GPTQ ``gptq.gptq_quantize(params,
model, images)`` on the same trees (tests/test_quantize.py checks it). ``qvec quantize``
writes the result as a packed export.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from qvec_jax import bank as qbank
from qvec_jax import checkpoints, gptq, packing, quant, select, trees
from qvec_jax.data import overlap
from qvec_jax.paths import check_lam

#: Calibration choices of a recipe: RTN (no images), GPTQ on noise, GPTQ on pretext images.
CALIBS = ("none", "noise", "pretext")
#: A recipe calibrated on the caller's own images (``quantize_model(calib=<array>)``).
USER = "user"
#: What a bank's lambda strategy may read (a bank keeps no donor images, and no receiver's).
LAM_DATA = ("none", "noise", "pretext")
#: ``record["chosen_on"]`` when the dev-half choice was used, and when the caller chose.
DEV_CHOICE, USER_CHOICE = "the study's dev half (docs/results.md)", "the user's options"


class RecipeError(ValueError):
    """A recipe that cannot run with what was given (one line: what is missing, what to do)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """``bank``: patch ``FP + lam * QV_bank`` first; ``calib``: ``"none"`` (RTN), ``"noise"``
    or ``"pretext"`` (GPTQ on those images; ``"user"``: on the caller's); ``lam``: the
    bank's lambda, a number or a lambda-strategy name (stored canonically)."""

    bank: bool
    calib: str
    lam: float | str = 1.0

    def __post_init__(self):
        if not isinstance(self.bank, bool):
            raise RecipeError(f"Recipe bank must be True or False, got {self.bank!r}")
        if self.calib not in (*CALIBS, USER):
            raise RecipeError(f"Recipe calib {self.calib!r}: use one of {', '.join(CALIBS)}")
        if isinstance(self.lam, str):
            s = select.get_strategy(self.lam)
            if s.data not in LAM_DATA:
                raise RecipeError(
                    f"lambda strategy {s.name!r} reads {s.data} data, which a bank does not "
                    "hold; use a number, a weight-only strategy or a noise/pretext proxy"
                )
            object.__setattr__(self, "lam", s.name)
        else:
            object.__setattr__(self, "lam", check_lam(self.lam))
        if not self.bank and self.lam != 1.0:
            raise RecipeError(f"lam {self.lam!r} is the bank's lambda; a recipe without a "
                              "bank takes none (use bank=True)")  # fmt: skip

    @property
    def method(self) -> str:
        """``"rtn"`` or ``"gptq"``."""
        return "rtn" if self.calib == "none" else "gptq"

    @property
    def name(self) -> str:
        """``rtn``, ``rtn+bank``, ``gptq:noise``, ``gptq+bank:pretext``; a bank lambda
        other than 1 follows an ``@`` (``rtn+bank@0.5``, ``gptq+bank:noise@norm-ratio``)."""
        name = self.method + ("+bank" if self.bank else "")
        name += "" if self.calib == "none" else f":{self.calib}"
        if self.lam != 1.0:
            name += f"@{self.lam if isinstance(self.lam, str) else f'{self.lam:g}'}"
        return name

    @property
    def lam_data(self) -> str:
        """The data kind the bank's lambda reads (``"none"`` for a number)."""
        return select.get_strategy(self.lam).data if isinstance(self.lam, str) else "none"

    @property
    def data(self) -> str:
        """What the recipe uses, in words: ``"none"``, ``"donor QAT (the bank)"``,
        ``"pretext images"``, ``"donor QAT (the bank) + pretext images"``, ... (noise is
        no data)."""
        parts = ["donor QAT (the bank)"] if self.bank else []
        if self.calib == "pretext" or (self.bank and self.lam_data == "pretext"):
            parts.append("pretext images")
        if self.calib == USER:
            parts.append("user images")
        return " + ".join(parts) or "none"


def _ranking(*names: str) -> tuple[Recipe, ...]:
    """Recipes from names: ``[method][+bank][:calib][@lam]``."""
    out = []
    for n in names:
        n, _, lam = n.partition("@")
        head, _, calib = n.partition(":")
        out.append(Recipe(bank=head.endswith("+bank"), calib=calib or "none", lam=float(lam or 1)))
    return tuple(out)


#: The recipes ranked by mean test accuracy on the study's DEV half (16 views; the 2-bit
#: study of issue 21 and its 3-bit twin, ``quant.bits=3 --lambdas 0,1``; docs/results.md,
#: "qvec quantize"), each bank the leave-one-out merge by ``bank.DEFAULT_METHODS[bits]``
#: at its dev-best lambda of 0.25, 0.5 and 1 under GPTQ (RTN: 1, zero-shot). The first is
#: the default; the others, the fallbacks (it needs a bank or a pretext task one lacks).
#: At 3 bits the recipes lie within 2 points of one another, at the noise level.
DEV_RANKING: dict[int, tuple[Recipe, ...]] = {
    2: _ranking("gptq:pretext", "gptq+bank:pretext@0.25", "gptq+bank:noise@0.5", "gptq:noise",
                "rtn+bank", "rtn"),
    3: _ranking("gptq+bank:pretext@0.5", "gptq:pretext", "gptq+bank:noise@0.5", "gptq:noise",
                "rtn", "rtn+bank"),
}  # fmt: skip
#: The default recipe per measured bit width: the head of its dev ranking.
DEFAULT_RECIPES: dict[int, Recipe] = {b: r[0] for b, r in DEV_RANKING.items()}
#: Dev-best bank lambda per ``(bits, merge method, calib)`` (other methods: ``Bank.lam``).
DEV_BANK_LAMS: dict[tuple[int, str, str], float] = {
    (2, "ties", "none"): 1.0, (2, "ties", "noise"): 0.5, (2, "ties", "pretext"): 0.25,
    (2, "mean", "none"): 1.0, (2, "mean", "noise"): 0.25, (2, "mean", "pretext"): 0.25,
    (3, "ties", "none"): 1.0, (3, "ties", "noise"): 0.25, (3, "ties", "pretext"): 0.25,
    (3, "mean", "none"): 1.0, (3, "mean", "noise"): 0.5, (3, "mean", "pretext"): 0.5,
}  # fmt: skip


def ranked_bits(bits: int) -> int:
    """The bit width whose dev ranking applies: ``bits`` if measured, else the nearest
    measured one (the wider on a tie)."""
    bits = quant.check_bits(bits)
    return min(DEV_RANKING, key=lambda b: (abs(b - bits), -b))


def _lack(r: Recipe, have_bank: bool, have_pretext: bool) -> str | None:
    """What ``r`` needs that is not available, in words (None: it fits)."""
    if r.bank and not have_bank:
        return "needs a QV bank (none given)"
    if "pretext" in (r.calib, r.lam_data if r.bank else None) and not have_pretext:
        return "needs the pretext task (none known)"
    return None


def choose_recipe(
    bits: int, *, have_bank: bool, have_pretext: bool, calib=None, bank=None
) -> tuple[Recipe, str]:
    """``(recipe, why)``: the first recipe of ``DEFAULT_RECIPES[b]``, then ``DEV_RANKING[b]``
    (``b``: :func:`ranked_bits`) that fits what is available and what the caller fixed
    (``calib`` one of ``CALIBS``, ``bank`` True/False); ``why`` says so in one line."""
    if calib is not None and calib not in CALIBS:
        raise RecipeError(f"calib {calib!r}: use one of {', '.join(CALIBS)} or an image array")
    b = ranked_bits(bits)
    default = DEFAULT_RECIPES[b]
    wanted = [r for r in (default, *DEV_RANKING[b]) if calib in (None, r.calib)
              and bank in (None, r.bank)]  # fmt: skip
    fits = [r for r in wanted if _lack(r, have_bank, have_pretext) is None]
    where = f"at {b} bits" + ("" if b == bits else f" (the nearest measured to {bits} bits)")
    fixed = " and ".join(f"{k}={v!r}" for k, v in (("calib", calib), ("bank", bank)) if v
                         is not None)  # fmt: skip
    if not fits:
        first = wanted[0] if wanted else default
        raise RecipeError(f"no recipe {where} with {fixed or 'what is given'}: {first.name} "
                          f"{_lack(first, have_bank, have_pretext)}; pass pretext= (a task) "
                          "or bank=, or use calib='noise'")  # fmt: skip
    r = fits[0]
    if fixed:
        return r, f"the dev ranking {where}: its first recipe with {fixed} that fits"
    if r == default:
        return r, f"the dev half's choice {where}"
    return r, (f"the dev half's choice {where} is {default.name}, which "
               f"{_lack(default, have_bank, have_pretext)}; {r.name} ranks first among the "
               "recipes that fit")  # fmt: skip


def default_recipe(
    bits: int, *, have_bank: bool, have_pretext: bool, calib=None, bank=None
) -> Recipe:
    """The recipe :func:`choose_recipe` picks (without its reason)."""
    return choose_recipe(bits, have_bank=have_bank, have_pretext=have_pretext, calib=calib,
                         bank=bank)[0]  # fmt: skip


# ----------------------------------------------------------------------------- run


def check_bank_fits(b: qbank.Bank, bits: int, granularity: str, *, opt: str = "") -> None:
    """Refuse a bank of another QAT quant spec than the requested one (``opt``: how the
    caller spells the options, ``"--"`` for the CLI, ``""`` for keywords)."""
    eq = " " if opt else "="
    if b.bits != bits:
        raise RecipeError(
            f"bank built for {b.bits}-bit {b.granularity} QAT; pass {opt}bits{eq}{b.bits} or "
            f"build a bank of {bits}-bit donors"
        )
    if b.granularity != granularity:
        raise RecipeError(
            f"bank built for {b.bits}-bit {b.granularity} QAT; pass {opt}granularity{eq}"
            f"{b.granularity} or build a bank of per-{granularity} donors"
        )


def _load_bank(bank, spec, meta, params) -> qbank.Bank | None:
    """The bank (loaded from a path), checked against the spec and (with meta) the receiver."""
    if bank is None:
        return None
    if isinstance(bank, (str, os.PathLike)):
        bank = qbank.load_bank(bank)
    if not isinstance(bank, qbank.Bank):
        raise RecipeError(f"bank must be None, a Bank or a path, got {type(bank).__name__}")
    check_bank_fits(bank, spec.bits, spec.granularity)
    if meta is not None:
        bank.check_receiver(meta, params)
    return bank


def _pick(bits, b, calib, lam, have_pretext: bool) -> tuple[Recipe, str, str]:
    """``(recipe, why, chosen_on)`` for the caller's ``calib`` (None, a name, or images)."""
    if lam is not None and b is None:
        raise RecipeError("lam= is the bank's lambda; pass bank= too, or drop lam=")
    fixed = None if lam is None else True  # a lambda given asks for the bank
    if calib is not None and not isinstance(calib, str):
        lam = (b.lam if b is not None else 1.0) if lam is None else lam
        r = Recipe(bank=b is not None, calib=USER, lam=lam)
        return r, "GPTQ calibrated on the images given as calib=", USER_CHOICE
    r, why = choose_recipe(bits, have_bank=b is not None, have_pretext=have_pretext,
                           calib=calib, bank=fixed)  # fmt: skip
    if r.bank and lam is None:  # the dev-best lambda of the bank's merge method
        lam = DEV_BANK_LAMS.get((ranked_bits(bits), b.method, r.calib), b.lam)
    r = dataclasses.replace(r, lam=lam) if r.bank else r
    if r.bank and r.lam_data == "pretext" and not have_pretext:
        raise RecipeError(f"lambda strategy {r.lam!r} reads pretext images: pass pretext= (a "
                          "task), or use a number or a weight-only or noise strategy")  # fmt: skip
    return r, why, DEV_CHOICE if calib is None else USER_CHOICE


def _model(model, meta, what: str):
    if model is not None:
        return model
    if meta is None:
        raise RecipeError(f"{what} runs the model: pass model= (the flax ViT) or meta= (a "
                          "checkpoint's meta), or use calib='none' (RTN)")  # fmt: skip
    return checkpoints.model_from_meta(meta)


def _train_images(task: str, n: int, image_size: int, seed: int, data_dir) -> np.ndarray:
    """``select.train_images``, with a missing data set as a RecipeError naming the task."""
    try:
        return select.train_images(task, n, image_size=image_size, seed=seed, data_dir=data_dir)
    except (KeyError, ValueError, OSError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise RecipeError(f"pretext task {task}: cannot read its train images ({msg}); pass "
                          "data_dir= where it lives, or use calib='noise'") from None  # fmt: skip


def _with_bank(params, b, r: Recipe, spec, ctx: dict) -> tuple:
    """``(FP + lam * QV_bank, bank record)``, or ``(params, None)`` without a bank; a
    strategy's lambda is chosen here (its images: noise or the pretext task's)."""
    if not r.bank:
        return params, None
    t = time.perf_counter()
    rec = {"checksum": b.checksum, "donors": list(b.donors), "merge": b.provenance["merge"]}
    lam = r.lam
    if isinstance(lam, str):
        s = select.get_strategy(lam)
        model = _model(ctx["model"], ctx["meta"], f"lambda strategy {s.name!r}") if (
            s.data != "none") else None  # fmt: skip
        inputs = None
        if s.data == "pretext":
            inputs = {"pretext": _train_images(ctx["pretext"], s.n, model.image_size,
                                               ctx["seed"], ctx["data_dir"])}  # fmt: skip
            rec["lam_images"] = {"task": ctx["pretext"], "n": len(inputs["pretext"])}
        choice = select.select_lambda(params, b.qv, spec, model, strategy=s, inputs=inputs)
        lam, rec["lam_choice"] = choice.lam, choice.to_dict()
    rec["lam"] = lam
    patched = jax.block_until_ready(trees.patch(params, b.qv, lam))
    ctx["seconds"]["bank"] = time.perf_counter() - t
    return patched, rec


def _pretext_label(n: int, task: str, receiver, seed: int, data_dir) -> tuple:
    """``(label, counts, receiver_data)`` of ``n`` pretext images of ``task``: how many of
    the receiver's images they hold (``counts`` None: not counted)."""
    label, counts = f"{n} pretext images of {task}", None
    try:
        counts = receiver and overlap.overlap_counts(task, n, receiver, seed=seed,
                                                     data_dir=data_dir)  # fmt: skip
    except (KeyError, ValueError, OSError):
        pass
    if overlap.has_overlap(counts):
        said = f"{overlap.describe(counts)}: receiver data, NOT zero-shot"
        return f"{label} (it holds receiver images: {said})", counts, True
    if not receiver:
        return f"{label} (the receiver's task is not known: overlap not counted)", None, False
    if counts is None and overlap.may_overlap(task, receiver):
        return f"{label} (it may hold receiver images, not counted: NOT zero-shot)", None, True
    return f"{label} (0 of the receiver's images)", counts, False


def _calibration(r: Recipe, calib, model, ctx: dict) -> tuple:
    """``(images, calib record, receiver_data)`` of a GPTQ recipe (``(None, None, False)``
    for RTN)."""
    if r.calib == "none":
        return None, None, False
    t, n, seed = time.perf_counter(), ctx["calib_size"], ctx["seed"]
    task, counts, receiver_data = None, None, False
    if r.calib == USER:
        images, seed = np.asarray(calib, np.float32), None
        label, receiver_data = f"{len(images)} user images (they may be the receiver's)", True
    elif r.calib == "noise":
        images = np.asarray(select.noise_images(n, model.image_size, seed=seed))
        label = f"{n} synthetic noise images (no data)"
    else:
        task = ctx["pretext"]
        images = _train_images(task, n, model.image_size, seed, ctx["data_dir"])
        receiver = (ctx["meta"] or {}).get("task")
        label, counts, receiver_data = _pretext_label(len(images), task, receiver, seed,
                                                      ctx["data_dir"])  # fmt: skip
    rec = {"source": r.calib, "task": task, "n": int(len(images)), "seed": seed, "label": label}
    ctx["seconds"]["calib"] = time.perf_counter() - t
    return images, rec | {"overlap": counts}, receiver_data


def _quantize(r: Recipe, tree, images, spec, ctx: dict):
    """RTN or GPTQ of ``tree``: the QTensor tree; its seconds in ``ctx["seconds"]``."""
    t = time.perf_counter()
    if r.method == "rtn":
        out = jax.block_until_ready(packing.quantize(tree, spec))
    else:
        out = gptq.gptq_quantize(tree, ctx["model"], images, spec, timings=ctx["seconds"])
    ctx["seconds"][r.method] = time.perf_counter() - t
    return out


def quantize_model(
    params,
    *,
    bits: int,
    bank=None,
    calib=None,
    model=None,
    lam=None,
    granularity: str = "channel",
    pretext: str | None = None,
    calib_images=None,
    calib_size: int = 128,
    seed: int = 0,
    data_dir: str | None = None,
    meta: dict | None = None,
) -> tuple:
    """Quantize ``params`` (an FP ViT) by a recipe; return ``(QTensor tree, record)``.

    ``bank``: None, a ``bank.Bank`` or its path; it must be of this QAT spec and (with
    ``meta``) fit the receiver. ``calib``: None (the dev-chosen recipe, with fallbacks:
    :func:`choose_recipe`), ``"none"`` (RTN), ``"noise"``, ``"pretext"`` (``pretext`` task,
    else the bank's), or NHWC images of the caller's (also as ``calib_images``). ``lam``:
    the bank's lambda (None: the bank's default), a number or a strategy name. GPTQ and
    image strategies run ``model`` (None: built from ``meta``). ``calib_size``/``seed``:
    the calibration images drawn. ``record``: ``recipe``, ``bits``, ``granularity``,
    ``method``, ``bank`` (``checksum``, ``donors``, ``merge``, ``lam``, ``lam_choice``),
    ``calib`` (``source``, ``task``, ``n``, ``seed``, ``label``, ``overlap``), ``data``,
    ``receiver_data``, ``chosen_on``, ``why``, ``seconds``.
    """
    t0 = time.perf_counter()
    spec = quant.QuantSpec(quant.check_bits(bits), granularity)
    if calib_images is not None:
        if calib is not None:
            raise RecipeError("give the calibration images once: as calib= or calib_images=")
        calib = calib_images
    b = _load_bank(bank, spec, meta, params)
    pretext = pretext or (b.pretext if b is not None else None)
    r, why, chosen_on = _pick(spec.bits, b, calib, lam, pretext is not None)
    ctx = dict(model=model, meta=meta, pretext=pretext, seed=seed, data_dir=data_dir,
               calib_size=calib_size, seconds={})  # fmt: skip
    if r.method == "gptq":
        ctx["model"] = _model(model, meta, f"recipe {r.name} (GPTQ)")
    tree, bank_rec = _with_bank(params, b, r, spec, ctx)
    images, calib_rec, receiver_data = _calibration(r, calib, ctx["model"], ctx)
    out = _quantize(r, tree, images, spec, ctx)
    del tree  # the patched tree: gone before the caller gets the output
    seconds = ctx["seconds"] | {"total": time.perf_counter() - t0}
    record = {
        "recipe": r.name, "bits": spec.bits, "granularity": spec.granularity,
        "method": r.method, "bank": bank_rec, "calib": calib_rec, "data": r.data,
        "receiver_data": receiver_data, "chosen_on": chosen_on, "why": why,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }  # fmt: skip
    return out, record
