"""A quantized model one can ship: bit-packed codes + scales in one safetensors file.

Layout (format ``qvec_jax.packed``, version 3). The leaves are stored in one order, the
*index*, and concatenated, so the file has at most a handful of tensors and its header
stays small (a few hundred bytes per model, not per leaf):

- ``codes`` uint8 ``[sum bits * ceil(n / 8)]``: for each quantized leaf in index order,
  its codes ``q - qmin`` as ``bits`` bit-planes (``packing.pack``, ``[bits, ceil(n/8)]``),
  flattened row-major;
- ``scales`` float32: for each quantized leaf in index order, its scales (one per output
  channel, or one for the tensor), flattened;
- ``rest.<dtype>`` (e.g. ``rest.float32``): every unquantized leaf of that dtype in index
  order, flattened;
- the header's ``__metadata__`` holds ``format`` = ``qvec_jax.packed`` and ``qvec_jax``,
  a JSON object: ``version``, ``bits``, ``granularity``, ``rule`` (the rule's
  ``[pattern, channel axes]`` pairs), ``crc32`` (``{tensor name: CRC-32 of its bytes, 8
  hex digits}``, one per tensor above) and ``packed``: the base64 of the zlib-compressed
  JSON object ``{"index": [[path, shape, dtype, scale_shape or null], ...], "meta": {...}}``.
  ``path`` is the "/"-joined leaf path (``paths.path_str``), ``scale_shape`` is set for
  quantized leaves only, and ``meta`` is the caller's dict (e.g. the source checkpoint's
  meta: model variant, config). :func:`load_packed` returns it decoded.

Offsets are implied by the order and the shapes. So ``fq = (unpack(codes slice) + qmin) *
scales slice``, reshaped to the leaf's shape, is exactly ``packing.dequantize``. The
tensor bytes are exactly ``packing.size_report``'s ``total_bytes``; the header adds
about 2 kB (1.4% of the 2-bit demo model, 0.01% of ViT-B/16).

Integrity: :func:`load_packed` checks every tensor against its ``crc32`` as it reads it
(one pass over the data, as ``checkpoints.restore_params`` checks a checkpoint's leaves),
so a flipped bit in ``codes``, ``scales`` or ``rest.*``, or replaced codes, is refused
with one line naming the file and the tensor; the index is zlib data, whose own Adler-32
check refuses a damaged one. Version 3 added the checksums: files of version 2 (the same
layout without them) cannot be verified and are refused with a message to re-export.

Why by hand: safetensors stores named tensors only; one tensor per leaf made the header
(names, shapes, offsets) 7-11% of the demo model, so the index is compressed here.
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from .files import atomic_write_bytes
from .packing import QTensor, dequantize, quantize
from .paths import PyTree, Rule, path_str, unflatten
from .quant import QuantSpec, as_spec

FORMAT = "qvec_jax.packed"
VERSION = 3


class ExportError(ValueError):
    """A file that is not a packed qvec_jax model, or a tree that cannot be exported."""


def export_packed(
    params: PyTree,
    path: str | os.PathLike,
    spec: QuantSpec | int | None = None,
    *,
    bits: int | None = None,
    granularity: str | None = None,
    rule: Rule | None = None,
    meta: dict | None = None,
) -> int:
    """Write ``params`` packed to ``path`` (atomically); return the file size in bytes.

    ``params`` is an fp tree (quantized here by RTN, ``packing.quantize``) or a tree that
    already holds ``QTensor`` leaves (e.g. from ``gptq.gptq_quantize``), written as is.
    """
    spec = as_spec(spec, bits=bits, granularity=granularity, rule=rule)
    data = packed_bytes(params, spec, meta=meta)
    atomic_write_bytes(path, data)
    return len(data)


def packed_bytes(params: PyTree, spec: QuantSpec, meta: dict | None = None) -> bytes:
    """The file content of :func:`export_packed`. Works on ``jax.eval_shape`` trees too
    (zeros are written), to measure a model's packed size without its weights."""
    is_q = lambda x: isinstance(x, QTensor)  # noqa: E731
    if not any(is_q(x) for x in jax.tree.leaves(params, is_leaf=is_q)):
        params = _quantize_any(params, spec)
    index, codes, scales, rest = [], [], [], {}
    for p, x in flatten_q(params).items():
        if is_q(x) != (spec.rule.match(p) is not None):
            raise ExportError(
                f"{p}: the rule {'does not select' if is_q(x) else 'selects'} this leaf but it is "
                f"{'' if is_q(x) else 'not '}quantized; export with the spec it was quantized with"
            )
        if is_q(x):
            if x.bits != spec.bits or (spec.granularity == "tensor" and x.scale.size != 1):
                raise ExportError(
                    f"{p}: a {x.bits}-bit QTensor with {x.scale.size} scales does not fit "
                    f"{spec}; export with the spec it was quantized with"
                )
            packed, scale = _np(x.packed, p), _np(x.scale, p).astype(np.float32)
            if packed.dtype != np.uint8 or packed.shape != _packed_shape(x.shape, x.bits):
                raise ExportError(f"{p}: packed codes {packed.dtype}{list(packed.shape)} are not "
                                  f"uint8{list(_packed_shape(x.shape, x.bits))}")  # fmt: skip
            codes.append(packed.ravel())
            scales.append(scale.ravel())
            index.append([p, list(x.shape), x.dtype, list(scale.shape)])
        else:
            a = _np(x, p)
            rest.setdefault(a.dtype.name, []).append(a.ravel())
            index.append([p, list(a.shape), a.dtype.name, None])
    tensors = {"codes": codes, "scales": scales} | {f"rest.{k}": v for k, v in rest.items()}
    tensors = {k: np.concatenate(v) for k, v in tensors.items() if v}
    header = dict(
        version=VERSION,
        bits=spec.bits,
        granularity=spec.granularity,
        rule=[[rx.pattern, _jsonable(v)] for rx, v in spec.rule.patterns],
        crc32={k: crc32(v) for k, v in tensors.items()},
    )
    try:
        header["packed"] = _encode({"index": index, "meta": meta or {}})
    except TypeError as e:
        raise ExportError(f"meta: must be JSON-serializable ({e})") from None
    text = json.dumps(header, separators=(",", ":"))
    return save(tensors, metadata={"format": FORMAT, "qvec_jax": text})


def crc32(a: np.ndarray) -> str:
    """CRC-32 of an array's bytes (C order), as 8 hex digits."""
    return f"{zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)):08x}"


def _packed_shape(shape, bits: int) -> tuple[int, int]:
    return (bits, math.ceil(math.prod(shape) / 8))


def _encode(obj) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def _decode(text: str) -> dict:
    try:
        out = json.loads(zlib.decompress(base64.b64decode(text, validate=True)))
    except (ValueError, zlib.error) as e:  # binascii.Error and JSONDecodeError are ValueErrors
        raise ValueError(f"unreadable index ({e})") from None
    if not isinstance(out, dict) or not isinstance(out.get("index"), list):
        raise ValueError("unreadable index (not an object with an 'index' list)")
    return out


def load_packed(path: str | os.PathLike) -> tuple[PyTree, dict]:
    """``(params, header)`` of a file written by :func:`export_packed`.

    ``params`` is the dequantized tree (nested dicts of jax arrays), bit-identical to
    ``ptq`` (or to ``gptq``) of the exported params; ``header`` is the JSON object of the
    layout above with ``packed`` decoded: ``header["meta"]`` is the caller's dict and
    ``header["index"]`` the leaf list. Each tensor is checked against its CRC-32 as it is
    read; a mismatch raises :class:`ExportError` naming the file and the tensor.
    """
    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise ExportError(f"{path}: not a {FORMAT} file; write it with export_packed")
            header = json.loads(md["qvec_jax"])
            _check_version(path, header)
            arrays = {k: _verified(path, k, f.get_tensor(k), header) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{path}: not a readable {FORMAT} file ({first})") from None
    gone = sorted(set(header["crc32"]) - set(arrays))
    if gone:
        raise ExportError(f"{path}: damaged {FORMAT} file (no tensor {gone[0]!r}, which its "
                          "checksums list); re-export it")  # fmt: skip
    try:
        header = {k: v for k, v in header.items() if k != "packed"} | _decode(header["packed"])
        return unflatten(_leaves(arrays, header)), header
    except (KeyError, TypeError, ValueError) as e:
        why = e.args[0] if e.args else ""
        raise ExportError(f"{path}: damaged {FORMAT} file ({type(e).__name__}: {why})") from None


def _check_version(path: str, header) -> None:
    v = header.get("version") if isinstance(header, dict) else None
    if v != VERSION:
        why = " (written before per-tensor checksums, so it cannot be verified)" if v == 2 else ""
        raise ExportError(f"{path}: {FORMAT} version {v} is not {VERSION}{why}; re-export it "
                          "with this qvec_jax (qvec export)")  # fmt: skip
    if not isinstance(header.get("crc32"), dict):
        raise ExportError(f"{path}: damaged {FORMAT} file (its header has no crc32 table); "
                          "re-export it")  # fmt: skip


def _verified(path: str, name: str, a: np.ndarray, header: dict) -> np.ndarray:
    """``a`` (tensor ``name``, just read) if its CRC-32 is the one the header stores."""
    want = header["crc32"].get(name)
    if want is None:
        raise ExportError(f"{path}: damaged {FORMAT} file (tensor {name!r} has no checksum "
                          "in its header); re-export it")  # fmt: skip
    got = crc32(a)
    if got != want:
        raise ExportError(f"{path}: tensor {name!r} does not match its checksum (crc32 {got}, "
                          f"stored {want}); the file is damaged: re-export it")  # fmt: skip
    return a


def _leaves(arrays: dict, header: dict) -> dict:
    """``{path: fp leaf}``: the index walked in order over the concatenated tensors, each
    quantized leaf dequantized, every other leaf reshaped as is."""
    bits = header["bits"]
    at = {k: 0 for k in arrays}  # the next unread element of each tensor
    wants = {"codes": np.dtype(np.uint8), "scales": np.dtype(np.float32)}
    for name, a in arrays.items():
        want = wants.get(name) or (name[len("rest.") :] if name.startswith("rest.") else None)
        if want is None:
            raise ValueError(f"unknown tensor {name!r}")
        if a.dtype.name != np.dtype(want).name:
            raise ValueError(f"tensor {name!r} is {a.dtype}, not what its name says ({want})")

    def take(name: str, n: int, shape) -> np.ndarray:
        if name not in arrays:
            raise ValueError(f"no tensor {name!r}, which the index needs")
        a, i = arrays[name], at[name]
        if i + n > a.size:
            raise ValueError(f"tensor {name!r} ends before the index does")
        at[name] = i + n
        return a[i : i + n].reshape(shape)

    flat = {}
    for p, shape, dtype, scale_shape in header["index"]:
        if p in flat:
            raise ValueError(f"leaf {p!r} is twice in the index")
        if scale_shape is None:
            flat[p] = jnp.asarray(take(f"rest.{dtype}", math.prod(shape), shape))
            continue
        ps = _packed_shape(shape, bits)
        packed = take("codes", math.prod(ps), ps)
        scale = take("scales", math.prod(scale_shape), scale_shape)
        qt = QTensor(packed, scale, tuple(shape), dtype, bits)
        flat[p] = dequantize(jax.tree.map(jnp.asarray, qt))
    extra = [k for k, i in at.items() if i != arrays[k].size]
    if extra:
        raise ValueError(f"tensor {extra[0]!r} holds more than the index describes")
    return flat


def flatten_q(tree: PyTree) -> dict:
    """``paths.flatten`` that keeps ``QTensor`` leaves whole."""
    is_q = lambda x: isinstance(x, QTensor)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0]
    return {path_str(kp): x for kp, x in leaves}


def _quantize_any(params, spec):
    """``packing.quantize``, or zeros in its shapes for ``ShapeDtypeStruct`` leaves."""
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        qt = jax.eval_shape(lambda t: quantize(t, spec), params)
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), qt)
    return quantize(params, spec)


def _np(x, where: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiub" or a.dtype.itemsize == 0:
        raise ExportError(f"{where}: cannot store dtype {a.dtype} in safetensors")
    return np.ascontiguousarray(a)


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def packed_size(params: PyTree, spec: QuantSpec | int | None = None, **kw) -> int:
    """Bytes of the file :func:`export_packed` would write; needs only the shapes
    (``params`` may be a ``jax.eval_shape`` tree). ``kw``: bits/granularity/rule/meta."""
    meta = kw.pop("meta", None)
    spec = as_spec(spec, **kw)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return len(packed_bytes(abstract, spec, meta))
