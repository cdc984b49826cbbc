"""Pretrained import (Google/big_vision .npz, timm/HF safetensors): layouts, head, posemb,
bad files, and ViTs whose dims match no named variant."""

# ruff: noqa: F811  (the fixtures ref and google_npz are imported from vit_layouts)

from __future__ import annotations

import json
import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from vit_layouts import (  # noqa: F401
    assert_trees_equal,
    google_npz,
    images,
    logits,
    random_params,
    ref,
    to_big_vision,
    to_hf,
    to_timm,
)

import qvec_jax as q
from qvec_jax import pretrained as pt
from qvec_jax.models import create_model
from qvec_jax.models.vit import decode_variant, variant_name

# ------------------------------------------------------------------------------ layouts


def test_google_npz_loads_exactly(google_npz, ref):
    model, params = pt.load_pretrained(google_npz, image_size=28)
    assert (model.width, model.depth, model.num_heads, model.patch_size) == (32, 2, 2, 4)
    assert model.num_classes == 5 and model.representation_size == 32
    assert_trees_equal(params, ref[1])
    np.testing.assert_array_equal(logits(model, params, images()), ref[2])


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_npz_gives_the_same_logits(tmp_path, ref, scan):
    path = tmp_path / "bv.npz"
    np.savez(path, **to_big_vision(ref[1], scan=scan))
    model, params = pt.load_pretrained(path, variant="test/4", image_size=28)
    pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert pe.shape == (1, 50, 32) and not np.any(np.asarray(pe[:, 0]))
    np.testing.assert_allclose(logits(model, params, images()), ref[2], rtol=1e-5, atol=1e-5)


def test_timm_and_hf_safetensors_load_exactly(tmp_path):
    model0, params0 = random_params(1, num_classes=7)
    for name, sd in (("timm", to_timm(params0)), ("hf", to_hf(params0))):
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
        model, params = pt.load_pretrained(path, image_size=None)
        assert model.image_size == 28 and model.num_classes == 7, name
        assert_trees_equal(params, params0)


def test_pickle_files_are_refused(tmp_path):
    for name in ("model.pt", "pytorch_model.bin", "weird.weights"):
        p = tmp_path / name
        p.write_bytes(pickle.dumps({"a": 1}))
        with pytest.raises(pt.CheckpointError, match=r"pickle.*safetensors"):
            pt.load_pretrained(p)
    p = tmp_path / "obj.npz"
    np.savez(p, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(pt.CheckpointError, match="pickled objects"):
        pt.load_pretrained(p)


# ------------------------------------------------------------------- head and posemb


def test_new_head_is_fresh_seeded_and_drops_pre_logits(google_npz, ref):
    m3, p3 = pt.load_pretrained(google_npz, num_classes=3, image_size=28, seed=1)
    _, p3b = pt.load_pretrained(google_npz, num_classes=3, image_size=28, seed=1)
    _, p3c = pt.load_pretrained(google_npz, num_classes=3, image_size=28, seed=2)
    assert m3.num_classes == 3 and m3.representation_size is None
    assert "pre_logits" not in p3 and p3["head"]["kernel"].shape == (32, 3)
    assert not np.any(np.asarray(p3["head"]["bias"]))
    assert 0 < float(jnp.std(p3["head"]["kernel"])) < 0.05
    np.testing.assert_array_equal(p3["head"]["kernel"], p3b["head"]["kernel"])
    assert not np.array_equal(p3["head"]["kernel"], p3c["head"]["kernel"])
    backbone = {k: v for k, v in ref[1].items() if k not in ("head", "pre_logits")}
    assert_trees_equal({k: v for k, v in p3.items() if k != "head"}, backbone)
    assert logits(m3, p3, images()).shape == (2, 3)
    m0, p0 = pt.load_pretrained(google_npz, num_classes=0, image_size=28)
    assert m0.num_classes is None and "head" not in p0
    assert logits(m0, p0, images()).shape == (2, 32)


def test_posemb_resampled_for_a_new_image_size(google_npz, ref):
    model, params = pt.load_pretrained(google_npz, num_classes=4, image_size=36)
    pe = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    old = ref[1]["Transformer"]["posembed_input"]["pos_embedding"]
    assert pe.shape == (1, 1 + 9 * 9, 32)
    np.testing.assert_array_equal(pe[:, 0], old[:, 0])  # class token's slot kept
    g_old, g_new = old[0, 1:].reshape(7, 7, 32), pe[0, 1:].reshape(9, 9, 32)
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # bilinear, corners aligned
        np.testing.assert_allclose(g_new[i, j], g_old[i, j], rtol=1e-6, atol=1e-6)
    lo, hi = g_old.min(axis=(0, 1)), g_old.max(axis=(0, 1))
    assert np.all(g_new >= lo - 1e-6) and np.all(g_new <= hi + 1e-6)  # interpolation only
    assert logits(model, params, images(size=36)).shape == (2, 4)


def test_resample_posemb_is_linear_on_a_linear_grid():
    g0, g1 = 4, 7
    yy, xx = np.meshgrid(np.arange(g0), np.arange(g0), indexing="ij")
    grid = np.stack([yy, xx, 2 * yy - xx], -1).reshape(1, g0 * g0, 3).astype(np.float32)
    pe = np.concatenate([np.full((1, 1, 3), 9.0, np.float32), grid], 1)
    out = pt.resample_posemb(pe, 1 + g1 * g1)
    t = np.linspace(0, g0 - 1, g1)
    ny, nx = np.meshgrid(t, t, indexing="ij")
    want = np.stack([ny, nx, 2 * ny - nx], -1).reshape(1, -1, 3)
    np.testing.assert_allclose(out[:, 1:], want, atol=1e-5)
    assert np.all(out[:, 0] == 9.0)
    assert pt.resample_posemb(pe, pe.shape[1]) is pe


# --------------------------------------------------------------------------- bad files


def test_corrupt_and_truncated_files(tmp_path, google_npz):
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(pt.CheckpointError, match="garbage.npz.*corrupt or truncated"):
        pt.load_pretrained(bad)
    data = google_npz.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(pt.CheckpointError, match="cut.npz"):
        pt.load_pretrained(cut)
    st = tmp_path / "cut.safetensors"
    save_file({"a": np.zeros((100, 100), np.float32)}, str(st))
    st.write_bytes(st.read_bytes()[:5000])
    with pytest.raises(pt.CheckpointError, match="cut.safetensors.*corrupt or truncated"):
        pt.load_pretrained(st)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        pt.load_pretrained(tmp_path / "nope.npz")
    other = tmp_path / "other.npz"
    np.savez(other, foo=np.zeros(3))
    with pytest.raises(pt.CheckpointError, match="not a ViT checkpoint.*foo"):
        pt.load_pretrained(other)


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, ref):
    f = dict(q.flatten(ref[1]))
    del f["Transformer/encoderblock_1/LayerNorm_2/scale"]
    f["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3, np.float32)
    f["Transformer/encoder_norm/bias"] = np.zeros(31, np.float32)
    path = tmp_path / "broken.npz"
    np.savez(path, **f)
    with pytest.raises(pt.CheckpointError) as e:
        pt.load_pretrained(path, image_size=28)
    msg = str(e.value)
    assert "broken.npz" in msg
    assert "missing keys (1)" in msg and "encoderblock_1/LayerNorm_2/scale" in msg
    assert "unexpected keys (1)" in msg and "encoderblock_0/extra/kernel" in msg
    assert "wrong shapes (1)" in msg and "encoder_norm/bias: checkpoint (31,) vs model (32,)" in msg


def test_wrong_variant_is_named(google_npz):
    with pytest.raises(pt.CheckpointError, match=r"not a S/16: width 32 \(a S/16 has 384\)"):
        pt.load_pretrained(google_npz, variant="S/16")
    with pytest.raises(pt.CheckpointError, match="looks like a test/4"):
        pt.load_pretrained(google_npz, variant="B/4")


# ------------------------------------------------- dims that match no named variant


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 16),
    head_dim=st.integers(1, 128),
    depth=st.integers(1, 48),
    mlp=st.integers(1, 8192),
    patch=st.integers(1, 32),
)
def test_variant_name_round_trips_through_decode_variant(heads, head_dim, depth, mlp, patch):
    dims = dict(width=heads * head_dim, depth=depth, mlp_dim=mlp, num_heads=heads)
    name = variant_name(**dims, patch_size=patch)
    assert decode_variant(name) == dict(dims, patch_size=patch)
    assert create_model(name, num_classes=3, image_size=2 * patch).variant == name


def test_explicit_variant_names_a_class_when_one_matches_and_refuses_bad_dims():
    assert variant_name(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16) == "B/16"
    with pytest.raises(ValueError, match="multiple of the number of heads 5"):
        decode_variant("w192d3m768h5/16")
    with pytest.raises(ValueError, match=r"unknown ViT variant 'Q/16'.*w192d3m768h3/16"):
        decode_variant("Q/16")


SMALL = "w192d3m384h3/8"  # width 192, depth 3: no named variant


@pytest.fixture(scope="module")
def small():
    model, params = random_params(3, num_classes=4, image_size=32, variant=SMALL)
    return model, params, logits(model, params, images(size=32))


def test_npz_of_unnamed_dims_builds_the_model_from_its_own_dims(tmp_path, small):
    path = tmp_path / "small.npz"
    np.savez(path, **q.flatten(small[1]))
    model, params = pt.load_pretrained(path, image_size=None)
    assert model.variant == SMALL and (model.width, model.depth, model.num_heads) == (192, 3, 3)
    assert_trees_equal(params, small[1])
    np.testing.assert_allclose(logits(model, params, images(size=32)), small[2], atol=1e-5)
    with pytest.raises(pt.CheckpointError, match="has 3 attention heads, not the num_heads=6"):
        pt.load_pretrained(path, num_heads=6)


def test_timm_of_unnamed_dims_takes_heads_from_the_argument_default_width_over_64(tmp_path):
    six = "w192d3m384h6/8"  # 6 heads: not width/64, so timm's file alone cannot tell
    model0, params0 = random_params(4, num_classes=4, image_size=32, variant=six)
    path = tmp_path / "timm.safetensors"
    save_file(to_timm(params0), str(path))
    default, _ = pt.load_pretrained(path, image_size=None)
    assert default.variant == SMALL  # the documented default: width/64 = 3 heads
    model, params = pt.load_pretrained(path, image_size=None, num_heads=6)
    assert model.variant == six
    assert_trees_equal(params, params0)
    want = logits(model0, params0, images(size=32))
    np.testing.assert_allclose(logits(model, params, images(size=32)), want, atol=1e-5)


def test_heads_that_cannot_be_decided_are_asked_for(tmp_path):
    model0, params0 = random_params(5, num_classes=2, image_size=16, variant="w96d2m64h4/4")
    path = tmp_path / "w96.safetensors"
    save_file(to_timm(params0), str(path))
    with pytest.raises(pt.CheckpointError, match=r"w96.safetensors: cannot decide .*num_heads"):
        pt.load_pretrained(path, image_size=None)
    model, params = pt.load_pretrained(path, image_size=None, num_heads=4)
    assert model.variant == "w96d2m64h4/4"
    assert_trees_equal(params, params0)


def test_hf_config_gives_the_heads_of_unnamed_dims(tmp_path):
    model0, params0 = random_params(6, num_classes=3, image_size=16, variant="w96d2m64h4/4")
    d = tmp_path / "hf"
    d.mkdir()
    save_file(to_hf(params0), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    model, params = pt.load_pretrained(d, image_size=None)
    assert model.variant == "w96d2m64h4/4"
    assert model.layer_norm_eps == 1e-12  # HF's default: the config names no other
    want = logits(model0.clone(layer_norm_eps=1e-12), params0, images(size=16))
    np.testing.assert_allclose(logits(model, params, images(size=16)), want, atol=1e-5)


# ------------------------------------------------------------------ architecture fields


def _hf_dir(tmp_path, params, config=None):
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    save_file(to_hf(params), str(d / "model.safetensors"))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def test_hf_epsilon_and_activation_are_read_and_kept_in_the_meta(tmp_path):
    from qvec_jax import checkpoints

    model0, params0 = random_params(2, num_classes=5)
    d = _hf_dir(tmp_path, params0, {"layer_norm_eps": 1e-5, "hidden_act": "gelu_fast"})
    model, params = pt.load_pretrained(d, image_size=None)
    assert (model.layer_norm_eps, model.activation) == (1e-5, "gelu_tanh")
    want = logits(model0.clone(layer_norm_eps=1e-5, activation="gelu_tanh"), params0, images())
    np.testing.assert_allclose(logits(model, params, images()), want, atol=1e-6)
    assert np.abs(logits(model0, params0, images()) - want).max() > 1e-5  # they matter
    meta = checkpoints.model_meta(model)
    assert (meta["layer_norm_eps"], meta["activation"]) == (1e-5, "gelu_tanh")
    rebuilt = checkpoints.model_from_meta(meta)
    assert rebuilt == model
    ck = checkpoints.save_params(tmp_path / "ck", params, meta)
    again, _ = pt.load_pretrained(ck, image_size=None)  # a fine-tune's init.path
    assert again == model
    np.savez(tmp_path / "g.npz", **q.flatten(params0))
    google, _ = pt.load_pretrained(tmp_path / "g.npz", image_size=None)
    assert (google.layer_norm_eps, google.activation) == (1e-6, "gelu")  # Google's


@pytest.mark.parametrize(
    "config, field",
    [
        ({"layer_norm_eps": 0}, "layer_norm_eps=0"),
        ({"layer_norm_eps": "1e-12"}, "layer_norm_eps='1e-12'"),
        ({"hidden_act": "silu"}, "hidden_act='silu'"),
        ({"qkv_bias": False}, "qkv_bias=False"),
        ({"num_channels": 1}, "num_channels=1"),
    ],
)
def test_hf_config_values_the_model_cannot_represent_name_the_field(tmp_path, config, field):
    _, params0 = random_params(2, num_classes=5)
    d = _hf_dir(tmp_path, params0, config)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(pt.CheckpointError, match=f"{d}.*: config {field}: ") as e:
        pt.load_pretrained(d, image_size=None)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_a_meta_with_an_activation_the_model_lacks_is_refused(tmp_path):
    from qvec_jax import checkpoints

    meta = {"variant": "test/4", "num_classes": 5, "image_size": 28, "activation": "relu"}
    with pytest.raises(checkpoints.CheckpointError, match="activation 'relu' is not implemented"):
        checkpoints.model_from_meta(meta)
    _, params0 = random_params(2, num_classes=5)
    ck = checkpoints.save_params(tmp_path / "ck", params0, meta)
    with pytest.raises(pt.CheckpointError, match=f"{ck}: checkpoint meta: activation 'relu'"):
        pt.load_pretrained(ck, image_size=None)


# ------------------------------------------------------------------ leaves of the wrong rank

POS = "Transformer/posembed_input/pos_embedding"
MLP0 = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"


@pytest.mark.parametrize(
    "leaf, form",
    [
        (POS, "[1, tokens, width]"),
        ("embedding/kernel", "[patch, patch, 3, width]"),
        (MLP0, "[width, mlp_dim]"),
        ("head/kernel", "[features, classes]"),
        ("pre_logits/kernel", "[width, representation_size]"),
    ],
)
@pytest.mark.parametrize("layout", ["google", "big_vision"])
def test_a_leaf_of_the_wrong_rank_is_named_with_its_shape(tmp_path, ref, leaf, form, layout):
    f = {k: np.asarray(v) for k, v in q.flatten(ref[1]).items()}
    key = leaf
    if layout == "big_vision":
        f = to_big_vision(ref[1])
        key = {POS: "pos_embedding", MLP0: MLP0.replace("MlpBlock_3", "MlpBlock_0")}.get(leaf, leaf)
    f[key] = f[key].reshape(-1)  # e.g. a 1-D pos_embedding
    path = tmp_path / f"{layout}.npz"
    np.savez(path, **f)
    with pytest.raises(pt.CheckpointError) as e:
        pt.load_pretrained(path)
    msg = str(e.value)
    assert str(path) in msg and leaf in msg and form in msg and f"({f[key].size},)" in msg


@pytest.mark.parametrize(
    "name", ["pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"]
)
def test_timm_leaves_of_the_wrong_shape_are_reported_not_raised(tmp_path, name):
    _, params = random_params(1)
    sd = to_timm(params)
    sd[name] = sd[name].reshape(-1)[:-1].copy()  # wrong rank, and not divisible by 3
    path = tmp_path / "timm.safetensors"
    save_file(sd, str(path))
    with pytest.raises(pt.CheckpointError, match="timm.safetensors"):
        pt.load_pretrained(path, image_size=28)


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(image_size=0), "image_size"),
        (dict(image_size=-28), "image_size"),
        (dict(image_size=28.0), "image_size"),
        (dict(num_classes=-3), "num_classes"),
        (dict(representation_size=-1), "representation_size"),
    ],
)
def test_create_model_refuses_sizes_no_vit_has(kw, word):
    with pytest.raises(ValueError, match=word):
        create_model("test/4", **{"num_classes": 5, "image_size": 28, **kw})
