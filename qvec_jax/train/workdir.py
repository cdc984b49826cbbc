"""A fine-tune's workdir: its config, its lock, its metrics file, its resumable
training-state checkpoints, and its end: the final params and results.json
(:func:`finish`, :func:`final_eval`; ``train.finetune`` drives them; layout in ``train``).

Nothing here writes before :func:`claim_workdir`: :func:`check_config` only reads, so
a run refused for a bad config or setup leaves no file a corrected rerun would trip on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp

from qvec_jax import config as qconfig
from qvec_jax import quant
from qvec_jax.files import atomic_write_text, workdir_lock
from qvec_jax.sharding import replicated
from qvec_jax.train.step import TrainError

__all__ = [
    "check_config",
    "checkpoint_manager",
    "claim_workdir",
    "final_eval",
    "finish",
    "lock",
    "restore_state",
    "save_state",
    "truncate_metrics",
]


def lock(workdir: str, command: str):
    """``finetune.lock`` in ``workdir`` (process 0 only: the others share its run)."""
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return workdir_lock(workdir, "finetune", command=command)


def check_config(cfg, workdir: str, force: bool) -> bool:
    """Whether ``workdir`` holds a run with another config (refused unless ``force``).
    Reads only: nothing is written before the whole setup has succeeded."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        return False
    try:
        with open(cfg_path) as f:
            old = json.load(f)
    except json.JSONDecodeError as e:
        if force:  # --force starts over: the old run's files go
            return True
        raise TrainError(f"{cfg_path}: corrupt JSON ({e}); delete it, or use --force") from None
    # the demo's own settings (report strategy, task sets, ...) never make a run another
    changed = qconfig.training_diff(old, json.loads(qconfig.to_json(cfg)))
    if changed and not force:
        raise TrainError(
            f"workdir {workdir!r} holds a run with a different config (differs in: "
            f"{', '.join(changed)}); use another --workdir, or --force to start over there"
        )
    return bool(changed)


def claim_workdir(cfg, workdir: str, changed: bool) -> None:
    """Write ``config.json``; with a changed config (``--force``) first drop the old run's
    files (ours only)."""
    if jax.process_index() != 0:  # multi-host: workdir is on a shared filesystem
        return
    if changed:
        for name in ("ckpt", "params", "metrics.jsonl", "results.json"):
            p = os.path.join(workdir, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)
    text = json.dumps(json.loads(qconfig.to_json(cfg)), indent=2, sort_keys=True) + "\n"
    atomic_write_text(os.path.join(workdir, "config.json"), text)


def truncate_metrics(path: str, step: int) -> None:
    """Drop records past ``step`` (written before a crash, about to be redone) and a torn
    last line (a kill mid-write); any other unreadable line is an error naming the file."""
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for i, ln in enumerate(lines, 1):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == len(lines):  # the torn tail of a killed run: redone from the checkpoint
                break
            msg = f"{path}:{i}: not a JSON metrics record ({e}); fix or delete it"
            raise TrainError(msg) from None
        if rec.get("step", 0) <= step:
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    atomic_write_text(path, "".join(keep))


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Items: ``state`` (params, opt_state, step; sharded arrays) and ``progress`` (JSON:
    step and data fingerprint). The data position IS the step (the TrainLoader resumes at
    any step in O(1))."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True)
    return ocp.CheckpointManager(
        os.path.join(workdir, "ckpt"), options=options, item_names=("state", "progress")
    )


def save_state(mngr, step: int, state, crc: int) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave({"step": step, "crc": crc}),
        ),
        force=True,
    )


def restore_state(mngr, abstract, shardings):
    """(state, step, crc) of the latest checkpoint, each array restored with its sharding."""
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    r = mngr.restore(
        mngr.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()
        ),
    )
    return r.state, int(r.progress["step"]), int(r.progress["crc"])


def finish(run) -> dict:
    """The end of ``train.finetune`` (``run`` is its ``_Run``): save the final params
    with their meta, evaluate, write results.json, and drop the training-state
    checkpoints (they exist only to resume)."""
    from qvec_jax import checkpoints

    cfg, spec, is_main = run.cfg, run.spec, jax.process_index() == 0
    meta = checkpoints.CheckpointMeta(
        variant=cfg.model.variant, num_classes=run.task.num_classes,
        image_size=cfg.model.image_size, task=cfg.task, mode=cfg.mode, seed=cfg.seed,
        bits=spec.bits, granularity=spec.granularity, backbone_id=run.backbone,
        steps=run.total, config=json.loads(qconfig.to_json(cfg)),
    )  # fmt: skip
    # The architecture fields an imported backbone set (an HF ViT's layer_norm_eps=1e-12),
    # so model_from_meta rebuilds the model that was trained; defaults stay unwritten.
    default = checkpoints.model_from_meta({k: meta[k] for k in ("variant", "image_size")})
    meta.update({k: getattr(run.model, k) for k in checkpoints.ARCH_KEYS
                 if getattr(run.model, k) != getattr(default, k)})  # fmt: skip
    # Gather (undoes FSDP) on every process; the write itself is checkpoints.save_params's
    # (multi-host: untested here, it must not need the other processes to join).
    params = run.state["params"]
    host_params = jax.device_get(jax.jit(lambda p: p, out_shardings=replicated(run.mesh))(params))
    if is_main:
        checkpoints.save_params(run.path("params"), host_params, meta)
    results = {k: meta[k] for k in ("task", "mode", "bits", "granularity", "steps")}
    results.update(final_eval(cfg, run.model, params, run.task, spec, mesh=run.mesh))
    if is_main:
        atomic_write_text(run.path("results.json"), json.dumps(results, indent=2) + "\n")
        shutil.rmtree(run.path("ckpt"), ignore_errors=True)
    return results


def final_eval(cfg, model, params, task, spec: quant.QuantSpec, *, mesh=None) -> dict:
    """Val and test accuracy, FP and after PTQ with ``spec`` (reported, never used to
    choose anything)."""
    from qvec_jax import data as qdata
    from qvec_jax.evaluate import accuracy

    out = {}
    for name in ("val", "test"):
        split = qdata.load_split(
            task, name, image_size=cfg.model.image_size, data_dir=cfg.data.data_dir or None
        )
        kw = dict(batch_size=cfg.eval_batch_size, mesh=mesh)
        out[name] = {
            "fp": accuracy(model, params, split, **kw),
            "ptq": accuracy(model, params, split, spec, **kw),
            "n": len(split),
        }
    return out
