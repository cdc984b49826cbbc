"""The donor x receiver x lambda transfer grid (METHOD.md, "Transfer protocol").

For tasks fine-tuned FP and QAT from one pretrained backbone, with checkpoints at
``RUNS/<task>/fp/params`` and ``RUNS/<task>/qat/params`` (``qvec finetune --workdir
RUNS/<task>/<mode>``), :func:`run_grid` evaluates on every receiver R's val and test
splits:

- ``fp``:      acc(FP_R)
- ``ptq_fp``:  acc(PTQ(FP_R))              the base every delta is taken against
- ``ptq_qat``: acc(PTQ(QAT_R))
- ``patch``:   acc(PTQ(FP_R + lam * QV_D)) for every donor D (R itself included: the
               self pair at lam=1 is the ceiling) and every lam, ``QV_D = QAT_D - FP_D``
               over the backbone (head excluded).

Each finished cell is appended to ``WORKDIR/cells.jsonl`` (flushed per cell). A rerun
skips cells already there (and recomputes any whose checkpoints changed since), so an
interrupted grid resumes and adding a task or a lambda computes only the new cells.
Missing checkpoints are listed in ``grid.json`` and never skipped silently:
:class:`MissingCheckpoints` is raised after the available cells are done, unless
``allow_missing``.

Efficiency: params are jit *arguments*. ``PTQ(FP_R + lam * QV_D)`` is built by one
jitted function of ``(fp, qv, lam)`` and evaluated by one jitted function of
``(params, batch)``, so the whole grid compiles once per receiver model shape (not
per cell); each patched, quantized tree lives on device only while it is evaluated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qvec_jax import quant, trees
from qvec_jax import report as rp

#: The paper's lambda grid (METHOD.md).
DEFAULT_LAMBDAS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.00, 1.05, 1.20, 1.35, 1.50)
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


def checkpoint_path(runs_dir: str | os.PathLike, task: str, mode: str) -> Path:
    """Where the grid expects ``qvec finetune``'s final params: ``RUNS/<task>/<mode>/params``."""
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
    meta_file = path / "qvec_meta.json"
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
            meta_file = path / "qvec_meta.json"
            if not path.is_dir():
                reason = (
                    "fine-tune not finished: no params/ yet"
                    if path.parent.is_dir()
                    else "not found"
                )
            elif not meta_file.is_file():
                reason = "no qvec_meta.json: not a qvec checkpoint, or a partial write"
            else:
                meta = json.loads(meta_file.read_text())
                found[(t, mode)] = Ckpt(t, mode, path.resolve(), meta, _fingerprint(path))
                continue
            missing.append({"task": t, "mode": mode, "path": str(path), "reason": reason})
    return found, missing


def _recipe(meta: dict) -> dict:
    cfg = dict(meta.get("config") or {})
    return {k: v for k, v in cfg.items() if k not in _PER_TASK_KEYS}


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


# ----------------------------------------------------------------------------- jitted parts


@functools.partial(jax.jit, static_argnames=("bits", "granularity"))
def patch_and_quantize(fp_params, qv, lam, *, bits: int, granularity: str):
    """``PTQ(FP_R + lam * QV_D)``; params, QV and lam are arguments (one compile per shape)."""
    return quant.fake_quant_tree(trees.patch(fp_params, qv, lam), bits, granularity=granularity)


@functools.partial(jax.jit, static_argnames=("bits", "granularity"))
def ptq_jit(params, *, bits: int, granularity: str):
    """``PTQ(params)``: the same rule and numbers as ``quant.ptq``."""
    return quant.fake_quant_tree(params, bits, granularity=granularity)


@functools.partial(jax.jit, static_argnames=("model",))
def count_correct(params, images, labels, mask, *, model):
    logits = model.apply({"params": params}, images)
    return jnp.sum(((jnp.argmax(logits, axis=-1) == labels) & mask).astype(jnp.int32))


class _EvalSet:
    """The val or test split of one receiver, as sharded device batches.

    Batches are placed on device once and reused for every cell when they fit in
    ``cache_bytes``; otherwise they are streamed from the split for every evaluation.
    """

    def __init__(self, split, batch_size: int, mesh, cache_bytes: int):
        from qvec_jax import data as qdata

        self.split, self.batch_size, self.mesh = split, batch_size, mesh
        self.n = len(split)
        if self.n == 0:
            raise GridError(f"{split.task}/{split.split}: the split has no examples")
        item = np.dtype(np.float32).itemsize * int(np.prod(split.get(np.arange(1))[0].shape))
        self.cached = None
        if item * self.n <= cache_bytes:
            self.cached = [self._put(b) for b in qdata.eval_batches(split, batch_size)]

    def _put(self, batch):
        from qvec_jax import data as qdata

        images, labels, mask = batch
        return qdata.shard_batch((images, labels, np.asarray(mask, bool)), self.mesh)

    def batches(self) -> Iterator:
        from qvec_jax import data as qdata

        if self.cached is not None:
            yield from self.cached
        else:
            for b in qdata.eval_batches(self.split, self.batch_size):
                yield self._put(b)

    def accuracy(self, model, params) -> float:
        total = jnp.zeros((), jnp.int32)
        for x, y, m in self.batches():
            total = total + count_correct(params, x, y, m, model=model)
        return int(total) / self.n


# ----------------------------------------------------------------------------- the grid


@dataclass
class _Plan:
    """Which cells the available checkpoints allow, and which are still to compute."""

    expected: list[dict] = field(default_factory=list)
    todo: list[dict] = field(default_factory=list)


def _sources(kind: str, r: str, d: str | None, ck: dict) -> dict[str, str]:
    src = {"fp_R": ck[(r, "fp")].fingerprint}
    if kind == "ptq_qat":
        src["qat_R"] = ck[(r, "qat")].fingerprint
    if kind == "patch":
        src["fp_D"] = ck[(d, "fp")].fingerprint
        src["qat_D"] = ck[(d, "qat")].fingerprint
    return src


def plan_cells(tasks, lambdas, ckpts, done: dict[tuple, dict]) -> _Plan:
    """Every computable cell; those absent from ``done`` (or stale) go to ``todo``."""
    plan = _Plan()
    receivers = [t for t in tasks if (t, "fp") in ckpts]
    donors = [t for t in tasks if (t, "fp") in ckpts and (t, "qat") in ckpts]
    for r in receivers:
        kinds = ["fp", "ptq_fp"] + (["ptq_qat"] if (r, "qat") in ckpts else [])
        specs = [(k, None, None) for k in kinds]
        specs += [("patch", d, float(lam)) for d in donors for lam in lambdas]
        for kind, d, lam in specs:
            cell = {"kind": kind, "receiver": r, "donor": d, "lam": lam}
            cell["sources"] = _sources(kind, r, d, ckpts)
            plan.expected.append(cell)
            old = done.get(rp.cell_key(cell))
            if old is None or old.get("sources") != cell["sources"]:
                plan.todo.append(cell)
    return plan


def _load_grid_meta(workdir: Path, bits: int, granularity: str) -> dict:
    meta = rp.load_grid_meta(workdir)
    if meta and (meta.get("bits"), meta.get("granularity")) != (bits, granularity):
        raise GridError(
            f"{workdir} holds a grid at {meta.get('bits')}-bit {meta.get('granularity')}, not "
            f"{bits}-bit {granularity}; use another --workdir for another quantizer setting"
        )
    return meta


def repair_tail(path: Path) -> None:
    """Drop a torn last line (a run killed mid-append) so new records start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        rp._atomic_write_text(path, data[: data.rfind(b"\n") + 1].decode())


def _write_json(path: Path, obj) -> None:
    rp._atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def run_grid(
    tasks: Sequence[str],
    runs_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    bits: int,
    granularity: str = "channel",
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    batch_size: int = 256,
    allow_missing: bool = False,
    data_dir: str | None = None,
    progress: bool = True,
    device_cache_bytes: int = 1 << 30,
) -> list[dict]:
    """Compute every missing cell of the grid over ``tasks``; return all stored cells.

    ``runs_dir`` holds the fine-tunes (``RUNS/<task>/{fp,qat}/params``); results go to
    ``workdir`` (``cells.jsonl``, ``grid.json``); ``qvec_jax.report.write_report(workdir)``
    turns them into tables and plots. ``lambdas`` always gets 1.0 added (the zero-shot
    column and the ceiling need it). Raises :class:`MissingCheckpoints` after computing
    the available cells if a checkpoint is missing and not ``allow_missing``;
    :class:`GridError` if the checkpoints do not share one backbone.
    """
    from qvec_jax import checkpoints
    from qvec_jax import data as qdata
    from qvec_jax.evaluate import make_mesh, put

    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise GridError("no tasks given; pass at least one task name")
    bits = quant.check_bits(bits)
    quant.reduce_axes(1, granularity, None)  # validates granularity
    lambdas = sorted({round(float(lam), 6) for lam in lambdas} | {1.0})
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    old_meta = _load_grid_meta(workdir, bits, granularity)

    ckpts, missing = find_checkpoints(tasks, runs_dir)
    warnings = check_compatible(ckpts)
    backbone = next((c.meta.get("backbone_id") for c in ckpts.values()), None)
    if old_meta.get("backbone_id") not in (None, backbone) and backbone is not None:
        raise GridError(
            f"{workdir} holds a grid over backbone {old_meta['backbone_id']}, but these "
            f"checkpoints come from backbone {backbone}; use another --workdir"
        )
    done = {rp.cell_key(c): c for c in rp.load_cells(workdir)}
    plan = plan_cells(tasks, lambdas, ckpts, done)
    grid_meta = {
        "version": 1,
        "tasks": tasks,
        "lambdas": lambdas,
        "bits": bits,
        "granularity": granularity,
        "runs_dir": str(Path(runs_dir).resolve()),
        "backbone_id": backbone,
        "variant": next((c.meta.get("variant") for c in ckpts.values()), None),
        "checkpoints": {
            c.name: {"path": str(c.path), "fingerprint": c.fingerprint} for c in ckpts.values()
        },
        "missing": missing,
        "warnings": warnings,
        "expected_cells": len(tasks) * (3 + len(tasks) * len(lambdas)),
    }
    is_main = jax.process_index() == 0
    if is_main:
        _write_json(workdir / rp.GRID_META_FILE, grid_meta)
    for w in warnings:
        print(f"warning: {w}")

    if plan.todo:
        if is_main:
            repair_tail(workdir / rp.CELLS_FILE)
        _compute(
            plan.todo,
            ckpts,
            workdir,
            checkpoints=checkpoints,
            qdata=qdata,
            make_mesh=make_mesh,
            put=put,
            bits=bits,
            granularity=granularity,
            batch_size=batch_size,
            data_dir=data_dir,
            progress=progress,
            cache_bytes=device_cache_bytes,
            is_main=is_main,
        )
    cells = rp.load_cells(workdir)
    if missing and not allow_missing:
        raise MissingCheckpoints(missing, cells)
    return cells


def _compute(
    todo,
    ckpts,
    workdir,
    *,
    checkpoints,
    qdata,
    make_mesh,
    put,
    bits,
    granularity,
    batch_size,
    data_dir,
    progress,
    cache_bytes,
    is_main,
) -> None:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm.auto import tqdm

    mesh = make_mesh()
    n_dev = mesh.devices.size
    batch_size = -(-int(batch_size) // n_dev) * n_dev
    replicated = NamedSharding(mesh, P())
    host: dict[str, dict] = {}  # host copies of FP params, by task
    qvs: dict[str, dict] = {}  # host QVs, by donor
    ref: dict = {}  # backbone signature of the first checkpoint loaded

    def load(task: str, mode: str):
        c = ckpts[(task, mode)]
        params, _ = checkpoints.restore_params(c.path)
        sig = backbone_signature(params)
        if not ref:
            ref.update(sig=sig, name=c.name)
        check_same_backbone(sig, ref["sig"], c.name, ref["name"])
        return params

    def fp_params(task):  # cached only for the receiver being evaluated
        return host[task] if task in host else load(task, "fp")

    def qv_of(donor):  # host QVs are kept for the whole run (one per donor)
        if donor not in qvs:
            qv = trees.quantization_vector(load(donor, "qat"), fp_params(donor))
            qvs[donor] = jax.tree.map(np.asarray, qv)
        return qvs[donor]

    by_receiver: dict[str, list[dict]] = {}
    for cell in todo:
        by_receiver.setdefault(cell["receiver"], []).append(cell)
    bar = tqdm(
        total=len(todo),
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        unit="cell",
        desc="grid",
        disable=not progress or not is_main,
        dynamic_ncols=True,
    )
    cells_file = workdir / rp.CELLS_FILE
    with open(cells_file, "a") as out:
        for r, cells in by_receiver.items():
            meta = ckpts[(r, "fp")].meta
            model = checkpoints.model_from_meta(meta)
            image_size = int(meta["image_size"])
            evals = {
                s: _EvalSet(
                    qdata.load_split(r, s, image_size=image_size, data_dir=data_dir),
                    batch_size,
                    mesh,
                    cache_bytes,
                )
                for s in rp.SPLITS
            }
            host[r] = fp_params(r)
            fp_dev = put(host[r], replicated)
            qv_dev, qv_donor = None, None
            for cell in cells:
                kind, d = cell["kind"], cell["donor"]
                bar.set_postfix_str(f"R={r} {kind}" + (f" D={d} lam={cell['lam']:g}" if d else ""))
                t0 = time.perf_counter()
                if kind == "fp":
                    params = fp_dev
                elif kind == "ptq_fp":
                    params = ptq_jit(fp_dev, bits=bits, granularity=granularity)
                elif kind == "ptq_qat":
                    params = ptq_jit(
                        put(load(r, "qat"), replicated), bits=bits, granularity=granularity
                    )
                else:
                    if qv_donor != d:
                        qv_dev = None  # drop the previous donor's QV before placing the next
                        qv_dev, qv_donor = put(qv_of(d), replicated), d
                    params = patch_and_quantize(
                        fp_dev, qv_dev, jnp.float32(cell["lam"]), bits=bits, granularity=granularity
                    )
                acc = {s: e.accuracy(model, params) for s, e in evals.items()}
                del params  # the patched, quantized tree is freed right after evaluation
                record = {
                    **cell,
                    "acc": acc,
                    "n": {s: e.n for s, e in evals.items()},
                    "bits": bits,
                    "granularity": granularity,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                if is_main:
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                bar.update(1)
            qv_dev = fp_dev = None
            host.pop(r, None)  # still reloadable if r is a later donor
            del evals
    bar.close()
