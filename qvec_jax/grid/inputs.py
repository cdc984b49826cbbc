"""The grid's inputs: the fine-tuned checkpoints under ``RUNS`` and whether they belong
together.

``qvec finetune --workdir RUNS/<task>/<mode>`` leaves its final params at
``RUNS/<task>/<mode>/params``. A grid over some tasks reads the FP and QAT checkpoint of
each; every checkpoint gets a fingerprint (its meta and write time) so that a cell
computed from an older checkpoint is recomputed. A quantization vector only transfers
between fine-tunes of one pretrained backbone with one recipe, so those are checked here,
before anything is computed, with errors that name the checkpoints.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvec_jax import checkpoints, trees
from qvec_jax import config as qconfig

__all__ = [
    "MODES",
    "Ckpt",
    "GridError",
    "NAME_MAX",
    "MissingCheckpoints",
    "backbone_signature",
    "check_compatible",
    "check_same_backbone",
    "check_task_names",
    "checkpoint_path",
    "find_checkpoints",
]

MODES = ("fp", "qat")
# Recipe keys allowed to differ between tasks (the paper's epochs are per task).
_PER_TASK_KEYS = {"task", "mode", "epochs", "total_steps"}


class GridError(ValueError):
    """A grid that cannot be run as asked; the message says what to do."""


class MissingCheckpoints(GridError):
    """Some requested checkpoints do not exist. ``.missing`` lists them, ``.cells`` holds
    every cell computed from the available ones."""

    def __init__(self, missing: list[dict], cells: list[dict]):
        self.missing, self.cells = missing, cells
        lines = [f"  {m['task']}/{m['mode']}: {m['path']} ({m['reason']})" for m in missing]
        super().__init__(
            f"{len(missing)} checkpoint(s) missing; their cells were not computed:\n"
            + "\n".join(lines)
            + "\nFine-tune them (qvec finetune --workdir RUNS/<task>/<mode>) and rerun (only "
            "the new cells are computed), or pass --allow-missing to accept a partial grid."
        )


#: The longest file name, in bytes, that common file systems take (ext4, XFS, Btrfs, APFS).
NAME_MAX = 255


def check_task_names(tasks: Sequence[str]) -> None:
    """Refuse a task name that cannot be one directory name (``RUNS/<task>/<mode>``):
    empty, ``.`` or ``..``, holding ``/`` or NUL, or longer than :data:`NAME_MAX` bytes.
    Checked before anything is created, so a refused grid leaves no workdir behind."""
    for t in tasks:
        if not isinstance(t, str):
            raise GridError(f"task {t!r}: task names are strings")
        size = len(os.fsencode(t))
        why = (
            f"is {size} bytes long, over the file-name limit of {NAME_MAX} bytes"
            if size > NAME_MAX
            else "is not a single directory name"
            if t in ("", ".", "..") or "/" in t or "\0" in t
            else None
        )
        if why:
            raise GridError(
                f"task {t!r} {why}; a task name becomes a directory (RUNS/<task>/<mode>). "
                "Give the task a shorter name: register its view under one "
                "(qvec_jax.data.register_task(qvec_jax.data.derive(BASE, NAME, ...)))"
            )


def checkpoint_path(runs_dir: str | os.PathLike, task: str, mode: str) -> Path:
    """Where the grid expects ``qvec finetune``'s final params: ``RUNS/<task>/<mode>/params``
    (:class:`GridError` for a task name that cannot be a directory name)."""
    check_task_names([task])
    return Path(runs_dir) / task / mode / "params"


@dataclass
class Ckpt:
    task: str
    mode: str
    path: Path
    meta: dict
    fingerprint: str

    @property
    def name(self) -> str:
        return f"{self.task}/{self.mode}"


def _fingerprint(path: Path) -> str:
    """Identity of a written checkpoint: its meta and the time it was written."""
    meta_file = checkpoints.meta_file(path)
    h = hashlib.sha256(meta_file.read_bytes())
    h.update(str(meta_file.stat().st_mtime_ns).encode())
    return h.hexdigest()[:16]


def find_checkpoints(
    tasks: Sequence[str], runs_dir: str | os.PathLike
) -> tuple[dict[tuple[str, str], Ckpt], list[dict]]:
    """``({(task, mode): Ckpt}, missing)`` for every task and mode (meta only, no params)."""
    found, missing = {}, []
    for t in tasks:
        for mode in MODES:
            path = checkpoint_path(runs_dir, t, mode)
            if not path.is_dir():
                reason = (
                    "fine-tune not finished: no params/ yet"
                    if path.parent.is_dir()
                    else "not found"
                )
            elif not checkpoints.is_checkpoint(path):
                reason = f"no {checkpoints.META_FILE}: not a qvec checkpoint, or a partial write"
            else:
                meta = checkpoints.read_meta(path)
                found[(t, mode)] = Ckpt(t, mode, path.resolve(), meta, _fingerprint(path))
                continue
            missing.append({"task": t, "mode": mode, "path": str(path), "reason": reason})
    return found, missing


def _recipe(meta: dict) -> dict:
    cfg = dict(meta.get("config") or {})
    skip = (*_PER_TASK_KEYS, *qconfig.NOT_TRAINING)
    return {k: v for k, v in cfg.items() if k not in skip}


def check_compatible(ckpts: dict[tuple[str, str], Ckpt]) -> list[str]:
    """Refuse checkpoints that do not share one pretrained backbone; return warnings.

    Errors: different ``backbone_id``, ``variant`` or ``image_size`` in the metas; a QAT
    run whose recipe differs from its FP sibling's in more than ``mode``. Warnings:
    recipes that differ between tasks (beyond task, mode and length).
    """
    if not ckpts:
        return []
    for key in ("backbone_id", "variant", "image_size"):
        groups: dict[str, list[str]] = {}
        for c in ckpts.values():
            groups.setdefault(str(c.meta.get(key)), []).append(c.name)
        if len(groups) > 1:
            detail = "; ".join(f"{key}={v}: {', '.join(n)}" for v, n in groups.items())
            raise GridError(
                f"the checkpoints do not share one pretrained backbone ({detail}). A "
                "quantization vector only transfers between fine-tunes of the same backbone; "
                "fine-tune every task from the same init, or run separate grids."
            )
    for (t, mode), qat in ckpts.items():
        fp = ckpts.get((t, "fp"))
        if mode != "qat" or fp is None:
            continue
        diff = sorted(_diff(_recipe(fp.meta), _recipe(qat.meta)))
        if diff:
            raise GridError(
                f"{t}: FP ({fp.path}) and QAT ({qat.path}) were fine-tuned with different "
                f"recipes (config differs in {', '.join(diff)}); QV = QAT - FP is only "
                "meaningful when the two runs differ in mode alone. Rerun one of them."
            )
    warnings = []
    per_task = {}  # one checkpoint per task (FP and QAT recipes were checked equal above)
    for c in ckpts.values():
        per_task.setdefault(c.task, c)
    ref, *others = per_task.values()
    for c in others:
        diff = sorted(_diff(_recipe(ref.meta), _recipe(c.meta)))
        if diff:
            warnings.append(
                f"task {c.task} was fine-tuned with another recipe than task {ref.task} "
                f"(config differs in {', '.join(diff)})"
            )
    return warnings


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(prefix + k)
    return out


def backbone_signature(params) -> dict[str, tuple]:
    """``{path: (shape, dtype)}`` of every leaf a QV covers (the head excluded)."""
    return {
        p: (tuple(np.shape(x)), str(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype))
        for p, x in trees.flatten(params).items()
        if trees.HEAD_RULE.match(p) is None
    }


def check_same_backbone(sig: dict, ref_sig: dict, name: str, ref_name: str) -> None:
    """Raise :class:`GridError` naming both checkpoints and the first differing path."""
    for p in list(ref_sig) + [p for p in sig if p not in ref_sig]:
        a, b = ref_sig.get(p), sig.get(p)
        if a != b:
            what = lambda s: "absent" if s is None else f"shape {s[0]} {s[1]}"  # noqa: E731
            raise GridError(
                f"{name} and {ref_name} have different backbones at {p}: {what(b)} in {name} "
                f"vs {what(a)} in {ref_name}. Fine-tune every task from the same pretrained "
                "backbone (same variant and image size)."
            )
