"""Tasks and data: the paper's 22 tasks, offline sources, and a deterministic, shardable pipeline.

Images travel as uint8 at their stored size; :class:`DevicePreprocess` (view, resize,
grey->RGB, [-1, 1]) runs on the device inside the jitted train step and eval.

Sources (see :mod:`qvec_jax.data.sources`): TFDS datasets prepared as array_record
(read without TensorFlow), IDX directories (MNIST family; Debian's
``dataset-fashion-mnist`` at /usr/share/datasets/fashion-mnist), scikit-learn digits
(the embedded default, always available), and image folders.
"""

from __future__ import annotations

from qvec_jax.data.device import DevicePreprocess, device_preprocess
from qvec_jax.data.pipeline import (
    SPLITS,
    Split,
    clear_cache,
    eval_batches,
    load_split,
    locate,
    num_train_steps,
    open_task,
    val_size,
)
from qvec_jax.data.registry import (
    TASKS,
    VIEW_SYNTAX,
    Task,
    View,
    derive,
    get_task,
    list_tasks,
    parse_view,
    register_task,
    split_task_names,
)
from qvec_jax.data.sources import (
    DigitsSource,
    FolderSource,
    IdxSource,
    data_root,
    read_idx,
)
from qvec_jax.data.tfds_source import TfdsSource
from qvec_jax.sharding import shard_batch  # re-exported; placement lives in sharding

__all__ = [
    "SPLITS",
    "DevicePreprocess",
    "TASKS",
    "VIEW_SYNTAX",
    "DigitsSource",
    "FolderSource",
    "IdxSource",
    "Split",
    "Task",
    "TfdsSource",
    "View",
    "availability",
    "clear_cache",
    "data_root",
    "derive",
    "device_preprocess",
    "eval_batches",
    "get_task",
    "list_tasks",
    "load_split",
    "num_train_steps",
    "open_task",
    "parse_view",
    "read_idx",
    "register_task",
    "shard_batch",
    "split_task_names",
    "val_size",
]


def availability(task: Task | str, data_dir=None) -> tuple[bool, str, str]:
    """``(available, source, where_or_why)`` for the first available source of ``task``."""
    task = get_task(task)
    src, _, reasons = locate(task, data_dir)
    if src is not None:
        return True, src.describe(), reasons[0]
    return False, "|".join(s.describe() for s in task.sources), " | ".join(reasons)
