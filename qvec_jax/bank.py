"""A QV bank: one file per backbone holding the merged QV of all its donors (layer 3).

A donor is a task's pair of fine-tunes of one backbone: QAT and FP (:class:`DonorPair`).
:func:`build_bank` takes each donor's ``QV = QAT - FP`` (``trees.quantization_vector``,
head excluded, float32) and merges them (``merge.merge_qvs``, :data:`DEFAULT_METHODS`);
one donor's bank is its QV. A receiver of that backbone is then quantized zero-shot as
``PTQ(FP_R + lam * bank.qv)`` without any donor checkpoint at hand.

File (format ``qvec_jax.qv-bank``, version 1): a safetensors file with one float32
tensor per QV leaf, named by its "/"-joined leaf path, and the header's
``__metadata__`` = ``{"format": FORMAT, "qvec_jax": <the provenance as JSON>}``. The
provenance says what the bank is and where it came from: ``backbone_id``, ``variant``,
``image_size``, the QAT runs' quant spec (``bits``, ``granularity``, ``rule``), each
donor's task, QAT and FP checkpoint paths and content fingerprints (``qat_crc``,
``fp_crc``: ``checkpoints.backbone_id`` of its params, the hash of every leaf the QV is
computed from), the merge recipe (``MergeSpec.to_dict()`` plus ``n_donors``; method
``single`` for one donor), the default ``lam`` (1 = zero-shot), the donors' ``pretext``
task when their config names it, the ``qvec_jax`` version, a CRC-32 of every tensor
(``crc32``, ``export.crc32``) and ``checksum``: the sha256 of the canonical JSON of the
provenance without ``checksum``, then of each tensor's path, shape and float32 bytes in
sorted path order. :func:`load_bank` verifies both: a damaged tensor is named by its
CRC-32, and an edited provenance (a changed ``lam``, a renamed donor) fails the checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from .checkpoints import backbone_id as fingerprint
from .checkpoints import read_meta
from .export import crc32
from .files import atomic_write_bytes
from .merge import MergeSpec, merge_qvs
from .paths import check_lam, flatten, unflatten
from .quant import VIT_RULE
from .trees import quantization_vector

FORMAT = "qvec_jax.qv-bank"
VERSION = 1
#: The merge method per QAT bit width, chosen on the study's dev half (docs/results.md,
#: "qvec quantize"); another width takes the nearest measured one's.
DEFAULT_METHODS = {2: "ties", 3: "mean"}
#: Every provenance key a bank file must hold.
KEYS = ("format", "version", "backbone_id", "variant", "image_size", "bits", "granularity",
        "rule", "donors", "merge", "lam", "pretext", "qvec_jax", "crc32", "checksum")  # fmt: skip
_REBUILD = "rebuild it with `qvec qv-bank build`"


class BankError(ValueError):
    """A bank that cannot be built, a file that is not an intact bank, or a receiver that
    does not fit the bank; the one-line message names the file or donor and what to do."""


@dataclasses.dataclass(frozen=True, eq=False)
class DonorPair:
    """One donor: its QAT and FP fine-tunes of one task, each ``(params, meta)`` as
    ``checkpoints.restore_params`` returns, and the paths they were read from (compared by
    identity: its fields hold arrays)."""

    qat: tuple[dict, dict]
    fp: tuple[dict, dict]
    qat_path: str
    fp_path: str

    @property
    def task(self) -> str | None:
        return self.qat[1].get("task") or self.fp[1].get("task")


@dataclasses.dataclass(frozen=True, eq=False)
class Bank:
    """A merged QV (``qv``: nested dict of float32 numpy arrays, the head excluded) and its
    ``provenance`` (JSON-able, keys :data:`KEYS`). Compare banks by ``checksum``."""

    qv: dict
    provenance: dict

    bits = property(lambda self: int(self.provenance["bits"]), doc="QAT bit width")
    granularity = property(lambda self: str(self.provenance["granularity"]))
    backbone_id = property(lambda self: self.provenance.get("backbone_id"))
    lam = property(lambda self: float(self.provenance["lam"]), doc="default lambda")
    donors = property(lambda self: [d["task"] for d in self.provenance["donors"]])
    checksum = property(lambda self: str(self.provenance["checksum"]))
    pretext = property(lambda self: self.provenance.get("pretext"))
    method = property(lambda self: str(self.provenance["merge"]["method"]))

    def check_receiver(self, meta: dict, params=None, where: str = "receiver") -> None:
        """Raise BankError (one line naming `where` and the mismatch, saying what to do) when
        the receiver checkpoint's meta/params do not fit: a different backbone_id (when both
        known), a different variant or image_size, or a QV leaf path/shape missing in params."""
        meta = meta or {}
        if meta.get("kind") == "qv":
            raise BankError(f"{where} is a quantization vector, not a model; pass the "
                            "receiver's FP checkpoint")  # fmt: skip
        for key in ("backbone_id", "variant", "image_size"):
            mine, theirs = self.provenance.get(key), meta.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                raise BankError(
                    f"{where} has {key} {theirs!r} but the QV bank's donors have {mine!r}: a "
                    "QV only transfers within one backbone; use a bank built from fine-tunes "
                    "of the receiver's backbone (qvec qv-bank build)"
                )
        if params is None:
            return
        have = flatten(params)
        for path, v in flatten(self.qv).items():
            shape = tuple(np.shape(have[path])) if path in have else None
            if shape != v.shape:
                why = f"no leaf {path}" if shape is None else f"leaf {path} of shape {shape}"
                raise BankError(
                    f"{where} has {why}, where the QV bank holds one of shape {v.shape}: it is "
                    "not a model of the bank's backbone; use a bank built for its backbone"
                )


# ----------------------------------------------------------------------------- build


def build_bank(
    pairs: list[DonorPair], *, method: str | MergeSpec | None = None, lam: float = 1.0
) -> Bank:
    """The bank of ``pairs``: each donor's QV, merged by ``method`` (a name or a
    ``MergeSpec``; None: :data:`DEFAULT_METHODS` of the donors' bits) when there are two or
    more, with its provenance (module docstring).

    Refused (BankError naming the donor paths): no pair; a pair whose QAT/FP meta says
    another mode, or whose two tasks differ; donors of different backbones, quant specs,
    variants or image sizes; a checkpoint given twice; an all-zero QV."""
    pairs = list(pairs)
    if not pairs:
        raise BankError("no donors: give at least one (QAT, FP) pair of fine-tunes of one task")
    for pair in pairs:
        _check_pair(pair)
    model = _shared_model(pairs)
    if method is None:
        bits = min(DEFAULT_METHODS, key=lambda b: (abs(b - model["bits"]), -b))
        method = DEFAULT_METHODS[bits]
    try:
        spec = method if isinstance(method, MergeSpec) else MergeSpec(method)
        lam = check_lam(lam)
    except (TypeError, ValueError) as e:
        raise BankError(str(e)) from None
    prints = _fingerprints(pairs)
    qvs = [_qv(pair) for pair in pairs]
    if len(qvs) == 1:
        merged, recipe = qvs[0], {"method": "single"}
    else:
        try:
            merged, recipe = merge_qvs(qvs, spec), spec.to_dict()
        except ValueError as e:
            names = ", ".join(str(p.qat_path) for p in pairs)
            raise BankError(f"merging the QVs of {names}: {e}") from None
    donors = [
        {"task": p.task, "qat": os.path.abspath(p.qat_path), "fp": os.path.abspath(p.fp_path),
         "qat_crc": q, "fp_crc": f}
        for p, (q, f) in zip(pairs, prints)
    ]  # fmt: skip
    provenance = {
        "format": FORMAT, "version": VERSION, **model,
        "rule": [[rx.pattern, list(v)] for rx, v in VIT_RULE.patterns],
        "donors": donors, "merge": {**recipe, "n_donors": len(pairs)}, "lam": lam,
        "pretext": _pretext([m for p in pairs for m in (p.qat[1], p.fp[1])]),
        "qvec_jax": _version(),
    }  # fmt: skip
    flat = {p: np.asarray(v, dtype=np.float32) for p, v in flatten(merged).items()}
    return _seal(flat, provenance)


def _check_pair(pair: DonorPair) -> None:
    """One donor's two checkpoints: models (not QVs), of the modes their slots say, of
    one task."""
    for (_, meta), path, mode in ((pair.qat, pair.qat_path, "qat"), (pair.fp, pair.fp_path, "fp")):
        if meta.get("kind") == "qv":
            raise BankError(f"donor {path} is a quantization vector; pass the donor's QAT and "
                            "FP fine-tunes, from which the bank takes their QV")  # fmt: skip
        if meta.get("mode") not in (None, mode):
            raise BankError(
                f"donor {path}: its meta says mode={meta['mode']!r}, but it is given as the "
                f"{mode.upper()} fine-tune; pass each donor's (QAT, FP) in that order"
            )
    tq, tf = pair.qat[1].get("task"), pair.fp[1].get("task")
    if tq and tf and tq != tf:
        raise BankError(f"donor {pair.qat_path} (task {tq!r}) and {pair.fp_path} (task {tf!r}) "
                        "are runs of different tasks; pair each task's QAT and FP")  # fmt: skip


def _shared_model(pairs: list[DonorPair]) -> dict:
    """``backbone_id``, ``variant``, ``image_size`` (over every checkpoint, None where no
    meta says) and ``bits``, ``granularity`` (the QAT runs'), refused when donors differ."""
    every = [(p.qat_path, p.qat[1]) for p in pairs] + [(p.fp_path, p.fp[1]) for p in pairs]
    out = {}
    for key, what in (("backbone_id", "pretrained backbones"), ("variant", "model variants"),
                      ("image_size", "image sizes")):  # fmt: skip
        out[key] = _agree(every, lambda m, k=key: m.get(k), what)
    qat = [(p.qat_path, p.qat[1]) for p in pairs]
    for path, meta in qat:
        if meta.get("bits") is None or meta.get("granularity") is None:
            raise BankError(f"donor {path}: its meta names no quant spec (bits, granularity); "
                            "pass a QAT fine-tune of `qvec finetune --mode qat`")  # fmt: skip
    spec = _agree(qat, lambda m: (m["bits"], m["granularity"]), "quant specs", _spec_text)
    return out | {"bits": int(spec[0]), "granularity": str(spec[1])}


def _spec_text(spec) -> str:
    return f"{spec[0]}-bit per-{spec[1]}"


def _agree(items, get, what: str, show=repr):
    """The one value ``get(meta)`` of every item that has one (None if none has)."""
    first = None
    for path, meta in items:
        value = get(meta)
        if value is None:
            continue
        if first is None:
            first = (path, value)
        elif value != first[1]:
            raise BankError(
                f"donors {first[0]} ({show(first[1])}) and {path} ({show(value)}) have "
                f"different {what}; a QV bank holds donors of one backbone and quant spec: "
                "build one bank per backbone and quant spec"
            )
    return None if first is None else first[1]


def _fingerprints(pairs: list[DonorPair]) -> list[tuple[str, str]]:
    """``(qat_crc, fp_crc)`` of each pair; a checkpoint given twice (the same content, also
    under another path) is refused: a merge would count it twice."""
    seen: dict[str, str] = {}
    out = []
    for pair in pairs:
        both = []
        for (params, _), path in ((pair.qat, pair.qat_path), (pair.fp, pair.fp_path)):
            fp = fingerprint(params)
            if fp in seen:
                raise BankError(f"donor {path} is the same checkpoint as {seen[fp]} (fingerprint "
                                f"{fp}); pass each fine-tune once")  # fmt: skip
            seen[fp] = path
            both.append(fp)
        out.append(tuple(both))
    return out


def _qv(pair: DonorPair) -> dict:
    try:
        return quantization_vector(pair.qat[0], pair.fp[0], require_nonzero=True)
    except ValueError as e:
        raise BankError(f"donor {pair.qat_path} - {pair.fp_path}: {e}") from None


def _pretext(metas: list[dict]) -> str | None:
    """The task of the checkpoint that a donor's config ``init.path`` names (as
    ``qvec patch --proxy pretext`` reads it), or None if no meta says or it is gone."""
    for meta in metas:
        init = (meta.get("config") or {}).get("init") or {}
        if init.get("kind") != "pretrained" or not init.get("path"):
            continue
        try:
            task = read_meta(init["path"]).get("task")
        except (OSError, ValueError):
            continue
        if task:
            return task
    return None


def _version() -> str:
    try:
        return importlib.metadata.version("qvec-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- seal, verify


def _seal(flat: dict, provenance: dict) -> Bank:
    """The bank of ``flat`` with the tensors' CRC-32s and the checksum in its provenance."""
    provenance = {**provenance, "crc32": {p: crc32(flat[p]) for p in sorted(flat)}}
    provenance["checksum"] = _checksum(provenance, flat)
    return Bank(unflatten(flat), provenance)


def _checksum(provenance: dict, flat: dict) -> str:
    """sha256 of the canonical JSON of ``provenance`` without ``checksum``, then each
    tensor's path, shape and little-endian float32 bytes in sorted path order."""
    rest = {k: v for k, v in provenance.items() if k != "checksum"}
    h = hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    for p in sorted(flat):
        a = np.ascontiguousarray(flat[p], dtype="<f4")
        h.update(f"{p}:{list(a.shape)};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_bank(bank: Bank, path: str | os.PathLike) -> int:
    """Write ``bank`` to ``path`` atomically (old file or new, never a mix); return its size
    in bytes."""
    flat = {p: np.ascontiguousarray(v, dtype=np.float32) for p, v in flatten(bank.qv).items()}
    text = json.dumps(bank.provenance, separators=(",", ":"), allow_nan=False)
    data = save(flat, metadata={"format": FORMAT, "qvec_jax": text})
    atomic_write_bytes(path, data)
    return len(data)


def load_bank(path: str | os.PathLike) -> Bank:
    """The bank in ``path``, verified: its format and version, every tensor against its
    CRC-32 and the whole against the checksum; BankError naming the file otherwise."""
    path = os.fspath(path)
    if not Path(path).is_file():
        what = "a directory" if Path(path).is_dir() else "no such file"
        raise BankError(f"{path}: {what}, not a QV bank file; build one with `qvec qv-bank build`")
    try:
        with safe_open(path, framework="numpy") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise BankError(f"{path}: not a QV bank (format {md.get('format')!r}, not "
                                f"{FORMAT!r}); build one with `qvec qv-bank build`")  # fmt: skip
            provenance = _provenance(path, json.loads(md["qvec_jax"]))
            flat = {k: _verified(path, k, f.get_tensor(k), provenance) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BankError(f"{path}: not a readable {FORMAT} file ({first})") from None
    gone = sorted(set(provenance["crc32"]) - set(flat))
    if gone:
        raise BankError(f"{path}: damaged QV bank (no tensor {gone[0]!r}, which its provenance "
                        f"lists); {_REBUILD}")  # fmt: skip
    if _checksum(provenance, flat) != provenance["checksum"]:
        raise BankError(f"{path}: the checksum does not match: the file is damaged or was "
                        f"edited: {_REBUILD}")  # fmt: skip
    return Bank(unflatten(flat), provenance)


def _provenance(path: str, prov) -> dict:
    """``prov`` if it is a provenance of this version with every key; else BankError."""
    version = prov.get("version") if isinstance(prov, dict) else None
    if version != VERSION:
        raise BankError(f"{path}: {FORMAT} version {version!r} is not {VERSION}, which this "
                        f"qvec_jax reads; {_REBUILD}")  # fmt: skip
    missing = [k for k in KEYS if k not in prov]
    if missing or not isinstance(prov["crc32"], dict):
        lacks = repr(missing[0]) if missing else "a crc32 table"
        raise BankError(f"{path}: damaged QV bank (its provenance lacks {lacks}); {_REBUILD}")
    return prov


def _verified(path: str, name: str, a: np.ndarray, provenance: dict) -> np.ndarray:
    """``a`` (tensor ``name``, just read) if it is float32 and its CRC-32 is the stored one."""
    want = provenance["crc32"].get(name)
    if want is None or a.dtype != np.float32:
        why = "is not in its provenance" if want is None else f"is {a.dtype}, not float32"
        raise BankError(f"{path}: damaged QV bank (tensor {name!r} {why}); {_REBUILD}")
    got = crc32(a)
    if got != want:
        raise BankError(f"{path}: QV leaf {name} does not match its checksum (crc32 {got}, "
                        f"stored {want}): the file is damaged: {_REBUILD}")  # fmt: skip
    return a


# ----------------------------------------------------------------------------- describe


def describe(bank: Bank) -> str:
    """What ``bank`` holds and where it came from, in lines (what `qvec qv-bank show`
    prints)."""
    p = bank.provenance
    flat = flatten(bank.qv)
    n = sum(v.size for v in flat.values())
    norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in flat.values()))
    recipe = {k: v for k, v in p["merge"].items() if k not in ("method", "n_donors")}
    how = ", ".join(f"{k} {v}" for k, v in recipe.items() if v is not None)
    lines = [
        f"QV bank ({FORMAT} v{p['version']}, written by qvec_jax {p['qvec_jax']})",
        f"backbone    {p['backbone_id'] or 'unknown'} (variant {p['variant']}, "
        f"{p['image_size']} px)",
        f"quant spec  {_spec_text((p['bits'], p['granularity']))} QAT, of the leaves (channel "
        "axes): " + ", ".join(f"{pat} {tuple(axes)}" for pat, axes in p["rule"]),
        f"merge       {p['merge']['method']}{f' ({how})' if how else ''} of "
        f"{p['merge']['n_donors']} donor{'s' if p['merge']['n_donors'] != 1 else ''}",
        f"lambda      {p['lam']:g}{' (zero-shot)' if p['lam'] == 1 else ''}",
        f"pretext     {p['pretext'] or 'unknown'}",
        f"QV          {len(flat)} leaves, {n:,} values, global L2 norm {norm:.4g}",
        f"checksum    sha256 {p['checksum']}",
        "donors:",
    ]
    for i, d in enumerate(p["donors"]):
        lines.append(f"  {i + 1}. {d['task'] or '(no task)'}: qat {d['qat']} ({d['qat_crc']}), "
                     f"fp {d['fp']} ({d['fp_crc']})")  # fmt: skip
    return "\n".join(lines)
