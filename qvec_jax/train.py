"""FP and QAT fine-tuning: one loop, one config, on a ``jax.sharding`` mesh, resumable.

QAT differs from FP in one line of the loss (``QAT is PTQ's sibling``)::

    p = quant.fake_quant_tree(params, spec, ste=True) if qat else params
    logits = model.apply({"params": p}, images)

With the same config and seed, FP and QAT start from the same params (same fresh head)
and see the same batches in the same order, so ``QAT - FP`` isolates quantization.

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
the step: ``train_batches(..., start_step=step)`` replays the same stream); they are
deleted once ``params/`` and ``results.json`` are written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qvec_jax import config as qconfig
from qvec_jax import quant
from qvec_jax.sharding import make_mesh, put, state_shardings
from qvec_jax.trees import HEAD_RULE, path_str

MODES = ("fp", "qat")
INIT_KINDS = ("pretrained", "random")


class TrainError(ValueError):
    """Bad config or workdir; the message says what to do."""


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


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
    """``clip_by_global_norm`` then AdamW on a linear-warmup + cosine schedule -> (tx, schedule)."""
    warmup = int(optim.warmup_steps)
    if not 0 <= warmup < total_steps:
        raise TrainError(
            f"optim.warmup_steps={warmup} must be in [0, total_steps={total_steps}); "
            "lower it or train longer (epochs=... or total_steps=...)"
        )
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(optim.lr), warmup_steps=warmup, decay_steps=total_steps
    )
    tx = optax.chain(
        optax.clip_by_global_norm(float(optim.clip_norm)),
        optax.adamw(
            schedule,
            b1=float(optim.b1),
            b2=float(optim.b2),
            eps=float(optim.eps),
            weight_decay=float(optim.weight_decay),
        ),
    )
    mult = float(optim.get("head_lr_mult", 1.0))
    if mult != 1.0:  # the head (trees.HEAD_RULE) learns at mult * lr; 1.0 = the paper
        tx = optax.chain(tx, scale_head_updates(mult))
    return tx, schedule


def scale_head_updates(mult: float) -> optax.GradientTransformation:
    """Multiply the updates of the head leaves (``trees.HEAD_RULE``) by ``mult``."""

    def scale(updates, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda kp, u: u * mult if HEAD_RULE.match(path_str(kp)) else u, updates
        )

    return optax.stateless(scale)


def accumulation_steps(batch_size: int, device_batch_size: int, n_devices: int) -> int:
    """Micro-batches per optimizer step so that each device sees <= ``device_batch_size``."""
    if batch_size % n_devices:
        raise TrainError(
            f"batch_size={batch_size} is not divisible by the {n_devices} devices of the mesh"
        )
    per_device = batch_size // n_devices
    if device_batch_size <= 0 or per_device <= device_batch_size:
        return 1
    k = math.ceil(per_device / device_batch_size)
    while per_device % k:
        k += 1
    return k


def total_train_steps(cfg: ml_collections.ConfigDict, num_train: int, task_epochs) -> int:
    """``total_steps`` if > 0, else ceil(epochs * num_train / batch_size)."""
    if cfg.total_steps > 0:
        return int(cfg.total_steps)
    from qvec_jax import data as qdata

    epochs = cfg.epochs if cfg.epochs > 0 else task_epochs
    if not epochs or epochs <= 0:
        raise TrainError("no epochs for this task: set epochs=... or total_steps=...")
    return qdata.num_train_steps(int(num_train), int(cfg.batch_size), float(epochs))


# --------------------------------------------------------------------------- the step


def loss_fn(params, model, images, labels, *, spec=None, label_smoothing=0.0):
    """Mean softmax cross-entropy. With a ``quant.QuantSpec`` (QAT) the model runs at the
    STE fake-quantized params; with ``spec=None`` (FP) at the params themselves."""
    if spec is not None:
        params = quant.fake_quant_tree(params, spec, ste=True)
    logits = model.apply({"params": params}, images)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def make_train_step(
    model, tx, mesh, state_sharding, *, mode, spec=None, accum=1, label_smoothing=0.0
):
    """Jitted ``(state, images, labels) -> (state, metrics)``; ``state`` is donated.

    ``state = {"params", "opt_state", "step"}``; ``spec``: the ``quant.QuantSpec`` QAT
    trains for (unused by FP). With ``accum > 1`` the global batch is split into
    ``accum`` equal micro-batches (each spread over all devices) whose mean gradient
    feeds one optimizer update: the same update, a fraction of the activations.
    """
    if mode not in MODES:
        raise TrainError(f"mode {mode!r} is not one of {MODES}")
    if mode == "qat" and not isinstance(spec, quant.QuantSpec):
        raise TrainError(f"mode 'qat' needs spec=quant.QuantSpec(bits, ...), got {spec!r}")
    grad_fn = jax.value_and_grad(loss_fn)
    kw = dict(spec=spec if mode == "qat" else None, label_smoothing=label_smoothing)
    batch_sh = NamedSharding(mesh, P("data"))

    def step(state, images, labels):
        params = state["params"]
        if accum == 1:
            loss, grads = grad_fn(params, model, images, labels, **kw)
        else:
            m = images.shape[0] // accum

            def micro(x):  # [B, ...] -> [accum, m, ...]; micro j = rows j, j+accum, ...
                x = x.reshape(m, accum, *x.shape[1:])
                x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))
                return jax.lax.with_sharding_constraint(
                    jnp.swapaxes(x, 0, 1), NamedSharding(mesh, P(None, "data"))
                )

            def body(carry, xy):
                loss, grads = grad_fn(params, model, *xy, **kw)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(body, zero, (micro(images), micro(labels)))
            loss, grads = jax.tree.map(lambda g: g / accum, (loss, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(
        step,
        donate_argnums=(0,),
        in_shardings=(state_sharding, batch_sh, batch_sh),
        out_shardings=(state_sharding, NamedSharding(mesh, P())),
    )


# --------------------------------------------------------------------------- init


def create_state(params, tx, shardings) -> dict:
    """The train state ``{"params", "opt_state", "step"}`` placed with ``shardings``.

    Every leaf gets its final sharding before step 1, so the jitted step sees the same
    input layouts on every call and compiles once. The state owns fresh buffers (the
    step donates them), so ``params`` stays usable.
    """
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings["params"])
    params = copy(put(params, shardings["params"]))
    init = jax.jit(tx.init, out_shardings=shardings["opt_state"])
    step = put(np.zeros((), np.int32), shardings["step"])
    return {"params": params, "opt_state": init(params), "step": step}


def build_model_and_params(cfg: ml_collections.ConfigDict, num_classes: int):
    """(model, params) from ``cfg.init``; the head is always fresh, seeded by ``cfg.seed``.

    ``init.kind="pretrained"``: ``pretrained.load_pretrained(init.path)`` (Google .npz,
    timm/HF safetensors, or a params dir written by this project), head replaced and
    ``pre_logits`` dropped; ``"random"``: ``model.init`` (tests, from-scratch demos).
    """
    from qvec_jax import pretrained
    from qvec_jax.models import vit

    kind, path = cfg.init.kind, cfg.init.path
    if kind not in INIT_KINDS:
        raise TrainError(f"init.kind={kind!r} is not one of {INIT_KINDS}")
    if kind == "random":
        model = vit.create_model(
            cfg.model.variant, num_classes=num_classes, image_size=cfg.model.image_size
        )
        return model, vit.init_params(model, jax.random.key(cfg.seed))
    if not path or not os.path.exists(path):
        raise TrainError(
            f"init.path={path!r} does not exist: download the pretrained checkpoint "
            "(e.g. gs://vit_models/imagenet21k/ViT-B_16.npz) and pass init.path=FILE"
        )
    return pretrained.load_pretrained(
        path,
        variant=cfg.model.variant,
        num_classes=num_classes,
        image_size=cfg.model.image_size,
        seed=cfg.seed,
    )


# --------------------------------------------------------------------------- workdir


def _atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_" + os.path.basename(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _prepare_workdir(cfg, workdir: str, force: bool) -> None:
    os.makedirs(workdir, exist_ok=True)
    cfg_path = os.path.join(workdir, "config.json")
    new = json.loads(qconfig.to_json(cfg))
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        changed = qconfig.diff(old, new)
        if changed and not force:
            raise TrainError(
                f"workdir {workdir!r} holds a run with a different config (differs in: "
                f"{', '.join(changed)}); use another --workdir, or --force to start over there"
            )
        if changed and jax.process_index() == 0:  # --force: drop the old run's files, ours only
            for name in ("ckpt", "params", "metrics.jsonl", "results.json"):
                p = os.path.join(workdir, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)
    if jax.process_index() == 0:  # multi-host: workdir is on a shared filesystem
        _atomic_write(cfg_path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def _truncate_metrics(path: str, step: int) -> None:
    """Drop records past ``step`` (written before a crash, about to be redone)."""
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    _atomic_write(path, "".join(keep))


def _batch_crc(crc: int, images, labels) -> int:
    """Running fingerprint of the data stream (labels + a strided image sample)."""
    crc = zlib.crc32(np.ascontiguousarray(labels).tobytes(), crc)
    return zlib.crc32(np.ascontiguousarray(np.asarray(images).reshape(-1)[::997]).tobytes(), crc)


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Items: ``state`` (params, opt_state, step; sharded arrays) and ``progress`` (JSON:
    step and data fingerprint). The data position IS the step (train_batches is O(1))."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True)
    return ocp.CheckpointManager(
        os.path.join(workdir, "ckpt"), options=options, item_names=("state", "progress")
    )


def _save(mngr, step: int, state, crc: int) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave({"step": step, "crc": crc}),
        ),
        force=True,
    )


def _restore(mngr, abstract, shardings):
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


# --------------------------------------------------------------------------- the loop


def validate(cfg: ml_collections.ConfigDict) -> quant.QuantSpec:
    """Check ``cfg`` once; return its quantizer settings (QAT's, and the final PTQ eval's)."""
    if cfg.mode not in MODES:
        raise TrainError(f"mode={cfg.mode!r}: use --mode fp or --mode qat")
    if not cfg.task:
        raise TrainError("no task: pass --task NAME (see `qvec tasks` / data.list_tasks())")
    try:
        return quant.QuantSpec(cfg.quant.bits, cfg.quant.granularity)
    except (TypeError, ValueError) as e:
        raise TrainError(
            f"quant.bits={cfg.quant.bits!r}, quant.granularity="
            f"{cfg.quant.granularity!r}: {e}; fix the config or override"
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

    ``stop_after``: run at most this many steps in this call, checkpoint, and return
    ``{"stopped_at": step}`` (for time-limited jobs; rerun to continue). A finished run
    returns its ``results.json`` without training again.
    """
    from tqdm.auto import tqdm

    from qvec_jax import checkpoints
    from qvec_jax import data as qdata

    spec = validate(cfg)
    task = qdata.get_task(cfg.task)
    workdir = os.path.abspath(workdir)
    _prepare_workdir(cfg, workdir, force)
    results_path = os.path.join(workdir, "results.json")
    params_dir = os.path.join(workdir, "params")
    if os.path.exists(results_path) and os.path.isdir(params_dir):
        with open(results_path) as f:
            return json.load(f)

    data_dir = cfg.data.data_dir or None
    train_split = qdata.load_split(
        task, "train", image_size=cfg.model.image_size, data_dir=data_dir
    )
    total = total_train_steps(cfg, len(train_split), task.epochs)
    mesh = make_mesh() if mesh is None else mesh
    accum = accumulation_steps(cfg.batch_size, cfg.device_batch_size, mesh.devices.size)
    if (cfg.batch_size // accum) % mesh.devices.size:
        raise TrainError("batch_size / accumulation steps must be divisible by the device count")
    tx, schedule = make_optimizer(cfg.optim, total)

    model, host_params = build_model_and_params(cfg, task.num_classes)
    backbone = checkpoints.backbone_id(host_params)  # of the init; the head is excluded
    abstract = jax.eval_shape(
        lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)},
        host_params,
    )
    shardings = state_shardings(abstract, mesh, fsdp=cfg.fsdp)
    train_step = make_train_step(
        model,
        tx,
        mesh,
        shardings,
        mode=cfg.mode,
        spec=spec,
        accum=accum,
        label_smoothing=cfg.label_smoothing,
    )

    mngr = _checkpoint_manager(workdir, cfg.keep_checkpoints)
    start, crc = 0, 0
    if mngr.latest_step() is not None:
        state, start, crc = _restore(mngr, abstract, shardings)
    else:
        state = create_state(host_params, tx, shardings)
    del host_params
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    _truncate_metrics(metrics_path, start)

    end = total if stop_after is None else min(total, start + int(stop_after))
    batches = qdata.train_batches(train_split, cfg.batch_size, seed=cfg.seed, start_step=start)
    is_main = jax.process_index() == 0
    bar = tqdm(
        total=total,
        initial=start,
        disable=not (progress and is_main),
        unit="step",
        desc=f"{cfg.task} {cfg.mode}",
        dynamic_ncols=True,
    )
    window, t_log, n_log = [], time.perf_counter(), 0
    with open(metrics_path, "a") as mfile:
        for step in range(start, end):
            images, labels = next(batches)
            crc = _batch_crc(crc, images, labels)
            x, y = qdata.shard_batch((images, labels), mesh)
            state, m = train_step(state, x, y)
            bar.update(1)
            if step == start:  # keep compilation out of the throughput numbers
                jax.block_until_ready(m)
                t_log = time.perf_counter()
            else:
                n_log += 1
            window.append(m)
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                ms = jax.device_get(window)
                dt = max(time.perf_counter() - t_log, 1e-9)
                rec = {
                    "step": done,
                    "loss": float(np.mean([w["loss"] for w in ms])),
                    "lr": float(schedule(step)),
                    "grad_norm": float(ms[-1]["grad_norm"]),
                    "steps_per_s": n_log / dt if n_log else None,  # None: compile only
                    "examples_per_s": n_log * cfg.batch_size / dt if n_log else None,
                    "data_crc": crc,
                }
                if is_main:
                    mfile.write(json.dumps(rec) + "\n")
                    mfile.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                window, t_log, n_log = [], time.perf_counter(), 0
            if done % cfg.checkpoint_every == 0 or done == end:
                _save(mngr, done, state, crc)
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if end < total:
        return {"stopped_at": end, "total_steps": total}

    params = state["params"]
    meta = {
        "variant": cfg.model.variant,
        "num_classes": task.num_classes,
        "image_size": cfg.model.image_size,
        **{k: cfg[k] for k in ("task", "mode", "seed")},
        **{k: cfg.quant[k] for k in ("bits", "granularity")},
        "backbone_id": backbone,
        "steps": total,
        "config": json.loads(qconfig.to_json(cfg)),
    }
    # Gather (undoes FSDP) on every process; the write itself is checkpoints.save_params's
    # (multi-host: untested here, it must not need the other processes to join).
    gather = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))
    host_params = jax.device_get(gather(params))
    if is_main:
        checkpoints.save_params(params_dir, host_params, meta)

    results = {k: meta[k] for k in ("task", "mode", "bits", "granularity", "steps")}
    results.update(final_eval(cfg, model, params, task, spec, mesh=mesh))
    if is_main:
        _atomic_write(results_path, json.dumps(results, indent=2) + "\n")
        shutil.rmtree(os.path.join(workdir, "ckpt"), ignore_errors=True)
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
            "ptq": accuracy(
                model, params, split, bits=spec.bits, granularity=spec.granularity, **kw
            ),
            "n": len(split),
        }
    return out
