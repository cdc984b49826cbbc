"""Real low-bit storage of a quantized tree: integer codes, bit-packed, plus scales.

``quantize`` turns each leaf selected by the rule into a ``QTensor``; ``dequantize``
rebuilds exactly the tree ``ptq`` gives. ``size_report`` counts the bytes of that
storage (it also works on ``jax.eval_shape`` trees, so no weights are needed).
Codes ``q`` in ``[qmin, qmax]`` are stored as ``q - qmin`` in ``bits`` bits each, as
``bits`` bit-planes of ``ceil(n/8)`` bytes (``jnp.packbits``), so 3-bit codes take 3/8 byte.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .paths import PyTree, Rule, flatten, path_str
from .quant import QuantSpec, as_spec, codes_and_scale, reduce_axes, select_quantized


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    """One quantized leaf: ``fq = (unpack(packed) + qmin) * scale`` reshaped to ``shape``."""

    packed: jax.Array  # uint8 [bits, ceil(n / 8)]
    scale: jax.Array  # float32, broadcastable to shape
    shape: tuple = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """int codes in ``[-2**(b-1), 2**(b-1) - 1]`` -> uint8 ``[bits, ceil(n/8)]``."""
    u = (codes.reshape(-1).astype(jnp.int32) + 2 ** (bits - 1)).astype(jnp.uint8)
    return jnp.stack([jnp.packbits((u >> j) & 1) for j in range(bits)])


def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
    planes = jnp.unpackbits(packed, axis=1, count=n).astype(jnp.int32)
    u = sum(planes[j] << j for j in range(bits))
    return (u - 2 ** (bits - 1)).astype(jnp.int8)


def quantize(
    params: PyTree,
    spec: QuantSpec | int | None = None,
    *,
    bits: int | None = None,
    granularity: str | None = None,
    rule: Rule | None = None,
) -> PyTree:
    """Replace each selected leaf by a bit-packed ``QTensor`` (METHOD.md quantizer codes).

    ``spec``: a ``QuantSpec``, or the bit width with the keywords (as ``quant.ptq``).
    Eager calls refuse NaN/Inf leaves, naming the path (as ``ptq``).
    """
    spec = as_spec(spec, bits=bits, granularity=granularity, rule=rule)
    sel = select_quantized(params, spec.rule)

    def one(kp, x):
        axes = sel.get(path_str(kp))
        if axes is None:
            return x
        packed, s = _quantize_leaf(x, spec.bits, spec.granularity, axes)
        return QTensor(packed, s, tuple(x.shape), jnp.dtype(x.dtype).name, spec.bits)

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize(qparams: PyTree) -> PyTree:
    """Inverse of ``quantize``: bit-identical to ``ptq`` with the same arguments."""

    def one(x):
        if not isinstance(x, QTensor):
            return x
        return _dequantize_leaf(x.packed, x.scale, x.shape, x.dtype, x.bits)

    return jax.tree.map(one, qparams, is_leaf=lambda x: isinstance(x, QTensor))


@partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_leaf(x, bits, granularity, axes):
    q, s = codes_and_scale(x, bits, granularity, axes)
    return pack(q, bits), s


@partial(jax.jit, static_argnums=(2, 3, 4))
def _dequantize_leaf(packed, scale, shape, dtype, bits):
    q = unpack(packed, bits, math.prod(shape)).reshape(shape)
    return (q.astype(jnp.float32) * scale).astype(dtype)


def size_report(
    params: PyTree,
    spec: QuantSpec | int | None = None,
    *,
    bits: int | None = None,
    granularity: str | None = None,
    rule: Rule | None = None,
) -> dict:
    """Bytes of the quantized model (packed codes + fp32 scales + unquantized leaves) vs fp32.

    ``spec`` as in ``quantize``. Accepts arrays or ``jax.ShapeDtypeStruct`` leaves (e.g.
    from ``jax.eval_shape``). An empty tree is refused.
    """
    spec = as_spec(spec, bits=bits, granularity=granularity, rule=rule)
    if not flatten(params):
        raise ValueError("size_report: the tree has no leaves; pass a model's params")
    bits, granularity, sel = spec.bits, spec.granularity, spec.rule.select(params)
    rep = dict(
        bits=bits,
        granularity=granularity,
        quantized_leaves=0,
        quantized_weights=0,
        code_bytes=0,
        scale_bytes=0,
        other_bytes=0,
        fp32_bytes=0,
    )
    for p, x in flatten(params).items():
        n = math.prod(x.shape)
        rep["fp32_bytes"] += 4 * n
        if p in sel:
            red = reduce_axes(len(x.shape), granularity, sel[p])
            rep["quantized_leaves"] += 1
            rep["quantized_weights"] += n
            rep["code_bytes"] += bits * math.ceil(n / 8)
            rep["scale_bytes"] += 4 * (n // math.prod(x.shape[a] for a in red))
        else:
            rep["other_bytes"] += n * np.dtype(x.dtype).itemsize
    rep["total_bytes"] = rep["code_bytes"] + rep["scale_bytes"] + rep["other_bytes"]
    rep["compression"] = rep["fp32_bytes"] / rep["total_bytes"]
    return rep
