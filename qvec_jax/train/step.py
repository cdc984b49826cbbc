"""One optimizer step of FP or QAT fine-tuning: the optimizer, the loss, the jitted step.

QAT differs from FP in one line of the loss (``QAT is PTQ's sibling``)::

    p = quant.fake_quant_tree(params, spec, ste=True) if qat else params
    logits = model.apply({"params": p}, images)

The step runs on a 1-D ``("data",)`` mesh: the batch is sharded over it; the state
``{"params", "opt_state", "step"}`` is placed with the shardings it is built for
(``sharding.state_shardings``: replicated, or FSDP). ``train.finetune`` drives it.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qvec_jax import quant
from qvec_jax.data.resident import gather, positions_sharding
from qvec_jax.sharding import put
from qvec_jax.trees import HEAD_RULE, PyTree, path_str

MODES = ("fp", "qat")


class TrainError(ValueError):
    """Bad config or workdir, or a diverged run; the message says what to do."""


# --------------------------------------------------------------------------- config

# (key, lowest, highest, lowest allowed?, integer?) of every number the loop reads.
_NUMBERS = (
    ("optim.lr", 0.0, math.inf, False, False),
    ("optim.head_lr_mult", 0.0, math.inf, True, False),
    ("optim.weight_decay", 0.0, math.inf, True, False),
    ("optim.clip_norm", 0.0, math.inf, False, False),
    ("optim.b1", 0.0, 1.0, True, False),
    ("optim.b2", 0.0, 1.0, True, False),
    ("optim.eps", 0.0, math.inf, False, False),
    ("optim.warmup_steps", 0, math.inf, True, True),
    ("label_smoothing", 0.0, 1.0, True, False),
    ("batch_size", 1, math.inf, True, True),
    ("device_batch_size", 0, math.inf, True, True),
    ("eval_batch_size", 1, math.inf, True, True),
    ("log_every", 1, math.inf, True, True),
    ("checkpoint_every", 1, math.inf, True, True),
    ("keep_checkpoints", 1, math.inf, True, True),
)


def check_numbers(cfg: ml_collections.ConfigDict) -> None:
    """Refuse a config number that is not finite or out of range, naming the key, before
    anything runs or is written (``optim.lr=1e999`` would train to NaN; ``batch_size=0``
    would fail later, after the workdir is claimed). Missing keys are left to the loop."""
    for key, lo, hi, lo_ok, integer in _NUMBERS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            continue
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(node, bool) or not isinstance(node, kind):
            raise TrainError(f"{key}={node!r}: must be {'an integer' if integer else 'a number'}")
        above = node >= lo if lo_ok else node > lo
        if not (math.isfinite(node) and above and node < hi):
            where = f"{'[' if lo_ok else '('}{lo}, {hi})"
            raise TrainError(f"{key}={node!r}: must be finite and in {where}; fix the override")


# --------------------------------------------------------------------------- optimizer


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
        tx = optax.chain(tx, optax.masked(optax.scale(mult), head_mask))
    return tx, schedule


def head_mask(tree) -> PyTree:
    """``True`` on the head leaves (``trees.HEAD_RULE``), ``False`` elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: HEAD_RULE.match(path_str(kp)) is not None, tree
    )


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


# --------------------------------------------------------------------------- the step


def loss_fn(params, model, images, labels, *, spec=None, label_smoothing=0.0):
    """Mean softmax cross-entropy. With a ``quant.QuantSpec`` (QAT) the model runs at the
    STE fake-quantized params; with ``spec=None`` (FP) at the params themselves."""
    if spec is not None:  # on the float32 params, before the model casts to its dtype
        params = quant.fake_quant_tree(params, spec, ste=True)
    logits = model.apply({"params": params}, images).astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def _accumulate(grad, params, images, labels, accum: int, mesh):
    """The mean ``(loss, grads)`` of ``grad(images, labels)`` over ``accum`` equal
    micro-batches of the global batch (micro j = rows j, j+accum, ..., each spread over
    all devices), summed in a ``lax.scan``: one micro-batch's activations at a time."""
    m = images.shape[0] // accum

    def micro(x):  # [B, ...] -> [accum, m, ...]
        x = x.reshape(m, accum, *x.shape[1:])
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))
        return jax.lax.with_sharding_constraint(
            jnp.swapaxes(x, 0, 1), NamedSharding(mesh, P(None, "data"))
        )

    def body(carry, xy):
        return jax.tree.map(jnp.add, carry, grad(*xy)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zero, (micro(images), micro(labels)))
    return jax.tree.map(lambda g: g / accum, (loss, grads))


def _step(model, tx, mesh, *, mode, spec=None, accum=1, label_smoothing=0.0, preprocess=None):
    """The unjitted ``(state, images, labels) -> (state, metrics)`` of one optimizer step
    (see :func:`make_train_step`)."""
    if mode not in MODES:
        raise TrainError(f"mode {mode!r} is not one of {MODES}")
    if mode == "qat" and not isinstance(spec, quant.QuantSpec):
        raise TrainError(f"mode 'qat' needs spec=quant.QuantSpec(bits, ...), got {spec!r}")
    prep = (lambda x: x) if preprocess is None else preprocess

    def lossp(params, model, images, labels, **kw):
        return loss_fn(params, model, prep(images), labels, **kw)

    grad_fn = jax.value_and_grad(lossp)
    kw = dict(spec=spec if mode == "qat" else None, label_smoothing=label_smoothing)

    def step(state, images, labels):
        params = state["params"]
        if accum == 1:
            loss, grads = grad_fn(params, model, images, labels, **kw)
        else:
            grad = functools.partial(grad_fn, params, model, **kw)
            loss, grads = _accumulate(grad, params, images, labels, accum, mesh)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def _scan(step, resident):
    """``(state, xs, data) -> (state, stacked metrics)``: ``step`` over ``xs`` in a scan."""

    def chunk(state, xs, data):
        def body(st, x):
            images, labels = x if resident is None else gather(resident, *data, x)
            return step(st, images, labels)

        return jax.lax.scan(body, state, xs)

    return chunk


def make_train_step(model, tx, mesh, state_sharding, **kw):
    """Jitted ``(state, images, labels) -> (state, metrics)``; ``state`` is donated.

    Keywords: ``mode`` ("fp" or "qat"), ``spec`` (the ``quant.QuantSpec`` QAT trains
    for; unused by FP), ``accum``, ``label_smoothing``, ``preprocess``.
    ``preprocess``: a ``data.DevicePreprocess`` run on each (micro-)batch inside the
    step, so ``images`` arrive as uint8 at their stored size; None: they are model
    inputs already. The model's ``dtype`` is the compute dtype (bfloat16 halves the
    activations); params, optimizer state and QAT's fake-quant stay float32.

    ``state = {"params", "opt_state", "step"}``. With ``accum > 1`` the global batch is
    split into ``accum`` equal micro-batches (each spread over all devices) whose mean
    gradient feeds one optimizer update: the same update, a fraction of the activations.

    It is :func:`make_train_chunk` at ``k = 1``: the step compiled as a scan body, so
    one step per dispatch and ``k`` per dispatch agree bit for bit. (A bare jitted
    step does not: XLA on CPU fuses the patch embedding's gradient differently outside a
    loop, about 1e-9 apart in Adam's moments after 4 steps.)
    """
    chunk = _scan(_step(model, tx, mesh, **kw), None)
    batch_sh = NamedSharding(mesh, P("data"))

    def step(state, images, labels):
        state, m = chunk(state, (images[None], labels[None]), ())
        return state, jax.tree.map(lambda v: v[0], m)

    return jax.jit(
        step,
        donate_argnums=(0,),
        in_shardings=(state_sharding, batch_sh, batch_sh),
        out_shardings=(state_sharding, NamedSharding(mesh, P())),
    )


def make_train_chunk(model, tx, mesh, state_sharding, *, resident=None, **kw):
    """Jitted ``(state, xs, data) -> (state, metrics)``: ``k`` optimizer steps in one
    dispatch (a ``lax.scan``), bit-identical to ``k`` calls of :func:`make_train_step`
    (``tests/test_train.py``); each metric comes back stacked, ``[k]``.

    ``resident`` (a ``data.ResidentSplit``): ``data = (images, labels)`` are its device
    arrays and ``xs`` the stream positions ``[k, B]`` (``data.positions_array``); each
    step gathers its batch on device. None: ``xs = (images [k, B, ...], labels [k, B])``
    host batches placed with ``data.loader.place_rows(..., steps=k)`` and ``data = ()``.
    Keywords as :func:`make_train_step`.
    """
    chunk = _scan(_step(model, tx, mesh, **kw), resident)
    if resident is None:
        stacked = NamedSharding(mesh, P(None, "data"))
        xs_sh, data_sh = (stacked, stacked), ()
    else:
        xs_sh = positions_sharding(resident)
        data_sh = (resident.images.sharding, resident.labels.sharding)
    return jax.jit(
        chunk,
        donate_argnums=(0,),
        in_shardings=(state_sharding, xs_sh, data_sh),
        out_shardings=(state_sharding, NamedSharding(mesh, P())),
    )


# --------------------------------------------------------------------------- init


# --------------------------------------------------------------------------- divergence


@jax.jit
def all_finite(tree) -> jax.Array:
    """One device scalar: whether every float leaf of ``tree`` is finite."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating)]  # fmt: skip
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def check_metrics(ms: list[dict], first_step: int, lr: float, workdir: str, last_good) -> None:
    """Stop the run at the first step whose loss or gradient norm is NaN/Inf.

    ``ms``: host metrics of steps ``first_step, first_step + 1, ...``. ``last_good``:
    the step of the newest checkpoint (kept; None if there is none)."""
    for i, m in enumerate(ms):
        bad = [k for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
        if bad:
            raise diverged(first_step + i, f"the {bad[0]} is {float(m[bad[0]])}", lr, workdir,
                           last_good)  # fmt: skip


def diverged(step: int, what: str, lr: float, workdir: str, last_good) -> TrainError:
    kept = "no checkpoint" if last_good is None else f"the checkpoint of step {last_good}"
    return TrainError(
        f"step {step}: {what}; training diverged and stopped. {workdir} keeps {kept}, and no "
        f"final params were written. Lower optim.lr (now {lr:g}) and rerun with --force "
        "(or in another --workdir)"
    )


def abstract_state(params, tx) -> dict:
    """The train state's shapes and dtypes (``jax.eval_shape``), for shardings and restore."""
    return jax.eval_shape(
        lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}, params
    )


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
