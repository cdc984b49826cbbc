"""Weight-only lambda strategies (data "none"): signals from ``FP_R`` and ``QV_D`` alone.

On the kernels the quantizer touches, with the receiver's own PTQ residual
``R = PTQ(FP_R) - FP_R``: the norm ratio, the alignment (projection of ``R`` on the QV),
Model Stock's shrinkage of ``cos(QV, R)``, and the RTN-error baseline. One jitted pass
(:func:`weight_stats`) measures everything the four need; ``decide`` is pure arithmetic
on that record, so any constant can be re-chosen later without touching the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from qvec_jax import quant, trees
from qvec_jax.paths import flatten, unflatten
from qvec_jax.select.base import CANDIDATES, Choice, SelectError, Strategy, floats


class _Weights(Strategy):
    key: ClassVar[str] = "weights"
    #: The smallest value the tunable constant may take (None: any finite number).
    lowest: ClassVar[float | None] = None

    def __post_init__(self):
        for f in self.tunable:
            v = getattr(self, f)
            ok = math.isfinite(v) and (self.lowest is None or v >= self.lowest)
            if not ok:
                low = "" if self.lowest is None else f" and >= {self.lowest:g}"
                raise SelectError(f"{self.family} {f} must be finite{low}, got {v}")

    def collect(self, ctx):
        return weight_stats(ctx.fp_r, ctx.qv, ctx.spec, ctx.candidates)

    def _nearest(self, record, target: float, what: str) -> Choice:
        cands = record["candidates"]
        scores = [-abs(c - target) for c in cands]
        return self._choice(cands, scores, f"{what} -> lambda*={target:.3g}, nearest {{lam}}")


@dataclasses.dataclass(frozen=True)
class NormRatio(_Weights):
    """``lam ||QV|| = multiple ||PTQ(FP_R) - FP_R||`` on the quantized kernels: move the
    receiver about as far as its own quantization error."""

    multiple: float = 1.0
    family: ClassVar[str] = "norm-ratio"
    tunable: ClassVar[tuple[str, ...]] = ("multiple",)
    lowest: ClassVar[float | None] = 0.0

    def decide(self, record):
        w = record[self.key]
        target = self.multiple * w["residual_norm"] / max(w["qv_norm"], 1e-30)
        c, r, v = self.multiple, w["residual_norm"], w["qv_norm"]
        what = f"{c:g}*||R||/||QV|| = {c:g}*{r:.3g}/{v:.3g}"
        return self._nearest(record, target, what)


@dataclasses.dataclass(frozen=True)
class Alignment(_Weights):
    """``lam = scale <QV, R> / ||QV||^2``: the projection of the receiver's PTQ residual
    ``R = PTQ(FP_R) - FP_R`` onto the QV (Prop. 1 with ``R`` in place of ``QV_R``)."""

    scale: float = 1.0
    family: ClassVar[str] = "alignment"
    tunable: ClassVar[tuple[str, ...]] = ("scale",)

    def decide(self, record):
        w = record[self.key]
        target = self.scale * w["dot"] / max(w["qv_norm"] ** 2, 1e-30)
        return self._nearest(record, target, f"{self.scale:g}*<QV,R>/||QV||^2")


@dataclasses.dataclass(frozen=True)
class ModelStock(_Weights):
    """Model Stock's interpolation ratio ``k cos / (1 + (k-1) cos)`` (Jang et al. 2024,
    ``k`` fine-tunes) with ``cos = cos(QV, R)``; ``cos <= 0`` gives 0."""

    k: float = 2.0
    family: ClassVar[str] = "model-stock"
    tunable: ClassVar[tuple[str, ...]] = ("k",)
    lowest: ClassVar[float | None] = 1.0  # k fine-tunes; k >= 1 keeps 1 + (k-1) cos > 0

    def decide(self, record):
        w = record[self.key]
        cos = w["dot"] / max(w["qv_norm"] * w["residual_norm"], 1e-30)
        t = self.k * cos / (1 + (self.k - 1) * cos) if cos > 0 else 0.0
        return self._nearest(record, t, f"cos(QV,R)={cos:.3g}, k={self.k:g}")


@dataclasses.dataclass(frozen=True)
class RtnError(_Weights):
    """Baseline: the smallest RTN error ``||PTQ(FP_R + lam QV) - (FP_R + lam QV)||``.
    Measured at small scale to pick lam ~ 0 and lose; kept only as a baseline."""

    family: ClassVar[str] = "rtn-error"

    def decide(self, record):
        errs = record[self.key]["rtn_error"]
        scores = [None if e is None else -e for e in errs]
        return self._choice(record["candidates"], scores, "smallest RTN error at {lam}")


def _kernels(fp_r, qv, spec: quant.QuantSpec):
    fr, fv = flatten(fp_r), flatten(qv)
    sel = quant.select_quantized(fp_r, spec.rule)
    for p in sel:
        if p not in fv:
            raise SelectError(f"{p}: quantized kernel of the receiver missing in the QV")
    trees.check_same_structure(fp_r, qv, ("fp_r", "qv"), paths=list(sel))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return unflatten({p: f32(fr[p]) for p in sel}), unflatten({p: f32(fv[p]) for p in sel})


@functools.partial(jax.jit, static_argnames=("spec",))
def _weight_stats(fk, vk, lams, *, spec):
    sq = lambda t: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t))
    r = jax.tree.map(jnp.subtract, quant.fake_quant_tree(fk, spec), fk)
    dot = sum(jnp.vdot(v, x) for v, x in zip(jax.tree.leaves(vk), jax.tree.leaves(r)))

    def rtn(lam):
        p = jax.tree.map(lambda f, v: f + lam * v, fk, vk)
        return sq(jax.tree.map(jnp.subtract, quant.fake_quant_tree(p, spec), p))

    return jnp.sqrt(sq(vk)), jnp.sqrt(sq(r)), dot, jnp.sqrt(jax.lax.map(rtn, lams))


def weight_stats(fp_r, qv, spec, candidates=CANDIDATES) -> dict:
    """On the kernels ``spec.rule`` quantizes, with ``R = PTQ(FP_R) - FP_R`` (float32):
    ``qv_norm`` ``||QV||``, ``residual_norm`` ``||R||``, ``dot`` ``<QV, R>`` and, per
    candidate, ``rtn_error`` ``||PTQ(FP_R + lam QV) - (FP_R + lam QV)||``."""
    spec = quant.as_spec(spec)
    fk, vk = _kernels(fp_r, qv, spec)
    qn, rn, dot, rtn = _weight_stats(fk, vk, jnp.asarray(candidates, jnp.float32), spec=spec)
    return {
        "qv_norm": float(qn),
        "residual_norm": float(rn),
        "dot": float(dot),
        "rtn_error": floats(rtn),
    }
