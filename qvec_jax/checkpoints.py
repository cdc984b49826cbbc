"""Checkpoints: import pretrained ViT weights, and orbax save/restore.

Pretrained imports (``load_pretrained``), all read without executing code (numpy with
``allow_pickle=False``, safetensors' numpy API; no torch needed):

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
- a qvec orbax checkpoint directory written by :func:`save_params`.

Our own checkpoints are directories ``<path>/{params or state}/`` (orbax) plus
``<path>/qvec_meta.json``, written into a sibling temp dir and swapped in by rename, so an
interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qvec_jax.models.vit import HEAD_INIT, WIDTHS, ViT, create_model, decode_variant
from qvec_jax.trees import HEAD_RULE, path_str

META_FILE = "qvec_meta.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar"}
_HEAD_RE = re.compile(r"^(head|pre_logits)(/|$)")
_POS = "Transformer/posembed_input/pos_embedding"


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the requested model."""


# ----------------------------------------------------------------------------- reading files


def _pickle_refusal(path: Path) -> CheckpointError:
    dst = path.with_suffix(".safetensors")
    return CheckpointError(
        f"{path}: refusing to load a pickle-based checkpoint (loading it could execute "
        "arbitrary code). Convert it to safetensors once, in an environment you trust:\n"
        '  python -c "import torch; from safetensors.torch import save_file; '
        f"sd = torch.load('{path}', map_location='cpu', weights_only=True); "
        "sd = sd.get('state_dict', sd.get('model', sd)); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{dst}')\"\n"
        "then pass the .safetensors file."
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:1] == b"\x80":
        raise _pickle_refusal(path)
    if magic != b"PK":
        raise CheckpointError(
            f"{path}: corrupt or truncated .npz (not a zip archive); download it again"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise CheckpointError(f"{path}: contains pickled objects, refusing to load") from e
        raise CheckpointError(f"{path}: not a readable .npz ({e}); download it again") from e
    except Exception as e:  # BadZipFile, EOFError, zlib.error, OSError...
        raise CheckpointError(
            f"{path}: corrupt or truncated .npz ({type(e).__name__}: {e}); download it again"
        ) from e


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError
        raise CheckpointError(
            f"{path}: corrupt or truncated .safetensors ({type(e).__name__}: {e}); "
            "download or convert it again"
        ) from e


def _read_file(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".safetensors":
        return _read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80" or (head[:2] == b"PK" and _zip_has_pickle(path)):
        raise _pickle_refusal(path)
    if head[:2] == b"PK":
        return _read_npz(path)
    if len(head) >= 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format; expected a Google .npz, a timm/Hugging Face "
        ".safetensors file, or a qvec checkpoint directory"
    )


def _zip_has_pickle(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(".pkl") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _read_dir(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A Hugging Face model directory: all *.safetensors shards (+ config.json if any)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise CheckpointError(
            f"{path}: directory holds no *.safetensors and no {META_FILE} (found {found}); "
            "pass the checkpoint file itself"
        )
    flat: dict[str, np.ndarray] = {}
    for f in files:
        flat.update(_read_safetensors(f))
    cfg = path / "config.json"
    return flat, json.loads(cfg.read_text()) if cfg.exists() else {}


# ----------------------------------------------------------------- layouts -> Google layout


def _detect_layout(flat: dict[str, np.ndarray], path: Path) -> str:
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
        if parts[:2] == ["Transformer", "encoderblock"]:  # scanned: leading depth axis
            sub = "/".join(rename.get(p, p) for p in parts[2:])
            for i in range(v.shape[0]):
                out[f"Transformer/encoderblock_{i}/{sub}"] = v[i]
            continue
        k = "/".join(rename.get(p, p) for p in parts) if "encoderblock_" in k else k
        if k in ("pos_embedding", "Transformer/pos_embedding"):
            k = _POS
        out[k] = v
    pe = out.get(_POS)
    if pe is not None and math.isqrt(pe.shape[1]) ** 2 == pe.shape[1] and "cls" in out:
        out[_POS] = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    return out


def _from_timm(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    blk = "Transformer/encoderblock_{}/"
    att = blk + "MultiHeadDotProductAttention_1/"
    direct = {
        "cls_token": "cls",
        "pos_embed": _POS,
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
            out["embedding/kernel"] = v.transpose(2, 3, 1, 0)
        elif m and m.group(2) in per_block:
            out[blk.format(m.group(1)) + per_block[m.group(2)]] = v
        elif m and m.group(2) in per_block_t:
            out[blk.format(m.group(1)) + per_block_t[m.group(2)]] = v.T
        elif m and m.group(2) in ("attn.qkv.weight", "attn.qkv.bias"):
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
            out[_POS] = v
        elif k == "embeddings.patch_embeddings.projection.weight":
            out["embedding/kernel"] = v.transpose(2, 3, 1, 0)
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


def _split_heads(flat: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
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


# ------------------------------------------------------------------ variant detection


def _dims(flat: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    need = ["embedding/kernel", "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", _POS]
    missing = [k for k in need if k not in flat]
    if missing:
        raise CheckpointError(f"{path}: missing keys needed to identify the ViT: {missing}")
    q = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    return dict(
        width=flat["embedding/kernel"].shape[-1],
        patch_size=flat["embedding/kernel"].shape[0],
        depth=len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")}),
        mlp_dim=flat["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].shape[-1],
        num_heads=q.shape[1] if q.ndim == 3 else None,
        num_classes=flat["head/kernel"].shape[-1] if "head/kernel" in flat else None,
        representation_size=(
            flat["pre_logits/kernel"].shape[-1] if "pre_logits/kernel" in flat else None
        ),
        num_pos=flat[_POS].shape[1],
    )


def _resolve_variant(dims: dict, variant: str | None, path: Path) -> str:
    keys = ("width", "depth", "mlp_dim", "num_heads")
    found = [
        f"{name}/{dims['patch_size']}"
        for name, cfg in WIDTHS.items()
        if all(dims[k] is None or dims[k] == cfg[k] for k in keys)
    ]
    desc = ", ".join(f"{k} {dims[k]}" for k in keys + ("patch_size",) if dims[k] is not None)
    if variant is None:
        if not found:
            raise CheckpointError(
                f"{path}: no known ViT variant has {desc}; known width classes: "
                f"{ {n: c['width'] for n, c in WIDTHS.items()} }"
            )
        return found[0]
    cfg = decode_variant(variant)
    bad = [
        f"{k} {dims[k]} (a {variant} has {cfg[k]})"
        for k in keys + ("patch_size",)
        if dims[k] is not None and dims[k] != cfg[k]
    ]
    if bad:
        hint = f"it looks like a {found[0]}" if found else f"it has {desc}"
        raise CheckpointError(
            f"{path}: checkpoint is not a {variant}: {'; '.join(bad)}; {hint}. "
            "Pass the matching variant, or omit it to auto-detect."
        )
    return variant


# ------------------------------------------------------------------- load_pretrained


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
    if path.is_dir() and (path / META_FILE).exists():
        params, meta = restore_params(path)
        return flatten_dict(params, sep="/"), "qvec", meta
    flat, extra = _read_dir(path) if path.is_dir() else (_read_file(path), {})
    flat = {k.removeprefix("params/"): v for k, v in flat.items()}
    layout = _detect_layout(flat, path)
    convert = {"google": dict, "big_vision": _from_big_vision, "timm": _from_timm}
    convert["hf"] = _from_hf
    flat = convert[layout](flat)
    if layout == "hf" and not extra:
        cfg = path.with_name("config.json")
        extra = json.loads(cfg.read_text()) if cfg.exists() else {}
    return flat, layout, extra


def load_pretrained(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    num_classes: int | None = None,
    image_size: int | None = 224,
    seed: int = 0,
) -> tuple[ViT, dict]:
    """Load a pretrained ViT into our layout. Returns ``(model, params)`` (float32).

    ``variant`` (e.g. ``"B/16"``) is detected from the shapes when omitted, and checked
    against them when given. ``num_classes=None`` keeps the checkpoint's head and
    ``pre_logits``; an integer replaces the head by a fresh one (seeded by ``seed``) and
    drops ``pre_logits`` (0: no head, ``apply`` returns features). When ``image_size``
    differs from the checkpoint's, the position embeddings are resampled bilinearly;
    ``image_size=None`` keeps the checkpoint's resolution.
    """
    path = Path(path)
    flat, layout, extra = _read_any(path)
    dims = _dims(flat, path)
    if layout == "qvec" and variant is None:
        variant = extra.get("variant")
    if dims["num_heads"] is None and "num_attention_heads" in extra:
        dims["num_heads"] = int(extra["num_attention_heads"])
    variant = _resolve_variant(dims, variant, path)
    cfg = decode_variant(variant)
    flat = _split_heads(flat, cfg["num_heads"])
    grid = math.isqrt(dims["num_pos"] - 1)
    if image_size is None:
        image_size = grid * cfg["patch_size"]
    keep_head = num_classes is None
    if not keep_head:
        flat = {k: v for k, v in flat.items() if not _HEAD_RE.match(k)}
    model = create_model(
        variant,
        num_classes=dims["num_classes"] if keep_head else num_classes,
        image_size=image_size,
        representation_size=dims["representation_size"] if keep_head else None,
    )
    expected = flatten_dict(model.abstract_params(), sep="/")
    if _POS in flat and flat[_POS].ndim == 3 and flat[_POS].shape[2] == expected[_POS].shape[2]:
        flat[_POS] = resample_posemb(flat[_POS], expected[_POS].shape[1])
    if not keep_head and num_classes:
        kernel = HEAD_INIT(jax.random.key(seed), expected["head/kernel"].shape, jnp.float32)
        flat["head/kernel"] = np.asarray(kernel)
        flat["head/bias"] = np.zeros(expected["head/bias"].shape, np.float32)
    _check_against(flat, expected, path, variant)
    params = unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")
    return model, params


def model_from_meta(meta: dict) -> ViT:
    """Rebuild the :class:`ViT` described by a checkpoint's ``qvec_meta.json``."""
    try:
        return create_model(
            meta["variant"],
            num_classes=meta.get("num_classes"),
            image_size=meta["image_size"],
            representation_size=meta.get("representation_size"),
        )
    except KeyError as e:
        raise CheckpointError(f"checkpoint meta lacks {e}; it has {sorted(meta)}") from e


def backbone_id(params) -> str:
    """Short stable hash (12 hex chars) of the backbone: every leaf except ``head`` and
    ``pre_logits``, by path, shape and float32 value. Equal ids = same pretrained init."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(((path_str(p), x) for p, x in leaves), key=lambda t: t[0]):
        if HEAD_RULE.match(path):
            continue
        arr = np.ascontiguousarray(np.asarray(leaf, dtype=np.float32))
        h.update(f"{path}:{arr.shape};".encode())
        h.update(arr.astype("<f4", copy=False).tobytes())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------- orbax save/restore


def _backup(path: Path) -> Path:
    return path.parent / f".{path.name}.qvec-old"


def _recover(path: Path) -> None:
    """Undo a swap interrupted between its two renames."""
    if not path.exists() and _backup(path).exists():
        os.rename(_backup(path), path)


def _atomic_write(path: str | os.PathLike, meta: dict, write) -> Path:
    path = Path(path).absolute()
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise CheckpointError(f"checkpoint meta for {path} is not JSON-serializable: {e}") from e
    _recover(path)
    if path.exists() and not (path / META_FILE).exists():
        raise CheckpointError(
            f"{path} exists and is not a qvec checkpoint; refusing to replace it. "
            "Choose another path or remove it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.qvec-tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        (tmp / META_FILE).write_text(meta_text)
        if path.exists():
            shutil.rmtree(_backup(path), ignore_errors=True)
            os.rename(path, _backup(path))
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(_backup(path), ignore_errors=True)
    return path


def _local_process(ocp):
    """Orbax options for host arrays read or written by this process alone: no barrier with
    the other processes of a multi-host run (train.py saves params from process 0 only)."""
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _orbax_save(directory: Path, tree) -> None:
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer(multiprocessing_options=_local_process(ocp))
    ckptr.save(directory, tree)
    ckptr.wait_until_finished()


def _read_meta(path: Path) -> dict:
    _recover(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such qvec checkpoint directory")
    try:
        return json.loads((path / META_FILE).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not a qvec checkpoint (no {META_FILE})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/{META_FILE}: corrupt JSON ({e})") from e


def save_params(path: str | os.PathLike, params, meta: dict | None = None) -> Path:
    """Write ``params`` (any pytree of arrays) and ``meta`` (JSON) atomically to ``path``."""
    meta = {"kind": "params", **(meta or {})}
    return _atomic_write(path, meta, lambda tmp: _orbax_save(tmp / "params", params))


def restore_params(path: str | os.PathLike) -> tuple[dict, dict]:
    """-> ``(params, meta)``; params as host numpy arrays with their saved dtypes."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = _read_meta(path)
    try:
        local = _local_process(ocp)
        ckptr = ocp.Checkpointer(
            ocp.PyTreeCheckpointHandler(multiprocessing_options=local),
            multiprocessing_options=local,
        )
        tree = ckptr.metadata(path / "params").item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        params = ckptr.restore(path / "params", args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot restore params ({type(e).__name__}: {e}); "
            "the checkpoint is incomplete or corrupt"
        ) from e
    return params, meta


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def save_train_state(path: str | os.PathLike, state, meta: dict | None = None) -> Path:
    """Atomically save a train-state pytree (params, optax state, step, PRNG keys...)."""
    tree = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
    meta = {"kind": "train_state", **(meta or {})}
    return _atomic_write(path, meta, lambda tmp: _orbax_save(tmp / "state", tree))


def restore_train_state(path: str | os.PathLike, target) -> tuple[Any, dict]:
    """Restore into the structure, dtypes (and shardings) of ``target``, a concrete or
    ``jax.ShapeDtypeStruct`` tree such as ``jax.eval_shape(make_state)``. -> ``(state, meta)``."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = _read_meta(path)

    def to_abstract(x):
        if _is_key(x):
            return jax.eval_shape(jax.random.key_data, x)
        return ocp.utils.to_shape_dtype_struct(x) if hasattr(x, "dtype") else x

    try:
        raw = ocp.StandardCheckpointer().restore(path / "state", jax.tree.map(to_abstract, target))
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot restore the train state into the given target "
            f"({type(e).__name__}: {e}); was it saved from the same model/optimizer?"
        ) from e

    def rewrap(t, x):
        if not _is_key(t):
            return x
        impl = getattr(t.dtype, "_impl", None) or jax.random.key_impl(t)
        return jax.random.wrap_key_data(x, impl=impl)

    return jax.tree.map(rewrap, target, raw), meta
