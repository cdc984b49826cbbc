"""A quantized model one can ship: bit-packed codes + scales in one safetensors file.

Layout (format ``qvec_jax.packed``, version 1). Tensor names are the "/"-joined leaf
paths of the param tree (``paths.path_str``):

- each quantized leaf ``P`` (the rule selects it) is two tensors:
  ``P:packed`` uint8 ``[bits, ceil(n / 8)]``, the codes ``q - qmin`` as ``bits`` bit-planes
  (``packing.pack``), and ``P:scale`` float32, the scales in the leaf's rank with size 1
  on the reduced axes (one per output channel, or one for the tensor);
- every other leaf ``P`` is stored as is, under ``P``;
- the header's ``__metadata__`` holds ``format`` = ``qvec_jax.packed`` and ``qvec_jax``,
  a JSON object: ``version``, ``bits``, ``granularity``, ``rule`` (the rule's
  ``[pattern, channel axes]`` pairs), ``leaves`` (``{P: [shape, dtype]}`` of each
  quantized leaf) and ``meta`` (the caller's dict, e.g. the model variant).

So ``fq = (unpack(P:packed) + qmin) * P:scale`` reshaped to the leaf's shape, exactly
``packing.dequantize``. The tensor bytes are exactly ``packing.size_report``'s
``total_bytes``; the JSON header adds a few hundred bytes per leaf (0.1% for ViT-B/16).
"""

from __future__ import annotations

import json
import os

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
VERSION = 1


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
    tensors, leaves = {}, {}
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
            tensors[p + ":packed"], tensors[p + ":scale"] = _np(x.packed, p), _np(x.scale, p)
            leaves[p] = [list(x.shape), x.dtype]
        else:
            tensors[p] = _np(x, p)
    header = dict(
        version=VERSION,
        bits=spec.bits,
        granularity=spec.granularity,
        rule=[[rx.pattern, _jsonable(v)] for rx, v in spec.rule.patterns],
        leaves=leaves,
        meta=meta or {},
    )
    try:
        text = json.dumps(header)
    except TypeError as e:
        raise ExportError(f"meta: must be JSON-serializable ({e})") from None
    return save(tensors, metadata={"format": FORMAT, "qvec_jax": text})


def load_packed(path: str | os.PathLike) -> tuple[PyTree, dict]:
    """``(params, header)`` of a file written by :func:`export_packed`.

    ``params`` is the dequantized tree (nested dicts of jax arrays), bit-identical to
    ``ptq`` (or to ``gptq``) of the exported params; ``header`` is the JSON object of the
    layout above (``header["meta"]`` is the caller's dict).
    """
    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise ExportError(f"{path}: not a {FORMAT} file; write it with export_packed")
            header = json.loads(md["qvec_jax"])
            if header.get("version") != VERSION:
                raise ExportError(f"{path}: {FORMAT} version {header.get('version')} is not "
                                  f"{VERSION}; re-export it with this qvec_jax")  # fmt: skip
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{path}: not a readable {FORMAT} file ({first})") from None
    try:
        return unflatten(_leaves(arrays, header)), header
    except (KeyError, TypeError, ValueError) as e:
        why = e.args[0] if e.args else ""
        raise ExportError(f"{path}: damaged {FORMAT} file ({type(e).__name__}: {why})") from None


def _leaves(arrays: dict, header: dict) -> dict:
    """``{path: fp leaf}``: each quantized leaf dequantized, every other array as is."""
    quantized = header["leaves"]
    flat = {}
    for k, a in arrays.items():
        p, _, part = k.rpartition(":")
        if p in quantized and part in ("packed", "scale"):
            if part == "packed":
                shape, dtype = quantized[p]
                qt = QTensor(a, arrays[p + ":scale"], tuple(shape), dtype, header["bits"])
                flat[p] = dequantize(jax.tree.map(jnp.asarray, qt))
        else:
            flat[k] = jnp.asarray(a)
    missing = set(quantized) - set(flat)
    if missing:
        raise KeyError(f"no packed codes for {sorted(missing)[0]}")
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
