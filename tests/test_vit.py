"""The Flax ViT: param layout, published shapes, forward pass, quantization rule coverage."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qvec_jax as q
from qvec_jax.models import VARIANTS, create_model, decode_variant
from qvec_jax.models.vit import count_params


def _flat_shapes(model) -> dict[str, tuple[int, ...]]:
    return {p: tuple(x.shape) for p, x in q.flatten(model.abstract_params()).items()}


def test_b16_in21k_schema_matches_published_checkpoint():
    # ViT-B_16.npz (ImageNet-21k): 14x14 patches + cls, 21843 classes, 768-d pre_logits.
    s = _flat_shapes(create_model("B/16", num_classes=21843, representation_size=768))
    assert s["Transformer/posembed_input/pos_embedding"] == (1, 197, 768)
    assert s["embedding/kernel"] == (16, 16, 3, 768)
    assert s["cls"] == (1, 1, 768)
    assert s["pre_logits/kernel"] == (768, 768)
    assert s["head/kernel"] == (768, 21843) and s["head/bias"] == (21843,)
    b = "Transformer/encoderblock_11/"
    assert s[b + "MultiHeadDotProductAttention_1/query/kernel"] == (768, 12, 64)
    assert s[b + "MultiHeadDotProductAttention_1/query/bias"] == (12, 64)
    assert s[b + "MultiHeadDotProductAttention_1/out/kernel"] == (12, 64, 768)
    assert s[b + "MultiHeadDotProductAttention_1/out/bias"] == (768,)
    assert s[b + "MlpBlock_3/Dense_0/kernel"] == (768, 3072)
    assert s[b + "MlpBlock_3/Dense_1/kernel"] == (3072, 768)
    assert s[b + "LayerNorm_0/scale"] == s[b + "LayerNorm_2/bias"] == (768,)
    assert s["Transformer/encoder_norm/scale"] == (768,)
    assert "Transformer/encoderblock_12/LayerNorm_0/scale" not in s
    # 12 blocks x 16 leaves + embedding 2 + cls + posemb + encoder_norm 2 + pre_logits 2 + head 2
    assert len(s) == 12 * 16 + 10


def test_b16_param_count_matches_timm():
    # timm's vit_base_patch16_224 (1000 classes) has 86,567,656 parameters.
    assert count_params(create_model("B/16", num_classes=1000).abstract_params()) == 86_567_656


def test_vit_rule_selects_the_72_block_kernels_of_b16():
    params = create_model("B/16", num_classes=21843, representation_size=768).abstract_params()
    sel = q.VIT_RULE.select(params)
    flat = q.flatten(params)
    assert len(sel) == 72
    assert sum(math.prod(flat[p].shape) for p in sel) == 84_934_656
    rows = 0
    for p, axes in sel.items():
        shape = flat[p].shape
        if p.endswith(("query/kernel", "key/kernel", "value/kernel")):
            assert axes == (1, 2) and shape == (768, 12, 64), p
        elif p.endswith("out/kernel"):
            assert axes == (2,) and shape == (12, 64, 768), p
        else:
            assert "MlpBlock_3/Dense_" in p and axes == (1,), p
        rows += math.prod(shape[a] for a in axes)
    assert rows == 82_944  # output channels, as METHOD.md counts them
    assert not any(k in p for p in sel for k in ("head", "pre_logits", "embedding", "bias"))
    assert q.VIT_RULE.unmatched(params) == []


def test_forward_shapes_and_no_head():
    model = create_model("test/4", num_classes=10, image_size=28)
    params = model.init_params(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 3), minval=-1, maxval=1)
    logits = model.apply({"params": params}, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    feats = create_model("test/4", num_classes=None, image_size=28)
    fparams = {k: v for k, v in params.items() if k != "head"}
    f = feats.apply({"params": fparams}, x)
    assert f.shape == (3, 32)
    np.testing.assert_allclose(
        np.asarray(f @ params["head"]["kernel"] + params["head"]["bias"]),
        np.asarray(logits),
        rtol=1e-5,
        atol=1e-6,
    )


def test_class_token_output_feeds_the_head():
    # Changing one image's patches changes only that image's logits (no cross-batch mixing),
    # and the whole image matters (every patch reaches the class token through attention).
    model = create_model("test/4", num_classes=5, image_size=28)
    params = model.init_params(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(2), (2, 28, 28, 3), minval=-1, maxval=1)
    y = x.at[1, -4:, -4:, :].set(0.9)
    a, b = model.apply({"params": params}, x), model.apply({"params": params}, y)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert float(jnp.abs(a[1] - b[1]).max()) > 1e-6


def test_mlp_uses_exact_erf_gelu():
    # timm's ViT uses nn.GELU() (erf), not the tanh approximation: check against numpy/scipy.
    from scipy.special import erf

    from qvec_jax.models.vit import MlpBlock

    mlp = MlpBlock(mlp_dim=16)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3
    p = mlp.init(jax.random.key(1), x)["params"]
    xn = np.asarray(x, np.float64)
    h = xn @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"])
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    ref = h @ np.asarray(p["Dense_1"]["kernel"]) + np.asarray(p["Dense_1"]["bias"])
    np.testing.assert_allclose(np.asarray(mlp.apply({"params": p}, x)), ref, rtol=1e-5, atol=1e-5)


def test_variants_and_bad_inputs():
    assert decode_variant("B/16") == dict(
        width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16
    )
    assert VARIANTS["test/4"] == dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)
    assert VARIANTS["demo/4"]["width"] == 96 and VARIANTS["H/14"]["depth"] == 32
    assert decode_variant("S/8")["patch_size"] == 8
    with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
        decode_variant("X/16")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        create_model("B/16", num_classes=2, image_size=100)
    model = create_model("test/4", num_classes=2, image_size=28)
    params = model.init_params(jax.random.key(0))
    with pytest.raises(ValueError, match="28x28x3.*shape \\(1, 32, 32, 3\\)"):
        model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))


def test_bf16_compute_keeps_fp32_params():
    model = create_model("test/4", num_classes=4, image_size=28, dtype=jnp.bfloat16)
    params = model.init_params(jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = model.apply({"params": params}, jnp.zeros((2, 28, 28, 3)))
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 4)


def test_init_is_seeded():
    model = create_model("test/4", num_classes=4, image_size=28)
    a, b = model.init_params(jax.random.key(5)), model.init_params(5)
    c = model.init_params(6)
    assert all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.all(u == v)), a, b)))
    assert not bool(jnp.all(a["head"]["kernel"] == c["head"]["kernel"]))


def _softmax_attention(q, k, v):
    """The definition, in float64 numpy: softmax over keys of q.k / sqrt(head_dim), times v."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def test_fused_attention_is_softmax_attention_and_flax_s():
    import flax.linen as nn

    from qvec_jax.models.attention import fused_attention

    rng = np.random.default_rng(0)
    q, k, v = rng.normal(0, 2, (3, 2, 5, 3, 8)).astype(np.float32)
    got = fused_attention(q, k, v)
    assert got.shape == (2, 5, 3, 8) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _softmax_attention(q, k, v), rtol=1e-5, atol=1e-6)
    # inside flax's module: the same params give the same output as flax's own attention
    x = rng.normal(size=(2, 5, 12)).astype(np.float32)
    ours = nn.MultiHeadDotProductAttention(num_heads=3, attention_fn=fused_attention)
    params = jax.jit(ours.init)(jax.random.key(2), x, x)
    want = jax.jit(nn.MultiHeadDotProductAttention(num_heads=3).apply)(params, x, x)
    got = jax.jit(ours.apply)(params, x, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_fused_attention_refuses_what_it_would_drop():
    import flax.linen as nn

    from qvec_jax.models.attention import fused_attention

    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="does not implement mask"):
        fused_attention(q, q, q, mask=jnp.ones((1, 2, 4, 4), bool))
    x = jnp.ones((1, 4, 16))
    mha = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=fused_attention)
    params = mha.init(jax.random.key(0), x, x)
    with pytest.raises(ValueError, match="does not implement sow_weights"):
        mha.apply(params, x, x, sow_weights=True)
    drop = mha.clone(dropout_rate=0.1)
    with pytest.raises(ValueError, match="does not implement dropout"):
        drop.apply(params, x, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert drop.apply(params, x, x, deterministic=True).shape == x.shape  # no dropout: fine


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (jit, custom_jvp...) included."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_bf16_forward_stays_in_bf16(monkeypatch):
    model = create_model("test/4", num_classes=4, image_size=28, dtype=jnp.bfloat16)
    params = model.abstract_params()  # shapes and dtypes are all this test needs
    x = jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32)
    # every module (LayerNorms, attention, MLP, blocks, head) returns bfloat16
    capture = partial(model.apply, capture_intermediates=True)
    _, state = jax.eval_shape(capture, {"params": params}, x)
    outs = q.flatten(state["intermediates"])
    assert len(outs) > 20 and {str(y.dtype) for y in outs.values()} == {"bfloat16"}
    # every matmul and the conv take bfloat16 operands; the only float32 results are XLA
    # attention's scores (q.k accumulated in float32 for the softmax, [b, h, q, 1, k])
    jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, x).jaxpr
    mm = [e for e in _eqns(jaxpr) if e.primitive.name in ("dot_general", "conv_general_dilated")]
    assert len(mm) >= 2 * 6 + 2  # per block q, k, v, out, MLP x2; conv, head (+ attention's)
    assert {str(v.aval.dtype) for e in mm for v in e.invars} == {"bfloat16"}
    f32 = [e.outvars[0].aval for e in mm if e.outvars[0].aval.dtype == jnp.float32]
    assert len(f32) <= model.depth and all(a.shape == (2, 2, 50, 1, 50) for a in f32)
    # and the blocks' attention is jax.nn.dot_product_attention's (it refuses this kernel)
    from qvec_jax.models import attention

    monkeypatch.setattr(attention, "ATTENTION_IMPLEMENTATION", "no-such-kernel")
    with pytest.raises(ValueError, match="Unsupported implementation option: no-such-kernel"):
        jax.eval_shape(model.apply, {"params": params}, x)


def test_attention_kernel_is_cudnn_only_for_half_precision_on_gpu(monkeypatch):
    from qvec_jax.models.attention import attention_kernel

    assert attention_kernel(jnp.float32) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_kernel(jnp.bfloat16) == "cudnn"
    assert attention_kernel(jnp.float16) == "cudnn"
    assert attention_kernel(jnp.float32) == "xla"


def test_padded_cudnn_attention_is_plain_attention(monkeypatch):
    """The cuDNN path pads 13 tokens to 16 and masks the padding by sequence lengths: run
    with XLA's kernel in its place (no GPU here), values and gradients equal plain
    attention's; with a warning, a refused cuDNN falls back to XLA."""
    from qvec_jax.models import attention

    real = jax.nn.dot_product_attention
    xla = lambda *a, implementation=None, **kw: real(*a, implementation="xla", **kw)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 13, 3, 8)), jnp.float32) for _ in range(3))
    plain = lambda q, k, v: jnp.sum(jnp.sin(real(q, k, v, implementation="xla")))
    want, want_g = jax.value_and_grad(plain, argnums=(0, 1, 2))(q, k, v)
    monkeypatch.setattr(jax.nn, "dot_product_attention", xla)
    padded = lambda q, k, v: jnp.sum(jnp.sin(attention._cudnn(q, k, v)))
    got, got_g = jax.value_and_grad(padded, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, atol=1e-6)
    monkeypatch.setattr(jax.nn, "dot_product_attention", real)
    monkeypatch.setattr(attention, "attention_kernel", lambda dtype: "cudnn")
    with pytest.warns(UserWarning, match="cuDNN attention refused"):
        out = attention.fused_attention(q, k, v)
    np.testing.assert_allclose(out, real(q, k, v), atol=1e-6)
