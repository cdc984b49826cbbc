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
    """Integer codes ``q`` (int8) and float32 scales ``s`` (kept dims) with ``fq = q * s``.

    A NaN counts as Inf in the absmax, so a channel holding NaN or Inf always gets a NaN
    scale: XLA's CPU max reductions may skip a NaN, which would leave a finite scale and
    quietly turn the NaN into a code. The tree functions read their NaN/Inf check off the
    scales this way, in the pass that reads the weights anyway.
    """
    check_bits(bits)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    w32 = jnp.asarray(w).astype(jnp.float32)
    mag = jnp.where(jnp.isnan(w32), jnp.inf, jnp.abs(w32))
    absmax = jnp.max(mag, axis=reduce_axes(w32.ndim, granularity, channel_axes), keepdims=True)
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
    return _ste(w, _dequant(q, s, w.dtype)) if ste else _dequant(q, s, w.dtype)


def _dequant(q, s, dtype):
    """``q * s`` in float32, cast to the weights' dtype."""
    return (q.astype(jnp.float32) * s).astype(dtype)


def _ste(w, fq):
    """``fq`` forward, identity backward: ``sg(fq) + (w - sg(w))``, exactly ``fq``."""
    return jax.lax.stop_gradient(fq) + (w - jax.lax.stop_gradient(w))


def select_quantized(params: PyTree, rule: Rule) -> dict[str, tuple]:
    """``{path: channel axes}`` of the leaves ``rule`` quantizes; each must be a float leaf.

    Eager calls also refuse NaN/Inf in any float leaf (naming it): round-to-nearest would
    turn a NaN into 0 and an Inf into a NaN channel. Under ``jit`` that check is skipped.
    """
    sel = _selection(params, rule)
    check_finite(params, "params")
    return sel


def _selection(params: PyTree, rule: Rule) -> dict[str, tuple]:
    """``select_quantized`` without the NaN/Inf check (the tree functions fold it in)."""
    sel = rule.select(params)
    if not sel:
        raise ValueError(f"the quantization rule selects no leaf of this tree: {rule!r}")
    leaves = flatten(params)
    for p in sel:
        if not is_float(leaves[p]):
            raise ValueError(f"{p}: rule selects a non-float leaf of dtype {leaves[p].dtype}")
    return sel


def grouped_default() -> bool:
    """Whether the tree functions stack same-shaped leaves: yes on GPU and TPU, no on CPU.

    On an H200 (XLA's optimized HLO for ViT-B/16), leaf by leaf is 228 kernels, grouped
    15: XLA fuses the stacking into the reductions and writes the leaves from one fused
    kernel per stack, with no stack in memory. XLA's CPU backend materializes the stacks
    and their fake-quant instead (2-4x slower, and up to 1.7x the quantized bytes more
    memory), while its kernels cost little each (bench/ptq.py).
    """
    return jax.default_backend() != "cpu"


def fake_quant_leaves(
    leaves, channel_axes, bits: int, *, granularity: str = "channel", ste=False, grouped=None
) -> list:
    """``[fake_quant(w, bits, granularity=granularity, channel_axes=a, ste=ste) for ...]``
    over ``zip(leaves, channel_axes)``, bit for bit, as one jitted program.

    ``grouped=True`` stacks the leaves that share shape, dtype, reduction axes and
    sharding and quantizes each stack with one quantizer call (a new leading axis with
    its own scales): a ViT's block kernels have four shapes, so four stacks instead of two
    kernels per leaf. ``False``: leaf by leaf. ``None``: ``grouped_default()``.
    """
    bits = check_bits(bits)
    axes = _check_leaves(leaves, channel_axes, granularity)
    return _run(leaves, (), axes, bits, granularity, ste, grouped, check=False)[0]


def _check_leaves(leaves, channel_axes, granularity) -> tuple:
    """``channel_axes`` as static tuples (or None), after ``fake_quant``'s checks."""
    if len(leaves) != len(channel_axes):
        raise ValueError(f"{len(leaves)} leaves but {len(channel_axes)} channel_axes")
    for w, ax in zip(leaves, channel_axes):
        if not is_float(w):
            raise TypeError(f"fake_quant needs a float array, got dtype {jnp.asarray(w).dtype}")
        reduce_axes(jnp.ndim(w), granularity, ax)
    return tuple(None if ax is None else tuple(int(a) for a in ax) for ax in channel_axes)


def _run(leaves, rest, axes, bits, granularity, ste, grouped, check):
    """``_quantize`` over its static plan: which leaves (and ``rest`` leaves) go together."""
    grouped = grouped_default() if grouped is None else bool(grouped)
    return _quantize(
        tuple(leaves), tuple(rest), axes=axes, bits=bits, granularity=granularity,
        groups=_groups(leaves, axes, granularity, grouped),
        rest_groups=_groups(rest, (None,) * len(rest), "tensor", grouped),
        ste=bool(ste), check=check,
    )  # fmt: skip


def _groups(leaves, axes, granularity, grouped) -> tuple[tuple[int, ...], ...]:
    """Indices of the leaves quantized together: one leaf each, or (``grouped``) all
    those of one shape, dtype, reduction axes and sharding."""
    if not grouped:
        return tuple((i,) for i in range(len(leaves)))
    by: dict[tuple, list[int]] = {}
    for i, (w, ax) in enumerate(zip(leaves, axes)):
        shape = jnp.shape(w)
        red = reduce_axes(len(shape), granularity, ax)
        by.setdefault((shape, jnp.result_type(w), red, _sharding(w)), []).append(i)
    return tuple(tuple(idx) for idx in by.values())


def _sharding(w):
    """A leaf's sharding (a traced one's, under explicit mesh axes), or None: stacking
    leaves of two shardings would reshard one of them, or fail under explicit axes."""
    if isinstance(w, jax.core.Tracer):
        return getattr(w.aval, "sharding", None)
    return getattr(w, "sharding", None)


@partial(
    jax.jit,
    static_argnames=("axes", "groups", "rest_groups", "bits", "granularity", "ste", "check"),
)
def _quantize(leaves, rest, *, axes, groups, rest_groups, bits, granularity, ste, check):
    """The fake-quant of ``leaves``, group by group, and (``check``) one flag: no NaN/Inf
    in them (their scales say it: NaN where a channel holds one) nor in ``rest``, read
    once (stacked as ``rest_groups`` says)."""
    out, flags = [None] * len(leaves), []
    for idx in groups:
        fqs, s = _quantize_group([leaves[i] for i in idx], axes[idx[0]], bits, granularity)
        for i, fq in zip(idx, fqs):
            out[i] = _ste(leaves[i], fq) if ste else fq
        flags.append(s)
    if not check:
        return out, None
    flags += [jnp.stack([rest[i] for i in idx]) if len(idx) > 1 else rest[idx[0]]
              for idx in rest_groups]  # fmt: skip
    ok = jnp.bool_(True)
    for x in flags:
        ok = ok & jnp.isfinite(x).all()
    return out, ok


def _quantize_group(ws, channel_axes, bits, granularity):
    """The fake-quant of same-shaped leaves in one quantizer call, and the scales. Stacked
    on a new axis 0, which gets its own scales; the other axes keep their roles."""
    w = ws[0]
    if len(ws) == 1:
        q, s = codes_and_scale(w, bits, granularity, channel_axes)
        return [_dequant(q, s, w.dtype)], s
    red = reduce_axes(w.ndim, granularity, channel_axes)
    keep = (0, *(a + 1 for a in range(w.ndim) if a not in red))
    q, s = codes_and_scale(jnp.stack(ws), bits, "channel", keep)
    fq = _dequant(q, s, w.dtype)
    return [fq[j] for j in range(len(ws))], s


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
    loss for QAT (``ste=True``). One jitted program for the whole tree, leaf by leaf or
    stacked by shape (``grouped_default()``: on GPU/TPU), with the same bits either way.
    Eager calls refuse NaN/Inf leaves, naming the path, from the scales the quantizer
    computes and one read of the other float leaves in the same program; under ``jit``
    the values are unknown and that check is skipped.
    """
    spec = as_spec(spec, bits=bits, granularity=granularity, rule=rule)
    sel = _selection(params, spec.rule)
    kv, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths, xs = [path_str(kp) for kp, _ in kv], [x for _, x in kv]
    idx = [i for i, p in enumerate(paths) if p in sel]
    eager = not any(isinstance(x, jax.core.Tracer) for x in xs)
    rest = [x for p, x in zip(paths, xs) if p not in sel and is_float(x)] if eager else []
    leaves = [xs[i] for i in idx]
    axes = _check_leaves(leaves, [sel[paths[i]] for i in idx], spec.granularity)
    out, ok = _run(leaves, rest, axes, spec.bits, spec.granularity, ste, None, check=eager)
    if eager and not bool(ok):
        check_finite(params, "params")  # names the first bad leaf
        raise ValueError("params: a float64 value beyond float32's range")  # Inf once cast
    for i, y in zip(idx, out):
        xs[i] = y
    return jax.tree_util.tree_unflatten(treedef, xs)


def ptq(
    params: PyTree,
    spec: QuantSpec | int | None = None,
    *,
    bits: int | None = None,
    granularity: str | None = None,
    rule: Rule | None = None,
) -> PyTree:
    """PTQ of a param tree (METHOD.md): same structure, dtypes and shardings.

    ``spec`` as in ``fake_quant_tree``. One jitted call over the selected leaves (and a
    read of the other float leaves for the NaN/Inf check) and one host sync; the leaves
    not selected are returned as they are. Peak memory stays at about the input plus the
    output (leaf by leaf, or grouped where XLA fuses the stacks: see ``grouped_default``).
    """
    return fake_quant_tree(params, as_spec(spec, bits=bits, granularity=granularity, rule=rule))
