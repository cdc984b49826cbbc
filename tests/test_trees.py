"""Tree laws of the quantization vector (METHOD.md), the algebra, NNX, sharding, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import finetune_of, run_multidevice, vit_tree
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qvec_jax as q
from qvec_jax.trees import check_finite

HEAD = ("head/kernel", "head/bias")


def f32(x):
    return np.asarray(x, np.float32)


# --- paths and rules -------------------------------------------------------------------


def test_path_str_and_flatten_roundtrip(vit):
    flat = q.flatten(vit)
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel" in flat
    assert "cls" in flat and "head/bias" in flat
    back = q.unflatten(flat)
    assert jax.tree.structure(back) == jax.tree.structure(vit)
    assert q.path_str((jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(2))) == "a/2"


# --- the QV laws -----------------------------------------------------------------------


def test_qv_covers_backbone_floats_only(fp_qat_pair):
    fp, qat = fp_qat_pair
    qv = q.flatten(q.quantization_vector(qat, fp))
    ff = q.flatten(fp)
    expected = {p for p, x in ff.items() if not p.startswith("head/") and p not in ("step", "rng")}
    assert set(qv) == expected
    fq = q.flatten(qat)
    for p, v in qv.items():
        assert v.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(v), f32(fq[p]) - f32(ff[p]))


def test_patch_at_one_gives_qat_on_backbone_and_keeps_head(fp_qat_pair):
    fp, qat = fp_qat_pair
    patched = q.patch(fp, q.quantization_vector(qat, fp), 1.0)
    assert jax.tree.structure(patched) == jax.tree.structure(fp)
    fpat, fq, ff = q.flatten(patched), q.flatten(qat), q.flatten(fp)
    for p, x in fpat.items():
        assert x.dtype == ff[p].dtype and x.shape == ff[p].shape
        if p in HEAD or p in ("step", "rng"):
            assert np.array_equal(np.asarray(x), np.asarray(ff[p])), p  # bit-identical
        else:
            np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(fq[p]), maxulp=1)
    assert not np.array_equal(np.asarray(fq["head/kernel"]), np.asarray(fpat["head/kernel"]))


def test_patch_lam_zero_is_identity_and_lam_is_linear(fp_qat_pair):
    fp, qat = fp_qat_pair
    qv = q.quantization_vector(qat, fp)
    for x, y in zip(jax.tree.leaves(q.patch(fp, qv, 0.0)), jax.tree.leaves(fp)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    a, b = 0.3, 0.45
    once = q.flatten(q.patch(fp, qv, a + b))
    twice = q.flatten(q.patch(q.patch(fp, qv, a), qv, b))
    for p in once:
        np.testing.assert_allclose(np.asarray(once[p]), np.asarray(twice[p]), rtol=0, atol=1e-6)
    # lam = -1 undoes lam = 1
    back = q.flatten(q.patch(q.patch(fp, qv, 1.0), qv, -1.0))
    for p, x in q.flatten(fp).items():
        np.testing.assert_allclose(np.asarray(back[p]), np.asarray(x), rtol=0, atol=1e-6)


def test_patch_to_another_receiver_with_other_head():
    """A QV from task D patches task R whose head has another number of classes."""
    fp_d = vit_tree(1, num_classes=5)
    qat_d = finetune_of(fp_d, 2)
    fp_r = vit_tree(4, num_classes=11)
    qv = q.quantization_vector(qat_d, fp_d)
    patched = q.flatten(q.patch(fp_r, qv, 0.75))
    fr, fv = q.flatten(fp_r), q.flatten(qv)
    assert patched["head/kernel"].shape == (16, 11)
    assert np.array_equal(np.asarray(patched["head/kernel"]), np.asarray(fr["head/kernel"]))
    p = "Transformer/encoderblock_0/LayerNorm_0/scale"
    ref = f32(fr[p]) + np.float32(0.75) * f32(fv[p])
    np.testing.assert_array_max_ulp(np.asarray(patched[p]), ref, maxulp=1)


def test_dtypes_bf16_receiver_stays_bf16_and_qv_is_float32():
    fp = vit_tree(1, dtype=jnp.bfloat16)
    qat = finetune_of(fp, 2, rel=0.1)
    qv = q.quantization_vector(qat, fp)
    fq, ff = q.flatten(qat), q.flatten(fp)
    for p, v in q.flatten(qv).items():
        assert v.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(v), f32(fq[p]) - f32(ff[p]))
    patched = q.patch(fp, qv, 1.0)
    for p, x in q.flatten(patched).items():
        assert x.dtype == jnp.bfloat16, p
        if p not in HEAD:  # bf16 - bf16 is exact in float32, so the round trip is exact
            np.testing.assert_array_equal(f32(x), f32(fq[p]))
    # a float32 receiver patched with a QV of a bf16 pair stays float32
    fp32 = jax.tree.map(lambda x: x.astype(jnp.float32), fp)
    assert {x.dtype for x in jax.tree.leaves(q.patch(fp32, qv))} == {jnp.dtype(jnp.float32)}


def test_integer_leaves_never_in_qv_and_never_modified(fp_qat_pair):
    fp, qat = fp_qat_pair
    qv = q.quantization_vector(qat, fp)
    assert "step" not in qv and "rng" not in qv
    patched = q.patch(fp, qv, 1.3)
    assert patched["step"].dtype == jnp.int32 and int(patched["step"]) == 7
    assert patched["rng"].dtype == fp["rng"].dtype
    np.testing.assert_array_equal(np.asarray(patched["rng"]), np.asarray(fp["rng"]))
    # typed PRNG keys too
    fp2, qat2 = {**fp, "key": jax.random.key(0)}, {**qat, "key": jax.random.key(1)}
    qv2 = q.quantization_vector(qat2, fp2)
    assert "key" not in qv2
    assert q.patch(fp2, qv2)["key"] is fp2["key"]
    # a QV that names an integer leaf of the receiver is refused
    with pytest.raises(ValueError, match="^step: dtype int32 in receiver_params"):
        q.patch(fp, {**qv, "step": jnp.float32(1.0)})


def test_exclude_rule_is_configurable(fp_qat_pair):
    fp, qat = fp_qat_pair
    qv = q.flatten(q.quantization_vector(qat, fp, exclude=q.Rule([r"^head/", r"LayerNorm"])))
    assert not any("LayerNorm" in p or p.startswith("head/") for p in qv)
    assert "Transformer/encoder_norm/scale" in qv
    assert q.HEAD_RULE.match("pre_logits/kernel") and q.HEAD_RULE.match("head/bias")
    assert q.HEAD_RULE.match("Transformer/head/x") is None


# --- algebra ---------------------------------------------------------------------------

finite = st.floats(-100, 100, width=32, allow_subnormal=False)


@st.composite
def tree_pairs(draw):
    shapes = draw(st.lists(hnp.array_shapes(max_dims=3, max_side=4), min_size=1, max_size=3))
    mk = lambda: {
        f"l{i}": {"w": draw(hnp.arrays(np.float32, s, elements=finite))}
        for i, s in enumerate(shapes)
    }
    return mk(), mk()


def flat_np(t):
    return np.concatenate([np.ravel(f32(x)) for x in jax.tree.leaves(t)]).astype(np.float64)


@settings(max_examples=30, deadline=None)
@given(tree_pairs(), st.floats(-3, 3))
def test_algebra_on_definitions(pair, c):
    a, b = pair
    va, vb = flat_np(a), flat_np(b)
    np.testing.assert_allclose(flat_np(q.add(a, b)), va + vb, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(flat_np(q.sub(a, b)), va - vb, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(flat_np(q.scale(a, c)), c * va, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(
        flat_np(q.weighted_sum([a, b], [c, 2.0])), c * va + 2 * vb, rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(flat_np(q.weighted_sum([a, b])), (va + vb) / 2, atol=1e-4)
    np.testing.assert_allclose(q.global_norm(a), np.linalg.norm(va), rtol=1e-5, atol=1e-5)
    ln = q.leaf_norms(a)
    assert set(ln) == set(q.flatten(a))
    for p, x in q.flatten(a).items():
        np.testing.assert_allclose(ln[p], np.linalg.norm(f32(x)), rtol=1e-5, atol=1e-5)
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    if na > 1e-3 and nb > 1e-3:
        cos = q.cosine(a, b)
        np.testing.assert_allclose(cos, va @ vb / (na * nb), atol=1e-5)
        assert abs(cos - q.cosine(b, a)) < 1e-6
        np.testing.assert_allclose(q.cosine(a, a), 1.0, atol=1e-5)
        np.testing.assert_allclose(q.cosine(a, q.scale(a, -2.0)), -1.0, atol=1e-5)


def test_algebra_keeps_dtype_and_checks_structure(vit):
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), vit)
    assert {x.dtype for x in jax.tree.leaves(q.scale(bf, 0.5))} == {jnp.dtype(jnp.bfloat16)}
    other = vit_tree(0, num_classes=7)
    for f in (q.add, q.sub, q.cosine):
        with pytest.raises(ValueError, match="head/bias: shape"):
            f(vit, other)
    with pytest.raises(ValueError, match="head/bias: shape"):
        q.weighted_sum([vit, other])
    with pytest.raises(ValueError, match="2 trees but 1 weights"):
        q.weighted_sum([vit, vit], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        q.weighted_sum([])


# --- bad input -------------------------------------------------------------------------

LN = "Transformer/encoderblock_1/LayerNorm_0/scale"


def drop(tree, path):
    flat = dict(q.flatten(tree))
    del flat[path]
    return q.unflatten(flat)


def replace(tree, path, value):
    return q.unflatten({**q.flatten(tree), path: value})


def test_mismatched_trees_name_the_path(fp_qat_pair):
    fp, qat = fp_qat_pair
    with pytest.raises(ValueError, match=f"^{LN}: missing in qat_params$"):
        q.quantization_vector(drop(qat, LN), fp)
    with pytest.raises(ValueError, match=f"^{LN}: missing in fp_params$"):
        q.quantization_vector(qat, drop(fp, LN))
    with pytest.raises(ValueError, match=rf"^{LN}: shape \(17,\) in qat_params vs \(16,\)"):
        q.quantization_vector(replace(qat, LN, jnp.zeros(17)), fp)
    with pytest.raises(ValueError, match=f"^{LN}: dtype int32 in qat_params vs float32"):
        q.quantization_vector(replace(qat, LN, jnp.zeros(16, jnp.int32)), fp)
    with pytest.raises(ValueError, match="^step: dtype float32 in qat_params vs int32"):
        q.quantization_vector(replace(qat, "step", jnp.float32(7)), fp)


def test_nan_inf_named(fp_qat_pair):
    fp, qat = fp_qat_pair
    bad = f32(q.flatten(qat)[LN]).copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=f"^{LN}: NaN or Inf in qat_params"):
        q.quantization_vector(replace(qat, LN, jnp.asarray(bad)), fp)
    bad[3] = np.inf
    with pytest.raises(ValueError, match=f"^{LN}: NaN or Inf in fp_params"):
        q.quantization_vector(qat, replace(fp, LN, jnp.asarray(bad)))
    qv = q.quantization_vector(qat, fp)
    with pytest.raises(ValueError, match=f"^{LN}: NaN or Inf in qv"):
        q.patch(fp, replace(qv, LN, jnp.asarray(bad)))
    with pytest.raises(ValueError, match=f"^{LN}: NaN or Inf in receiver_params"):
        q.patch(replace(fp, LN, jnp.asarray(-bad)), qv)
    # NaN in an excluded leaf (the head) is still refused: it may be the receiver's
    with pytest.raises(ValueError, match="^head/bias: NaN or Inf in qat_params"):
        q.quantization_vector(replace(qat, "head/bias", jnp.full(5, jnp.nan)), fp)


def test_nan_check_is_skipped_under_jit(fp_qat_pair):
    """Documented: traced leaves have no values, so jit skips the NaN/Inf check."""
    fp, qat = fp_qat_pair
    bad = replace(qat, LN, jnp.full(16, jnp.nan))
    qv = jax.jit(q.quantization_vector)(bad, fp)
    assert np.isnan(f32(qv["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"])).all()
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_finite(bad, "x")


def test_qv_path_absent_or_misshaped_in_receiver(fp_qat_pair):
    fp, qat = fp_qat_pair
    qv = q.quantization_vector(qat, fp)
    with pytest.raises(ValueError, match=f"^{LN}: missing in receiver_params$"):
        q.patch(drop(fp, LN), qv)
    with pytest.raises(
        ValueError, match=rf"^{LN}: shape \(8,\) in receiver_params vs \(16,\) in qv"
    ):
        q.patch(replace(fp, LN, jnp.zeros(8)), qv)
    deeper = vit_tree(0, depth=3)
    with pytest.raises(ValueError, match="encoderblock_2"):
        q.quantization_vector(finetune_of(deeper, 1), vit_tree(0))


# --- NNX -------------------------------------------------------------------------------


def nnx_split(seed):
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(8, 16, rngs=rngs)
            self.fc2 = nnx.Linear(16, 8, rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)
            self.count = nnx.Variable(jnp.int32(3))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(rngs), Block(rngs)])
            self.head = nnx.Linear(8, 4, rngs=rngs)

    return nnx.split(Net(nnx.Rngs(seed)))


def test_nnx_state_qv_patch_ptq():
    from flax import nnx

    graphdef, fp = nnx_split(0)
    other = nnx_split(1)[1]
    qat = jax.tree.map(
        lambda a, b: a + 0.01 * b if jnp.issubdtype(a.dtype, jnp.floating) else a, fp, other
    )
    paths = set(q.flatten(fp))
    assert "blocks/0/fc1/kernel" in paths and "blocks/1/count" in paths  # no trailing /value
    qv = q.quantization_vector(qat, fp)
    fqv = q.flatten(qv)
    assert (
        "blocks/0/norm/scale" in fqv and "count" not in str(list(fqv)) and "head/kernel" not in fqv
    )
    patched = q.patch(fp, qv, 1.0)
    assert isinstance(patched, nnx.State)
    assert jax.tree.structure(patched) == jax.tree.structure(fp)
    fpat, fq = q.flatten(patched), q.flatten(qat)
    for p, x in fpat.items():
        if p.startswith("head/") or p.endswith("count"):
            assert np.array_equal(np.asarray(x), np.asarray(q.flatten(fp)[p]))
        else:
            np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(fq[p]), maxulp=1)
    rule = q.Rule({r"^blocks/\d+/fc[12]/kernel$": (1,)})
    assert rule.unmatched(fp) == []
    out = q.ptq(fp, 3, rule=rule)
    assert isinstance(out, nnx.State) and jax.tree.structure(out) == jax.tree.structure(fp)
    fo, ff = q.flatten(out), q.flatten(fp)
    for p, x in ff.items():
        if p in rule.select(fp):
            np.testing.assert_array_equal(np.asarray(fo[p]), np.asarray(q.fake_quant(x, 3)))
        else:
            assert np.array_equal(np.asarray(fo[p]), np.asarray(x))
    model = nnx.merge(graphdef, out)  # the quantized state loads back into the module
    np.testing.assert_array_equal(
        np.asarray(model.blocks[0].fc1.kernel[...]), np.asarray(fo["blocks/0/fc1/kernel"])
    )


# --- sharding (8 forced host devices, in a subprocess) -------------------------------

SHARDING_CODE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import sys; sys.path.insert(0, "tests")
from conftest import vit_tree, finetune_of
import qvec_jax as q

assert jax.device_count() == 8
mesh = jax.make_mesh((4, 2), ("a", "b"))

def spec(x):
    if x.ndim >= 2 and x.shape[-1] % 8 == 0:
        return P(*([None] * (x.ndim - 1)), ("a", "b"))   # output axis split 8 ways
    if x.ndim >= 2 and x.shape[0] % 4 == 0:
        return P("a")                                     # reduction axis split
    return P()

host = vit_tree(0, width=16, heads=2, mlp=32)
flat = {p: jax.device_put(x, NamedSharding(mesh, spec(x))) for p, x in q.flatten(host).items()}
tree = q.unflatten(flat)
split = [p for p, x in flat.items() if len(x.sharding.device_set) == 8 and x.sharding.spec != P()]
assert len(split) > 10, split

def check(name, out):
    fo = q.flatten(out)
    for p, x in flat.items():
        assert fo[p].sharding.is_equivalent_to(x.sharding, x.ndim), (name, p, fo[p].sharding)

out = q.ptq(tree, 3)
check("ptq", out)
ref = q.ptq(host, 3)
for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

qat = q.unflatten({p: jax.device_put(x, flat[p].sharding)
                   for p, x in q.flatten(finetune_of(host, 1)).items()})
qv = q.quantization_vector(qat, tree)
check("patch", q.patch(tree, qv, 0.5))
check("patch(host qv)", q.patch(tree, q.quantization_vector(finetune_of(host, 1), host), 0.5))
check("fake_quant_tree", jax.jit(lambda t: q.fake_quant_tree(t, 3))(tree))
print("OK", len(split))
"""


def test_sharding_kept_through_ptq_and_patch():
    out = run_multidevice(SHARDING_CODE)
    assert out.strip().startswith("OK")
