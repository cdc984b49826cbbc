"""FP and QAT fine-tuning: one loop, one config, on a ``jax.sharding`` mesh, resumable.

The step (optimizer, loss, jitted update) is :mod:`qvec_jax.train.step`; this module runs
it: setup and the loop with logging and checkpoints (the final save and eval are
:func:`qvec_jax.train.workdir.finish`). With the same config and seed, FP and QAT start
from the same params (same fresh head) and see the same batches in the same order, so
``QAT - FP`` isolates quantization.

Scale-out: a 1-D mesh ``("data",)`` over all devices (all hosts after
``jax.distributed.initialize()``). The batch is sharded over it; params and optimizer
state are replicated, or with ``fsdp=True`` sharded over the same axis along their
largest divisible dimension (ZeRO-3 style: XLA all-gathers weights where used and
reduce-scatters gradients), for models whose state does not fit one device.

Workdir layout::

    config.json      the run's full config; another config is refused unless --force
    ckpt/<step>/     orbax CheckpointManager: params, optimizer state, data position
    metrics.jsonl    loss, lr, grad_norm, throughput every ``log_every`` steps
    params/          final params + meta (checkpoints.save_params), for the grid
    results.json     val and test accuracy, FP and after PTQ at ``quant.bits``

Training-state checkpoints exist to resume an interrupted run (the data position is
the step: ``data.loader.TrainLoader(..., start_step=step)`` replays the same stream; each
process reads only its own rows, in ``data.workers`` grain processes); they are
deleted once ``params/`` and ``results.json`` are written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import os
from typing import Any

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from qvec_jax import quant
from qvec_jax.data.resident import place_split
from qvec_jax.sharding import make_mesh, state_shardings
from qvec_jax.train.feed import ResidentFeed, StreamFeed, chunks
from qvec_jax.train.options import (
    compute_dtype,
    data_workers,
    device_bytes,
    steps_per_dispatch,
    total_train_steps,
)
from qvec_jax.train.records import Records, per_step
from qvec_jax.train.step import (
    MODES,
    TrainError,
    abstract_state,
    accumulation_steps,
    all_finite,
    check_metrics,
    check_numbers,
    create_state,
    diverged,
    make_optimizer,
    make_train_chunk,
)
from qvec_jax.train.workdir import (
    check_config,
    checkpoint_manager,
    claim_workdir,
    finish,
    lock,
    restore_state,
    save_state,
    truncate_metrics,
)

INIT_KINDS = ("pretrained", "random")


# --------------------------------------------------------------------------- setup


def maybe_initialize_distributed(force: bool = False) -> None:
    """``jax.distributed.initialize()`` for multi-host runs.

    Called when ``force`` or the env var ``QVEC_DISTRIBUTED=1`` is set; on TPU pods and
    SLURM/Open MPI clusters JAX finds the coordinator itself, elsewhere set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    """
    if force or os.environ.get("QVEC_DISTRIBUTED", "") not in ("", "0"):
        if not jax.distributed.is_initialized():
            jax.distributed.initialize()


# --------------------------------------------------------------------------- init


def build_model_and_params(cfg: ml_collections.ConfigDict, num_classes: int):
    """(model, params) from ``cfg.init``; the head is always fresh, seeded by ``cfg.seed``.

    ``init.kind="pretrained"``: ``pretrained.load_pretrained(init.path)`` (Google .npz,
    timm/HF safetensors, or a params dir written by this project), head replaced and
    ``pre_logits`` dropped; ``"random"``: ``model.init`` (tests, from-scratch demos).
    """
    from qvec_jax import pretrained
    from qvec_jax.models import vit

    kind, path = cfg.init.kind, cfg.init.path  # checked by validate()
    if kind == "random":
        model = vit.create_model(
            cfg.model.variant, num_classes=num_classes, image_size=cfg.model.image_size
        )
        params = vit.init_params(model, jax.random.key(cfg.seed))
    else:
        model, params = pretrained.load_pretrained(
            path,
            variant=cfg.model.variant,
            num_classes=num_classes,
            image_size=cfg.model.image_size,
            seed=cfg.seed,
        )
    return model.clone(dtype=compute_dtype(cfg)), params


# --------------------------------------------------------------------------- the run


def validate(cfg: ml_collections.ConfigDict) -> quant.QuantSpec:
    """Check ``cfg`` once, before anything is written; return its quantizer settings
    (QAT's, and the final PTQ eval's)."""
    if cfg.mode not in MODES:
        raise TrainError(f"mode={cfg.mode!r}: use --mode fp or --mode qat")
    if not cfg.task:
        raise TrainError("no task: pass --task NAME (see `qvec tasks` / data.list_tasks())")
    check_numbers(cfg)
    compute_dtype(cfg)
    data_workers(cfg)
    device_bytes(cfg)
    steps_per_dispatch(cfg)
    if cfg.init.kind not in INIT_KINDS:
        raise TrainError(f"init.kind={cfg.init.kind!r} is not one of {INIT_KINDS}")
    if cfg.init.kind == "pretrained" and not (cfg.init.path and os.path.exists(cfg.init.path)):
        raise TrainError(
            f"init.path={cfg.init.path!r} does not exist: download the pretrained checkpoint "
            "(e.g. gs://vit_models/imagenet21k/ViT-B_16.npz) and pass init.path=FILE"
        )
    try:
        return quant.QuantSpec(cfg.quant.bits, cfg.quant.granularity)
    except (TypeError, ValueError) as e:
        raise TrainError(
            f"quant.bits={cfg.quant.bits!r}, quant.granularity={cfg.quant.granularity!r}: "
            f"{e}; fix the config or override it"
        ) from None


def finetune(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    force: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    mesh=None,
) -> dict:
    """Run (or resume) the fine-tune described by ``cfg`` in ``workdir``; returns results.

    ``stop_after``: run at most this many steps (>= 1) in this call, checkpoint, and
    return ``{"stopped_at": step}`` (for time-limited jobs; rerun to continue). A finished
    run returns its ``results.json`` without training again. The config is checked and
    the whole setup built before the workdir is written (a bad config leaves nothing a
    corrected rerun would trip on); the run holds ``finetune.lock`` in the workdir, so a
    second run there stops at once (``files.WorkdirLocked``, naming the holder). A NaN/Inf
    loss or gradient norm stops the run (``TrainError``) with its last good checkpoint kept.
    """
    from qvec_jax import data as qdata

    spec = validate(cfg)
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, numbers.Integral)
        or stop_after < 1
    ):  # fmt: skip
        raise TrainError(f"stop_after={stop_after!r}: must be a whole number of steps >= 1")
    task = qdata.get_task(cfg.task)
    workdir = os.path.abspath(workdir)
    fresh = not os.path.exists(workdir)
    with lock(workdir, f"qvec finetune task={cfg.task} mode={cfg.mode}") as lock_file:
        try:
            changed = check_config(cfg, workdir, force)
            results_path = os.path.join(workdir, "results.json")
            if (
                not changed
                and os.path.exists(results_path)
                and os.path.isdir(os.path.join(workdir, "params"))
            ):
                with open(results_path) as f:
                    return json.load(f)
            run = _setup(cfg, spec, task, workdir, mesh, claim=lambda: claim_workdir(
                cfg, workdir, changed))  # fmt: skip
        except BaseException:
            if (
                fresh
                and lock_file is not None
                and not os.path.exists(os.path.join(workdir, "config.json"))
            ):  # nothing of ours but the lock: leave no workdir behind
                os.remove(lock_file)
                with contextlib.suppress(OSError):
                    os.rmdir(workdir)
            raise
        end = run.total if stop_after is None else min(run.total, run.start + int(stop_after))
        _loop(run, end, progress)
        if end < run.total:
            return {"stopped_at": end, "total_steps": run.total}
        return finish(run)


@dataclasses.dataclass
class _Run:
    """One fine-tune between setup, loop and finalize; the loop advances state and crc."""

    cfg: ml_collections.ConfigDict
    spec: quant.QuantSpec
    task: Any  # data.Task
    workdir: str
    mesh: Mesh
    model: Any
    train_split: Any  # data.Split
    total: int  # optimizer steps of the whole run
    schedule: optax.Schedule
    resident: Any  # data.ResidentSplit of the train split, or None: streamed
    chunk_fn: Any  # make_train_chunk's jitted steps
    mngr: ocp.CheckpointManager
    backbone: str  # checkpoints.backbone_id of the init
    state: dict
    start: int  # the step the state is at (0, or the restored checkpoint's)
    crc: int  # fingerprint of the batches seen so far

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)


def _setup(cfg, spec, task, workdir: str, mesh, claim) -> _Run:
    """Data, mesh, optimizer, model, shardings and the jitted step; then ``claim()`` (the
    first write to the workdir), the state of the latest checkpoint (resume) or a fresh
    one, and metrics past it dropped."""
    from qvec_jax import checkpoints
    from qvec_jax import data as qdata

    split = qdata.load_split(
        task, "train", image_size=cfg.model.image_size, data_dir=cfg.data.data_dir or None
    )
    total = total_train_steps(cfg, len(split), task.epochs)
    mesh = make_mesh() if mesh is None else mesh
    accum = accumulation_steps(cfg.batch_size, cfg.device_batch_size, mesh.devices.size)
    if (cfg.batch_size // accum) % mesh.devices.size:
        raise TrainError("batch_size / accumulation steps must be divisible by the device count")
    tx, schedule = make_optimizer(cfg.optim, total)
    model, host_params = build_model_and_params(cfg, task.num_classes)
    abstract = abstract_state(host_params, tx)
    shardings = state_shardings(abstract, mesh, fsdp=cfg.fsdp)
    resident = place_split(split, mesh, device_bytes(cfg))
    chunk_fn = make_train_chunk(
        model, tx, mesh, shardings, resident=resident, mode=cfg.mode, spec=spec, accum=accum,
        label_smoothing=cfg.label_smoothing, preprocess=split.preprocessor,
    )  # fmt: skip
    claim()
    mngr = checkpoint_manager(workdir, cfg.keep_checkpoints)
    if mngr.latest_step() is not None:
        state, start, crc = restore_state(mngr, abstract, shardings)
    else:
        state, start, crc = create_state(host_params, tx, shardings), 0, 0
    truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start)
    return _Run(
        cfg=cfg, spec=spec, task=task, workdir=workdir, mesh=mesh, model=model,
        train_split=split, total=total, schedule=schedule, resident=resident,
        chunk_fn=chunk_fn, mngr=mngr,
        backbone=checkpoints.backbone_id(host_params), state=state, start=start, crc=crc,
    )  # fmt: skip


def _feed(run: _Run, end: int):
    cfg = run.cfg
    if run.resident is not None:
        return ResidentFeed(run.train_split, run.resident, cfg.batch_size, cfg.seed, run.mesh)
    return StreamFeed(run.train_split, cfg.batch_size, cfg.seed, run.start, end, run.mesh,
                      data_workers(cfg))  # fmt: skip


def _loop(run: _Run, end: int, progress: bool) -> None:
    """Train steps ``run.start .. end`` in chunks of ``steps_per_dispatch`` steps (one
    jitted call each): a metrics record every ``log_every`` steps and a checkpoint
    every ``checkpoint_every`` steps, both also at ``end``.

    The device never waits on the host between chunks: the next chunk's input is built
    while the device runs the current one, and a record's metrics are fetched after the
    next chunk is dispatched (at a checkpoint, before: its steps are checked first).
    Divergence costs no extra host round trip: the losses and gradient norms of every
    step are checked when a record fetches them, and before a checkpoint (one more fetch
    of the steps since the last record, and one scalar: all params finite), so no
    checkpoint holds NaN/Inf params."""
    from tqdm.auto import tqdm

    cfg, is_main = run.cfg, jax.process_index() == 0
    feed = _feed(run, end)
    k = feed.max_steps(steps_per_dispatch(cfg))
    bounds = list(chunks(run.start, end, k, cfg.log_every, cfg.checkpoint_every))
    bar = tqdm(total=run.total, initial=run.start, disable=not (progress and is_main),
               unit="step", desc=f"{cfg.task} {cfg.mode}", dynamic_ncols=True)  # fmt: skip
    try:
        with open(run.path("metrics.jsonl"), "a") as mfile:
            ends = [done for _, done in bounds if done % cfg.log_every == 0 or done == end]
            records = Records(run, mfile if is_main else None, bar, ends)
            nxt = feed.chunk(*bounds[0], run.crc) if bounds else None
            for i, (s0, done) in enumerate(bounds):
                xs, run.crc = nxt
                run.state, m = run.chunk_fn(run.state, xs, feed.data)
                if i + 1 < len(bounds):  # on the host while the device runs this chunk
                    nxt = feed.chunk(*bounds[i + 1], run.crc)
                records.write_pending()  # the last chunk's, fetched while this one runs
                bar.update(done - s0)
                records.add(m, done - s0, first=i == 0)
                if done % cfg.log_every == 0 or done == end:
                    records.close(done, run.crc)
                if done % cfg.checkpoint_every == 0 or done == end:
                    records.write_pending()
                    _check_finite(run, done, records.window)
                    save_state(run.mngr, done, run.state, run.crc)
    finally:
        feed.close()
        bar.close()
        run.mngr.wait_until_finished()
        run.mngr.close()


def _check_finite(run: _Run, done: int, window: list) -> None:
    """Before a checkpoint: the unrecorded steps' metrics and the params are finite."""
    last_good = run.mngr.latest_step()
    ms = per_step(window)
    check_metrics(ms, done - len(ms) + 1, run.cfg.optim.lr, run.workdir, last_good)
    if not bool(all_finite(run.state["params"])):
        raise diverged(done, "the params hold NaN or Inf", run.cfg.optim.lr, run.workdir,
                       last_good)  # fmt: skip
