"""Unlabelled proxy inputs for lambda selection: a seeded sample of a task's TRAIN images.

Shared by the grid's strategy measurements (:mod:`qvec_jax.grid.extras`) and ``qvec
patch --lam auto --proxy`` so both read the same images for the same (task, n, seed).
Only the train split is read (never val or test) and the labels are never touched. The
sample is :func:`qvec_jax.data.overlap.draw_positions`'s, so
:func:`~qvec_jax.data.overlap.overlap_counts` says how many of its images a receiver's
splits hold.
"""

from __future__ import annotations

import numpy as np

from qvec_jax import data
from qvec_jax.data import overlap
from qvec_jax.select.proxy import subsample


def train_images(
    task: str, n: int, *, image_size: int, seed: int = 0, data_dir: str | None = None
) -> np.ndarray:
    """``min(n, len(train))`` model inputs (float32 ``[k, s, s, 3]`` in [-1, 1]) of
    ``task``'s train split at positions drawn without replacement by
    ``np.random.default_rng(seed)``, in position order."""
    if n < 1:
        raise ValueError(f"train_images: n must be >= 1, got {n}")
    split = data.load_split(task, "train", image_size=image_size, data_dir=data_dir)
    pos = overlap.draw_positions(len(split), n, seed)  # the sample overlap_counts counts
    return np.asarray(split.inputs(pos))


def images_overlap(
    tasks, n: int, receiver: str, *, seed: int = 0, data_dir=None, measured=None, proxy_seed=0
) -> dict[str, int]:
    """How many images of ``receiver``'s train, val and test splits are among the
    :func:`train_images` of ``tasks`` (``n`` each, drawn with ``seed``, concatenated in
    order: a leave-one-out merge's donors), per split; ``measured``: a ``select.Proxy``'s
    ``n`` (seed ``proxy_seed``), which measures on a subsample when given more inputs.

    No data is read when no task can overlap the receiver (``overlap.may_overlap``);
    raises ``OSError``/``ValueError``/``KeyError`` when the data needed to count is absent."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not any(overlap.may_overlap(t, receiver) for t in tasks):
        return overlap.zero_counts()
    sizes = [len(overlap.sample_indices(t, n, seed, data_dir)[1]) for t in tasks]
    keep = None
    if measured is not None and sum(sizes) > measured:
        keep = subsample(sum(sizes), measured, proxy_seed)
    parts, start = [], 0
    for t, k in zip(tasks, sizes):
        local = None if keep is None else keep[(keep >= start) & (keep < start + k)] - start
        if local is None or len(local):
            parts.append(
                overlap.overlap_counts(t, n, receiver, seed=seed, data_dir=data_dir, keep=local)
            )
        start += k
    return overlap.add_counts(parts)
