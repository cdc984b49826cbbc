"""When images of two tasks can be the same model input: the one overlap rule of the package.

An image of task A and an image of task B *overlap* when they can be the same model input:
the same example of the same source (dataset, example index) shown through the same view
(rotation, flip, inversion). A class subset only decides which examples a task holds, so
``fashion_mnist`` and ``fmnist_a`` overlap on the examples of classes 0-4, while
``fmnist_rot90`` shows every Fashion-MNIST example turned and overlaps neither of them.

Splits map to source examples as :func:`qvec_jax.data.load_split` takes them
(:func:`qvec_jax.data.pipeline.split_indices`): ``test`` is the official test part;
``train`` and ``val`` split the official train part, after a class-subset view's filter,
with ``SPLIT_SEED``. So a class subset has a val split of its own, and the train images
of one task can be val images of another: 256 train images of ``fashion_mnist`` (the
demo's pretext sample) hold 124 of ``fmnist_a``'s train images and 14 of its val images.

- :func:`same_task`: the same sources and view: the same images (one task, two names).
- :func:`may_overlap`: whether two tasks can share inputs at all, from their definitions
  alone (no data read): a common source, the same rotation/flip/inversion, a class in
  common. False means they never do.
- :func:`draw_positions`: the one seeded draw of ``n`` positions in a split (proxy images
  of ``select.train_images``, ``qvec patch --proxy``, ``qvec ptq --calib``, the grid).
- :func:`overlap_counts`: how many images of such a sample of a task's train split are
  in each split of a receiver (``{"train": k, "val": k, "test": k}``).

Every user of a sample (the grid, the report, the CLI, each strategy's data label)
counts with these functions, so they agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from qvec_jax.data.pipeline import SPLITS, split_indices
from qvec_jax.data.registry import Task, get_task
from qvec_jax.data.sources import data_root

__all__ = [
    "SPLITS",
    "add_counts",
    "describe",
    "draw_positions",
    "has_overlap",
    "may_overlap",
    "overlap_counts",
    "same_task",
    "sample_indices",
    "zero_counts",
]

Counts = dict[str, int]


def zero_counts() -> Counts:
    """``{"train": 0, "val": 0, "test": 0}``."""
    return dict.fromkeys(SPLITS, 0)


def _task(name) -> Task | None:
    try:
        return get_task(name)
    except (KeyError, ValueError):  # a task of a meta or a record this registry does not know
        return None


def same_task(a: str | None, b: str | None) -> bool:
    """Whether ``a`` and ``b`` name the same images: the same sources and view (a name this
    registry does not know equals only itself)."""
    if not a or not b:
        return False
    ta, tb = _task(a), _task(b)
    if ta is None or tb is None:
        return a == b
    return ta.sources == tb.sources and ta.view == tb.view


def may_overlap(a: str | None, b: str | None) -> bool:
    """Whether tasks ``a`` and ``b`` can show the same model inputs (module docstring), from
    their definitions: a source in common, the same rotation/flip/inversion and a class in
    common. ``False``: they never do; ``True``: :func:`overlap_counts` says how many."""
    if not a or not b:
        return False
    ta, tb = _task(a), _task(b)
    if ta is None or tb is None:
        return a == b
    va, vb = ta.view, tb.view
    if not set(ta.sources) & set(tb.sources):
        return False
    if (va.rot90, va.hflip, va.invert) != (vb.rot90, vb.hflip, vb.invert):
        return False
    if va.classes is None or vb.classes is None:
        return True
    return bool(set(va.classes) & set(vb.classes))


def draw_positions(size: int, n: int, seed: int = 0) -> np.ndarray:
    """``min(n, size)`` positions of a split of ``size`` examples, drawn without
    replacement by ``np.random.default_rng(seed)``, in ascending order."""
    if n < 1:
        raise ValueError(f"a sample needs n >= 1 images, got {n}")
    take = min(int(n), int(size))
    return np.sort(np.random.default_rng(seed).choice(int(size), take, replace=False))


_INDICES: dict = {}


def _indices(task: str, split: str, data_dir) -> tuple:
    """``(source, part, indices)`` of a split, cached per (task, split, data root)."""
    key = (get_task(task), split, str(data_root(data_dir)))
    if key not in _INDICES:
        src, _, part, idx = split_indices(task, split, data_dir)
        _INDICES[key] = (src, part, idx)
    return _INDICES[key]


def sample_indices(task: str, n: int, seed: int = 0, data_dir=None) -> tuple:
    """``(source, indices)``: the source examples (official train part) of the ``n``
    train images of ``task`` that ``draw_positions`` picks, in the sample's order."""
    src, _, idx = _indices(task, "train", data_dir)
    return src, idx[draw_positions(len(idx), n, seed)]


def overlap_counts(
    task: str, n: int, receiver: str, *, seed: int = 0, data_dir=None, keep=None
) -> Counts:
    """How many of the ``n`` train images of ``task`` drawn with ``seed`` (the sample of
    ``select.train_images``) are images of ``receiver``'s train, val and test splits.
    ``keep``: positions in that sample actually used (a subsample), default all.

    Reads no data when the two tasks cannot overlap (:func:`may_overlap`); otherwise the
    splits' indices (labels only, for a class subset). Raises ``OSError`` (the data is
    not here) or ``ValueError``/``KeyError`` (an unknown task) when it cannot count."""
    out = zero_counts()
    if not may_overlap(task, receiver):
        return out
    src, sample = sample_indices(task, n, seed, data_dir)
    if keep is not None:
        sample = sample[np.asarray(keep, dtype=np.int64)]
    for split in SPLITS:
        r_src, part, idx = _indices(receiver, split, data_dir)
        if r_src == src and part == "train":  # a train sample is never an official test image
            out[split] = int(np.isin(sample, idx).sum())
    return out


def has_overlap(counts: Mapping | None) -> bool:
    """Whether ``counts`` (of :func:`overlap_counts`) holds any shared image."""
    return bool(counts) and any(int(counts.get(s) or 0) for s in SPLITS)


def add_counts(many: Iterable[Mapping]) -> Counts:
    """The per-split sum of several :func:`overlap_counts`."""
    out = zero_counts()
    for c in many:
        for s in SPLITS:
            out[s] += int(c.get(s) or 0)
    return out


def describe(counts: Mapping) -> str:
    """``"124 train, 14 val, 0 test"``."""
    return ", ".join(f"{int(counts.get(s) or 0)} {s}" for s in SPLITS)
