"""Splits, preprocessing and batching: from a source to sharded device arrays.

Path of one batch: ``reader.read(part, indices)`` (raw images) -> :func:`apply_view` ->
:func:`preprocess` (resize, grey->RGB, [-1, 1]) -> numpy batch ->
:func:`qvec_jax.sharding.shard_batch`.

Splits (as in the paper): ``val`` = 10% of the task's official train (at most 5000),
drawn with ``np.random.default_rng(SPLIT_SEED=0)`` independently of the run seed;
``train`` = the rest of official train; ``test`` = the official test. Indices keep the
source's order. A class-subset view filters first, so val is 10% of the subset.

Small splits are preprocessed once and held in memory (cached per task, split,
image_size, data root); when the preprocessed split would exceed
``$QVEC_DATA_MAX_MB`` (default 2048) MiB it streams: every batch is read, decoded and
preprocessed on demand from the source (TFDS array_record gives random access).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from qvec_jax.data.registry import Task, View, get_task
from qvec_jax.data.sources import data_root

SPLITS = ("train", "val", "test")
SPLIT_SEED = 0
VAL_FRACTION = 0.1
VAL_MAX = 5000


def val_size(n_train_official: int) -> int:
    """Number of validation examples drawn from an official train split of this size."""
    return min(VAL_MAX, int(n_train_official * VAL_FRACTION))


def split_positions(n: int) -> dict[str, np.ndarray]:
    """Positions (0..n-1) of the official train that form ``train`` and ``val``."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    k = val_size(n)
    return {"val": np.sort(perm[:k]), "train": np.sort(perm[k:])}


# ----------------------------------------------------------------------------- preprocessing


def apply_view(images, view: View, max_value: float):
    """Apply rot90 (counter-clockwise), then hflip, then invert, to raw images (array or list)."""
    if view.rot90 == 0 and not view.hflip and not view.invert:
        return images

    def one(x, ax):  # spatial axes start at ``ax``: 0 for one image, 1 for a batch
        if view.rot90:
            x = np.rot90(x, view.rot90, axes=(ax, ax + 1))
        if view.hflip:
            x = np.flip(x, axis=ax + 1)
        if view.invert:
            x = max_value - x.astype(np.float32)
        return x

    if isinstance(images, list):
        return [one(x, 0) for x in images]
    return one(images, 1)


def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32)


def preprocess(images, max_value: float, image_size: int, *, keep_grey: bool = False) -> np.ndarray:
    """Raw images (``[n,h,w(,c)]`` or a list of ``[h,w(,c)]``) -> float32 NHWC in [-1, 1].

    Values are divided by ``max_value``; each channel is resized to ``image_size`` x
    ``image_size`` with PIL's bilinear filter in float32 (PIL widens the filter when
    downscaling, i.e. antialiased; no aspect-preserving crop); grey becomes 3 channels
    (or stays 1 with ``keep_grey``, which the in-memory cache uses to save memory).
    """
    n = len(images)
    if isinstance(images, np.ndarray) and images.ndim in (3, 4):
        arr = images if images.ndim == 4 else images[..., None]
        grey = arr.shape[-1] == 1
    else:
        arr = None
        grey = all(np.ndim(x) == 2 or np.shape(x)[-1] == 1 for x in images)
    c_out = 1 if (grey and keep_grey) else 3
    out = np.empty((n, image_size, image_size, c_out), dtype=np.float32)
    same_size = arr is not None and arr.shape[1:3] == (image_size, image_size)
    if same_size and arr.shape[-1] in (1, 3, 4):
        out[...] = arr[..., :c_out] if arr.shape[-1] != 1 else arr  # broadcasts grey to 3
    else:
        for i in range(n):
            x = np.asarray(images[i], dtype=np.float32)
            if x.ndim == 2:
                x = x[..., None]
            if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
                raise ValueError(f"image {i} has shape {x.shape}; expected [h, w] or [h, w, 1|3|4]")
            x = x[..., :3]
            if x.shape[:2] != (image_size, image_size):
                x = np.stack([_resize_plane(x[..., c], image_size) for c in range(x.shape[-1])], -1)
            out[i] = x if x.shape[-1] == c_out else x[..., :1]  # grey broadcasts to 3
    out *= 2.0 / max_value
    out -= 1.0
    return np.clip(out, -1.0, 1.0, out=out)


def _rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


# ----------------------------------------------------------------------------- splits


@dataclass(eq=False)
class Split:
    """One split of one task at one image size.

    ``images`` (float32 NHWC in [-1, 1], 3 channels) and ``labels`` (int32) are the whole
    split as arrays; ``get(positions)`` reads only some examples (streams if large).
    """

    task: Task
    split: str
    image_size: int
    source: str  # where the examples came from (source kind + location)
    indices: np.ndarray  # indices into the source's official part
    part: str  # "train" or "test": the official part the indices refer to
    reader: object = field(repr=False)
    in_memory: bool = True
    _images: np.ndarray | None = field(default=None, repr=False)
    _labels: np.ndarray | None = field(default=None, repr=False)
    _label_map: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.indices)

    def _relabel(self, raw: np.ndarray, where) -> np.ndarray:
        k = self.task.source_num_classes
        if raw.size and (raw.min() < 0 or raw.max() >= k):
            raise ValueError(
                f"task {self.task.name!r}: labels in {self.source} ({where}) range "
                f"{raw.min()}..{raw.max()} but the task declares {k} classes (0..{k - 1}); "
                "fix the task's num_classes or the data"
            )
        labels = raw if self._label_map is None else self._label_map[raw]
        return labels.astype(np.int32)

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            raw = self.reader.labels(self.part)[self.indices]
            self._labels = self._relabel(raw, f"{self.part} part")
        return self._labels

    @property
    def images(self) -> np.ndarray:
        """The whole split, preprocessed (materialised once, then cached; read-only view)."""
        if self._images is None:
            self._images, self._labels = self._read(np.arange(len(self)), keep_grey=True)
        x = self._images
        return np.broadcast_to(x, (*x.shape[:3], 3)) if x.shape[-1] == 1 else x

    def _read(self, positions: np.ndarray, keep_grey: bool = False):
        raw_images, raw_labels = self.reader.read(self.part, self.indices[positions])
        labels = self._relabel(np.asarray(raw_labels), f"{self.part} part")
        mv = self.reader.max_value
        raw_images = apply_view(raw_images, self.task.view, mv)
        return preprocess(raw_images, mv, self.image_size, keep_grey=keep_grey), labels

    def get(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` at ``positions`` (0..len-1) of this split."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.in_memory:
            self.images  # noqa: B018 (materialise the cache)
            return _rgb(self._images[positions]), self.labels[positions]
        return self._read(positions)


_READERS: dict = {}
_SPLITS: dict = {}


def clear_cache() -> None:
    """Forget every cached reader and split (frees their memory)."""
    _READERS.clear()
    _SPLITS.clear()


def locate(task: Task | str, data_dir=None) -> tuple:
    """``(source, root, reasons)``: the first source of ``task`` whose data is present
    (``source`` is None if none is; ``reasons`` then says, per source, what is missing)."""
    task = get_task(task)
    root = data_root(data_dir)
    reasons = []
    for src in task.sources:
        ok, where = src.locate(root)
        if ok:
            return src, root, [where]
        reasons.append(f"{src.describe()}: {where}")
    return None, root, reasons


def open_task(task: Task | str, data_dir=None):
    """``(source, reader)`` for the first available source of ``task`` (readers are cached)."""
    task = get_task(task)
    src, root, reasons = locate(task, data_dir)
    if src is None:
        raise FileNotFoundError(
            f"no source of task {task.name!r} is available under data root {root}:\n"
            + "\n".join(f"  - {r}" for r in reasons)
            + "\nPass data_dir or set QVEC_DATA_DIR to the root that holds the data."
        )
    key = (src, str(root))
    if key not in _READERS:
        _READERS[key] = src.open(root)
    return src, _READERS[key]


def _part_indices(task: Task, reader, part: str) -> np.ndarray:
    n = reader.size(part)
    if task.view.classes is None:
        return np.arange(n, dtype=np.int64)
    keep = np.isin(reader.labels(part), np.asarray(task.view.classes))
    return np.flatnonzero(keep).astype(np.int64)


def load_split(
    task_or_name: Task | str,
    split: str,
    *,
    image_size: int,
    data_dir: str | os.PathLike | None = None,
    in_memory: bool | None = None,
) -> Split:
    """One split (``"train"``, ``"val"`` or ``"test"``) of a task, preprocessed to ``image_size``.

    ``in_memory=None`` decides by size (see module docstring); True/False forces it.
    """
    task = get_task(task_or_name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    root = data_root(data_dir)
    key = (task, split, image_size, str(root), in_memory)
    if key in _SPLITS:
        return _SPLITS[key]
    src, reader = open_task(task, root)
    part = "test" if split == "test" else "train"
    indices = _part_indices(task, reader, part)
    if split != "test":
        indices = indices[split_positions(len(indices))[split]]
    if len(indices) == 0:
        raise ValueError(f"task {task.name!r}: split {split!r} is empty in {reader.where}")
    if in_memory is None:
        limit = float(os.environ.get("QVEC_DATA_MAX_MB", 2048)) * 2**20
        in_memory = reader.in_memory or len(indices) * image_size**2 * 3 * 4 <= limit
    label_map = None
    if task.view.classes is not None:
        label_map = np.full(task.source_num_classes, -1, dtype=np.int64)
        label_map[np.asarray(task.view.classes)] = np.arange(len(task.view.classes))
    out = Split(
        task=task,
        split=split,
        image_size=image_size,
        source=f"{src.describe()} @ {reader.where}",
        indices=indices,
        part=part,
        reader=reader,
        in_memory=bool(in_memory),
        _label_map=label_map,
    )
    if reader.in_memory:  # cheap: check every label of the split now, not at the first batch
        out.labels  # noqa: B018
    _SPLITS[key] = out
    return out


# ----------------------------------------------------------------------------- batching


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: ``np.random.default_rng([seed, epoch]).permutation(n)``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_positions(n: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """Positions of the examples in batch ``step`` of the training stream (O(1) in ``step``).

    The stream is the concatenation of epoch permutations; batches run across epoch
    boundaries, so every batch is full and no example is dropped.
    """
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(pos, n)
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_permutation(n, seed, int(e))[offsets[sel]]
    return out


def num_train_steps(split: Split | int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for ``epochs`` passes over ``split`` at ``batch_size``: ceil(epochs*n/b)."""
    n = split if isinstance(split, int) else len(split)
    return max(1, math.ceil(epochs * n / batch_size))


def train_batches(
    split: Split, batch_size: int, *, seed: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Infinite deterministic ``(images, labels)`` stream; batch ``s`` depends only on (seed, s).

    FP and QAT runs with the same seed see the same batches; starting at ``start_step``
    yields exactly what an uninterrupted run sees from that step on.
    """
    if batch_size < 1 or seed < 0 or start_step < 0:
        raise ValueError(
            "need batch_size >= 1, seed >= 0, start_step >= 0; "
            f"got {batch_size}, {seed}, {start_step}"
        )
    n = len(split)
    step = start_step
    while True:
        yield split.get(train_positions(n, batch_size, seed=seed, step=step))
        step += 1


def eval_batches(
    split: Split, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(images, labels, mask)`` in split order; the last batch is zero-padded.

    ``mask`` marks the real rows, so every example is counted exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(split)
    for start in range(0, n, batch_size):
        pos = np.arange(start, min(start + batch_size, n))
        images, labels = split.get(pos)
        k = len(pos)
        mask = np.zeros(batch_size, dtype=bool)
        mask[:k] = True
        if k < batch_size:
            pad = batch_size - k
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        yield images, labels, mask


__all__ = [
    "SPLITS",
    "Split",
    "apply_view",
    "clear_cache",
    "epoch_permutation",
    "eval_batches",
    "load_split",
    "num_train_steps",
    "open_task",
    "preprocess",
    "split_positions",
    "train_batches",
    "train_positions",
    "val_size",
]
