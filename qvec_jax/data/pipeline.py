"""Splits and batching: from a source to uint8 batches for the device.

Path of one batch: ``reader.read(part, indices)`` (raw images) -> uint8 at the stored size
(:meth:`Split.get`) -> numpy batch -> :func:`qvec_jax.sharding.shard_batch` -> inside the
jitted step or eval, :class:`qvec_jax.data.device.DevicePreprocess` (view, resize,
grey->RGB, [-1, 1]). The host never resizes, except images of variable size (which
cannot be stacked): those are resized to the model size once, as uint8, with PIL.

Splits (as in the paper): ``val`` = 10% of the task's official train (at most 5000),
drawn with ``np.random.default_rng(SPLIT_SEED=0)`` independently of the run seed;
``train`` = the rest of official train; ``test`` = the official test. Indices keep the
source's order. A class-subset view filters first, so val is 10% of the subset.

Splits are read once and held in memory as uint8 (cached per task, split, image_size,
data root) unless they would exceed ``$QVEC_DATA_MAX_MB`` (default 2048) MiB of uint8;
then they stream: every batch is read and decoded on demand from the source (TFDS
array_record gives random access).

Batching: :func:`eval_batches` (split order, padded and masked) for evaluation; the
training stream (its order, resume and per-host rows) is :class:`qvec_jax.data.loader.TrainLoader`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from qvec_jax.data.device import DevicePreprocess, to_uint8
from qvec_jax.data.registry import Task, get_task
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


# ----------------------------------------------------------------------------- splits

#: Images per device call when a whole split is turned into model inputs (Split.images).
_CHUNK = 4096


def host_resize_uint8(images: list, image_size: int, where: str) -> np.ndarray:
    """Variable-size images (a list of ``[h, w(, c)]`` uint8) -> uint8 ``[n, s, s, c]``
    resized on the host with PIL's bilinear filter (the only host resize: images of
    different sizes cannot share a batch at their stored size). Grey stays one channel."""
    from PIL import Image

    out = []
    for i, x in enumerate(images):
        x = to_uint8(x, where)
        if x.ndim == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (3, 4)):
            raise ValueError(f"{where}: image {i} has shape {x.shape}; expected [h, w(, 1|3|4)]")
        x = x[..., :3]
        if x.shape[:2] != (image_size, image_size):
            x = np.asarray(Image.fromarray(x).resize((image_size, image_size), Image.BILINEAR))
        out.append(x)
    return np.stack(out)


@dataclass(eq=False)
class Split:
    """One split of one task at one image size.

    ``get(positions)`` gives uint8 images at their stored size (``[n, h, w]`` or
    ``[n, h, w, c]``) and int32 labels: what travels to the device, where
    :attr:`preprocessor` (resize, view, grey->RGB, [-1, 1]) runs inside the jitted step or
    eval. ``raw`` is the whole split so; ``images`` the whole split as model inputs.
    Variable-size sources (image folders, TFDS datasets without a fixed shape) are
    resized to ``image_size`` on the host, as uint8, since they cannot be stacked.
    """

    task: Task
    split: str
    image_size: int
    source: str  # where the examples came from (source kind + location)
    indices: np.ndarray  # indices into the source's official part
    part: str  # "train" or "test": the official part the indices refer to
    reader: object = field(repr=False)
    in_memory: bool = True
    _raw: np.ndarray | None = field(default=None, repr=False)
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
    def preprocessor(self) -> DevicePreprocess:
        """The device preprocess of this split: its size, its task's view, its value range."""
        v = self.task.view
        return DevicePreprocess(
            image_size=self.image_size, max_value=float(self.reader.max_value), rot90=v.rot90,
            hflip=v.hflip, invert=v.invert,
        )  # fmt: skip

    @property
    def raw(self) -> np.ndarray:
        """The whole split as uint8 at its stored size (read once, then cached, when in memory)."""
        if self._raw is None:
            raw, labels = self._read(np.arange(len(self)))
            if not self.in_memory:
                return raw
            self._raw, self._labels = raw, labels
        return self._raw

    @property
    def item_bytes(self) -> int:
        """Bytes of one uint8 example as it travels (what a device cache holds)."""
        return int(np.prod(self.get(np.arange(1))[0].shape[1:]))

    @property
    def images(self) -> np.ndarray:
        """The whole split as model inputs: ``inputs`` of every position (not cached)."""
        return self.inputs(np.arange(len(self)))

    def inputs(self, positions) -> np.ndarray:
        """Model inputs at ``positions`` (float32 ``[n, s, s, 3]`` in [-1, 1]), made by
        :attr:`preprocessor` on the default device; for proxies, calibration and tests
        (training and eval feed ``get``'s uint8 to the device and preprocess there)."""
        prep, (raw, _) = self.preprocessor, self.get(positions)
        chunks = [prep.jitted(raw[i : i + _CHUNK]) for i in range(0, len(raw), _CHUNK)]
        return np.concatenate([np.asarray(c) for c in chunks]) if chunks else np.zeros(
            (0, self.image_size, self.image_size, 3), np.float32)  # fmt: skip

    def subset(self, n: int, seed: int = 0) -> Split:
        """A fixed sample of ``n`` examples of this split (the split itself when it holds
        no more): positions drawn by ``numpy.random.default_rng(seed)``, kept in split
        order. What a study evaluates on when the whole split costs too much."""
        if n >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        raw = None if self._raw is None else self._raw[keep]
        labels = None if self._labels is None else self._labels[keep]
        return dataclasses.replace(self, indices=self.indices[keep], _raw=raw, _labels=labels)

    def _read(self, positions: np.ndarray):
        raw_images, raw_labels = self.reader.read(self.part, self.indices[positions])
        labels = self._relabel(np.asarray(raw_labels), f"{self.part} part")
        where = f"task {self.task.name!r} ({self.source})"
        if isinstance(raw_images, np.ndarray) or len({np.shape(x) for x in raw_images}) <= 1:
            if self.reader.image_shape(self.part) is not None:
                return to_uint8(np.asarray(raw_images), where), labels
        return host_resize_uint8(list(raw_images), self.image_size, where), labels

    def get(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(images, labels)`` at ``positions`` (0..len-1) of this split."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.in_memory:
            return self.raw[positions], self.labels[positions]
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


def split_indices(task: Task | str, split: str, data_dir=None) -> tuple:
    """``(source, reader, part, indices)`` of one split: the source examples it holds
    (indices into the official ``part``, "train" or "test"), as :func:`load_split` takes
    them: ``test`` is the official test part, ``train``/``val`` split the official train
    part (both after a class-subset view's filter) by :func:`split_positions`."""
    task = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    src, reader = open_task(task, data_dir)
    part = "test" if split == "test" else "train"
    indices = _part_indices(task, reader, part)
    if split != "test":
        indices = indices[split_positions(len(indices))[split]]
    return src, reader, part, indices


def load_split(
    task_or_name: Task | str,
    split: str,
    *,
    image_size: int,
    data_dir: str | os.PathLike | None = None,
    in_memory: bool | None = None,
) -> Split:
    """One split (``"train"``, ``"val"`` or ``"test"``) of a task, for a model of ``image_size``.

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
    src, reader, part, indices = split_indices(task, split, root)
    if len(indices) == 0:
        raise ValueError(f"task {task.name!r}: split {split!r} is empty in {reader.where}")
    if in_memory is None:
        limit = float(os.environ.get("QVEC_DATA_MAX_MB", 2048)) * 2**20
        shape = reader.image_shape(part)
        item = int(np.prod(shape)) if shape is not None else image_size**2 * 3
        in_memory = reader.in_memory or len(indices) * item <= limit
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


def num_train_steps(split: Split | int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for ``epochs`` passes over ``split`` at ``batch_size``: ceil(epochs*n/b)."""
    n = split if isinstance(split, int) else len(split)
    return max(1, math.ceil(epochs * n / batch_size))


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
    "clear_cache",
    "eval_batches",
    "load_split",
    "num_train_steps",
    "open_task",
    "split_indices",
    "split_positions",
    "val_size",
]
