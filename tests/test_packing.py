"""Bit-packed storage: pack/unpack, quantize/dequantize == ptq, size_report by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import vit_shapes, vit_tree, with_int_leaves

import qvec_jax as q
from qvec_jax.packing import pack, unpack


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 13, 64, 1003])
def test_pack_unpack_roundtrip(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), n).astype(np.int8)
    codes[0] = -(2 ** (bits - 1))  # both ends of the range
    codes[-1] = 2 ** (bits - 1) - 1 if n > 1 else codes[-1]
    packed = pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (bits, math.ceil(n / 8))
    out = unpack(packed, bits, n)
    assert out.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(out), codes)


@pytest.mark.parametrize(
    "bits,gran", [(b, "channel") for b in range(2, 9)] + [(3, "tensor"), (8, "tensor")]
)
def test_dequantize_quantize_is_ptq(bits, gran):
    tree = with_int_leaves(vit_tree(5, width=12, heads=3, mlp=20))  # odd sizes: n % 8 != 0
    qt = q.quantize(tree, bits, granularity=gran)
    fq = q.flatten(qt)
    kernels = [p for p in fq if p.endswith("kernel/packed")]
    assert len(kernels) == 12
    assert all(fq[p].dtype == jnp.uint8 for p in kernels)
    out, ref = q.dequantize(qt), q.ptq(tree, bits, granularity=gran)
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    for p, x in q.flatten(ref).items():
        y = q.flatten(out)[p]
        assert y.dtype == x.dtype and y.shape == x.shape
        assert np.array_equal(np.asarray(y), np.asarray(x)), p  # bit-identical


def test_quantize_bf16_and_qtensor_is_a_pytree():
    tree = vit_tree(2, dtype=jnp.bfloat16)
    qt = q.quantize(tree, 3)
    leaf = qt["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
    assert isinstance(leaf, q.QTensor) and leaf.dtype == "bfloat16" and leaf.bits == 3
    assert leaf.scale.dtype == jnp.float32 and leaf.scale.shape == (1, 32)
    out = q.dequantize(jax.jit(lambda t: t)(qt))  # survives a jit boundary as a pytree
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(q.ptq(tree, 3))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_size_report_by_hand():
    tree = {
        "Transformer": {
            "encoderblock_0": {
                "MlpBlock_3": {
                    "Dense_0": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros(3)},
                },
                "MultiHeadDotProductAttention_1": {
                    "query": {"kernel": jnp.zeros((4, 2, 3))},
                    "out": {"kernel": jnp.zeros((2, 3, 4))},
                },
            }
        },
        "head": {"kernel": jnp.zeros((4, 2), jnp.bfloat16)},
        "step": jnp.int32(0),
    }
    r = q.size_report(tree, 3)
    # codes: 3 bits * ceil(n / 8) bytes for n = 15, 24, 24
    assert r["code_bytes"] == 3 * (2 + 3 + 3)
    # scales (fp32): Dense 3 columns, query 2*3 = 6 (heads, head_dim), out 4
    assert r["scale_bytes"] == 4 * (3 + 6 + 4)
    # bias fp32 3*4, head bf16 8*2, step int32 4
    assert r["other_bytes"] == 12 + 16 + 4
    assert r["quantized_leaves"] == 3 and r["quantized_weights"] == 15 + 24 + 24
    assert r["fp32_bytes"] == 4 * (15 + 3 + 24 + 24 + 8 + 1)
    assert r["total_bytes"] == r["code_bytes"] + r["scale_bytes"] + r["other_bytes"]
    assert r["compression"] == r["fp32_bytes"] / r["total_bytes"]
    t = q.size_report(tree, 8, granularity="tensor")
    assert t["code_bytes"] == 8 * (2 + 3 + 3) and t["scale_bytes"] == 4 * 3
    # the stored QTensors agree with the report
    packed = q.quantize(tree, 3, rule=q.VIT_RULE)
    stored = sum(
        x.packed.size + 4 * x.scale.size
        for x in jax.tree.leaves(packed, is_leaf=lambda x: isinstance(x, q.QTensor))
        if isinstance(x, q.QTensor)
    )
    assert stored == r["code_bytes"] + r["scale_bytes"]


def vit_b16_shapes(num_classes=1000):
    """The real ViT-B/16 shapes (no weights), via jax.eval_shape."""
    shapes = vit_shapes(
        depth=12, width=768, heads=12, mlp=3072, patch=16, num_patches=196, num_classes=num_classes
    )
    return jax.eval_shape(
        lambda: q.unflatten({p: jnp.zeros(s, jnp.float32) for p, s in shapes.items()})
    )


def test_size_report_vit_b16():
    tree = vit_b16_shapes(1000)
    r = q.size_report(tree, 3)
    assert r["quantized_leaves"] == 72
    assert r["quantized_weights"] == 84_934_656  # METHOD.md
    assert r["scale_bytes"] == 4 * 82_944  # one fp32 scale per output row
    assert r["code_bytes"] == 3 * 84_934_656 // 8
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    assert r["fp32_bytes"] == 4 * n and r["other_bytes"] == 4 * (n - 84_934_656)
    print(
        f"\nViT-B/16 (1000 classes, {n:,} params) 3-bit per-channel: "
        f"{r['total_bytes'] / 1e6:.2f} MB ({r['total_bytes'] / 2**20:.2f} MiB) "
        f"vs fp32 {r['fp32_bytes'] / 1e6:.2f} MB: {r['compression']:.2f}x smaller"
    )


@pytest.mark.parametrize("bits,gran", [(3, "channel"), (5, "tensor")])
def test_quantize_and_size_report_take_a_quantspec(bits, gran):
    tree = with_int_leaves(vit_tree(6, width=12, heads=3, mlp=20))
    rule = q.Rule({r"MlpBlock_3/Dense_[01]/kernel$": (1,)})
    for r, kw in ((q.VIT_RULE, {}), (rule, {"rule": rule})):
        spec = q.QuantSpec(bits, gran, r)
        a, b = q.quantize(tree, spec), q.quantize(tree, bits=bits, granularity=gran, **kw)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(q.dequantize(a)), jax.tree.leaves(q.ptq(tree, spec))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        rep = q.size_report(tree, spec)
        assert rep == q.size_report(tree, bits, granularity=gran, **kw)
        assert (rep["bits"], rep["granularity"]) == (bits, gran)
        assert rep["quantized_leaves"] == (12 if r is q.VIT_RULE else 4)
    with pytest.raises(TypeError, match="not both"):
        q.size_report(tree, q.QuantSpec(3), granularity="tensor")
