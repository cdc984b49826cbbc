"""QV merges (qvec_jax.merge) against NumPy references of each paper's formula, the
algebra laws, the recipe type, NNX trees and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qvec_jax as q
from qvec_jax import merge as M
from qvec_jax.merge import methods as merge_methods

SHAPES = {
    "enc/block_0/kernel": (4, 6),
    "enc/block_0/bias": (6,),
    "enc/norm/scale": (3, 2, 2),
    "cls": (1, 1, 5),
}  # 47 merged entries; "head/*" and the integer "step" are never merged
D = 47


def qv_tree(seed, dtype=jnp.float32, shapes=SHAPES) -> dict:
    rng = np.random.default_rng(seed)
    flat = {
        p: jnp.asarray(rng.normal(0, 1, s).astype(np.float32), dtype) for p, s in shapes.items()
    }
    flat["head/kernel"] = jnp.asarray(rng.normal(0, 1, (6, 3)), dtype)
    flat["step"] = jnp.int32(seed)
    return q.unflatten(flat)


def qvs_of(k, seed=0, **kw) -> list[dict]:
    return [qv_tree(seed + i, **kw) for i in range(k)]


def vecs(trees, shapes=SHAPES) -> np.ndarray:
    """(k, d) float64: each tree's merged leaves, concatenated in path order."""
    return np.stack(
        [
            np.concatenate([np.ravel(np.asarray(q.flatten(t)[p], np.float64)) for p in shapes])
            for t in trees
        ]
    )


def segments(shapes=SHAPES) -> list[slice]:
    sizes = np.cumsum([0] + [int(np.prod(s)) for s in shapes.values()])
    return [slice(a, b) for a, b in zip(sizes[:-1], sizes[1:])]


def tree_of(v, shapes=SHAPES) -> dict:
    """The inverse of ``vecs`` for one vector."""
    return q.unflatten(
        {
            p: jnp.asarray(v[s].reshape(shp), jnp.float32)
            for (p, shp), s in zip(shapes.items(), segments(shapes))
        }
    )


def merged_vec(out, shapes=SHAPES) -> np.ndarray:
    assert set(q.flatten(out)) == set(shapes)
    for p, x in q.flatten(out).items():
        assert x.shape == shapes[p] and x.dtype == jnp.float32, p
    return vecs([out], shapes)[0]


# --- NumPy references, written from the papers on the concatenated vector -------------


def ref_mean(V, w):
    return w @ V / w.sum()


def ref_trim(v, density):
    m = max(1, round(density * v.size))
    thr = np.sort(np.abs(v))[::-1][m - 1]
    return np.where(np.abs(v) >= thr, v, 0)


def ref_elect_disjoint(T, w):
    g = np.sign(w @ T)
    agree = (np.sign(T) == g) & (T != 0)
    num, den = (w[:, None] * T * agree).sum(0), (w[:, None] * agree).sum(0)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0)


def ref_ties(V, density, w, scope="global", shapes=SHAPES):
    if scope == "global":
        T = np.stack([ref_trim(v, density) for v in V])
    else:
        T = np.concatenate(
            [np.stack([ref_trim(v[s], density) for v in V]) for s in segments(shapes)], axis=1
        )
    return ref_elect_disjoint(T, w)


def ref_stock_t(V):
    k = len(V)
    if k == 1:
        return 1.0
    n = np.linalg.norm(V, axis=1)
    cos = [
        V[i] @ V[j] / (n[i] * n[j]) if n[i] * n[j] > 0 else 0.0
        for i in range(k)
        for j in range(i + 1, k)
    ]
    c = float(np.clip(np.mean(cos), 0, 1))
    return k * c / (1 + (k - 1) * c)


def ref_model_stock(V, w, scope="leaf"):
    if scope == "global":
        return ref_stock_t(V) * ref_mean(V, w)
    return np.concatenate([ref_stock_t(V[:, s]) * ref_mean(V[:, s], w) for s in segments()])


# --- each formula against its reference -----------------------------------------------


W3 = np.array([0.5, 2.0, 1.0])


def test_mean_and_sum_match_numpy():
    qvs = qvs_of(3)
    V = vecs(qvs)
    np.testing.assert_allclose(merged_vec(M.mean_merge(qvs)), V.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged_vec(M.mean_merge(qvs, W3)), ref_mean(V, W3), atol=1e-6)
    np.testing.assert_allclose(merged_vec(M.sum_merge(qvs)), V.sum(0), atol=1e-5)
    signed = [1.0, -1.0, 0.25]  # task arithmetic allows negation
    np.testing.assert_allclose(merged_vec(M.sum_merge(qvs, signed)), signed @ V, atol=1e-5)


@pytest.mark.parametrize("scope", ["global", "leaf"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_ties_matches_numpy(scope, density):
    qvs = qvs_of(3, seed=10)
    out = merged_vec(M.ties_merge(qvs, density, W3, scope=scope))
    np.testing.assert_allclose(out, ref_ties(vecs(qvs), density, W3, scope), atol=1e-6)


def test_ties_global_and_leaf_trims_differ_and_keep_m_entries():
    (qv,) = qvs_of(1, seed=3)
    qvs = [replace(qv, "enc/block_0/kernel", 10 * qv["enc"]["block_0"]["kernel"])]
    a = merged_vec(M.ties_merge(qvs, 0.2))
    assert np.count_nonzero(a) == round(0.2 * D)  # exact global threshold, no ties
    b = merged_vec(M.ties_merge(qvs, 0.2, scope="leaf"))
    assert np.count_nonzero(b) == sum(max(1, round(0.2 * (s.stop - s.start))) for s in segments())
    assert np.count_nonzero(a[segments()[0]]) == 9 > np.count_nonzero(b[segments()[0]])


def test_dare_rows_drop_and_rescale_and_combine():
    qvs = qvs_of(2, seed=5)
    V, p = vecs(qvs), 0.4
    # with weights (1, 0) / (0, 1) the sum shows each sparsified vector D_i(v_i)
    Ds = np.stack([merged_vec(M.dare_merge(qvs, p, 7, w, combine="sum")) for w in ([1, 0], [0, 1])])
    for d, v in zip(Ds, V):
        kept = d != 0
        np.testing.assert_allclose(d[kept], v[kept] / (1 - p), rtol=1e-6)
        assert 0 < kept.sum() < v.size
    np.testing.assert_allclose(merged_vec(M.dare_merge(qvs, p, 7)), Ds.mean(0), atol=1e-6)
    ties = merged_vec(M.dare_merge(qvs, p, 7, [1.0, 3.0], combine="ties"))
    np.testing.assert_allclose(ties, ref_elect_disjoint(Ds, np.array([1.0, 3.0])), atol=1e-6)


def test_dare_keeps_a_fraction_1_minus_p():
    shapes = {"w": (200, 100)}
    qvs = [qv_tree(0, shapes=shapes)]
    for p in (0.1, 0.5, 0.9):
        kept = np.count_nonzero(merged_vec(M.dare_merge(qvs, p, 1), shapes))
        sigma = np.sqrt(20000 * p * (1 - p))
        assert abs(kept - 20000 * (1 - p)) < 5 * sigma, (p, kept)


def test_dare_mask_depends_only_on_seed_leaf_and_position():
    qvs = qvs_of(2, seed=1)
    one = M.dare_merge(qvs, 0.5, 3)
    again = M.dare_merge(qvs, 0.5, 3)
    for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    other = merged_vec(M.dare_merge(qvs, 0.5, 4))
    assert not np.array_equal(merged_vec(one), other)
    # the same mask on other values, and with another leaf excluded
    mask = merged_vec(M.dare_merge(qvs[:1], 0.5, 3)) != 0
    mask2 = merged_vec(M.dare_merge(qvs_of(1, seed=9), 0.5, 3)) != 0
    np.testing.assert_array_equal(mask, mask2)
    fewer = M.dare_merge(qvs[:1], 0.5, 3, exclude=q.Rule([r"^head/", r"^cls$"]))
    np.testing.assert_array_equal(
        np.asarray(fewer["enc"]["norm"]["scale"]) != 0, mask[segments()[2]].reshape(3, 2, 2)
    )


@pytest.mark.parametrize("scope", ["leaf", "global"])
def test_model_stock_matches_numpy(scope):
    base = vecs(qvs_of(1, seed=2))[0]
    rng = np.random.default_rng(0)  # correlated vectors, so that t is not clipped
    V = np.stack([base + 0.7 * rng.normal(size=base.size) for _ in range(3)])
    qvs = [tree_of(v) for v in V]
    out = merged_vec(M.model_stock_merge(qvs, W3, scope=scope))
    np.testing.assert_allclose(out, ref_model_stock(V, W3, scope), rtol=1e-5, atol=1e-6)
    assert 0 < ref_stock_t(V) < 1


SPECS = [
    M.MergeSpec("mean", W3),
    M.MergeSpec("sum", W3),
    M.MergeSpec("ties", W3, density=0.3),
    M.MergeSpec("ties", W3, density=0.3, scope="leaf"),
    M.MergeSpec("dare", W3, p=0.3, seed=2),
    M.MergeSpec("dare", W3, p=0.3, combine="ties"),
    M.MergeSpec("model_stock", W3),
    M.MergeSpec("model_stock", W3, scope="global"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.to_dict().values())))
def test_blocks_do_not_change_the_result(spec, monkeypatch):
    """Large leaves are merged in column blocks; the block size is invisible (DARE too)."""
    qvs = qvs_of(3, seed=6)
    whole = merged_vec(q.merge_qvs(qvs, spec))
    monkeypatch.setattr(merge_methods, "_BLOCK", 6)  # leaves of 24 and 12 entries: many blocks
    np.testing.assert_allclose(merged_vec(q.merge_qvs(qvs, spec)), whole, rtol=1e-6, atol=0)


def test_empty_leaf_merges_to_an_empty_leaf():
    qvs = [{**t, "empty": jnp.zeros((0, 3))} for t in qvs_of(3)]
    for spec in SPECS:
        out = q.merge_qvs(qvs, spec)
        assert out["empty"].shape == (0, 3) and out["empty"].dtype == jnp.float32


# --- the algebra laws ------------------------------------------------------------------


def test_merge_of_one_vector_is_that_vector():
    (qv,) = qvs_of(1)
    v = vecs([qv])[0]
    for spec in (
        "mean",
        "sum",
        M.MergeSpec("ties", density=1.0),
        "model_stock",
        M.MergeSpec("dare", p=0.0),
        M.MergeSpec("model_stock", scope="global"),
    ):
        np.testing.assert_array_equal(merged_vec(q.merge_qvs([qv], spec)), v.astype(np.float32))


def test_ties_density_one_with_agreeing_signs_is_the_mean():
    rng = np.random.default_rng(4)
    sign = np.where(rng.random(D) < 0.5, -1.0, 1.0)
    V = np.stack([sign * (0.1 + rng.random(D)) for _ in range(4)])  # no zero, same signs
    qvs = [tree_of(v) for v in V]
    mean = merged_vec(M.mean_merge(qvs))
    for scope in ("global", "leaf"):
        np.testing.assert_allclose(merged_vec(M.ties_merge(qvs, 1.0, scope=scope)), mean, rtol=1e-6)


def test_dare_p0_is_the_identity_then_the_combine():
    qvs = qvs_of(3)
    np.testing.assert_array_equal(
        merged_vec(M.dare_merge(qvs, 0.0, 11)), merged_vec(M.mean_merge(qvs))
    )
    np.testing.assert_array_equal(
        merged_vec(M.dare_merge(qvs, 0.0, 11, combine="ties")), merged_vec(M.ties_merge(qvs, 1.0))
    )


def test_weights_are_normalized_except_for_sum():
    qvs = qvs_of(3)
    for f in (M.mean_merge, M.ties_merge, M.model_stock_merge):
        np.testing.assert_allclose(
            merged_vec(f(qvs, weights=W3)), merged_vec(f(qvs, weights=7 * W3)), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(
        merged_vec(M.sum_merge(qvs, 3 * W3)), 3 * merged_vec(M.sum_merge(qvs, W3)), rtol=1e-5
    )
    # a zero weight removes a QV
    np.testing.assert_allclose(
        merged_vec(M.mean_merge(qvs, [1, 0, 1])), merged_vec(M.mean_merge(qvs[::2])), atol=1e-6
    )


def test_model_stock_laws():
    (qv,) = qvs_of(1)
    v = vecs([qv])[0]
    same = merged_vec(M.model_stock_merge([qv, qv, qv]))  # c = 1: t = 3 / (1 + 2) = 1
    np.testing.assert_allclose(same, v, rtol=1e-6)
    # pairwise orthogonal (disjoint supports in every leaf): c = 0, t = 0: the origin (FP)
    half = {p: np.arange(np.prod(s)).reshape(s) % 2 == 0 for p, s in SHAPES.items()}
    a = q.unflatten({p: jnp.where(half[p], x, 0) for p, x in q.flatten(qv).items() if p in SHAPES})
    b = q.unflatten({p: jnp.where(half[p], 0, x) for p, x in q.flatten(qv).items() if p in SHAPES})
    for scope in ("leaf", "global"):
        assert not merged_vec(M.model_stock_merge([a, b], scope=scope)).any()
    # opposite vectors: c = -1 is clipped to 0, so t = 0 (not a division by zero)
    neg = jax.tree.map(lambda x: -x, qv)
    assert not merged_vec(M.model_stock_merge([qv, neg])).any()
    # k = 2, equal norms at angle theta: t = 2 cos / (1 + cos)
    c = 0.6
    u = jnp.asarray([1.0, 0.0])
    w = jnp.asarray([c, np.sqrt(1 - c * c)], jnp.float32)
    out = M.model_stock_merge([{"x": u}, {"x": w}])["x"]
    np.testing.assert_allclose(np.asarray(out), 2 * c / (1 + c) * (u + w) / 2, rtol=1e-6)


# --- hypothesis: the exact threshold and TIES on arbitrary trees ------------------------

finite = st.floats(-1e3, 1e3, width=32)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        hnp.arrays(
            st.sampled_from([np.float32, np.float64]),
            hnp.array_shapes(max_dims=2, max_side=6),
            elements=st.floats(-1e3, 1e3, width=32),
        ),
        min_size=1,
        max_size=4,
    ),
    st.floats(0, 1),
)
def test_radix_select_is_the_exact_kth_largest(arrays, frac):
    allv = np.sort(np.abs(np.concatenate([a.ravel() for a in arrays]).astype(np.float64)))[::-1]
    m = 1 + int(frac * (allv.size - 1))
    assert float(merge_methods._kth_largest_abs(arrays, m)) == allv[m - 1]  # small: np.partition
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(merge_methods, "_SMALL", 0)  # the leaf-streamed radix select of large trees
        assert float(merge_methods._kth_largest_abs(arrays, m)) == allv[m - 1]


def test_global_ties_through_the_radix_path(monkeypatch):
    qvs = qvs_of(3, seed=8)
    monkeypatch.setattr(merge_methods, "_SMALL", 0)
    for density in (0.1, 0.5):
        out = merged_vec(M.ties_merge(qvs, density, W3))
        np.testing.assert_allclose(out, ref_ties(vecs(qvs), density, W3), atol=1e-6)


@st.composite
def qv_lists(draw):
    shapes = draw(st.lists(hnp.array_shapes(max_dims=3, max_side=4), min_size=1, max_size=3))
    k = draw(st.integers(1, 4))
    elems = st.one_of(st.just(0.0), finite)  # zeros and repeated values: ties and empty A
    return shapes, [
        {
            f"l{i}": {"w": draw(hnp.arrays(np.float32, s, elements=elems))}
            for i, s in enumerate(shapes)
        }
        for _ in range(k)
    ]


@settings(max_examples=40, deadline=None)
@given(qv_lists(), st.floats(0.01, 1.0), st.sampled_from(["global", "leaf"]))
def test_ties_property_against_numpy(data, density, scope):
    shapes, qvs = data
    sh = {f"l{i}/w": tuple(s) for i, s in enumerate(shapes)}
    V = vecs(qvs, sh)
    w = np.arange(1.0, len(qvs) + 1)
    out = merged_vec(M.ties_merge(qvs, density, w, scope=scope), sh)
    np.testing.assert_allclose(out, ref_ties(V, density, w, scope, sh), rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(qv_lists(), st.sampled_from(["leaf", "global"]))
def test_mean_sum_model_stock_properties(data, scope):
    shapes, qvs = data
    sh = {f"l{i}/w": tuple(s) for i, s in enumerate(shapes)}
    V, w = vecs(qvs, sh), np.arange(1.0, len(qvs) + 1)
    mean = merged_vec(M.mean_merge(qvs, w), sh)
    np.testing.assert_allclose(mean, ref_mean(V, w), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(merged_vec(M.sum_merge(qvs, w), sh), w @ V, rtol=1e-5, atol=1e-2)
    stock = merged_vec(M.model_stock_merge(qvs, w, scope=scope), sh)
    if scope == "global":  # the result is t * mean with t in [0, 1]
        t = ref_stock_t(V)
        assert 0 <= t <= 1
        np.testing.assert_allclose(stock, t * mean, rtol=1e-4, atol=1e-3)
    assert np.linalg.norm(stock) <= np.linalg.norm(mean) * (1 + 1e-5) + 1e-6
    # order does not matter (weights permuted alike); DARE's masks do depend on the order
    perm = np.random.default_rng(len(qvs)).permutation(len(qvs))
    for f in (
        M.mean_merge,
        M.ties_merge,
        lambda v, weights: M.model_stock_merge(v, weights, scope=scope),
    ):
        a = merged_vec(f(qvs, weights=w), sh)
        b = merged_vec(f([qvs[i] for i in perm], weights=w[perm]), sh)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


# --- dtypes, integer leaves, rules, NNX --------------------------------------------------


def test_bf16_inputs_give_float32_and_integer_and_head_leaves_are_never_merged():
    qvs = qvs_of(2, dtype=jnp.bfloat16)
    for spec in ("mean", "ties", "dare", "model_stock"):
        out = q.merge_qvs(qvs, spec)
        assert "step" not in out and "head" not in out
    np.testing.assert_array_equal(
        merged_vec(M.mean_merge(qvs)), vecs(qvs).mean(0).astype(np.float32)
    )
    # integer leaves may differ between the QVs; they are not read
    assert qvs[0]["step"] != qvs[1]["step"]
    assert set(q.flatten(M.mean_merge(qvs, exclude=q.Rule([])))) == set(SHAPES) | {"head/kernel"}
    only = M.mean_merge(qvs, exclude=q.Rule([r"^head/", r"^enc/"]))
    assert set(q.flatten(only)) == {"cls"}


def test_nnx_state_qvs_merge_and_patch():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 8, rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)
            self.count = nnx.Variable(jnp.int32(3))
            self.head = nnx.Linear(8, 2, rngs=rngs)

    states = [nnx.split(Net(nnx.Rngs(s)))[1] for s in range(4)]
    fp = states[0]
    tvs = [
        jax.tree.map(lambda a, b: b - a if a.dtype != jnp.int32 else b, fp, s) for s in states[1:]
    ]
    for spec in ("mean", "ties", "dare", "model_stock"):
        merged = q.merge_qvs(tvs, spec)
        assert set(q.flatten(merged)) == {"fc/kernel", "fc/bias", "norm/scale", "norm/bias"}
        patched = q.patch(fp, merged, 1.0)
        assert isinstance(patched, nnx.State)
    ref = np.mean([np.asarray(t["fc"]["kernel"][...]) for t in tvs], axis=0)
    np.testing.assert_allclose(
        np.asarray(q.merge_qvs(tvs)["fc"]["kernel"]), ref, rtol=1e-6, atol=1e-7
    )


# --- the recipe ------------------------------------------------------------------------


def test_merge_spec_defaults_json_roundtrip_and_entry_point():
    assert M.MergeSpec("ties").to_dict() == {
        "method": "ties",
        "weights": None,
        "density": 0.2,
        "scope": "global",
    }
    assert M.MergeSpec("model_stock").scope == "leaf"
    for spec in (M.MergeSpec("dare", [1, 2], p=0.3, seed=5, combine="ties"), M.MergeSpec("sum")):
        back = M.MergeSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert back == spec and hash(back) == hash(spec)
    qvs = qvs_of(2)
    a = q.merge_qvs(qvs, "ties", density=0.3, scope="leaf")
    b = q.merge_qvs(qvs, M.MergeSpec("ties", density=0.3, scope="leaf"))
    np.testing.assert_array_equal(merged_vec(a), merged_vec(b))


# --- bad input -------------------------------------------------------------------------

LEAF = "enc/norm/scale"


def replace(tree, path, value):
    return q.unflatten({**q.flatten(tree), path: value})


def drop(tree, path):
    return q.unflatten({p: x for p, x in q.flatten(tree).items() if p != path})


def test_mismatched_trees_name_the_leaf():
    a, b = qvs_of(2)
    for method in M.METHODS:
        with pytest.raises(ValueError, match=f"^{LEAF}: missing in qvs\\[1\\]$"):
            q.merge_qvs([a, drop(b, LEAF)], method)
    with pytest.raises(ValueError, match=f"^{LEAF}: missing in qvs\\[0\\]$"):
        q.merge_qvs([drop(a, LEAF), b])
    with pytest.raises(
        ValueError, match=rf"^{LEAF}: shape \(3, 2, 2\) in qvs\[0\] vs \(12,\) in qvs\[2\]"
    ):
        q.merge_qvs([a, b, replace(b, LEAF, jnp.zeros(12))])
    with pytest.raises(
        ValueError, match=f"^{LEAF}: dtype float32 in qvs\\[0\\] vs int32 in qvs\\[1\\]"
    ):
        q.merge_qvs([a, replace(b, LEAF, jnp.zeros((3, 2, 2), jnp.int32))])
    # an excluded leaf may differ (heads of different tasks)
    q.merge_qvs([a, replace(b, "head/kernel", jnp.zeros((6, 9)))])


def test_bad_values_and_options_are_named():
    a, b = qvs_of(2)
    bad = np.asarray(q.flatten(b)[LEAF]).copy()
    bad[1, 0, 1] = np.inf
    with pytest.raises(ValueError, match=f"^{LEAF}: NaN or Inf in qvs\\[1\\]$"):
        q.merge_qvs([a, replace(b, LEAF, jnp.asarray(bad))], "ties")
    cases = [
        (dict(qvs=[]), "^qvs: empty"),
        (dict(qvs=a), "^qvs: expected a list"),
        (dict(method="average"), "^method: 'average' is not one of mean, sum, ties"),
        (dict(method="ties", density=0.0), r"^density: must be in \(0, 1\], got 0.0"),
        (dict(method="ties", density=1.5), r"^density: must be in \(0, 1\]"),
        (dict(method="dare", p=1.0), r"^p: the drop rate must be in \[0, 1\), got 1.0"),
        (dict(method="dare", p=-0.1), r"^p: the drop rate"),
        (dict(method="dare", seed=1.5), "^seed: must be an int >= 0, got 1.5"),
        (dict(method="dare", seed=-1), "^seed: must be an int >= 0"),
        (dict(method="dare", combine="max"), "^combine: 'max' is not one of mean, sum, ties"),
        (dict(method="ties", scope="layer"), "^scope: 'layer' is not one of global, leaf"),
        (dict(method="mean", density=0.5), "^density: not a parameter of method 'mean'"),
        (dict(weights=[1.0, np.nan]), r"^weights\[1\]: nan is not finite"),
        (dict(weights=[1.0]), "^weights: 2 QVs but 1 weights"),
        (dict(weights=[1.0, -1.0]), "^weights: method 'mean' needs weights >= 0"),
        (dict(method="ties", weights=[0, 0]), "^weights: method 'ties' needs weights >= 0"),
        (dict(method=M.MergeSpec("ties"), density=0.1), "^density: give it in the MergeSpec"),
    ]
    for kw, msg in cases:
        qvs = kw.pop("qvs", [a, b])
        with pytest.raises(ValueError, match=msg):
            q.merge_qvs(qvs, **kw)
    with pytest.raises(ValueError, match="^qvs: no float leaf to merge"):
        q.merge_qvs([a, b], exclude=q.Rule(["."]))
    with pytest.raises(ValueError, match="^densty: not a MergeSpec field"):
        M.MergeSpec.from_dict({"method": "ties", "densty": 0.2})
