"""Our checkpoints: params and a typed meta, saved together as one orbax ``Composite``.

A checkpoint is the directory ``<path>/`` that orbax writes: ``params/`` (the pytree)
and ``meta/qvec_meta.json`` (:class:`CheckpointMeta`, JSON). Orbax writes into a
temporary sibling and renames it onto ``<path>`` when complete, so a reader sees a whole
checkpoint or none; an overwrite removes the old checkpoint first (an interrupted
overwrite leaves none, never a partial one). Checkpoints of the first format
(``<path>/params/`` next to ``<path>/qvec_meta.json``) are still read.

Foreign formats (``.npz``, ``.safetensors``) are imported by :mod:`qvec_jax.pretrained`.
A packed export (one ``.safetensors`` file written by ``export.export_packed``, its meta
carried inside) is read by :func:`restore_params` too, dequantized.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, TypedDict, get_type_hints

import jax
import numpy as np
import orbax.checkpoint as ocp

from qvec_jax.export import ExportError, crc32, load_packed
from qvec_jax.models.vit import ViT, create_model
from qvec_jax.trees import HEAD_RULE, flatten, is_float, path_str

META_FILE = "qvec_meta.json"
_META_ITEM = "meta"


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the requested model."""


class CheckpointMeta(TypedDict, total=False):
    """What a checkpoint says about itself; every key is optional, none other is allowed.

    ``train`` writes the model keys and the run keys; ``qvec convert`` the model keys,
    ``backbone_id`` and ``source``; ``qvec extract`` a ``kind="qv"`` meta with the
    donor's run keys, ``qat``, ``fp`` and ``global_norm``; ``qvec patch`` and ``qvec
    ptq`` add ``patch`` / ``ptq`` to the receiver's meta, ``qvec quantize`` ``ptq`` and
    ``quantize``. :func:`validate_meta` checks it.
    """

    kind: str  # "params" or "qv"
    variant: str  # models.vit variant, e.g. "B/16" or "w192d3m768h3/16"
    image_size: int
    num_classes: int
    representation_size: int
    layer_norm_eps: float  # the ViT's LayerNorm epsilon (absent: 1e-6; HF ViTs: 1e-12)
    activation: str  # the ViT's MLP activation, models.vit.ACTIVATIONS (absent: "gelu")
    task: str
    mode: str  # "fp", "qat" or "patched"
    bits: int
    granularity: str
    seed: int
    steps: int
    backbone_id: str  # backbone_id() of the pretrained init
    config: dict  # the run's full config (train)
    source: str  # the imported file (qvec convert)
    qat: str  # the QV's QAT checkpoint (qvec extract)
    fp: str  # the QV's FP checkpoint (qvec extract)
    global_norm: float  # of the QV (qvec extract)
    patch: dict  # {"qv", "donor", "lam", "zero_shot"} (qvec patch)
    ptq: dict  # {"bits", "granularity"} (qvec ptq), + "method", "calib" (gptq), "packed" (export)
    quantize: dict  # recipe.quantize_model's record: recipe, bank, calib, data (qvec quantize)
    merge: dict  # {"spec": MergeSpec.to_dict(), "inputs": [{path, task, fingerprint}]}
    crc32: dict  # {leaf path: CRC-32 of its saved bytes, 8 hex digits}, set by save_params


_KINDS = ("params", "qv")
_TYPES: dict[str, Any] = {
    k: (int, float) if t is float else t for k, t in get_type_hints(CheckpointMeta).items()
}


def validate_meta(meta: dict, where: str | os.PathLike) -> CheckpointMeta:
    """``meta`` checked against :class:`CheckpointMeta` (unknown keys, types, kind)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: checkpoint meta must be a JSON object, got {meta!r}")
    for key, value in meta.items():
        if key not in _TYPES:
            close = difflib.get_close_matches(str(key), list(_TYPES), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise CheckpointError(
                f"{where}: unknown checkpoint meta key {key!r}; {hint}known: {', '.join(_TYPES)}"
            )
        if value is not None and (isinstance(value, bool) or not isinstance(value, _TYPES[key])):
            raise CheckpointError(
                f"{where}: checkpoint meta {key}={value!r} is a {type(value).__name__}, "
                f"expected {getattr(_TYPES[key], '__name__', 'a number')}"
            )
    if meta.get("kind", "params") not in _KINDS:
        raise CheckpointError(f"{where}: checkpoint meta kind={meta['kind']!r} is not in {_KINDS}")
    return CheckpointMeta(**meta)


#: The meta keys of a model's architecture beyond its variant (:func:`model_meta`).
ARCH_KEYS = ("layer_norm_eps", "activation")


def model_meta(model: ViT) -> dict:
    """The meta keys :func:`model_from_meta` rebuilds ``model`` from: variant, sizes and
    the architecture fields an imported config can set (``ARCH_KEYS``)."""
    return dict(
        variant=model.variant,
        num_classes=model.num_classes,
        image_size=model.image_size,
        representation_size=model.representation_size,
        **{k: getattr(model, k) for k in ARCH_KEYS},
    )


def model_from_meta(meta: CheckpointMeta) -> ViT:
    """Rebuild the :class:`ViT` described by a checkpoint's meta (``ARCH_KEYS`` that are
    absent take the model's defaults: the meta of a Google or timm model need not say)."""
    arch = {k: meta[k] for k in ARCH_KEYS if meta.get(k) is not None}
    try:
        return create_model(
            meta["variant"],
            num_classes=meta.get("num_classes"),
            image_size=meta["image_size"],
            representation_size=meta.get("representation_size"),
            **arch,
        )
    except KeyError as e:
        raise CheckpointError(f"checkpoint meta lacks {e}; it has {sorted(meta)}") from e
    except ValueError as e:
        raise CheckpointError(f"checkpoint meta: {e}") from None


def quantized(meta: CheckpointMeta, path: str | os.PathLike | None = None) -> str | None:
    """What makes a checkpoint already quantized, in words (``"a packed export (3-bit
    gptq, channel)"``, ``"a `qvec ptq` output (2-bit rtn, channel)"``), or None. Known from
    the meta (``ptq``, set by ``qvec ptq`` and ``qvec export``) or, for a packed export,
    from ``path`` being a file. Quantizing it again would re-round its values and lose
    its codes (GPTQ's above all)."""
    ptq = meta.get("ptq")
    packed = (path is not None and Path(path).is_file()) or bool((ptq or {}).get("packed"))
    if not ptq and not packed:
        return None
    ptq = ptq if isinstance(ptq, dict) else {}
    bits = f"{ptq['bits']}-bit" if "bits" in ptq else ""
    method = ptq.get("method", "rtn") if ptq else ""  # `qvec ptq`'s RTN record names none
    how = ", ".join(str(x) for x in (bits, method, ptq.get("granularity")) if x)
    what = "a packed export" if packed else "a `qvec ptq` output"
    return f"{what} ({how})" if how else what


def describe(meta: CheckpointMeta, path: str | os.PathLike | None = None) -> str:
    """What a checkpoint is, in words, from its meta: a packed export, a `qvec ptq` output,
    a quantization vector, a patched model, an FP or QAT fine-tune of a task, or a model
    with no run mode (a converted pretrained one)."""
    q = quantized(meta, path)
    task = f" of task {meta['task']!r}" if meta.get("task") else ""
    if q:
        return q + task
    if meta.get("kind") == "qv":
        return f"a quantization vector{task}"
    if meta.get("patch") or meta.get("mode") == "patched":
        return f"a patched checkpoint{task} (`qvec patch`)"
    mode = meta.get("mode")
    if mode in ("fp", "qat"):
        return f"{'an FP' if mode == 'fp' else 'a QAT'} fine-tune{task}"
    return f"a model with no run mode in its meta{task} (a converted pretrained checkpoint?)"


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


# ----------------------------------------------------------------------------- on disk


def meta_file(path: str | os.PathLike) -> Path:
    """The JSON file holding the meta of the checkpoint ``path`` (either format).

    Its content and mtime change on every save: a cheap identity of the checkpoint."""
    path = Path(path)
    for f in (path / _META_ITEM / META_FILE, path / META_FILE):
        if f.is_file():
            return f
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such qvec checkpoint directory")
    raise CheckpointError(f"{path}: not a qvec checkpoint (no {_META_ITEM}/{META_FILE})")


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete qvec checkpoint (either format)."""
    path = Path(path)
    return (path / _META_ITEM / META_FILE).is_file() or (path / META_FILE).is_file()


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """The validated meta of the checkpoint ``path``, without reading its params (and
    without the leaf checksums, which only :func:`restore_params` needs)."""
    meta = _read_meta(path)
    meta.pop("crc32", None)
    return meta


def _read_meta(path) -> CheckpointMeta:
    f = meta_file(path)
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: corrupt JSON ({e})") from e
    return validate_meta(meta, f)


def _local():
    """Orbax options for host arrays read or written by this process alone: no barrier with
    the other processes of a multi-host run (train.py saves params from process 0 only)."""
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _checkpointer(legacy: bool = False) -> ocp.Checkpointer:
    local = _local()
    tree = ocp.PyTreeCheckpointHandler(multiprocessing_options=local)
    if legacy:  # first format: a bare pytree checkpoint in <path>/params
        return ocp.Checkpointer(tree, multiprocessing_options=local)
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(multiprocessing_options=local),
        params=tree,
        **{_META_ITEM: ocp.JsonCheckpointHandler(META_FILE, multiprocessing_options=local)},
    )
    return ocp.Checkpointer(handler, multiprocessing_options=local)


def save_params(path: str | os.PathLike, params, meta: CheckpointMeta | None = None) -> Path:
    """Write ``params`` (any pytree of arrays) and ``meta`` to ``path`` as one checkpoint.

    Refuses params holding NaN/Inf (naming the leaf) and a directory that is not a qvec
    checkpoint. The meta gets a CRC-32 of every leaf's bytes (``crc32``, replacing any
    given), which :func:`restore_params` verifies. Returns the path."""
    path = Path(path).absolute()
    host = {p: np.ascontiguousarray(jax.device_get(x)) for p, x in flatten(params).items()}
    _check_finite(host, f"refusing to save {path}")
    meta = {k: v for k, v in (meta or {}).items() if k != "crc32"}
    meta["crc32"] = {p: crc32(x) for p, x in host.items()}
    meta = validate_meta({"kind": "params", **meta}, path)
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta for {path} is not JSON-serializable: {e}") from e
    if path.exists() and not is_checkpoint(path):
        raise CheckpointError(
            f"{path} exists and is not a qvec checkpoint; refusing to replace it. "
            "Choose another path or remove it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    args = ocp.args.Composite(
        params=ocp.args.PyTreeSave(params), **{_META_ITEM: ocp.args.JsonSave(dict(meta))}
    )
    try:
        _checkpointer().save(path, args=args, force=True)
    finally:  # an interrupted save leaves orbax's temporary directory behind
        for tmp in path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _restore_tree(path: Path) -> dict:
    legacy = not (path / _META_ITEM / META_FILE).is_file()
    ckptr, where = _checkpointer(legacy), path / "params" if legacy else path
    item = ckptr.metadata(where).item_metadata
    tree = item.tree if legacy else item["params"].tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    args = ocp.args.PyTreeRestore(restore_args=restore_args)
    if legacy:
        return ckptr.restore(where, args=args)
    return ckptr.restore(where, args=ocp.args.Composite(params=args))["params"]


def _check_finite(flat: dict, where: str) -> None:
    for p, x in flat.items():
        if is_float(x) and not np.isfinite(x).all():
            raise CheckpointError(
                f"{where}: leaf {p} holds NaN or Inf; the run that made these params diverged "
                "(rerun it, e.g. with a lower optim.lr)"
            )


def verify(path: Path, params, meta: CheckpointMeta) -> None:
    """Refuse restored ``params`` whose bytes differ from the CRC-32s saved in ``meta``
    (a corrupt file), or that hold NaN/Inf; the error names the checkpoint and the leaf.
    Checkpoints saved without checksums (older ones) get the NaN/Inf check only."""
    flat = flatten(params)
    sums = meta.get("crc32")
    if sums is not None:
        if set(sums) != set(flat):
            odd = sorted(set(sums) ^ set(flat))[0]
            raise CheckpointError(
                f"{path}: leaf {odd} is in {'the checksums' if odd in sums else 'the params'} "
                "only; the checkpoint is corrupt: re-create it"
            )
        for p, x in flat.items():
            if crc32(x) != sums[p]:
                raise CheckpointError(
                    f"{path}: leaf {p} does not match its saved checksum (crc32 {crc32(x)}, "
                    f"saved {sums[p]}); the checkpoint is corrupt: re-create it"
                )
    _check_finite(flat, str(path))


def restore_params(
    path: str | os.PathLike, *, verify_data: bool = True
) -> tuple[dict, CheckpointMeta]:
    """-> ``(params, meta)``; params as host numpy arrays with their saved dtypes.

    ``verify_data`` (default): check the leaves against the checksums saved with them
    and for NaN/Inf (:func:`verify`); off only to measure what that costs. The returned
    meta leaves the checksums out. A file is read as a packed export (:func:`restore_packed`)."""
    path = Path(path).absolute()
    if path.is_file():
        return restore_packed(path)
    meta = _read_meta(path)
    try:
        params = _restore_tree(path)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot restore params ({type(e).__name__}: {e}); "
            "the checkpoint is incomplete or corrupt"
        ) from e
    if verify_data:
        verify(path, params, meta)
    meta.pop("crc32", None)
    return params, meta


def restore_packed(path: str | os.PathLike) -> tuple[dict, CheckpointMeta]:
    """``(params, meta)`` of a packed ``.safetensors`` export: the dequantized params (host
    numpy) and the meta of the checkpoint it was exported from (``export_packed``'s
    ``meta``), validated like a checkpoint's; NaN/Inf leaves are refused."""
    try:
        params, header = load_packed(path)
    except ExportError as e:
        raise CheckpointError(str(e)) from None
    params = jax.tree.map(np.asarray, params)
    meta = header.get("meta") or {}
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k != "crc32"}
    meta = validate_meta(meta, path)
    _check_finite(flatten(params), str(path))
    return params, meta
