"""GPTQ (Frantar et al., 2022, arXiv 2210.17323) in JAX, on exactly the grid of METHOD.md.

GPTQ quantizes one input feature of a layer at a time and feeds the rounding error
into the features not yet quantized, weighted by the inverse Hessian of the layer's
output error ``||X W - X Q||^2`` (``H = 2 X^T X / n``, X the layer's calibration inputs).

**The grid is RTN's.** The scale of every output channel (or of the tensor) is fixed
before GPTQ starts, from the ORIGINAL weights, by ``quant.codes_and_scale``:
``s = max(absmax, 1e-8) / qmax``. This is the choice of the paper's reference code too
(its ``find_params`` runs on the original rows before any update). GPTQ only picks
different integer codes in ``qmin..qmax`` (rounded with ``quant.true_div``, as RTN), so
``codes * s`` is what ``packing.dequantize`` rebuilds from the ``QTensor`` it returns.
Re-quantizing GPTQ's fake-quantized values with ``packing.quantize`` would NOT give the
same codes (a channel's largest code may be below qmax): export ``gptq_quantize``'s
``QTensor`` tree (``export.export_packed`` accepts it), not ``gptq``'s fp32 tree.

**Algorithm** (the reference's, on a Flax ``[in, out]`` kernel, i.e. its ``W^T``): dead
inputs (``H_ii = 0``) get ``H_ii = 1`` and zero weights; damping adds ``damp`` (1%) of
the mean diagonal; ``U`` = upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``); rows
(input features) are quantized in order, in lazy batches of ``block_size`` (128), the error
``(w_i - q_i s) / U_ii`` is subtracted from the later rows of the batch at once and from
the rows after the batch by one matmul. Kernels with several axes (q/k/v
``[embed, heads, head_dim]``, out ``[heads, head_dim, embed]``) are flattened to
``[in, out]`` (in = the axes the rule does not name as channel axes) and back.

**Calibration is sequential by block**, the paper's mode: the inputs of encoder block
``i`` are computed by blocks ``0..i-1`` already quantized; inside a block every layer's
Hessian comes from the block's FP weights (q/k/v share one input, the LayerNorm output;
out takes the attention output; Dense_0 the LN2 output; Dense_1 the GELU output).
``sequential=False`` takes every Hessian from one pass of the FP model instead. Layer
inputs are captured with ``nn.intercept_methods`` under ``jit``; only ``X^T X`` leaves
the jitted function.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from functools import lru_cache, partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .packing import QTensor, dequantize, pack
from .paths import PyTree, flatten, unflatten
from .quant import QuantSpec, as_spec, codes_and_scale, select_quantized, true_div

#: Modules (by "/"-joined scope path) that sequential GPTQ runs one at a time: the ViT
#: encoder blocks. Each maps its input to an output of the same shape, the next one's input.
BLOCK_PATTERN = r"^Transformer/encoderblock_\d+$"


class GPTQError(ValueError):
    """Bad input to GPTQ (shapes, options, a Hessian that is not positive definite)."""


def gptq_layer(
    w,
    H,
    bits: int,
    *,
    granularity: str = "channel",
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "layer",
):
    """GPTQ of one ``[in, out]`` kernel under Hessian ``H [in, in]``.

    Returns ``(codes int8 [in, out], scale float32 [1, out] or [1, 1])`` with the scale of
    ``quant.codes_and_scale(w)``; ``codes * scale`` is the fake-quantized kernel.
    """
    w = jnp.asarray(w, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    if w.ndim != 2 or H.shape != (w.shape[0], w.shape[0]):
        raise GPTQError(f"{name}: need w [in, out] and H [in, in], got {w.shape} and {H.shape}")
    if block_size < 1 or not damp >= 0:
        raise GPTQError(f"{name}: need block_size >= 1 and damp >= 0, got {block_size}, {damp}")
    _, s = codes_and_scale(w, bits, granularity, (1,))
    U, dead = _inverse_hessian_factor(H, jnp.float32(damp))
    if not bool(jnp.all(jnp.isfinite(U))):
        raise GPTQError(
            f"{name}: the damped Hessian is not positive definite; raise damp (now {damp})"
        )
    codes = _gptq_core(w, U, s, dead, bits, min(block_size, w.shape[0]))
    return codes, s


@jax.jit
def _inverse_hessian_factor(H, damp):
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (``U^T U = H^-1``)
    after the dead-input fix.

    With ``J`` the reversal and ``J H J = M M^T``: ``H^-1 = (J M^-1 J)^T (J M^-1 J)`` and
    ``J M^-1 J`` is upper triangular, so one Cholesky and one triangular inverse suffice
    (the reference's Cholesky, inverse, Cholesky costs about 4x the flops).
    """
    n = H.shape[0]
    d = jnp.diag(H)
    dead = d == 0
    H = H.at[jnp.arange(n), jnp.arange(n)].set(jnp.where(dead, 1.0, d))
    H = H + damp * jnp.mean(jnp.diag(H)) * jnp.eye(n, dtype=H.dtype)
    M = jnp.linalg.cholesky(H[::-1, ::-1])
    eye = jnp.eye(n, dtype=H.dtype)
    return jax.scipy.linalg.solve_triangular(M, eye, lower=True)[::-1, ::-1], dead


@partial(jax.jit, static_argnums=(4, 5))
def _gptq_core(w, U, s, dead, bits, block):
    """Rows of ``w`` quantized in order, in lazy batches of ``block`` rows (padded)."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    n_in, n_out = w.shape
    nb = -(-n_in // block)
    pad = nb * block - n_in
    W = jnp.pad(jnp.where(dead[:, None], 0.0, w), ((0, pad), (0, 0)))
    # Padded rows: zero weights, identity factor, no coupling to the real rows.
    U = jnp.pad(U, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(nb * block) >= n_in)
    rows = jnp.arange(nb * block)[:, None]

    def one_row(j, c):
        W1, Q1, E1, U1 = c
        q = jnp.clip(jnp.round(true_div(W1[j], s[0])), qmin, qmax)
        e = true_div(W1[j] - q * s[0], U1[j, j])
        W1 = W1 - U1[j][:, None] * e[None, :]  # U1[j, :j] = 0: rows < j are untouched
        return W1, Q1.at[j].set(q), E1.at[j].set(e), U1

    def one_block(b, c):
        W, Q = c
        i1 = b * block
        U1 = jax.lax.dynamic_slice(U, (i1, i1), (block, block))
        W1 = jax.lax.dynamic_slice(W, (i1, 0), (block, n_out))
        zeros = jnp.zeros_like(W1)
        _, Q1, E1, _ = jax.lax.fori_loop(0, block, one_row, (W1, zeros, zeros, U1))
        later = jax.lax.dynamic_slice(U, (i1, 0), (block, nb * block)).T @ E1
        W = W - jnp.where(rows >= i1 + block, later, 0.0)
        return W, jax.lax.dynamic_update_slice(Q, Q1, (i1, 0))

    _, Q = jax.lax.fori_loop(0, nb, one_block, (W, jnp.zeros_like(W)))
    return Q[:n_in].astype(jnp.int8)


def in_out_split(shape, channel_axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(in_axes, out_axes)`` of a kernel: out = the rule's channel axes, in = the rest."""
    nd = len(shape)
    out = tuple(sorted({a % nd for a in ((-1,) if channel_axes is None else channel_axes)}))
    return tuple(a for a in range(nd) if a not in out), out


def quantize_kernel(w, H, bits, channel_axes, *, granularity="channel", name="kernel", **kw):
    """GPTQ of a kernel of any layout the rule names -> ``QTensor`` (codes packed, RTN scale)."""
    ins, outs = in_out_split(w.shape, channel_axes)
    perm = ins + outs
    wt = jnp.transpose(jnp.asarray(w), perm)
    n_in = math.prod(wt.shape[: len(ins)])
    codes, s = gptq_layer(wt.reshape(n_in, -1), H, bits, granularity=granularity, name=name, **kw)
    codes = jnp.transpose(codes.reshape(wt.shape), np.argsort(perm))
    keep = tuple(1 if a in ins or granularity == "tensor" else n for a, n in enumerate(w.shape))
    dtype = jnp.dtype(jnp.asarray(w).dtype).name
    return QTensor(pack(codes, bits), s.reshape(keep), tuple(w.shape), dtype, bits)


def gptq_quantize(
    params: PyTree,
    model: nn.Module,
    calib_images,
    spec: QuantSpec | int | None = None,
    *,
    bits: int | None = None,
    granularity: str | None = None,
    rule=None,
    block_size: int = 128,
    damp: float = 0.01,
    batch_size: int = 32,
    sequential: bool = True,
    timings: dict | None = None,
) -> PyTree:
    """GPTQ of the leaves the rule selects -> tree with ``packing.QTensor`` leaves there.

    ``model.apply({"params": params}, images)`` must run the model on ``calib_images``
    (NHWC), ``batch_size`` images per pass. The result has ``packing.quantize``'s format:
    ``export.export_packed`` writes it and ``packing.dequantize`` turns it into fp params
    (that is :func:`gptq`). ``block_size``/``damp``: as :func:`gptq_layer`. ``timings``:
    a dict that receives the seconds spent on ``"hessians"`` (forward passes and
    ``X^T X``) and on ``"quantize"`` (the GPTQ solves).
    """
    spec = as_spec(spec, bits=bits, granularity=granularity, rule=rule)
    bits, sel, flat = spec.bits, select_quantized(params, spec.rule), flatten(params)
    kw = dict(granularity=spec.granularity, block_size=block_size, damp=damp)
    for p, axes in sel.items():
        ins, _ = in_out_split(flat[p].shape, axes)
        if ins != tuple(range(len(ins))):
            raise GPTQError(
                f"{p}: GPTQ needs the input axes {ins} of the kernel first (the layout of "
                "Dense/DenseGeneral); change the rule's channel axes or transpose the kernel"
            )
    images = jnp.asarray(calib_images, jnp.float32)
    if images.ndim != 4 or images.shape[0] < 1:
        raise GPTQError(f"calib_images: need NHWC images [n, h, w, c], got shape {images.shape}")
    if batch_size < 1:
        raise GPTQError(f"batch_size must be >= 1, got {batch_size}")
    job = _Job(flat, sel, bits, batch_size, kw, {} if timings is None else timings)
    if sequential:
        job.sequential(model, params, images)
    else:
        job.quantize_under(model, params, images, "")
    return unflatten(job.out)


def gptq(params: PyTree, model: nn.Module, calib_images, spec=None, **kw) -> PyTree:
    """GPTQ-fake-quantized params: same structure and dtypes, every selected leaf on the
    RTN grid (``code * scale``). Arguments as :func:`gptq_quantize`."""
    return dequantize(gptq_quantize(params, model, calib_images, spec, **kw))


def _wanted(flat, sel, prefix) -> dict[str, int]:
    """``{module path relative to prefix: its input features}`` for the kernels under prefix."""
    out = {}
    for p in sel:
        if not p.startswith(prefix):
            continue
        if not p.endswith("/kernel"):
            raise GPTQError(f"{p}: GPTQ quantizes module kernels only (a 'kernel' leaf)")
        ins, _ = in_out_split(flat[p].shape, sel[p])
        out[p[len(prefix) : -len("/kernel")]] = math.prod(flat[p].shape[a] for a in ins)
    return out


@dataclasses.dataclass
class _Job:
    """One GPTQ run: the input leaves, the selection, the options, the output so far."""

    flat: dict
    sel: dict
    bits: int
    batch_size: int
    kw: dict
    timings: dict

    def __post_init__(self):
        self.out = dict(self.flat)

    def clock(self, key: str, fn, *args):
        """``fn(*args)``, finished, with its seconds added to ``timings[key]``."""
        t = time.perf_counter()
        r = jax.block_until_ready(fn(*args))
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t
        return r

    def quantize_under(self, module, params, x, prefix: str) -> None:
        """GPTQ of the selected kernels under ``prefix`` from the inputs module sees on x."""
        wanted = _wanted(self.flat, self.sel, prefix)
        hs = self.clock("hessians", _hessians, module, params, x, wanted, self.batch_size)
        for rel, H in hs.items():
            p = f"{prefix}{rel}/kernel"
            args = (self.flat[p], H, self.bits, self.sel[p])
            self.out[p] = self.clock("quantize", partial(quantize_kernel, name=p, **self.kw), *args)

    def sequential(self, model, params, images) -> None:
        """Block by block; block i's inputs come from blocks 0..i-1 already quantized."""
        blocks = sorted(
            {m.group(0) for p in self.sel if (m := re.match(BLOCK_PATTERN[:-1], p))},
            key=lambda b: int(b.rsplit("_", 1)[1]),
        )
        outside = [p for p in self.sel if not any(p.startswith(b + "/") for b in blocks)]
        if outside:
            raise GPTQError(
                f"{outside[0]}: sequential GPTQ quantizes leaves inside encoder blocks only "
                f"({BLOCK_PATTERN}); pass sequential=False"
            )
        bs = self.batch_size
        x, mod = self.clock("hessians", _block_input, model, params, images, blocks[0], bs)
        for b in blocks:
            pre = b + "/"
            self.quantize_under(mod, _sub(self.flat, pre), x, pre)
            x = self.clock("hessians", _apply_batched, mod, dequantize(_sub(self.out, pre)), x, bs)


def _sub(flat: dict, prefix: str) -> dict:
    """The subtree under ``prefix`` as nested dicts."""
    return unflatten({p[len(prefix) :]: v for p, v in flat.items() if p.startswith(prefix)})


def _block_input(model, params, images, block, batch_size):
    """Inputs of module ``block`` (the FP model up to it) and an unbound copy of it.

    Every module matching BLOCK_PATTERN is skipped (returns its input) so the pass costs
    only the embedding and the head.
    """
    found = {}

    def icpt(f, args, kwargs, ctx):
        path = "/".join(ctx.module.scope.path)
        if ctx.method_name != "__call__" or not re.match(BLOCK_PATTERN, path):
            return f(*args, **kwargs)
        if path == block:
            found["x"], found["mod"] = args[0], ctx.module.clone(parent=None, name=None)
        return args[0]

    @jax.jit
    def run(p, xb):
        found.pop("x", None)
        with nn.intercept_methods(icpt):
            model.apply({"params": p}, xb)
        if "x" not in found:
            raise GPTQError(f"{block}: the model never called this module")
        return found["x"]

    xs = [run(params, images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return jnp.concatenate(xs), found["mod"]


def _apply_batched(module, params, x, batch_size):
    f = _jitted_apply(module)
    return jnp.concatenate([f(params, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@lru_cache(maxsize=8)
def _jitted_apply(module):
    return jax.jit(lambda p, x: module.apply({"params": p}, x))


def _hessians(module, params, x, wanted: dict, batch_size: int) -> dict:
    """``{module path: H = 2 X^T X / n}`` over the inputs the wanted modules get on x."""
    f = _hessian_fn(module, tuple(sorted(wanted.items())))
    sums = None
    for i in range(0, len(x), batch_size):
        part = f(params, x[i : i + batch_size])
        sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
    return {rel: 2.0 * xtx / n for rel, (xtx, n) in sums.items()}


def _rows(xin, n_in: int, where: str):
    """``xin [..., *in_dims]`` as ``[rows, n_in]`` float32 (trailing dims = the kernel's in)."""
    k = next((k for k in range(xin.ndim + 1) if math.prod(xin.shape[xin.ndim - k :]) >= n_in), 0)
    if math.prod(xin.shape[xin.ndim - k :]) != n_in:
        raise GPTQError(f"{where}: input of shape {xin.shape} does not end in {n_in} features")
    return xin.reshape(-1, n_in).astype(jnp.float32)


@lru_cache(maxsize=32)
def _hessian_fn(module, wanted: tuple):
    """Jitted ``(params, x) -> {module path: (X^T X, rows)}``; a shared input counted once."""
    wanted = dict(wanted)
    seen: dict = {}

    def icpt(f, args, kwargs, ctx):
        rel = "/".join(ctx.module.scope.path)
        if ctx.method_name == "__call__" and rel in wanted:
            seen.setdefault(id(args[0]), (args[0], []))[1].append(rel)
        return f(*args, **kwargs)

    @jax.jit
    def run(params, xb):
        seen.clear()
        with nn.intercept_methods(icpt):
            module.apply({"params": params}, xb)
        out = {}
        for xin, rels in seen.values():
            x2 = _rows(xin, wanted[rels[0]], rels[0])
            xtx = jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST)
            out.update({r: (xtx, x2.shape[0]) for r in rels})
        missing = sorted(set(wanted) - set(out))
        if missing:
            raise GPTQError(f"{missing[0]}: the model never called this layer on its input")
        return out

    return run
