"""Shared by the checkpoint tests: a random test/4 ViT and its tree in each foreign layout.

The layouts are written here by hand, with the exact key names of each source, from one
random tree in our (original Google) layout; ``test_torch_ref.py`` checks the timm/HF key
mapping against the real libraries.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import qvec_jax as q
from qvec_jax.models import create_model

ATT = "MultiHeadDotProductAttention_1"


def random_params(seed=0, num_classes=5, rep=None, image_size=28, variant="test/4"):
    """``variant`` params with every leaf random (so a mis-mapped leaf cannot hide)."""
    model = create_model(variant, num_classes=num_classes, image_size=image_size,
                         representation_size=rep)  # fmt: skip
    rng = np.random.default_rng(seed)
    return model, jax.tree.map(
        lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), model.abstract_params()
    )


def images(n=2, size=28, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def logits(model, params, x):
    return np.asarray(model.apply({"params": params}, x))


def to_big_vision(params, scan=False) -> dict[str, np.ndarray]:
    f = dict(q.flatten(params))
    pe = f.pop("Transformer/posembed_input/pos_embedding")
    out = {"pos_embedding": pe[:, 1:], "cls": f.pop("cls") + pe[:, :1]}
    ren = {ATT: "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1"}
    ren["MlpBlock_3"] = "MlpBlock_0"
    for k, v in f.items():
        out["/".join(ren.get(p, p) for p in k.split("/"))] = v
    if scan:
        blocks = sorted(k for k in out if k.startswith("Transformer/encoderblock_0/"))
        for k in blocks:
            sub = k.split("/", 2)[2]
            out["Transformer/encoderblock/" + sub] = np.stack(
                [out.pop(f"Transformer/encoderblock_{i}/{sub}") for i in range(2)]
            )
    return out


def _width_depth(f) -> tuple[int, int]:
    depth = len({k.split("/")[1] for k in f if k.startswith("Transformer/encoderblock_")})
    return f["cls"].shape[-1], depth


def to_timm(params) -> dict[str, np.ndarray]:
    f = q.flatten(params)
    w, depth = _width_depth(f)
    sd = {
        "cls_token": f["cls"],
        "pos_embed": f["Transformer/posembed_input/pos_embedding"],
        "patch_embed.proj.weight": f["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": f["embedding/bias"],
        "norm.weight": f["Transformer/encoder_norm/scale"],
        "norm.bias": f["Transformer/encoder_norm/bias"],
        "head.weight": f["head/kernel"].T,
        "head.bias": f["head/bias"],
    }
    for i in range(depth):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        qkv = [f[b + f"{ATT}/{n}/kernel"].reshape(w, w).T for n in ("query", "key", "value")]
        sd[t + "attn.qkv.weight"] = np.concatenate(qkv, 0)
        sd[t + "attn.qkv.bias"] = np.concatenate(
            [f[b + f"{ATT}/{n}/bias"].reshape(-1) for n in ("query", "key", "value")]
        )
        sd[t + "attn.proj.weight"] = f[b + f"{ATT}/out/kernel"].reshape(w, w).T
        sd[t + "attn.proj.bias"] = f[b + f"{ATT}/out/bias"]
        for ln, tn in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            sd[t + tn + ".weight"] = f[b + ln + "/scale"]
            sd[t + tn + ".bias"] = f[b + ln + "/bias"]
        for d, tn in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            sd[t + f"mlp.{tn}.weight"] = f[b + f"MlpBlock_3/{d}/kernel"].T
            sd[t + f"mlp.{tn}.bias"] = f[b + f"MlpBlock_3/{d}/bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def to_hf(params) -> dict[str, np.ndarray]:
    """ViTForImageClassification.save_pretrained key names."""
    f = q.flatten(params)
    w, depth = _width_depth(f)
    e = "vit.embeddings."
    sd = {
        e + "cls_token": f["cls"],
        e + "position_embeddings": f["Transformer/posembed_input/pos_embedding"],
        e + "patch_embeddings.projection.weight": f["embedding/kernel"].transpose(3, 2, 0, 1),
        e + "patch_embeddings.projection.bias": f["embedding/bias"],
        "vit.layernorm.weight": f["Transformer/encoder_norm/scale"],
        "vit.layernorm.bias": f["Transformer/encoder_norm/bias"],
        "classifier.weight": f["head/kernel"].T,
        "classifier.bias": f["head/bias"],
    }
    for i in range(depth):
        b, t = f"Transformer/encoderblock_{i}/", f"vit.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            sd[t + f"attention.attention.{n}.weight"] = f[b + f"{ATT}/{n}/kernel"].reshape(w, w).T
            sd[t + f"attention.attention.{n}.bias"] = f[b + f"{ATT}/{n}/bias"].reshape(-1)
        sd[t + "attention.output.dense.weight"] = f[b + f"{ATT}/out/kernel"].reshape(w, w).T
        sd[t + "attention.output.dense.bias"] = f[b + f"{ATT}/out/bias"]
        sd[t + "intermediate.dense.weight"] = f[b + "MlpBlock_3/Dense_0/kernel"].T
        sd[t + "intermediate.dense.bias"] = f[b + "MlpBlock_3/Dense_0/bias"]
        sd[t + "output.dense.weight"] = f[b + "MlpBlock_3/Dense_1/kernel"].T
        sd[t + "output.dense.bias"] = f[b + "MlpBlock_3/Dense_1/bias"]
        for ln, hn in (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")):
            sd[t + hn + ".weight"] = f[b + ln + "/scale"]
            sd[t + hn + ".bias"] = f[b + ln + "/bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def assert_trees_equal(a, b):
    fa, fb = q.flatten(a), q.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope="module")
def ref():
    """``(model, params, logits)`` of a random test/4 ViT with a 32-wide pre_logits."""
    model, params = random_params(0, rep=32)
    return model, params, logits(model, params, images())


@pytest.fixture
def google_npz(tmp_path, ref):
    """``ref``'s params as a Google-layout ``.npz``."""
    path = tmp_path / "vit.npz"
    np.savez(path, **q.flatten(ref[1]))
    return path
