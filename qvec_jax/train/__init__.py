"""FP and QAT fine-tuning on a ``jax.sharding`` mesh, resumable (layer 4).

- :mod:`~qvec_jax.train.loop`: :func:`finetune`: config checks, setup and the loop with
  its metrics records and state checkpoints.
- :mod:`~qvec_jax.train.step`: the optimizer (``optax``), the loss with the
  straight-through fake-quant for QAT, the jitted step, the divergence checks.
- :mod:`~qvec_jax.train.workdir`: a run's folder: config, lock, ``metrics.jsonl``, orbax
  state checkpoints, the final params and evaluation.
"""

from qvec_jax.train.loop import (
    COMPUTE_DTYPES,
    INIT_KINDS,
    build_model_and_params,
    compute_dtype,
    data_workers,
    finetune,
    maybe_initialize_distributed,
    total_train_steps,
    validate,
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
    make_train_step,
)
from qvec_jax.train.workdir import final_eval

__all__ = [
    "COMPUTE_DTYPES",
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
    "diverged",
    "final_eval",
    "finetune",
    "head_mask",
    "loss_fn",
    "make_optimizer",
    "make_train_step",
    "maybe_initialize_distributed",
    "total_train_steps",
    "validate",
]
