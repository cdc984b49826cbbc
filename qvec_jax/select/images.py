"""Unlabelled proxy inputs for lambda selection: a seeded sample of a task's TRAIN images.

Shared by the grid's strategy measurements (:mod:`qvec_jax.grid.extras`) and ``qvec
patch --lam auto --proxy`` so both read the same images for the same (task, n, seed).
Only the train split is read (never val or test) and the labels are never touched.
"""

from __future__ import annotations

import numpy as np

from qvec_jax import data


def train_images(
    task: str, n: int, *, image_size: int, seed: int = 0, data_dir: str | None = None
) -> np.ndarray:
    """``min(n, len(train))`` model inputs (float32 ``[k, s, s, 3]`` in [-1, 1]) of
    ``task``'s train split at positions drawn without replacement by
    ``np.random.default_rng(seed)``, in position order."""
    if n < 1:
        raise ValueError(f"train_images: n must be >= 1, got {n}")
    split = data.load_split(task, "train", image_size=image_size, data_dir=data_dir)
    take = min(int(n), len(split))
    pos = np.sort(np.random.default_rng(seed).choice(len(split), take, replace=False))
    return np.asarray(split.inputs(pos))
