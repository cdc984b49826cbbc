"""Import pretrained ViT weights from foreign formats into our layout: ``load_pretrained``.

Read without executing code (:mod:`.readers`), converted to the original Google layout
(:mod:`.layouts`), checked leaf by leaf against the model they are loaded into:

- Google ``.npz``, original ``vision_transformer`` layout (``ViT-B_16.npz``, the augreg
  files) -- this is our own param layout, see :mod:`qvec_jax.models.vit`;
- Google ``.npz``, big_vision layout: top-level ``pos_embedding`` without the class
  token's slot, blocks named ``LayerNorm_0/1``, ``MultiHeadDotProductAttention_0``,
  ``MlpBlock_0``, either one ``encoderblock_{i}`` per layer or a scanned ``encoderblock``
  with a leading depth axis. Mapped to the original names; the class token's slot of the
  position embedding is zero (big_vision adds posemb before prepending the token);
- timm ``vit_*`` ``.safetensors`` state dicts (fused ``qkv``; torch ``[out, in]`` weights);
- Hugging Face ``ViTModel`` / ``ViTForImageClassification`` ``.safetensors`` (or their
  directory); ``ViTModel``'s pooler (dense + tanh) is our ``pre_logits``;
- a qvec checkpoint directory written by :func:`qvec_jax.checkpoints.save_params`.

The model is built from the checkpoint's own dims: a named variant (``"B/16"``) when
they match one, else explicit dims (``"w192d3m768h3/16"``, :func:`models.vit.variant_name`),
and from the architecture fields of its config (HF or timm ``config.json``, next to the
file or in its directory; a qvec checkpoint's meta): the LayerNorm epsilon and the
activation, with a refusal naming the field for what the model cannot represent
(:mod:`.arch`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qvec_jax import checkpoints
from qvec_jax.checkpoints import CheckpointError
from qvec_jax.models.vit import HEAD_INIT, WIDTHS, ViT, create_model, decode_variant, variant_name
from qvec_jax.pretrained.arch import read_arch
from qvec_jax.pretrained.layouts import POS, split_heads, to_google
from qvec_jax.pretrained.readers import PICKLE_SUFFIXES, read_dir, read_file
from qvec_jax.trees import HEAD_RULE

__all__ = ["PICKLE_SUFFIXES", "CheckpointError", "load_pretrained", "resample_posemb"]

_DIM_KEYS = ("width", "depth", "mlp_dim", "num_heads")
_MLP0 = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
_Q0 = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"


#: The leaves the dims are read from, with the shapes they must have.
_DIM_LEAVES = {
    "embedding/kernel": "[patch, patch, 3, width]",
    _MLP0: "[width, mlp_dim]",
    POS: "[1, tokens, width]",
    "head/kernel": "[features, classes]",
    "pre_logits/kernel": "[width, representation_size]",
}


def _dims(flat: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    missing = [k for k in ["embedding/kernel", _MLP0, POS] if k not in flat]
    if missing:
        raise CheckpointError(f"{path}: missing keys needed to identify the ViT: {missing}")
    for k, form in _DIM_LEAVES.items():
        if k in flat and np.ndim(flat[k]) != form.count(",") + 1:
            raise CheckpointError(
                f"{path}: leaf {k} has shape {tuple(np.shape(flat[k]))}, expected {form}; "
                "the file is damaged or not a ViT checkpoint"
            )
    q = flat.get(_Q0)
    return dict(
        width=flat["embedding/kernel"].shape[-1],
        patch_size=flat["embedding/kernel"].shape[0],
        depth=len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")}),
        mlp_dim=flat[_MLP0].shape[-1],
        num_heads=q.shape[1] if q is not None and q.ndim == 3 else None,
        num_classes=flat["head/kernel"].shape[-1] if "head/kernel" in flat else None,
        representation_size=(
            flat["pre_logits/kernel"].shape[-1] if "pre_logits/kernel" in flat else None
        ),
        num_pos=flat[POS].shape[1],
    )


def _describe(dims: dict) -> str:
    return ", ".join(f"{k} {dims[k]}" for k in _DIM_KEYS + ("patch_size",) if dims[k] is not None)


def _own_variant(dims: dict, path: Path) -> str:
    """The variant of the checkpoint's own dims; heads default to width/64 when unknown."""
    heads = dims["num_heads"]
    if heads is None:
        if dims["width"] % 64:
            raise CheckpointError(
                f"{path}: cannot decide the number of attention heads ({_describe(dims)}; the "
                f"file does not store them and the default width/64 is no integer): pass "
                "num_heads=... (qvec convert --num-heads N)"
            )
        heads = dims["width"] // 64
    dims = {**{k: dims[k] for k in _DIM_KEYS}, "num_heads": heads, "patch_size": dims["patch_size"]}
    try:
        return variant_name(**dims)
    except ValueError as e:
        raise CheckpointError(f"{path}: the checkpoint's dims are not a valid ViT: {e}") from e


def _resolve_variant(dims: dict, variant: str | None, path: Path) -> str:
    found = [
        f"{name}/{dims['patch_size']}"
        for name, cfg in WIDTHS.items()
        if all(dims[k] is None or dims[k] == cfg[k] for k in _DIM_KEYS)
    ]
    if variant is None:
        return found[0] if found else _own_variant(dims, path)
    cfg = decode_variant(variant)
    bad = [
        f"{k} {dims[k]} (a {variant} has {cfg[k]})"
        for k in _DIM_KEYS + ("patch_size",)
        if dims[k] is not None and dims[k] != cfg[k]
    ]
    if bad:
        hint = f"it looks like a {found[0]}" if found else f"it has {_describe(dims)}"
        raise CheckpointError(
            f"{path}: checkpoint is not a {variant}: {'; '.join(bad)}; {hint}. "
            "Pass the matching variant, or omit it to auto-detect."
        )
    return variant


def resample_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
    """Bilinearly resize the patch-grid part of ``[1, 1+g*g, D]`` to ``num_tokens`` (big_vision's
    ``scipy.ndimage.zoom(order=1)``); the class token's slot is kept as is."""
    import scipy.ndimage

    cls, grid = posemb[:, :1], posemb[0, 1:]
    g0, g1 = math.isqrt(grid.shape[0]), math.isqrt(num_tokens - 1)
    if g0 * g0 != grid.shape[0] or g1 * g1 != num_tokens - 1:
        raise CheckpointError(
            f"cannot resample position embeddings {posemb.shape} to {num_tokens} tokens: "
            "the patch grids are not square"
        )
    if g0 == g1:
        return posemb
    grid = scipy.ndimage.zoom(grid.reshape(g0, g0, -1), (g1 / g0, g1 / g0, 1), order=1)
    return np.concatenate([cls, grid.reshape(1, g1 * g1, -1).astype(posemb.dtype)], axis=1)


def _check_against(flat: dict, expected: dict, path: Path, variant: str) -> None:
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(flat[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(flat) & set(expected)
        if tuple(flat[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:

        def fmt(title, items):
            shown = "\n    ".join(items[:20]) + ("\n    ..." if len(items) > 20 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""

        raise CheckpointError(
            f"{path}: does not fit a ViT {variant}:"
            + fmt("missing keys", missing)
            + fmt("unexpected keys", unexpected)
            + fmt("wrong shapes", wrong)
        )


def _read_any(path: Path) -> tuple[dict[str, np.ndarray], str, dict]:
    """-> (flat Google-layout dict with possibly 2-D attention matrices, layout, extra)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if path.is_dir() and checkpoints.is_checkpoint(path):
        params, meta = checkpoints.restore_params(path)
        return flatten_dict(params, sep="/"), "qvec", meta
    flat, extra = read_dir(path) if path.is_dir() else (read_file(path), {})
    flat, layout = to_google({k.removeprefix("params/"): v for k, v in flat.items()}, path)
    if layout in ("hf", "timm") and not extra:
        extra = _sibling_config(path, layout)
    return flat, layout, extra


def _sibling_config(path: Path, layout: str) -> dict:
    """The ``config.json`` next to a weights file ({} if none; a timm one only if it is
    timm's, with an ``architecture``)."""
    cfg = path.with_name("config.json")
    if not cfg.is_file():
        return {}
    try:
        extra = json.loads(cfg.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{cfg}: unreadable config ({e}); fix or remove it") from None
    if layout == "timm" and not (isinstance(extra, dict) and "architecture" in extra):
        return {}
    return extra


def _checkpoint_dims(path: Path, variant: str | None, num_heads: int | None):
    """``(flat, dims, variant, arch)``: the arrays, their dims, the variant they are loaded
    as, and the architecture fields of the config (``arch.read_arch``)."""
    flat, layout, extra = _read_any(path)
    dims = _dims(flat, path)
    arch = read_arch(extra, layout, path, flat)
    if layout == "qvec" and variant is None:
        variant = extra.get("variant")
    if dims["num_heads"] is None and "num_attention_heads" in extra:
        dims["num_heads"] = int(extra["num_attention_heads"])
    if num_heads is not None:
        if dims["num_heads"] not in (None, num_heads):
            raise CheckpointError(
                f"{path}: the checkpoint has {dims['num_heads']} attention heads, not the "
                f"num_heads={num_heads} asked for; omit num_heads"
            )
        dims["num_heads"] = int(num_heads)
    return flat, dims, _resolve_variant(dims, variant, path), arch


def load_pretrained(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    num_classes: int | None = None,
    image_size: int | None = 224,
    seed: int = 0,
    num_heads: int | None = None,
) -> tuple[ViT, dict]:
    """Load a pretrained ViT into our layout. Returns ``(model, params)`` (float32).

    ``variant`` (e.g. ``"B/16"``) is detected from the shapes when omitted, and checked
    against them when given; dims that match no named variant give an explicit-dims
    variant. ``num_heads`` is only needed for timm files (which do not store it) whose
    dims match no named variant and whose heads are not width/64, the default.
    ``num_classes=None`` keeps the checkpoint's head and ``pre_logits``; an integer
    replaces the head by a fresh one (seeded by ``seed``) and drops ``pre_logits`` (0: no
    head, ``apply`` returns features). When ``image_size`` differs from the checkpoint's,
    the position embeddings are resampled bilinearly; ``None`` keeps its resolution.
    The LayerNorm epsilon and the activation come from the checkpoint's config (an HF
    file without its config.json gets HF's default epsilon, 1e-12).
    """
    path = Path(path)
    flat, dims, variant, arch = _checkpoint_dims(path, variant, num_heads)
    cfg = decode_variant(variant)
    flat = split_heads(flat, cfg["num_heads"])
    if image_size is None:
        image_size = math.isqrt(dims["num_pos"] - 1) * cfg["patch_size"]
    keep_head = num_classes is None
    if not keep_head:
        flat = {k: v for k, v in flat.items() if not HEAD_RULE.match(k)}
    model = create_model(
        variant,
        num_classes=dims["num_classes"] if keep_head else num_classes,
        image_size=image_size,
        representation_size=dims["representation_size"] if keep_head else None,
        **arch,
    )
    expected = flatten_dict(model.abstract_params(), sep="/")
    if POS in flat and flat[POS].ndim == 3 and flat[POS].shape[2] == expected[POS].shape[2]:
        flat[POS] = resample_posemb(flat[POS], expected[POS].shape[1])
    if not keep_head and num_classes:
        kernel = HEAD_INIT(jax.random.key(seed), expected["head/kernel"].shape, jnp.float32)
        flat["head/kernel"] = np.asarray(kernel)
        flat["head/bias"] = np.zeros(expected["head/bias"].shape, np.float32)
    _check_against(flat, expected, path, variant)
    params = unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")
    return model, params
