"""Foreign ViT layouts (big_vision, timm, Hugging Face) -> the original Google layout.

Every converter maps a flat ``{name: array}`` dict onto our names (see
:mod:`qvec_jax.models.vit`); keys it does not know are kept under a ``<timm>/`` or
``<hf>/`` prefix so that the shape check reports them as unexpected. timm and HF store
attention as 2-D matrices; :func:`split_heads` reshapes them once the number of heads is
known.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from qvec_jax.checkpoints import CheckpointError

POS = "Transformer/posembed_input/pos_embedding"


def detect_layout(flat: dict[str, np.ndarray], path: Path) -> str:
    keys = list(flat)
    if any("MultiHeadDotProductAttention_1/" in k for k in keys):
        return "google"
    if any(k.startswith("Transformer/encoderblock") for k in keys):
        return "big_vision"
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        return "timm"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf"
    raise CheckpointError(
        f"{path}: not a ViT checkpoint in a known layout (Google/big_vision .npz, timm or "
        f"Hugging Face safetensors); first keys: {sorted(keys)[:8]}"
    )


def _from_big_vision(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rename = {
        "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
        "LayerNorm_1": "LayerNorm_2",
        "MlpBlock_0": "MlpBlock_3",
    }
    out: dict[str, np.ndarray] = {}
    for k, v in flat.items():
        parts = k.split("/")
        if parts[:2] == ["Transformer", "encoderblock"] and np.ndim(v):  # scanned: depth axis
            sub = "/".join(rename.get(p, p) for p in parts[2:])
            for i in range(v.shape[0]):
                out[f"Transformer/encoderblock_{i}/{sub}"] = v[i]
            continue
        k = "/".join(rename.get(p, p) for p in parts) if "encoderblock_" in k else k
        if k in ("pos_embedding", "Transformer/pos_embedding"):
            k = POS
        out[k] = v
    pe = out.get(POS)
    if (
        pe is not None
        and pe.ndim == 3
        and math.isqrt(pe.shape[1]) ** 2 == pe.shape[1]
        and "cls" in out
    ):
        out[POS] = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    return out


def _conv_kernel(v: np.ndarray) -> np.ndarray:
    """torch Conv2d ``[out, in, h, w]`` -> Flax ``[h, w, in, out]`` (other ranks kept as they
    are, for the shape check to name them)."""
    return v.transpose(2, 3, 1, 0) if v.ndim == 4 else v


def _splits_in_3(v: np.ndarray) -> bool:
    """Whether a fused qkv leaf splits into query, key and value (else it is unexpected)."""
    return v.ndim >= 1 and v.shape[0] % 3 == 0


def _from_timm(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    blk = "Transformer/encoderblock_{}/"
    att = blk + "MultiHeadDotProductAttention_1/"
    direct = {
        "cls_token": "cls",
        "pos_embed": POS,
        "patch_embed.proj.bias": "embedding/bias",
        "norm.weight": "Transformer/encoder_norm/scale",
        "norm.bias": "Transformer/encoder_norm/bias",
        "head.bias": "head/bias",
        "pre_logits.fc.bias": "pre_logits/bias",
    }
    per_block = {
        "norm1.weight": "LayerNorm_0/scale",
        "norm1.bias": "LayerNorm_0/bias",
        "norm2.weight": "LayerNorm_2/scale",
        "norm2.bias": "LayerNorm_2/bias",
        "attn.proj.bias": "MultiHeadDotProductAttention_1/out/bias",
        "mlp.fc1.bias": "MlpBlock_3/Dense_0/bias",
        "mlp.fc2.bias": "MlpBlock_3/Dense_1/bias",
    }
    per_block_t = {  # torch Linear [out, in] -> Flax kernel [in, out]
        "attn.proj.weight": "MultiHeadDotProductAttention_1/out/kernel",
        "mlp.fc1.weight": "MlpBlock_3/Dense_0/kernel",
        "mlp.fc2.weight": "MlpBlock_3/Dense_1/kernel",
    }
    for k, v in flat.items():
        k = k.removeprefix("module.")
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if k in direct:
            out[direct[k]] = v
        elif k in ("head.weight", "pre_logits.fc.weight"):
            out[k.split(".")[0] + "/kernel"] = v.T
        elif k == "patch_embed.proj.weight":
            out["embedding/kernel"] = _conv_kernel(v)
        elif m and m.group(2) in per_block:
            out[blk.format(m.group(1)) + per_block[m.group(2)]] = v
        elif m and m.group(2) in per_block_t:
            out[blk.format(m.group(1)) + per_block_t[m.group(2)]] = v.T
        elif m and m.group(2) in ("attn.qkv.weight", "attn.qkv.bias") and _splits_in_3(v):
            kind = "kernel" if k.endswith("weight") else "bias"
            for name, part in zip(("query", "key", "value"), np.split(v, 3, axis=0)):
                part = part.T if kind == "kernel" else part
                out[att.format(m.group(1)) + f"{name}/{kind}"] = part
        else:
            out["<timm>/" + k] = v  # reported as unexpected
    return out


def _from_hf(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    blk = "Transformer/encoderblock_{}/"
    per_block = {
        "layernorm_before": "LayerNorm_0",
        "layernorm_after": "LayerNorm_2",
        "attention.attention.query": "MultiHeadDotProductAttention_1/query",
        "attention.attention.key": "MultiHeadDotProductAttention_1/key",
        "attention.attention.value": "MultiHeadDotProductAttention_1/value",
        "attention.output.dense": "MultiHeadDotProductAttention_1/out",
        "intermediate.dense": "MlpBlock_3/Dense_0",
        "output.dense": "MlpBlock_3/Dense_1",
        # transformers >= 5 in-memory names (save_pretrained still writes the above)
        "attention.q_proj": "MultiHeadDotProductAttention_1/query",
        "attention.k_proj": "MultiHeadDotProductAttention_1/key",
        "attention.v_proj": "MultiHeadDotProductAttention_1/value",
        "attention.o_proj": "MultiHeadDotProductAttention_1/out",
        "mlp.fc1": "MlpBlock_3/Dense_0",
        "mlp.fc2": "MlpBlock_3/Dense_1",
    }
    top = {
        "layernorm": "Transformer/encoder_norm",
        "pooler.dense": "pre_logits",  # ViTModel's pooler: dense + tanh on the cls token
        "classifier": "head",
    }
    for key, v in flat.items():
        k = key.removeprefix("vit.")
        m = re.fullmatch(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)", k)
        mod, _, leaf = k.rpartition(".")
        if k == "embeddings.cls_token":
            out["cls"] = v
        elif k == "embeddings.position_embeddings":
            out[POS] = v
        elif k == "embeddings.patch_embeddings.projection.weight":
            out["embedding/kernel"] = _conv_kernel(v)
        elif k == "embeddings.patch_embeddings.projection.bias":
            out["embedding/bias"] = v
        elif m and m.group(2) in per_block:
            name = blk.format(m.group(1)) + per_block[m.group(2)]
            out[name + "/" + _hf_leaf(name, m.group(3))] = v.T if v.ndim == 2 else v
        elif mod in top:
            out[top[mod] + "/" + _hf_leaf(top[mod], leaf)] = v.T if v.ndim == 2 else v
        else:
            out["<hf>/" + key] = v
    return out


def _hf_leaf(module: str, leaf: str) -> str:
    if "LayerNorm" in module or module.endswith("encoder_norm"):
        return "scale" if leaf == "weight" else "bias"
    return "kernel" if leaf == "weight" else "bias"


def split_heads(flat: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """Reshape 2-D attention matrices (timm/HF) to Flax DenseGeneral shapes."""
    out = dict(flat)
    for k, v in flat.items():
        m = re.search(r"MultiHeadDotProductAttention_1/(query|key|value|out)/(kernel|bias)$", k)
        if not m:
            continue
        which, leaf = m.groups()
        if which == "out":
            if leaf == "kernel" and v.ndim == 2 and v.shape[0] % num_heads == 0:
                out[k] = v.reshape(num_heads, -1, v.shape[1])
        elif leaf == "kernel" and v.ndim == 2 and v.shape[1] % num_heads == 0:
            out[k] = v.reshape(v.shape[0], num_heads, -1)
        elif leaf == "bias" and v.ndim == 1 and v.shape[0] % num_heads == 0:
            out[k] = v.reshape(num_heads, -1)
    return out


def to_google(flat: dict[str, np.ndarray], path: Path) -> tuple[dict[str, np.ndarray], str]:
    """``(flat dict in the Google layout, layout name)`` of a checkpoint's raw arrays."""
    layout = detect_layout(flat, path)
    convert = {"google": dict, "big_vision": _from_big_vision, "timm": _from_timm, "hf": _from_hf}
    return convert[layout](flat), layout
