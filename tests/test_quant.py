"""The quantizer against the METHOD.md formula (NumPy and PyTorch), STE, validation, ptq."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VIT_KERNELS, run_multidevice, vit_tree, with_int_leaves
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qvec_jax as q
from qvec_jax import quant

BITS = range(2, 9)


def np_quant(w, bits, reduce_axes):
    """METHOD.md in NumPy float32: codes, scales, fake-quant values."""
    w = np.asarray(w, np.float32)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    absmax = np.abs(w).max(axis=reduce_axes, keepdims=True)
    s = np.maximum(absmax, np.float32(1e-8)) / np.float32(qmax)
    codes = np.clip(np.round(w / s), qmin, qmax)  # np.round: half to even
    return codes.astype(np.int8), s, (codes * s).astype(np.float32)


def reduce_of(ndim, granularity, channel_axes):
    if granularity == "tensor":
        return tuple(range(ndim))
    keep = {a % ndim for a in ((-1,) if channel_axes is None else channel_axes)}
    return tuple(a for a in range(ndim) if a not in keep)


def near_ties(rng, shape, bits, reduce_axes):
    """Arrays whose ``w / s`` sits on or next to ``k + 0.5``, where rounding can go wrong.

    One entry per channel holds the channel's absmax, so ``s`` is known in advance.
    """
    qmax = 2 ** (bits - 1) - 1
    keep_shape = tuple(1 if a in reduce_axes else n for a, n in enumerate(shape))
    absmax = rng.uniform(0.3, 3.0, keep_shape).astype(np.float32)
    s = absmax / np.float32(qmax)
    k = rng.integers(-qmax, qmax, shape).astype(np.float32) + np.float32(0.5)
    w = (k * s).astype(np.float32)
    w = np.where(rng.random(shape) < 0.3, np.nextafter(w, np.float32(np.inf)), w)
    first = tuple(slice(0, 1) if a in reduce_axes else slice(None) for a in range(len(shape)))
    w[first] = absmax * rng.choice(np.float32([-1, 1]), keep_shape)
    return w


def assert_codes_scale_values(w, bits, granularity, channel_axes):
    red = reduce_of(np.ndim(w), granularity, channel_axes)
    c_np, s_np, v_np = np_quant(w, bits, red)
    c, s = q.codes_and_scale(w, bits, granularity, channel_axes)
    v = q.fake_quant(w, bits, granularity=granularity, channel_axes=channel_axes)
    assert c.dtype == jnp.int8 and c.shape == np.shape(w) and s.shape == s_np.shape
    np.testing.assert_array_equal(np.asarray(c), c_np)
    np.testing.assert_array_max_ulp(np.asarray(s), s_np, maxulp=1)
    np.testing.assert_array_max_ulp(np.asarray(v), v_np, maxulp=1)


CASES = [
    ((12, 10), None),
    ((12, 10), (0,)),
    ((12, 10), (1,)),
    ((6, 3, 5), (1, 2)),
    ((3, 5, 6), (2,)),
    ((6, 3, 5), (0,)),
    ((6, 3, 5), (-1, 0)),
    ((3, 3, 2, 8), None),
    ((3, 3, 2, 8), (2, 3)),
    ((3, 3, 2, 8), (0, 1, 2, 3)),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("shape,axes", CASES)
def test_matches_numpy_formula(bits, granularity, shape, axes):
    rng = np.random.default_rng(bits)
    w = rng.normal(0, 0.05, shape).astype(np.float32)
    assert_codes_scale_values(w, bits, granularity, axes)
    red = reduce_of(len(shape), granularity, axes)
    assert_codes_scale_values(near_ties(rng, shape, bits, red), bits, granularity, axes)


def test_round_half_to_even_on_exact_ties():
    # absmax 3 at 3 bits -> s = 1 exactly, so w / s is w
    w = np.float32([[3.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997]]).T
    c, s = q.codes_and_scale(w, 3, "channel", (1,))
    assert float(s[0, 0]) == 1.0
    assert np.asarray(c).ravel().tolist() == [3, 0, 2, 2, 0, -2, -2, 0]


finite32 = st.floats(-1e6, 1e6, width=32, allow_subnormal=False)


@st.composite
def kernels(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    w = draw(hnp.arrays(np.float32, shape, elements=finite32))
    nd = len(shape)
    axes = draw(
        st.lists(st.integers(-nd, nd - 1), min_size=1, max_size=nd, unique_by=lambda a: a % nd)
    )
    return w, tuple(axes), draw(st.integers(2, 8)), draw(st.sampled_from(["channel", "tensor"]))


@settings(max_examples=30, deadline=None)
@given(kernels())
def test_properties(case):
    w, axes, bits, gran = case
    qmax = 2 ** (bits - 1) - 1
    assert_codes_scale_values(w, bits, gran, axes)
    c, s = q.codes_and_scale(w, bits, gran, axes)
    c = np.asarray(c)
    assert c.min() >= -qmax and c.max() <= qmax  # qmin is never reached
    fq = q.fake_quant(w, bits, granularity=gran, channel_axes=axes)
    # sign symmetry
    np.testing.assert_array_equal(
        np.asarray(q.fake_quant(-w, bits, granularity=gran, channel_axes=axes)), -np.asarray(fq)
    )
    # idempotence: same codes again, values within 1 ulp (s is recomputed from q * s)
    c2, _ = q.codes_and_scale(fq, bits, gran, axes)
    np.testing.assert_array_equal(np.asarray(c2), c)
    fq2 = q.fake_quant(fq, bits, granularity=gran, channel_axes=axes)
    np.testing.assert_array_max_ulp(np.asarray(fq2), np.asarray(fq), maxulp=1)


def test_zero_channel_stays_zero():
    w = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    w[:, 2] = 0.0
    for gran in ("channel", "tensor"):
        out = np.asarray(q.fake_quant(w, 3, granularity=gran))
        assert np.isfinite(out).all() and (out[:, 2] == 0).all()
    out = np.asarray(q.fake_quant(np.zeros((3, 3), np.float32), 4))
    assert np.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtype_preserved_and_computed_in_float32(dtype):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), dtype)
    out = q.fake_quant(w, 3)
    assert out.dtype == dtype and out.shape == w.shape
    ref = q.fake_quant(w.astype(jnp.float32), 3).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_jittable_with_static_bits():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    f = jax.jit(lambda x: q.fake_quant(x, 3, channel_axes=(1,)))
    np.testing.assert_array_equal(np.asarray(f(w)), np.asarray(q.fake_quant(w, 3)))


# --- the three ViT kernel layouts vs the PyTorch-layout [out, in] matrix -----------------

D, H, HD, MLP = 16, 4, 8, 24
LAYOUTS = {
    # name: (kernel shape, channel axes, kernel -> torch [out, in], torch [out, in] -> kernel)
    "qkv": (
        (D, H, HD),
        (1, 2),
        lambda k: k.reshape(D, H * HD).T,
        lambda m: m.T.reshape(D, H, HD),
    ),
    "out": (
        (H, HD, D),
        (2,),
        lambda k: k.reshape(H * HD, D).T,
        lambda m: m.T.reshape(H, HD, D),
    ),
    "dense": ((D, MLP), (1,), lambda k: k.T, lambda m: m.T),
}


def per_row_numpy(m, bits):
    return np_quant(m, bits, (1,))


def per_row_torch(m, bits):
    """The authors' formula, in PyTorch, on a PyTorch-layout [out, in] weight."""
    torch = pytest.importorskip("torch")
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    w = torch.from_numpy(np.ascontiguousarray(m))
    abs_max = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    scale = abs_max / qmax
    codes = (w / scale).round().clamp(qmin, qmax)
    return codes.to(torch.int8).numpy(), scale.numpy(), (codes * scale).numpy()


def check_layout(name, bits, per_row, ties):
    shape, axes, to_torch, from_torch = LAYOUTS[name]
    rng = np.random.default_rng(bits)
    k = rng.normal(0, 0.05, shape).astype(np.float32)
    if ties:  # near-ties built on the [out, in] matrix, where the scales are per row
        k = from_torch(near_ties(rng, to_torch(k).shape, bits, (1,)))
    m = to_torch(k)
    c_ref, s_ref, v_ref = per_row(m, bits)
    c, s = q.codes_and_scale(k, bits, "channel", axes)
    v = q.fake_quant(k, bits, channel_axes=axes)
    np.testing.assert_array_equal(to_torch(np.asarray(c)), c_ref)
    np.testing.assert_array_max_ulp(np.asarray(s).reshape(-1), s_ref.reshape(-1), maxulp=1)
    np.testing.assert_array_max_ulp(to_torch(np.asarray(v)), v_ref, maxulp=1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("ties", [False, True])
def test_layout_vs_numpy_per_row(name, bits, ties):
    check_layout(name, bits, per_row_numpy, ties)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("ties", [False, True])
def test_layout_vs_torch_per_row(name, bits, ties):
    check_layout(name, bits, per_row_torch, ties)


def test_vit_rule_axes_are_the_layouts():
    for path, name in [
        ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel", "qkv"),
        ("Transformer/encoderblock_11/MultiHeadDotProductAttention_1/value/kernel", "qkv"),
        ("Transformer/encoderblock_3/MultiHeadDotProductAttention_1/out/kernel", "out"),
        ("Transformer/encoderblock_3/MlpBlock_3/Dense_1/kernel", "dense"),
    ]:
        assert q.VIT_RULE.match(path) == LAYOUTS[name][1]


# --- STE -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gran", ["channel", "tensor"])
def test_ste_forward_exact_and_gradient_identity(dtype, gran):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 5, 4)), dtype)
    f = lambda x: q.fake_quant(x, 3, granularity=gran, channel_axes=(1, 2), ste=True)
    out, vjp = jax.vjp(f, w)
    ref = q.fake_quant(w, 3, granularity=gran, channel_axes=(1, 2))
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    ct = jnp.asarray(rng.normal(size=w.shape), dtype)
    (g,) = vjp(ct)
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(ct, np.float32))
    # under jit and grad too
    g2 = jax.jit(jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) * 3.0)))(w)
    np.testing.assert_array_equal(np.asarray(g2, np.float32), 3.0)


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2.0, "3", True, None, np.float32(4)])
def test_bits_type_error(bits):
    w = jnp.ones((2, 2))
    for f in (
        lambda: q.fake_quant(w, bits),
        lambda: q.codes_and_scale(w, bits),
        lambda: q.ptq(vit_tree(0), bits),
    ):
        with pytest.raises(TypeError, match="bits"):
            f()


@pytest.mark.parametrize("bits", [0, 1, 9, -3, 16])
def test_bits_value_error(bits):
    with pytest.raises(ValueError, match="2..8"):
        q.fake_quant(jnp.ones((2, 2)), bits)
    with pytest.raises(ValueError, match="2..8"):
        q.ptq(vit_tree(0), bits)


def test_numpy_int_bits_accepted():
    w = jnp.ones((2, 2))
    np.testing.assert_array_equal(np.asarray(q.fake_quant(w, np.int64(3))), np.ones((2, 2)))


def test_bad_granularity_and_axes():
    w = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="granularity"):
        q.fake_quant(w, 3, granularity="row")
    with pytest.raises(ValueError, match="granularity"):
        q.ptq(vit_tree(0), 3, granularity="group")
    for axes in [(2,), (-3,), (0, 5)]:
        with pytest.raises(ValueError, match="out of range"):
            q.fake_quant(w, 3, channel_axes=axes)


# --- ptq / fake_quant_tree ------------------------------------------------------------


def test_vit_rule_selects_exactly_the_block_kernels(vit):
    sel = q.VIT_RULE.select(vit)
    assert sorted(sel) == sorted(VIT_KERNELS)
    assert len(sel) == 6 * 2
    assert q.VIT_RULE.unmatched(vit) == []


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gran", ["channel", "tensor"])
def test_ptq_quantizes_selected_and_keeps_the_rest(dtype, gran):
    tree = with_int_leaves(vit_tree(3, dtype=dtype))
    out = q.ptq(tree, 3, granularity=gran)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    fi, fo = q.flatten(tree), q.flatten(out)
    for p, x in fi.items():
        y = fo[p]
        assert y.dtype == x.dtype and y.shape == x.shape, p
        if p in VIT_KERNELS:
            ref = q.fake_quant(x, 3, granularity=gran, channel_axes=q.VIT_RULE.match(p))
            np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
            assert not np.array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32)), p
        else:
            assert np.array_equal(np.asarray(y), np.asarray(x)), p


def test_ptq_3bit_uses_at_most_7_levels_per_channel(vit):
    out = q.flatten(q.ptq(vit, 3))
    k = np.asarray(out["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"])
    for col in k.T:
        assert len(np.unique(col)) <= 7


def test_fake_quant_tree_under_jit_equals_ptq(vit):
    a = jax.jit(lambda p: q.fake_quant_tree(p, 4, ste=True))(vit)
    b = q.ptq(vit, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rule_unmatched_and_bad_rules(vit):
    rule = q.Rule({r"Dense_0/kernel$": (1,), r"Dense_7/kernel$": (1,), r"^nope/": (0,)})
    assert rule.unmatched(vit) == [r"Dense_7/kernel$", r"^nope/"]
    out = q.flatten(q.ptq(vit, 3, rule=rule))
    changed = [p for p, x in q.flatten(vit).items() if not np.array_equal(out[p], x)]
    assert sorted(changed) == [
        f"Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/kernel" for i in (0, 1)
    ]
    with pytest.raises(ValueError, match="selects no leaf"):
        q.ptq(vit, 3, rule=q.Rule({r"^nope/": (0,)}))
    tree = with_int_leaves(vit)
    with pytest.raises(ValueError, match="^step: .*non-float"):
        q.ptq(tree, 3, rule=q.Rule({r"^step$": (), r"kernel$": (1,)}))


def test_rule_first_match_wins():
    r = q.Rule([(r"Dense_0", 1), (r"Dense_\d", 2)])
    assert r.match("a/Dense_0/kernel") == 1 and r.match("a/Dense_1/kernel") == 2
    assert r.match("a/b") is None
    assert q.Rule([r"^head/"]).match("head/kernel") is True


# --- QuantSpec ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2.0, "3", True, None, np.float32(4)])
def test_quantspec_bits_type_error(bits):
    with pytest.raises(TypeError, match="bits"):
        q.QuantSpec(bits)


@pytest.mark.parametrize("bits", [0, 1, 9, -3])
def test_quantspec_bits_value_error(bits):
    with pytest.raises(ValueError, match="2..8"):
        q.QuantSpec(bits)


def test_quantspec_validates_granularity_and_rule_once():
    for g in ("row", None, ["channel"]):
        with pytest.raises(ValueError, match="granularity must be one of"):
            q.QuantSpec(3, g)
    with pytest.raises(TypeError, match="rule must be a qvec_jax.Rule"):
        q.QuantSpec(3, "channel", {r"kernel$": (1,)})
    s = q.QuantSpec(np.int64(3))
    assert type(s.bits) is int and s.bits == 3
    assert (s.granularity, s.rule) == ("channel", q.VIT_RULE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 4
    with pytest.raises(ValueError, match="2..8"):
        dataclasses.replace(s, bits=9)  # a replaced spec is validated again


def test_quantspec_equality_and_hash():
    twin_rule = q.Rule({rx.pattern: list(v) for rx, v in q.VIT_RULE.patterns})  # lists -> tuples
    assert twin_rule == q.VIT_RULE and hash(twin_rule) == hash(q.VIT_RULE)
    a, b = q.QuantSpec(3), q.QuantSpec(3, "channel", twin_rule)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != q.QuantSpec(2) and a != q.QuantSpec(3, "tensor")
    assert a != q.QuantSpec(3, rule=q.Rule({r"kernel$": (1,)}))
    assert q.Rule([r"^a"]) != q.Rule([r"^b"]) and q.Rule([r"^a"]) != r"^a"


def test_quantspec_is_one_static_jit_argument(vit):
    traces = []

    @partial(jax.jit, static_argnums=1)
    def f(p, spec):
        traces.append(spec)
        return q.fake_quant_tree(p, spec)

    f(vit, q.QuantSpec(3))
    f(vit, q.QuantSpec(3, rule=q.Rule({rx.pattern: v for rx, v in q.VIT_RULE.patterns})))
    assert len(traces) == 1  # an equal spec built apart hits the cache
    out = f(vit, q.QuantSpec(2))
    assert len(traces) == 2
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(q.ptq(vit, 2))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("bits,gran", [(2, "channel"), (3, "tensor"), (8, "channel")])
def test_quantspec_and_keywords_give_identical_results(bits, gran):
    tree = with_int_leaves(vit_tree(4))
    rule = q.Rule({r"MlpBlock_3/Dense_0/kernel$": (1,), r"query/kernel$": (1, 2)})
    for r, kw in ((q.VIT_RULE, {}), (rule, {"rule": rule})):
        spec = q.QuantSpec(bits, gran, r)
        pairs = [
            (q.ptq(tree, spec), q.ptq(tree, bits, granularity=gran, **kw)),
            (q.ptq(tree, spec=spec), q.ptq(tree, bits=bits, granularity=gran, **kw)),
            (
                q.fake_quant_tree(tree, spec, ste=True),
                q.fake_quant_tree(tree, bits, granularity=gran, ste=True, **kw),
            ),
        ]
        for a, b in pairs:
            assert jax.tree.structure(a) == jax.tree.structure(b)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(  # the spec's settings are the ones used
        q.flatten(q.ptq(tree, q.QuantSpec(bits, gran)))[VIT_KERNELS[0]],
        q.flatten(tree)[VIT_KERNELS[0]],
    )


def test_spec_and_keywords_together_are_refused(vit):
    spec = q.QuantSpec(3)
    for kw in ({"granularity": "tensor"}, {"bits": 3}, {"rule": q.VIT_RULE}):
        with pytest.raises(TypeError, match="not both"):
            q.ptq(vit, spec, **kw)
    with pytest.raises(TypeError, match="bits given twice"):
        q.ptq(vit, 3, bits=3)
    with pytest.raises(TypeError, match="bits"):
        q.ptq(vit)  # no bit width at all


# --- both ViT namings: Google checkpoints and big_vision-trained trees ------------------

# big_vision's vit.py numbers the same Flax sub-modules from 0, and keeps the position
# embedding at the top (without the cls entry).
_BIG_VISION_NAMES = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "MlpBlock_3": "MlpBlock_0",
    "LayerNorm_2": "LayerNorm_1",
}


def big_vision_path(path: str) -> str:
    if path == "Transformer/posembed_input/pos_embedding":
        return "pos_embedding"
    return "/".join(_BIG_VISION_NAMES.get(part, part) for part in path.split("/"))


def big_vision_tree(tree) -> dict:
    """``tree`` (Google layout) with big_vision's names; the same arrays."""
    flat = q.flatten(tree)
    flat["Transformer/posembed_input/pos_embedding"] = flat[
        "Transformer/posembed_input/pos_embedding"
    ][:, 1:]
    return q.unflatten({big_vision_path(p): x for p, x in flat.items()})


def test_vit_rule_selects_the_same_kernels_in_both_namings(vit):
    bv = big_vision_tree(vit)
    assert "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel" in q.flatten(bv)
    sel, sel_bv = q.VIT_RULE.select(vit), q.VIT_RULE.select(bv)
    assert {big_vision_path(p): ax for p, ax in sel.items()} == sel_bv
    assert len(sel_bv) == 12
    assert all(v == (1, 2) for p, v in sel_bv.items() if p.endswith(("query/kernel", "key/kernel")))
    assert q.VIT_RULE.unmatched(bv) == [] and q.VIT_RULE.unmatched(vit) == []


@pytest.mark.parametrize("gran", ["channel", "tensor"])
def test_ptq_and_size_report_on_a_big_vision_tree(vit, gran):
    bv = big_vision_tree(vit)
    out, ref = q.flatten(q.ptq(bv, 2, granularity=gran)), q.flatten(q.ptq(vit, 2, granularity=gran))
    assert {big_vision_path(p) for p in ref} == set(out)
    for p, x in ref.items():
        y = out[big_vision_path(p)]
        if p == "Transformer/posembed_input/pos_embedding":
            x = x[:, 1:]
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=p)
    changed = [p for p, x in q.flatten(bv).items() if not np.array_equal(out[p], x)]
    assert sorted(changed) == sorted(big_vision_path(p) for p in VIT_KERNELS)
    rep, rep_bv = q.size_report(vit, 2, granularity=gran), q.size_report(bv, 2, granularity=gran)
    assert rep_bv["quantized_weights"] == rep["quantized_weights"]
    assert rep_bv["quantized_leaves"] == 12 and rep_bv["code_bytes"] == rep["code_bytes"]


def test_head_rule_leaves_out_the_same_head_in_both_namings(fp_qat_pair):
    fp, qat = fp_qat_pair
    qv = q.flatten(q.quantization_vector(qat, fp))
    qv_bv = q.flatten(q.quantization_vector(big_vision_tree(qat), big_vision_tree(fp)))
    assert {big_vision_path(p) for p in qv} == set(qv_bv)
    assert "head/kernel" in q.flatten(big_vision_tree(fp))
    assert not any(p.startswith("head/") for p in qv_bv)


# --- grouped fake-quant: stacks of same-shaped leaves, bit for bit the per-leaf quantizer ---

FLOATS = [jnp.float32, jnp.bfloat16, jnp.float16]


@st.composite
def leaf_sets(draw):
    """Leaves of 1-3 shapes (so that stacks form), each with its own channel axes (also
    negative spellings of the same axes) and dtype; values normal, or next to ties."""
    shapes = draw(
        st.lists(
            hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6), min_size=1, max_size=3
        )
    )
    gran, bits, ste = (
        draw(st.sampled_from(["channel", "tensor"])),
        draw(st.integers(2, 8)),
        draw(st.booleans()),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    leaves, axes = [], []
    for _ in range(draw(st.integers(1, 9))):
        shape = draw(st.sampled_from(shapes))
        nd = len(shape)
        ax = draw(st.sampled_from([None, (nd - 1,), (-1,), tuple(range(nd)), (0,)]))
        red = reduce_of(nd, gran, ax)
        w = near_ties(rng, shape, bits, red) if rng.random() < 0.5 else rng.normal(size=shape)
        leaves.append(jnp.asarray(w, draw(st.sampled_from(FLOATS))))
        axes.append(ax)
    return leaves, axes, bits, gran, ste


def per_leaf(leaves, axes, bits, gran, ste=False):
    return [
        q.fake_quant(w, bits, granularity=gran, channel_axes=a, ste=ste)
        for w, a in zip(leaves, axes)
    ]


def assert_bits_equal(xs, ys):
    """Same dtypes, shapes and bits (so -0.0 is not 0.0)."""
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        bits = f"u{x.dtype.itemsize}"
        np.testing.assert_array_equal(x.view(bits), y.view(bits))


@settings(max_examples=40, deadline=None)
@given(leaf_sets())
def test_grouped_and_per_leaf_fake_quant_are_bit_identical(case):
    leaves, axes, bits, gran, ste = case
    ref = per_leaf(leaves, axes, bits, gran, ste)
    for grouped in (True, False):
        out = quant.fake_quant_leaves(
            leaves, axes, bits, granularity=gran, ste=ste, grouped=grouped
        )
        assert_bits_equal(out, ref)


def test_per_leaf_plan_holds_no_whole_tree_temporary(monkeypatch):
    """Leaf by leaf (the CPU default), the program's temporaries are the scales: peak
    memory is the input plus the output. (XLA's CPU backend materializes stacks.)"""
    monkeypatch.setattr(quant, "grouped_default", lambda: False)
    tree = vit_tree(0, width=64, heads=4, mlp=256)
    kernels = sum(x.nbytes for p, x in q.flatten(tree).items() if p in VIT_KERNELS)
    compiled = jax.jit(lambda t: q.fake_quant_tree(t, 3)).lower(tree).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.05 * kernels


def test_groups_share_shape_dtype_and_reduction_axes():
    f32, bf16 = jnp.zeros((4, 3, 5)), jnp.zeros((4, 3, 5), jnp.bfloat16)
    leaves = [f32, f32, bf16, f32, f32, jnp.zeros((4, 15)), f32]
    axes = ((1, 2), (-2, -1), (1, 2), (2,), (1, 2), (1,), (1, -1))
    assert quant._groups(leaves, axes, "channel", False) == tuple((i,) for i in range(7))
    assert quant._groups(leaves, axes, "channel", True) == ((0, 1, 4, 6), (2,), (3,), (5,))
    # per tensor the channel axes do not matter
    assert quant._groups(leaves, axes, "tensor", True) == ((0, 1, 3, 4, 6), (2,), (5,))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gran", ["channel", "tensor"])
def test_ptq_grouped_equals_per_leaf_fake_quant(monkeypatch, dtype, gran):
    tree = with_int_leaves(vit_tree(5, dtype=dtype, depth=3))
    flat, sel = q.flatten(tree), q.VIT_RULE.select(tree)
    ref = per_leaf([flat[p] for p in sel], list(sel.values()), 3, gran)
    for grouped in (True, False):
        monkeypatch.setattr(quant, "grouped_default", lambda g=grouped: g)
        for fn in (q.ptq, jax.jit(q.ptq, static_argnums=1)):
            out = q.flatten(fn(tree, q.QuantSpec(3, gran)))
            assert_bits_equal([out[p] for p in sel], ref)
            for p in flat.keys() - sel.keys():
                assert out[p] is flat[p] or np.array_equal(out[p], flat[p]), p


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_ste_forward_and_gradient_are_the_per_leaf_ones(monkeypatch, dtype):
    tree = vit_tree(6, dtype=dtype, depth=3)
    ct = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(1).normal(size=x.shape), dtype), tree
    )
    loss = lambda t: sum(
        jnp.sum(x.astype(jnp.float32) * c.astype(jnp.float32))
        for x, c in zip(jax.tree.leaves(q.fake_quant_tree(t, 2, ste=True)), jax.tree.leaves(ct))
    )
    results = {}
    for grouped in (True, False):
        monkeypatch.setattr(quant, "grouped_default", lambda g=grouped: g)
        fwd = jax.jit(lambda t: q.fake_quant_tree(t, 2, ste=True))(tree)
        results[grouped] = fwd, jax.jit(jax.grad(loss))(tree)
    (fwd_g, grad_g), (fwd_p, grad_p) = results[True], results[False]
    assert_bits_equal(jax.tree.leaves(fwd_g), jax.tree.leaves(fwd_p))
    assert_bits_equal(jax.tree.leaves(grad_g), jax.tree.leaves(grad_p))
    assert_bits_equal(jax.tree.leaves(grad_g), jax.tree.leaves(ct))  # identity everywhere
    sel = q.VIT_RULE.select(tree)
    flat, ref = q.flatten(fwd_g), q.flatten(tree)
    assert_bits_equal(
        [flat[p] for p in sel], per_leaf([ref[p] for p in sel], sel.values(), 2, "channel")
    )


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_eager_tree_calls_refuse_nan_and_inf_in_any_leaf_naming_it(monkeypatch, grouped, bad):
    """The check is read off the scales (a NaN counts as Inf in the absmax) and one read
    of the other float leaves, in the quantizing programs: a bad value in any float leaf,
    at any place, is caught and named."""
    monkeypatch.setattr(quant, "grouped_default", lambda: grouped)
    tree = with_int_leaves(vit_tree(0, dtype=jnp.bfloat16))
    flat = q.flatten(tree)
    floats = [p for p, x in flat.items() if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floats) == len(flat) - 2
    for k, path in enumerate(floats):
        bad_flat = dict(flat)
        x = np.array(flat[path], copy=True)
        x.reshape(-1)[[0, k % x.size, -1][k % 3]] = bad
        bad_flat[path] = jnp.asarray(x)
        bad_tree = q.unflatten(bad_flat)
        for fn in (lambda t: q.ptq(t, 2), lambda t: q.fake_quant_tree(t, 3, ste=True)):
            with pytest.raises(ValueError, match=f"^{path}: NaN or Inf in params"):
                fn(bad_tree)
    jax.jit(lambda t: q.ptq(t, 2))(bad_tree)  # under jit: no check, no error


def test_a_nan_or_inf_anywhere_in_a_channel_makes_its_scale_nan():
    """XLA's CPU max reduction can skip a NaN in a large array; the scale must not."""
    w = np.random.default_rng(0).normal(size=(768, 3072)).astype(np.float32)
    w[5, 7], w[700, 9], w[3, 11] = np.nan, np.inf, -np.inf
    _, s = q.codes_and_scale(w, 3)
    s = np.asarray(s).ravel()
    assert (
        np.flatnonzero(np.isnan(s)).tolist() == [7, 9, 11]
        and np.isfinite(np.delete(s, [7, 9, 11])).all()
    )
    _, s = q.codes_and_scale(w, 3, "tensor")
    assert np.isnan(np.asarray(s)).all()


def test_fake_quant_leaves_validates_like_fake_quant():
    w = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="2 leaves but 1 channel_axes"):
        quant.fake_quant_leaves([w, w], [None], 3)
    with pytest.raises(TypeError, match="float array"):
        quant.fake_quant_leaves([w, jnp.ones((4, 3), jnp.int32)], [None, None], 3)
    with pytest.raises(ValueError, match="out of range"):
        quant.fake_quant_leaves([w], [(2,)], 3)
    with pytest.raises(ValueError, match="2..8"):
        quant.fake_quant_leaves([w], [None], 9)
    assert quant.fake_quant_leaves([], [], 3) == []


GROUPED_SHARDING_CODE = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import sys; sys.path.insert(0, "tests")
from conftest import vit_tree
import qvec_jax as q
from qvec_jax import quant

mesh = jax.make_mesh((4, 2), ("a", "b"))
host = vit_tree(0, width=16, heads=2, mlp=32, depth=3)
def spec(i, x):  # same-shaped leaves on up to three shardings, in turn
    specs = [P()]
    if x.ndim >= 2 and x.shape[-1] % 8 == 0:
        specs.append(P(*([None] * (x.ndim - 1)), ("a", "b")))  # output axis split 8 ways
    if x.ndim >= 2 and x.shape[0] % 4 == 0:
        specs.append(P("a"))  # reduction axis split
    return specs[i % len(specs)]

flat = {p: jax.device_put(x, NamedSharding(mesh, spec(i, x)))
        for i, (p, x) in enumerate(q.flatten(host).items())}
assert len({x.sharding for p, x in flat.items() if p.endswith("query/kernel")}) == 3
ref = q.flatten(q.ptq(host, 3))
for grouped in (True, False):
    quant.grouped_default = lambda: grouped
    for fn in (q.ptq, jax.jit(q.ptq, static_argnums=1)):
        out = q.flatten(fn(q.unflatten(flat), 3))
        for p, x in flat.items():
            assert out[p].sharding.is_equivalent_to(x.sharding, x.ndim), (p, out[p].sharding)
            np.testing.assert_array_equal(np.asarray(out[p]), np.asarray(ref[p]))
print("OK")
"""


def test_grouped_ptq_keeps_each_leafs_sharding():
    assert run_multidevice(GROUPED_SHARDING_CODE).strip() == "OK"
