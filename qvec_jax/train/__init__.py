"""FP and QAT fine-tuning on a ``jax.sharding`` mesh, resumable (layer 4).

- :mod:`~qvec_jax.train.loop`: :func:`finetune`: config checks, setup and the loop with
  its metrics records and state checkpoints.
- :mod:`~qvec_jax.train.step`: the optimizer (``optax``), the loss with the
  straight-through fake-quant for QAT, the jitted step and the jitted chunk of steps
  (a ``lax.scan``), the divergence checks.
- :mod:`~qvec_jax.train.feed`: the input of a chunk: positions into a device-resident
  split, or streamed host batches.
- :mod:`~qvec_jax.train.options`: the config's compute dtype, input settings, length.
- :mod:`~qvec_jax.train.workdir`: a run's folder: config, lock, ``metrics.jsonl``, orbax
  state checkpoints, the final params and evaluation.
"""

from qvec_jax.train.loop import (
    INIT_KINDS,
    build_model_and_params,
    finetune,
    maybe_initialize_distributed,
    validate,
)
from qvec_jax.train.options import (
    COMPUTE_DTYPES,
    DEVICE_BYTES,
    compute_dtype,
    data_workers,
    device_bytes,
    steps_per_dispatch,
    total_train_steps,
)
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
    head_mask,
    loss_fn,
    make_optimizer,
    make_train_chunk,
    make_train_step,
)
from qvec_jax.train.workdir import final_eval

__all__ = [
    "COMPUTE_DTYPES",
    "DEVICE_BYTES",
    "INIT_KINDS",
    "MODES",
    "TrainError",
    "abstract_state",
    "accumulation_steps",
    "all_finite",
    "build_model_and_params",
    "check_metrics",
    "check_numbers",
    "compute_dtype",
    "create_state",
    "data_workers",
    "device_bytes",
    "diverged",
    "final_eval",
    "finetune",
    "head_mask",
    "loss_fn",
    "make_optimizer",
    "make_train_chunk",
    "make_train_step",
    "maybe_initialize_distributed",
    "steps_per_dispatch",
    "total_train_steps",
    "validate",
]
