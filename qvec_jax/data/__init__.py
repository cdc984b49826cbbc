"""Tasks and data: the paper's 22 tasks, offline sources, and a deterministic, shardable pipeline.

Sources (see :mod:`qvec_jax.data.sources`): TFDS datasets prepared as array_record
(read without TensorFlow), IDX directories (MNIST family; Debian's
``dataset-fashion-mnist`` at /usr/share/datasets/fashion-mnist), scikit-learn digits
(the embedded default, always available), and image folders.
"""

from __future__ import annotations

from qvec_jax.data.pipeline import (
    SPLITS,
    Split,
    clear_cache,
    eval_batches,
    load_split,
    locate,
    num_train_steps,
    open_task,
    preprocess,
    shard_batch,
    train_batches,
    val_size,
)
from qvec_jax.data.registry import TASKS, Task, View, derive, get_task, list_tasks, register_task
from qvec_jax.data.sources import (
    DigitsSource,
    FolderSource,
    IdxSource,
    TfdsSource,
    data_root,
    read_idx,
)

__all__ = [
    "SPLITS",
    "TASKS",
    "DigitsSource",
    "FolderSource",
    "IdxSource",
    "Split",
    "Task",
    "TfdsSource",
    "View",
    "add_cli",
    "availability",
    "clear_cache",
    "data_root",
    "derive",
    "eval_batches",
    "get_task",
    "list_tasks",
    "load_split",
    "num_train_steps",
    "open_task",
    "preprocess",
    "read_idx",
    "register_task",
    "shard_batch",
    "train_batches",
    "val_size",
]


def availability(task: Task | str, data_dir=None) -> tuple[bool, str, str]:
    """``(available, source, where_or_why)`` for the first available source of ``task``."""
    task = get_task(task)
    src, _, reasons = locate(task, data_dir)
    if src is not None:
        return True, src.describe(), reasons[0]
    return False, "|".join(s.describe() for s in task.sources), " | ".join(reasons)


def _cmd_tasks(args) -> int:
    names = list_tasks(paper_only=args.paper)
    if args.name:
        names = [get_task(n).name for n in args.name]
    root = data_root(args.data_dir)
    print(f"data root: {root}  (--data-dir or $QVEC_DATA_DIR)")
    header = f"{'task':<15} {'source':<40} {'classes':>7} {'epochs':>6}  available"
    print(header)
    print("-" * len(header))
    n_ok = 0
    for name in names:
        t = get_task(name)
        ok, src, where = availability(t, root)
        n_ok += ok
        view = f" [{t.view.describe()}]" if not t.view.is_identity else ""
        epochs = "-" if t.epochs is None else str(t.epochs)
        status = f"yes  {where}" if ok else "no"
        print(f"{name:<15} {(src + view):<40} {t.num_classes:>7} {epochs:>6}  {status}")
        if not ok and args.verbose:
            print(f"{'':<15} why: {where}")
    print(f"{n_ok} of {len(names)} tasks available on this machine")
    if not args.verbose and n_ok < len(names):
        print("run `qvec tasks -v` to see what each missing task needs")
    return 0


def add_cli(sub) -> None:
    """Register ``qvec tasks``."""
    p = sub.add_parser(
        "tasks",
        help="list registered tasks, their sources, and whether they are available here",
        description="List every registered task with its source, classes, epochs (METHOD.md) "
        "and whether its data is available on this machine.",
    )
    p.add_argument("name", nargs="*", help="only these tasks")
    p.add_argument(
        "--data-dir", default=None, help="data root (default $QVEC_DATA_DIR, ~/tensorflow_datasets)"
    )
    p.add_argument("--paper", action="store_true", help="only the paper's 22 tasks")
    p.add_argument("-v", "--verbose", action="store_true", help="say what each missing task needs")
    p.set_defaults(func=_cmd_tasks)
