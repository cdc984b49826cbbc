"""Lambda strategies that run the model: ``Proxy`` (label-free closeness of
``PTQ(FP_R + lam QV_D)`` to ``FP_R`` on donor, pretext, noise or unlabelled receiver
inputs) and ``ValBest`` (the paper's ``lam_best`` on labelled receiver val).

The jitted functions take params, QV, candidates and inputs as arguments (one compile
per shape; model and quantizer spec static), run the candidates one after another with
``lax.map`` and the input batches with ``lax.scan``, so nothing leaves the device until
the per-candidate numbers do.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from qvec_jax import quant, trees
from qvec_jax.select.base import (
    MEASURES,
    PROXY_KINDS,
    Context,
    SelectError,
    Strategy,
    floats,
    pick,
)


def _forward(model, params, x):
    """``(pre-logit features, logits)`` in one pass: the head-less model (``num_classes=
    None`` returns the features the head sees), then the head's ``x @ kernel + bias``."""
    body = {k: v for k, v in params.items() if k != "head"}
    feats = model.clone(num_classes=None).apply({"params": body}, x).astype(jnp.float32)
    head = params["head"]
    return feats, feats @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def _patched(fp, qv, lam, spec):
    return quant.fake_quant_tree(trees.patch(fp, qv, lam), spec)


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _closeness(fp, qv, lams, xb, mb, *, model, spec):
    """Per candidate: mean KL(FP_R || patched), top-1 agreement and feature cosine over the
    masked rows of the batches ``xb`` [nb, B, H, W, 3]; one candidate at a time (lax.map)."""
    ref = jax.lax.map(lambda x: _forward(model, fp, x), xb)

    def one(lam):
        p = _patched(fp, qv, lam, spec)

        def body(tot, batch):
            x, m, (rf, rl) = batch
            f, lg = _forward(model, p, x)
            lr, lp = jax.nn.log_softmax(rl), jax.nn.log_softmax(lg)
            kl = jnp.sum(jnp.exp(lr) * (lr - lp), axis=-1)
            agree = (jnp.argmax(lg, -1) == jnp.argmax(rl, -1)).astype(jnp.float32)
            norms = jnp.linalg.norm(f, axis=-1) * jnp.linalg.norm(rf, axis=-1)
            cos = jnp.sum(f * rf, axis=-1) / jnp.maximum(norms, 1e-30)
            return tot + jnp.stack([jnp.sum(v * m) for v in (kl, agree, cos)]), None

        tot, _ = jax.lax.scan(body, jnp.zeros(3, jnp.float32), (xb, mb, ref))
        return tot / jnp.sum(mb)

    return jax.lax.map(one, lams)


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _accuracy(fp, qv, lams, xb, yb, mb, *, model, spec):
    """Per candidate: top-1 accuracy of ``PTQ(FP_R + lam QV)`` on the masked rows."""

    def one(lam):
        p = _patched(fp, qv, lam, spec)

        def body(hits, batch):
            x, y, m = batch
            ok = jnp.argmax(model.apply({"params": p}, x), -1) == y
            return hits + jnp.sum(ok.astype(jnp.float32) * m), None

        return jax.lax.scan(body, jnp.zeros((), jnp.float32), (xb, yb, mb))[0] / jnp.sum(mb)

    return jax.lax.map(one, lams)


def _batches(x, batch_size: int):
    """``x`` [n, ...] -> ([nb, B, ...] zero-padded, mask [nb, B])."""
    n = x.shape[0]
    b = max(1, min(int(batch_size), n))
    nb = -(-n // b)
    pad = jnp.zeros((nb * b - n, *x.shape[1:]), x.dtype)
    mask = (jnp.arange(nb * b) < n).astype(jnp.float32).reshape(nb, b)
    return jnp.concatenate([x, pad]).reshape(nb, b, *x.shape[1:]), mask


def _images(x, model, who: str):
    x = getattr(x, "images", x)  # a data.Split gives its images (never its labels)
    x = jnp.asarray(x, jnp.float32)
    size = getattr(model, "image_size", None)
    if x.ndim != 4 or x.shape[-1] != 3 or (size and x.shape[1:3] != (size, size)) or not len(x):
        raise SelectError(
            f"{who}: inputs must be NHWC images [n, {size}, {size}, 3] in "
            f"[-1, 1], got shape {tuple(x.shape)}"
        )
    return x


def noise_images(n: int, image_size: int, *, seed: int = 0, res: int = 8) -> jax.Array:
    """Synthetic inputs: uniform [-1, 1] noise on a ``res`` x ``res`` grid, bilinearly
    upsampled to ``image_size`` (smooth blobs rather than pixel noise)."""
    z = jax.random.uniform(jax.random.key(seed), (n, res, res, 3), minval=-1.0, maxval=1.0)
    return jax.image.resize(z, (n, image_size, image_size, 3), "linear")


def _check_model(ctx: Context) -> None:
    if ctx.model is None or "head" not in ctx.fp_r:
        raise SelectError(
            f"strategy {ctx.strategy!r} runs the model: pass model=<the ViT> "
            "and receiver params with a 'head'"
        )


def subsample(total: int, n: int, seed: int = 0) -> np.ndarray:
    """The positions of the ``n`` of ``total`` given inputs that a :class:`Proxy` with
    ``seed`` measures on when it is given more than ``n`` (a merge's donors' images)."""
    return np.asarray(jax.random.permutation(jax.random.key(seed), int(total))[: int(n)])


@dataclasses.dataclass(frozen=True)
class Proxy(Strategy):
    """Closeness of ``PTQ(FP_R + lam QV_D)`` to ``FP_R`` itself on label-free inputs.

    ``measure``: "kl" (mean KL(FP_R || patched) of the logits, lower is closer),
    "agree" (top-1 agreement), "cos" (cosine of the pre-logit features). ``n`` inputs
    at most (a seeded sample when more are given; ``seed``), ``batch_size`` rows per
    forward pass; "noise" makes ``n`` inputs by :func:`noise_images` (``noise_res``)
    unless given. With "unlabelled receiver" it is few-shot, not zero-shot.

    ``margin`` (tunable, default 0: plain closest): stay at the paper's ``lam = 1``
    unless the closest candidate's distance (KL, 1 - agreement or 1 - cosine) is below
    ``(1 - margin)`` times the distance at ``lam = 1``.
    """

    data: str = "noise"
    measure: str = "kl"
    n: int = 256
    seed: int = 0
    batch_size: int = 256
    noise_res: int = 8
    margin: float = 0.0
    tunable: ClassVar[tuple[str, ...]] = ("margin",)

    def __post_init__(self):
        if self.data not in PROXY_KINDS:
            raise SelectError(f"Proxy data must be one of {PROXY_KINDS}, got {self.data!r}")
        if self.measure not in MEASURES:
            raise SelectError(f"Proxy measure must be one of {MEASURES}, got {self.measure!r}")
        if self.n < 1 or self.batch_size < 1:
            raise SelectError(
                f"Proxy n and batch_size must be >= 1, got {self.n}, {self.batch_size}"
            )
        if not 0.0 <= self.margin < 1.0:
            raise SelectError(f"Proxy margin must be in [0, 1), got {self.margin}")

    @property
    def family(self) -> str:
        tag = {"unlabelled receiver": "rx"}.get(self.data, self.data)
        n = f"{self.n}" if self.data == "unlabelled receiver" or self.n != 256 else ""
        return f"proxy-{tag}{n}-{self.measure}"

    @property
    def key(self) -> str:
        res = f"/res={self.noise_res}" if self.data == "noise" else ""
        return f"proxy/{self.data}/n={self.n}/seed={self.seed}{res}"

    def collect(self, ctx):
        _check_model(ctx)
        x = ctx.data(self.data)
        if x is None:
            x = noise_images(self.n, ctx.model.image_size, seed=self.seed, res=self.noise_res)
        x = _images(x, ctx.model, self.name)
        if x.shape[0] > self.n:
            x = x[subsample(x.shape[0], self.n, self.seed)]
        xb, mb = _batches(x, self.batch_size)
        lams = jnp.asarray(ctx.candidates, jnp.float32)
        out = np.asarray(_closeness(ctx.fp_r, ctx.qv, lams, xb, mb, model=ctx.model, spec=ctx.spec))
        return {"n": int(x.shape[0]), **{m: floats(out[:, i]) for i, m in enumerate(MEASURES)}}

    def decide(self, record):
        rec, cands = record[self.key], record["candidates"]
        dist = [None if v is None else (v if self.measure == "kl" else 1.0 - v)
                for v in rec[self.measure]]  # fmt: skip
        scores = [None if d is None else -d for d in dist]
        why = f"{self.measure} of PTQ(FP_R+lam*QV) vs FP_R on {rec['n']} {self.data} inputs"
        lam = pick(cands, scores)
        if self.margin > 0 and 1.0 in cands and lam in cands and lam != 1.0:
            d1, db = dist[cands.index(1.0)], dist[cands.index(lam)]
            if d1 is not None and db is not None and not db < (1.0 - self.margin) * d1:
                why += f": closest at {lam:g}, not {self.margin:g} closer than at 1, so {{lam}}"
                return self._choice(cands, scores, why, lam=1.0)
        return self._choice(cands, scores, why + ": closest at {lam}")


@dataclasses.dataclass(frozen=True)
class ValBest(Strategy):
    """The paper's ``lam_best``: argmax of post-PTQ accuracy on the labelled receiver val
    split, given as ``(images, labels)`` or a ``data.Split``. Not zero-shot."""

    batch_size: int = 256
    data: ClassVar[str] = "labelled receiver"
    family: ClassVar[str] = "val-best"
    key: ClassVar[str] = "val"

    def collect(self, ctx):
        _check_model(ctx)
        val = ctx.data(self.data)
        images, labels = (val.images, val.labels) if hasattr(val, "labels") else val
        x = _images(images, ctx.model, self.name)
        y = jnp.asarray(labels, jnp.int32)
        if y.shape != (x.shape[0],):
            raise SelectError(f"{self.name}: {x.shape[0]} images but labels of shape {y.shape}")
        xb, mb = _batches(x, self.batch_size)
        yb, _ = _batches(y, self.batch_size)
        lams = jnp.asarray(ctx.candidates, jnp.float32)
        acc = _accuracy(ctx.fp_r, ctx.qv, lams, xb, yb, mb, model=ctx.model, spec=ctx.spec)
        return {"n": int(x.shape[0]), "acc": floats(acc)}

    def decide(self, record):
        rec = record[self.key]
        why = f"best post-PTQ accuracy on {rec['n']} labelled receiver val examples"
        return self._choice(record["candidates"], rec["acc"], why + " at {lam}")
