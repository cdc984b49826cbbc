"""The weight quantizer of METHOD.md: symmetric absmax round-to-nearest, with an STE for QAT.

    qmax = 2**(b-1) - 1,  qmin = -2**(b-1)
    s    = max(absmax, 1e-8) / qmax           one s per output channel, or per tensor
    q    = clip(round(w / s), qmin, qmax)      round half to even
    fq   = q * s

QAT and PTQ are one function applied to the params before ``model.apply``:
``fake_quant_tree(params, spec, ste=True)`` inside the loss for QAT, ``ptq(params, spec)``
after training. ``QuantSpec(bits, granularity, rule)`` holds the settings, validated once;
``VIT_RULE`` names which leaves are quantized and their channel axes. The tree functions
also take the loose keywords: ``ptq(params, 3)``, ``ptq(params, bits=2, granularity="tensor")``.
"""

from __future__ import annotations

import dataclasses
import numbers
from functools import partial

import jax
import jax.numpy as jnp

from .paths import PyTree, Rule, check_finite, flatten, is_float, path_str

#: The linear kernels of the ViT encoder blocks and their OUTPUT axes. One rule for both
#: namings of the same Flax blocks: Google's ViT checkpoints (``MultiHeadDotProductAttention_1``,
#: ``MlpBlock_3``) and big_vision-trained trees (``MultiHeadDotProductAttention_0``,
#: ``MlpBlock_0``). q/k/v [embed, heads, head_dim] -> (1, 2); out [heads, head_dim, embed]
#: -> (2,); MLP Dense [in, out] -> (1,). Biases, norms, embeddings, cls and head are not matched.
_ATTN = r"Transformer/encoderblock_\d+/MultiHeadDotProductAttention_[01]/"
_MLP = r"Transformer/encoderblock_\d+/MlpBlock_[03]/"
VIT_RULE = Rule(
    {
        _ATTN + r"(query|key|value)/kernel$": (1, 2),
        _ATTN + r"out/kernel$": (2,),
        _MLP + r"Dense_[01]/kernel$": (1,),
    }
)
GRANULARITIES = ("channel", "tensor")


def check_bits(bits) -> int:
    """``bits`` as an int in 2..8 (METHOD.md); NumPy integers are accepted."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"bits must be an int in 2..8, got {type(bits).__name__} {bits!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return int(bits)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """The quantizer's settings: bit width, one scale per channel or per tensor, and the
    rule naming the quantized leaves and their channel axes. Validated once, here; frozen
    and hashable, so it passes as one static ``jit`` argument."""

    bits: int
    granularity: str = "channel"
    rule: Rule = VIT_RULE

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits))
        if not isinstance(self.granularity, str) or self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if not isinstance(self.rule, Rule):
            raise TypeError(f"rule must be a qvec_jax.Rule, got {type(self.rule).__name__}")


def as_spec(spec=None, *, bits=None, granularity=None, rule=None) -> QuantSpec:
    """A ``QuantSpec`` from a spec, or from the loose keywords (``spec`` may be the bit
    width: ``ptq(params, 3)``). A spec and keywords together are refused."""
    if isinstance(spec, QuantSpec):
        if (bits, granularity, rule) != (None, None, None):
            raise TypeError("pass a QuantSpec or bits=/granularity=/rule=, not both")
        return spec
    if spec is not None and bits is not None:
        raise TypeError(f"bits given twice: {spec!r} and bits={bits!r}")
    return QuantSpec(
        spec if bits is None else bits,
        "channel" if granularity is None else granularity,
        VIT_RULE if rule is None else rule,
    )


def reduce_axes(ndim: int, granularity: str, channel_axes) -> tuple[int, ...]:
    """The axes one scale is shared over: all but ``channel_axes`` (default: the last)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return tuple(range(ndim))
    axes = (-1,) if channel_axes is None else tuple(channel_axes)
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"channel_axes {axes} out of range for a {ndim}-D array")
    keep = {a % ndim for a in axes}
    return tuple(a for a in range(ndim) if a not in keep)


def codes_and_scale(w, bits: int, granularity: str = "channel", channel_axes=None):
    """Integer codes ``q`` (int8) and float32 scales ``s`` (kept dims) with ``fq = q * s``."""
    check_bits(bits)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    w32 = jnp.asarray(w).astype(jnp.float32)
    absmax = jnp.max(
        jnp.abs(w32), axis=reduce_axes(w32.ndim, granularity, channel_axes), keepdims=True
    )
    s = true_div(jnp.maximum(absmax, 1e-8), qmax)
    q = jnp.clip(jnp.round(true_div(w32, s)), qmin, qmax)
    return q.astype(jnp.int8), s


def true_div(a, b):
    """``a / b`` as an IEEE division, like NumPy and PyTorch (METHOD.md: ``round(w / s)``).

    XLA rewrites ``x / broadcast(y)`` into ``x * (1 / y)``, whose extra rounding moves
    codes next to ties; ``b + 0 * a`` has b's values but is no broadcast, so the
    division stays (a little slower than the multiply; see bench/ptq.py).
    """
    return a / (b + 0 * a)


def fake_quant(w, bits: int, *, granularity: str = "channel", channel_axes=None, ste: bool = False):
    """``q * s`` (METHOD.md, "Quantizer") in ``w``'s shape and dtype, computed in float32.

    ``channel_axes`` get one scale each (default: the last axis, right for a Flax
    ``Dense`` kernel ``[in, out]``); ``granularity="tensor"`` uses one scale. With
    ``ste=True`` the gradient is the identity (straight-through estimator, no clipping
    mask); written as ``sg(fq) + (w - sg(w))`` so the forward value is exactly ``fq``.
    An integer ``w`` is refused (``TypeError``): its codes would be meaningless.
    """
    bits = check_bits(bits)
    if not is_float(w):
        raise TypeError(f"fake_quant needs a float array, got dtype {jnp.asarray(w).dtype}")
    reduce_axes(jnp.ndim(w), granularity, channel_axes)  # validate before tracing
    axes = None if channel_axes is None else tuple(int(a) for a in channel_axes)
    return _fake_quant(w, bits, granularity, axes, bool(ste))


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _fake_quant(w, bits, granularity, channel_axes, ste):
    q, s = codes_and_scale(w, bits, granularity, channel_axes)
    fq = (q.astype(jnp.float32) * s).astype(w.dtype)
    return jax.lax.stop_gradient(fq) + (w - jax.lax.stop_gradient(w)) if ste else fq


def select_quantized(params: PyTree, rule: Rule) -> dict[str, tuple]:
    """``{path: channel axes}`` of the leaves ``rule`` quantizes; each must be a float leaf.

    Eager calls also refuse NaN/Inf in any float leaf (naming it): round-to-nearest would
    turn a NaN into 0 and an Inf into a NaN channel. Under ``jit`` that check is skipped.
    """
    sel = rule.select(params)
    if not sel:
        raise ValueError(f"the quantization rule selects no leaf of this tree: {rule!r}")
    leaves = flatten(params)
    for p in sel:
        if not is_float(leaves[p]):
            raise ValueError(f"{p}: rule selects a non-float leaf of dtype {leaves[p].dtype}")
    check_finite(params, "params")
    return sel


def fake_quant_tree(
    params: PyTree,
    spec: QuantSpec | int | None = None,
    *,
    bits: int | None = None,
    granularity: str | None = None,
    rule: Rule | None = None,
    ste: bool = False,
) -> PyTree:
    """Fake-quantize the leaves ``spec.rule`` selects, with the channel axes it gives.

    ``spec``: a ``QuantSpec``, or the bit width with ``granularity``/``rule`` keywords
    (defaults ``"channel"``, ``VIT_RULE``). Pure and traceable: call it inside a jitted
    loss for QAT (``ste=True``). Eager calls refuse NaN/Inf leaves, naming the path; under
    ``jit`` the values are unknown and that check is skipped.
    """
    spec = as_spec(spec, bits=bits, granularity=granularity, rule=rule)
    sel = select_quantized(params, spec.rule)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: (
            x
            if (ax := sel.get(path_str(kp))) is None
            else fake_quant(x, spec.bits, granularity=spec.granularity, channel_axes=ax, ste=ste)
        ),
        params,
    )


def ptq(
    params: PyTree,
    spec: QuantSpec | int | None = None,
    *,
    bits: int | None = None,
    granularity: str | None = None,
    rule: Rule | None = None,
) -> PyTree:
    """PTQ of a param tree (METHOD.md): same structure, dtypes and shardings.

    ``spec`` as in ``fake_quant_tree``. Each selected leaf is quantized by its own
    jitted call, so peak memory stays at the input plus the output (no whole-tree
    intermediate).
    """
    return fake_quant_tree(params, as_spec(spec, bits=bits, granularity=granularity, rule=rule))
