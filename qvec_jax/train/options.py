"""What a training config says about how to run, read and checked in one place.

``compute_dtype`` (what the ViT computes in), ``data.workers``, ``data.device_bytes``
and ``steps_per_dispatch`` (how the input reaches the devices: speed only, results
are bit-identical), and the run's length in steps.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from qvec_jax.train.step import TrainError

__all__ = [
    "COMPUTE_DTYPES", "DEVICE_BYTES", "compute_dtype", "data_workers", "device_bytes",
    "steps_per_dispatch", "total_train_steps",
]  # fmt: skip


def total_train_steps(cfg: ml_collections.ConfigDict, num_train: int, task_epochs) -> int:
    """``total_steps`` if > 0, else ceil(epochs * num_train / batch_size)."""
    if cfg.total_steps > 0:
        return int(cfg.total_steps)
    from qvec_jax import data as qdata

    epochs = cfg.epochs if cfg.epochs > 0 else task_epochs
    if not epochs or epochs <= 0:
        raise TrainError("no epochs for this task: set epochs=... or total_steps=...")
    return qdata.num_train_steps(int(num_train), int(cfg.batch_size), float(epochs))


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(cfg: ml_collections.ConfigDict):
    """``model.compute_dtype`` ("float32" when absent) as a dtype: the ViT's activations
    and matmuls; params, optimizer state, fake-quant and PTQ stay float32."""
    name = cfg.model.get("compute_dtype", "float32")
    if name not in COMPUTE_DTYPES:
        raise TrainError(f"model.compute_dtype={name!r}: use one of {COMPUTE_DTYPES}")
    return jnp.dtype(name)


def data_workers(cfg: ml_collections.ConfigDict) -> int:
    """``data.workers``: grain worker processes reading the training input (0: this
    process; absent in older configs: 0)."""
    n = cfg.data.get("workers", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TrainError(f"data.workers={n!r}: use a whole number >= 0 (0 reads in-process)")
    return n


#: ``data.device_bytes`` when a config has none: training splits up to 1 GiB of uint8
#: a device live on the devices (Fashion-MNIST's train split is 42 MB).
DEVICE_BYTES = 1 << 30


def device_bytes(cfg: ml_collections.ConfigDict) -> int:
    """``data.device_bytes``: the most bytes of a training split each device holds (the
    split is gathered on device, ``data.resident``); 0 streams every batch from the host."""
    n = cfg.data.get("device_bytes", DEVICE_BYTES)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TrainError(f"data.device_bytes={n!r}: use a whole number of bytes >= 0 "
                         "(0 streams the training input from the host)")  # fmt: skip
    return n


def steps_per_dispatch(cfg: ml_collections.ConfigDict) -> int:
    """``steps_per_dispatch``: optimizer steps per jitted call (a ``lax.scan``, cut at
    every record and checkpoint; absent or 0: up to the next record, ``log_every``)."""
    n = cfg.get("steps_per_dispatch", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TrainError(f"steps_per_dispatch={n!r}: use a whole number >= 0 (0: log_every)")
    return n or int(cfg.log_every)
