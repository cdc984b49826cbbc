"""GPTQ against the paper's algorithm (plain NumPy), against RTN, and on a tiny ViT."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qvec_jax as q
from qvec_jax import gptq as G
from qvec_jax.models import create_model
from qvec_jax.packing import unpack
from qvec_jax.paths import flatten


def np_gptq(w_in_out, H, bits, damp=0.01):
    """Algorithm 1 of Frantar et al. (2022) in float64, one column at a time (no lazy
    batches), on ``W = w^T [out, in]``; scale fixed per row from the original W."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    W = np.array(w_in_out, np.float64).T.copy()
    s = np.maximum(np.abs(W).max(axis=1), 1e-8) / qmax
    H = np.array(H, np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * np.mean(np.diag(H)) * np.eye(len(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1
    Q = np.zeros_like(W)
    for i in range(W.shape[1]):
        Q[:, i] = np.clip(np.round(W[:, i] / s), qmin, qmax)
        err = (W[:, i] - Q[:, i] * s) / U[i, i]
        W[:, i:] -= np.outer(err, U[i, i:])
    return Q.T, s


def layer(seed, n_in=70, n_out=24, n=300, dead=()):
    """Correlated calibration inputs X [n, in], a kernel w [in, out], H = 2 X^T X / n."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in)) @ rng.standard_normal((n_in, n_in)) * 0.3
    X[:, list(dead)] = 0
    X = X.astype(np.float32)
    w = (rng.standard_normal((n_in, n_out)) * 0.1).astype(np.float32)
    return X, w, (2 * X.T.astype(np.float64) @ X / n).astype(np.float32)


def out_err(X, w, wq):
    X = X.astype(np.float64)
    return float(np.sum((X @ np.asarray(w, np.float64) - X @ np.asarray(wq, np.float64)) ** 2))


@pytest.mark.parametrize("bits,seed,dead", [(2, 0, ()), (3, 1, (5, 40)), (4, 2, ())])
def test_matches_numpy_reference(bits, seed, dead):
    X, w, H = layer(seed, dead=dead)
    codes, s = G.gptq_layer(w, H, bits, block_size=32)  # 70 rows: 3 lazy batches, padded
    ref_codes, ref_s = np_gptq(w, H, bits)
    _, rtn_s = q.codes_and_scale(w, bits)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rtn_s))
    np.testing.assert_allclose(np.asarray(s)[0], ref_s, rtol=1e-6)
    # float32 lazy batches vs float64 column by column: a near-tie may round differently
    assert np.mean(np.asarray(codes) == ref_codes) >= 0.99
    assert np.all(np.asarray(codes)[list(dead)] == 0)
    e, e_ref = out_err(X, w, codes * s), out_err(X, w, ref_codes * ref_s)
    assert abs(e - e_ref) <= 1e-3 * e_ref


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_identity_hessian_is_rtn(bits, granularity):
    """No coupling between inputs (identity, or any positive diagonal H): no error
    feedback, so GPTQ is round-to-nearest, bit for bit."""
    w = jax.random.normal(jax.random.key(bits), (200, 40))
    H = jnp.eye(200) if bits % 2 else jnp.diag(jax.random.uniform(jax.random.key(9), (200,)) + 0.1)
    codes, s = G.gptq_layer(w, H, bits, granularity=granularity, block_size=64)
    rtn = q.fake_quant(w, bits, granularity=granularity)
    np.testing.assert_array_equal(np.asarray(codes.astype(jnp.float32) * s), np.asarray(rtn))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_output_error_not_above_rtn(seed, bits):
    X, w, H = layer(seed + 10, n_in=96, n_out=32, dead=(7,) if seed == 3 else ())
    codes, s = G.gptq_layer(w, H, bits)
    assert out_err(X, w, codes * s) <= out_err(X, w, q.fake_quant(w, bits))


def test_kernel_layouts_pack_and_unpack():
    """q/k/v [embed, heads, hd] and out [heads, hd, embed]: codes on the RTN scale,
    packed codes unpack to the same integers, dequantize = codes * scale."""
    rng = np.random.default_rng(0)
    for shape, axes in (((24, 4, 6), (1, 2)), ((4, 6, 24), (2,))):
        w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        H = np.cov(rng.standard_normal((24, 200))).astype(np.float32)
        qt = G.quantize_kernel(w, H, 3, axes)
        codes = unpack(qt.packed, 3, w.size).reshape(shape)
        _, rtn_s = q.codes_and_scale(w, 3, "channel", axes)
        np.testing.assert_array_equal(np.asarray(qt.scale), np.asarray(rtn_s))
        fq = q.dequantize({"k": qt})["k"]
        np.testing.assert_array_equal(np.asarray(fq), np.asarray(codes * rtn_s))
        assert fq.shape == shape and int(jnp.abs(codes).max()) <= 3


@pytest.fixture(scope="module")
def demo():
    model = create_model("demo/4", num_classes=10, image_size=16)
    params = model.init_params(0)
    images = jax.random.uniform(jax.random.key(1), (24, 16, 16, 3), minval=-1, maxval=1)
    return model, params, images


def test_hessians_are_the_layer_inputs(demo):
    """H of query = LN0 output; of Dense_1 = GELU(Dense_0 output); of out = attention output."""
    model, params, images = demo
    b = "Transformer/encoderblock_1/"
    att, mlp = b + "MultiHeadDotProductAttention_1/", b + "MlpBlock_3/"
    wanted = {att + "query": 96, att + "out": 96, mlp + "Dense_1": 192}
    hs = G._hessians(model, params, images, wanted, batch_size=10)
    _, st = model.apply(
        {"params": params},
        images,
        capture_intermediates=lambda m, name: name == "__call__",
        mutable=["intermediates"],
    )
    inter = flatten(st["intermediates"])
    ln0 = inter[b + "LayerNorm_0/__call__/0"].reshape(-1, 96)
    d0 = nn.gelu(inter[mlp + "Dense_0/__call__/0"], approximate=False).reshape(-1, 192)
    for rel, x in ((att + "query", ln0), (mlp + "Dense_1", d0)):
        ref = 2 * np.asarray(x, np.float64).T @ np.asarray(x, np.float64) / len(x)
        np.testing.assert_allclose(np.asarray(hs[rel]), ref, rtol=2e-4, atol=1e-5)
    assert hs[att + "out"].shape == (96, 96)


@pytest.mark.parametrize("sequential", [True, False])
def test_vit_gptq_on_the_grid(demo, sequential):
    model, params, images = demo
    timings = {}
    qt = G.gptq_quantize(
        params, model, images, 2, batch_size=10, sequential=sequential, timings=timings
    )
    assert set(timings) == {"hessians", "quantize"} and min(timings.values()) > 0
    out = q.dequantize(qt)
    sel, flat_p, flat_o = q.VIT_RULE.select(params), flatten(params), flatten(out)
    assert len(sel) == 4 * 6 and jax.tree.structure(out) == jax.tree.structure(params)
    changed = 0
    for p, x in flat_p.items():
        if p not in sel:
            assert flat_o[p] is x or np.array_equal(flat_o[p], x), p
            continue
        _, s = q.codes_and_scale(x, 2, "channel", sel[p])
        codes = np.asarray(flat_o[p]) / np.asarray(s)
        np.testing.assert_array_equal(codes, np.round(codes), err_msg=p)
        assert codes.min() >= -2 and codes.max() <= 1, p
        np.testing.assert_array_equal(np.asarray(flat_o[p]), np.round(codes) * np.asarray(s))
        changed += not np.array_equal(flat_o[p], q.fake_quant(x, 2, channel_axes=sel[p]))
    assert changed == len(sel)  # GPTQ moved codes away from RTN in every kernel


def test_tensor_granularity_and_bad_input(demo):
    model, params, images = demo
    out = G.gptq(params, model, images[:8], 3, granularity="tensor", sequential=False)
    k = out["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
    w = params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
    codes = np.asarray(k) / np.asarray(q.codes_and_scale(w, 3, "tensor")[1])
    np.testing.assert_array_equal(codes, np.round(codes))
    with pytest.raises(G.GPTQError, match="calib_images"):
        G.gptq(params, model, images[0], 3)
    with pytest.raises(G.GPTQError, match="w \\[in, out\\]"):
        G.gptq_layer(np.ones((4, 3)), np.eye(3), 3)
    rank1 = np.outer(np.arange(1.0, 7.0), np.arange(1.0, 7.0))
    with pytest.raises(G.GPTQError, match="not positive definite"):
        G.gptq_layer(np.ones((6, 2)), rank1, 3, damp=0.0)
