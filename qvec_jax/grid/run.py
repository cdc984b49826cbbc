"""The grid's entry point, :func:`run_grid`: the donor x receiver x lambda transfer grid
(METHOD.md, "Transfer protocol").

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

Each finished cell is appended to ``WORKDIR/cells.jsonl`` (fsynced per cell, through
:class:`qvec_jax.grid.store.GridStore`). A rerun skips cells already there (and
recomputes any whose checkpoints changed since), so an interrupted grid resumes and
adding a task or a lambda computes only the new cells.
Missing checkpoints are listed in ``grid.json`` and never skipped silently:
:class:`MissingCheckpoints` is raised after the available cells are done, unless
``allow_missing``.

Scale-out: the cells split over processes and jobs. ``shard=(i, n)`` (``qvec grid
--shard i/n``: a Slurm array, separate TPU VMs) computes only the cells of shard ``i``
(:func:`shard_of`: by receiver, so each receiver's splits are read by one shard);
in a ``jax.distributed`` run of P processes each process takes one shard of its own
(shard ``i*P + p`` of ``n*P``). Each shard evaluates on its process's local devices,
appends to its own ``cells.shard-<i>-of-<n>.jsonl`` and holds its own lock
(:meth:`GridStore.lock`); :meth:`GridStore.cells` merges all record files, so
``qvec report`` (or a final ``run_grid`` without a shard) reports the whole grid. The
shards share ``grid.json``: one asking for another grid is refused until that one is complete.

Efficiency (:mod:`qvec_jax.grid.cells`): params are jit *arguments* (one compile per model
shape and group size, not per cell); a group of one donor's lambdas is patched, quantized
and evaluated as one stack within a memory budget (``cell_group``; the same records).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp

from qvec_jax import quant, trees
from qvec_jax.files import directory_lock
from qvec_jax.grid.cells import GridRun
from qvec_jax.grid.inputs import (
    GridError,
    MissingCheckpoints,
    check_compatible,
    check_task_names,
    find_checkpoints,
)
from qvec_jax.grid.store import GridStore, cell_key
from qvec_jax.train import COMPUTE_DTYPES

__all__ = ["DEFAULT_LAMBDAS", "plan_cells", "run_grid", "shard_of"]


#: The paper's lambda grid (METHOD.md).
DEFAULT_LAMBDAS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.00, 1.05, 1.20, 1.35, 1.50)


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
            old = done.get(cell_key(cell))
            if old is None or old.get("sources") != cell["sources"]:
                plan.todo.append(cell)
    return plan


def shard_of(cell: dict, tasks: Sequence[str], n: int) -> int:
    """The shard (0..n-1) that computes ``cell`` of the grid over ``tasks``.

    By receiver: the receiver at position k of ``tasks`` belongs to shard ``k % n``, so
    each receiver's val and test splits are read and cached by one shard. With more
    shards than receivers, receiver k's cells spread over the shards ``k, k+R, ...``
    (R receivers) by a CRC-32 of the cell's key. Depends only on the cell and the
    request, never on which cells are done (every shard agrees at any time).
    """
    k, r = list(tasks).index(cell["receiver"]), len(tasks)
    if n <= r:
        return k % n
    owners = range(k, n, r)
    h = zlib.crc32("|".join(cell_key(cell)).encode())
    return owners[h % len(owners)]


def _process_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    """This process's shard: ``shard`` itself in one process; in a ``jax.distributed``
    run of P processes, shard ``i*P + p`` of ``n*P`` (``shard=None`` is ``(0, 1)``)."""
    if shard is not None:
        i, n = shard
        if isinstance(i, bool) or isinstance(n, bool) or not 0 <= int(i) < int(n):
            raise GridError(f"shard {i}/{n}: need whole numbers 0 <= i < n")
        shard = (int(i), int(n))
    p, count = jax.process_index(), jax.process_count()
    if count == 1:
        return shard
    i, n = shard or (0, 1)
    return (i * count + p, n * count)


def _quantizer(bits, granularity, rule_note: str | None) -> str:
    """``"2-bit channel"``, plus the rule when it is not ``VIT_RULE``."""
    return f"{bits}-bit {granularity}" + ("" if rule_note is None else f" (rule {rule_note})")


def _rule_note(spec: quant.QuantSpec) -> str | None:
    """How ``grid.json`` names a non-default quantization rule (None for ``VIT_RULE``)."""
    return None if spec.rule == quant.VIT_RULE else repr(spec.rule)


def _compute_dtype(compute_dtype) -> str:
    """``run_grid``'s ``compute_dtype`` (a name or a dtype) as its name."""
    try:
        name = jnp.dtype(compute_dtype).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise GridError(f"compute_dtype={compute_dtype!r}: use one of {COMPUTE_DTYPES}")
    return name


def _check_setting(store: GridStore, meta: dict, spec, dtype: str, eval_n, backbone) -> None:
    """Refuse a workdir that holds a grid at another quantizer setting, compute dtype,
    evaluation sample or backbone: each needs its own ``--workdir``."""
    n_text = lambda n: f"{n} images per split" if n else "whole splits"  # noqa: E731
    settings = [
        ("at", _quantizer(meta.get("bits"), meta.get("granularity"), meta.get("rule")),
         _quantizer(spec.bits, spec.granularity, _rule_note(spec)), "quantizer setting"),
        ("computed in", meta.get("compute_dtype", "float32"), dtype, "compute dtype"),
        ("evaluated on", n_text(meta.get("eval_n")), n_text(eval_n), "evaluation sample"),
    ]  # fmt: skip
    if backbone is not None and meta.get("backbone_id") not in (None, backbone):
        settings.append(("over backbone", meta["backbone_id"], backbone, "backbone"))
    for verb, old, new, what in settings if meta else ():
        if old != new:
            msg = f"{store.workdir} holds a grid {verb} {old}, not {new}; use another --workdir"
            raise GridError(f"{msg} for another {what}")


def _grid_meta(
    tasks, lambdas, spec, runs_dir, ckpts, missing, warnings, dtype, eval_n=None
) -> dict:
    """What ``grid.json`` records about a grid request (the rule, the compute dtype and
    the evaluation sample only when not the default)."""
    rule = {} if _rule_note(spec) is None else {"rule": _rule_note(spec)}
    rule |= {} if dtype == "float32" else {"compute_dtype": dtype}
    rule |= {} if not eval_n else {"eval_n": int(eval_n)}
    return {
        "version": 1,
        "tasks": tasks,
        "lambdas": lambdas,
        "bits": spec.bits,
        "granularity": spec.granularity,
        **rule,
        "runs_dir": str(Path(runs_dir).resolve()),
        "backbone_id": next((c.meta.get("backbone_id") for c in ckpts.values()), None),
        "variant": next((c.meta.get("variant") for c in ckpts.values()), None),
        "checkpoints": {
            c.name: {"path": str(c.path), "fingerprint": c.fingerprint} for c in ckpts.values()
        },
        "missing": missing,
        "warnings": warnings,
        "expected_cells": len(tasks) * (3 + len(tasks) * len(lambdas)),
    }


def _at_least_one(value, name: str, what: str, none: str) -> int | None:
    """``run_grid``'s ``eval_n`` or ``cell_group`` checked: a whole number of ``what`` >= 1,
    or None (``none``: what None means)."""
    if value is not None and (isinstance(value, bool) or int(value) < 1):
        raise GridError(f"{name}={value!r}: a whole number of {what} >= 1, or None for {none}")
    return None if value is None else int(value)


def _request(tasks, bits, granularity, spec, lambdas, compute_dtype, cell_group) -> tuple:
    """``run_grid``'s arguments checked and normalized: ``(tasks, spec, lambdas, dtype)``
    (tasks deduplicated in order, lambdas sorted with 1.0 added, dtype as its name)."""
    _at_least_one(cell_group, "cell_group", "cells", "the default")
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise GridError("no tasks given; pass at least one task name")
    check_task_names(tasks)  # before the lock creates the workdir
    if spec is None and bits is None:
        raise GridError("no quantizer: pass bits= (and granularity=) or spec=QuantSpec(...)")
    spec = quant.as_spec(spec, bits=bits, granularity=granularity)
    lambdas = sorted({round(lam, 6) for lam in trees.check_lambdas(lambdas)} | {1.0})
    dtype = _compute_dtype(compute_dtype)
    return tasks, spec, lambdas, dtype


#: The keys of ``grid.json`` that are the request itself: every shard of a grid must agree
#: on them (the checkpoints found, missing ones and warnings follow from them).
_REQUEST_KEYS = (
    "tasks", "lambdas", "bits", "granularity", "rule", "compute_dtype", "eval_n", "runs_dir"
)  # fmt: skip


def _complete(store: GridStore, meta: dict) -> bool:
    """Whether the grid that ``meta`` (a ``grid.json``) describes is complete: every cell
    its checkpoints allow is stored, computed from those checkpoints."""
    ckpts = {}
    for name, c in (meta.get("checkpoints") or {}).items():
        task, _, mode = name.rpartition("/")
        ckpts[(task, mode)] = SimpleNamespace(fingerprint=(c or {}).get("fingerprint"))
    done = {cell_key(c): c for c in store.cells({c.fingerprint for c in ckpts.values()})}
    return not plan_cells(meta.get("tasks") or [], meta.get("lambdas") or [], ckpts, done).todo


def _check_shard_request(store: GridStore, meta: dict, shard, *, say: bool = True) -> None:
    """Refuse shard ``shard`` whose request (``meta``) differs from the ``grid.json`` that
    the other shards share, unless the grid described there is complete (then this shard
    starts the next request, and says so if ``say``)."""
    old = store.meta()
    differ = [k for k in _REQUEST_KEYS if old and old.get(k) != meta.get(k)]
    if not differ:
        return
    what = "; ".join(f"{k} {old.get(k)} there, {meta.get(k)} here" for k in differ)
    if _complete(store, old):
        if say:
            where = f"shard {shard[0]}/{shard[1]} replaces the complete grid's request in"
            print(f"note: {where} {store.meta_path} ({what}); run every shard with this request")
        return
    raise GridError(
        f"shard {shard[0]}/{shard[1]} asks for another grid than {store.meta_path}, which "
        f"the other shards share and whose grid is not complete ({what}); run every shard "
        "with the same tasks, lambdas, quantizer and runs, or use another --workdir"
    )


def _write_meta(store: GridStore, meta: dict, shard: tuple[int, int] | None, write: bool):
    """Write ``grid.json`` (if ``write``: process 0). A shard (``shard``: the one asked
    for) first checks it against the other shards' ``grid.json``, holding the workdir's
    mutex so that two shards starting together cannot both pass with different requests."""
    if shard is None:
        if write:
            store.write_meta(meta)
        return
    with directory_lock(store.workdir):
        _check_shard_request(store, meta, shard, say=write)
        if write:
            store.write_meta(meta)


def run_grid(
    tasks: Sequence[str],
    runs_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    bits: int | None = None,
    granularity: str | None = None,
    spec: quant.QuantSpec | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    batch_size: int = 256,
    allow_missing: bool = False,
    data_dir: str | None = None,
    progress: bool = True,
    device_cache_bytes: int = 1 << 30,
    shard: tuple[int, int] | None = None,
    extras=None,
    compute_dtype="float32",
    eval_n: int | None = None,
    cell_group: int | None = None,
) -> list[dict]:
    """Compute every missing cell of the grid over ``tasks``; return all stored cells.

    The quantizer is ``spec`` (a ``quant.QuantSpec``), or ``bits`` with ``granularity``
    ("channel" by default). ``runs_dir`` holds the fine-tunes (``RUNS/<task>/{fp,qat}/params``);
    results go to ``workdir`` (``cells.jsonl``, ``grid.json``, through a :class:`GridStore`);
    ``qvec_jax.report.write_report(workdir, cells=...)`` turns them into tables and plots.
    ``lambdas`` (finite, non-empty) always gets 1.0 added (the zero-shot column, the ceiling).
    ``shard=(i, n)``: only the cells of shard ``i`` of ``n`` (module docstring); in a
    ``jax.distributed`` run the processes split the cells (of the shard) among them,
    wait for each other, and return the merged cells.
    Raises :class:`MissingCheckpoints` after computing the available cells if a checkpoint is
    missing and not ``allow_missing``; :class:`GridError` if the checkpoints do not share one
    backbone, a task name cannot be a directory name (before anything is created), or a shard
    asks for another grid than the ``grid.json`` the other shards share, while that grid is not
    complete (before its lock is taken); ``files.WorkdirLocked`` (at once) if another grid run
    holds ``workdir`` (or shard).
    ``extras``: a ``grid.extras.Extras`` (lambda-strategy measurements, leave-one-out
    merges), a ``grid.gptq.GptqCells`` (GPTQ rows), or a sequence of them, computed in
    order after the main cells, under the same lock and shard.
    ``compute_dtype``: "float32" or "bfloat16", the model's activations and matmuls;
    params, QVs, the patch and PTQ stay float32 (PTQ before the cast).
    ``eval_n``: each split's fixed sample of at most this many (``data.Split.subset``).
    ``grid.json`` names a non-default dtype or sample; a rerun with another is refused.
    ``cell_group``: cells evaluated as one stack, at most (1: one at a time; None: default).
    """
    tasks, spec, lambdas, dtype = _request(
        tasks, bits, granularity, spec, lambdas, compute_dtype, cell_group
    )
    store, eval_n = GridStore(workdir), _at_least_one(eval_n, "eval_n", "examples", "all")
    mine = _process_shard(shard)
    if shard is not None:  # before the lock: a refused shard leaves the workdir as it was
        request = _grid_meta(tasks, lambdas, spec, runs_dir, {}, [], [], dtype, eval_n)
        _check_shard_request(store, request, shard, say=False)
    with store.lock(mine, command="qvec grid"):  # every process locks its own shard
        missing = _run_locked(
            tasks, runs_dir, store, spec, lambdas, batch_size=batch_size, data_dir=data_dir,
            progress=progress, device_cache_bytes=device_cache_bytes, shard=mine,
            extras=extras, dtype=dtype, asked=shard, eval_n=eval_n, cell_group=cell_group,
        )  # fmt: skip
    return _merged_cells(store, missing, allow_missing)


def _merged_cells(store: GridStore, missing: list[dict], allow_missing: bool) -> list[dict]:
    """Every stored cell, once every process of a ``jax.distributed`` run has written its
    own; :class:`MissingCheckpoints` (holding them) if checkpoints are ``missing``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("qvec grid: all shards done")
    cells = store.cells()
    if missing and not allow_missing:
        raise MissingCheckpoints(missing, cells)
    return cells


def _run_locked(
    tasks, runs_dir, store: GridStore, spec, lambdas, *, batch_size, data_dir, progress,
    device_cache_bytes, shard, extras=None, dtype="float32", asked=None, eval_n=None,
    cell_group=None,
) -> list[str]:  # fmt: skip
    """``run_grid``'s body, run while this process holds its shard's lock; computes the
    shard's missing cells and returns the missing checkpoints. ``shard``: this process's
    shard; ``asked``: the shard ``run_grid`` was asked for (None: the whole grid)."""
    old_meta = store.meta()

    ckpts, missing = find_checkpoints(tasks, runs_dir)
    warnings = check_compatible(ckpts)
    meta = _grid_meta(tasks, lambdas, spec, runs_dir, ckpts, missing, warnings, dtype, eval_n)
    _check_setting(store, old_meta, spec, dtype, eval_n, meta["backbone_id"])
    fingerprints = {c.fingerprint for c in ckpts.values()}
    done = {cell_key(c): c for c in store.cells(fingerprints)}
    plan = plan_cells(tasks, lambdas, ckpts, done)
    if shard is not None:
        plan.todo = [c for c in plan.todo if shard_of(c, tasks, shard[1]) == shard[0]]
    # grid.json: a function of the request, the same from every shard (checked)
    _write_meta(store, meta, asked, write=jax.process_index() == 0)
    for w in warnings:
        print(f"warning: {w}")

    if plan.todo:
        store.repair_tail(shard)
        run = GridRun(ckpts, spec, data_dir=data_dir, compute_dtype=dtype, eval_n=eval_n,
                      cell_group=cell_group)  # fmt: skip
        run.compute(plan.todo, store, batch_size, device_cache_bytes, progress, shard)
    stages = extras if isinstance(extras, (list, tuple)) else () if extras is None else (extras,)
    for stage in stages:  # Extras, GptqCells: their cells after the main ones, in order
        stage.run(
            tasks, ckpts, store, spec, lambdas, batch_size=batch_size, data_dir=data_dir,
            progress=progress, device_cache_bytes=device_cache_bytes, shard=shard,
            compute_dtype=dtype, eval_n=eval_n,
        )  # fmt: skip
    return missing
