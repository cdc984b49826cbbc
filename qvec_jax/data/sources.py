"""Where images come from: IDX directories, scikit-learn digits, image folders (and TFDS,
in :mod:`qvec_jax.data.tfds_source`).

A *source* is a small frozen description (hashable, so tasks can be cache keys).
``source.locate(root)`` says whether it is available under a data root, and
``source.open(root)`` returns a *reader* over the two official parts, ``"train"`` and
``"test"``, with raw (not yet preprocessed) images:

- ``reader.size(part) -> int``
- ``reader.labels(part) -> int64 array`` of every example (may scan a TFDS split once)
- ``reader.read(part, indices) -> (images, labels)``; images are a uint8 array
  ``[n, h, w(, c)]`` or a list of uint8 ``[h, w(, c)]`` arrays (image folders, TFDS),
  values in ``[0, reader.max_value]``
- ``reader.image_shape(part)``: the shape every image of ``part`` has, or None when
  sizes vary (those are resized on the host; fixed-size ones travel as they are stored)
- ``reader.in_memory``: True when everything is already decoded in RAM
- ``reader.where``: a human-readable location (recorded in each Split)

The data root is the ``data_dir`` argument, else ``$QVEC_DATA_DIR``, else
``~/tensorflow_datasets`` (see :func:`data_root`).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".webp")
PARTS = ("train", "test")


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$QVEC_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if data_dir is None:
        data_dir = os.environ.get("QVEC_DATA_DIR") or "~/tensorflow_datasets"
    return Path(data_dir).expanduser()


def check_part(part: str) -> None:
    """Refuse a part name other than ``"train"`` / ``"test"`` (every reader checks with it)."""
    if part not in PARTS:
        raise ValueError(f"unknown source part {part!r}; use one of {PARTS}")


# ----------------------------------------------------------------------------- in-memory


class ArrayReader:
    """Reader over arrays (or lists of arrays) already in memory."""

    in_memory = True

    def __init__(self, parts: dict, max_value: float, where: str):
        self._parts = parts  # part -> (images, labels)
        self.max_value = float(max_value)
        self.where = where
        self._shapes = {}
        for part, (images, _) in parts.items():
            shapes = {np.shape(x) for x in images} if isinstance(images, list) else None
            one = images.shape[1:] if shapes is None else next(iter(shapes), None)
            self._shapes[part] = one if shapes is None or len(shapes) == 1 else None

    def image_shape(self, part: str) -> tuple | None:
        check_part(part)
        return self._shapes[part]

    def size(self, part: str) -> int:
        check_part(part)
        return len(self._parts[part][1])

    def labels(self, part: str) -> np.ndarray:
        check_part(part)
        return self._parts[part][1]

    def read(self, part: str, indices):
        check_part(part)
        images, labels = self._parts[part]
        indices = np.asarray(indices, dtype=np.int64)
        if isinstance(images, list):
            return [images[i] for i in indices], labels[indices]
        return images[indices], labels[indices]


# ----------------------------------------------------------------------------- sklearn digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSource:
    """scikit-learn's handwritten digits: 1797 real 8x8 images, values 0..16, 10 classes.

    They ship inside scikit-learn, so this source is always available. Digits has no
    official test split; this one is fixed: ``np.random.default_rng(0).permutation(1797)``,
    the last ``round(0.2 * 1797) = 359`` are "test", the first 1438 are the official "train"
    (both kept in ascending index order). Val/train are then drawn from that train as for
    every task.
    """

    kind: str = "sklearn"

    def describe(self) -> str:
        return "sklearn:digits"

    def locate(self, root: Path) -> tuple[bool, str]:
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            return False, "scikit-learn is not installed (pip install scikit-learn)"
        return True, "bundled with scikit-learn"

    def open(self, root: Path) -> ArrayReader:
        from sklearn.datasets import load_digits

        d = load_digits()
        images = d.images.astype(np.uint8)  # [1797, 8, 8], whole numbers 0..16
        labels = d.target.astype(np.int64)
        n = len(labels)
        perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
        n_train = n - int(round(n * DIGITS_TEST_FRACTION))
        tr, te = np.sort(perm[:n_train]), np.sort(perm[n_train:])
        parts = {"train": (images[tr], labels[tr]), "test": (images[te], labels[te])}
        return ArrayReader(parts, max_value=16.0, where="sklearn.datasets.load_digits")


# ----------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``*-idx3-ubyte`` images or ``*-idx1-ubyte`` labels), plain or .gz."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}; re-download it") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(
            f"{path} is not an unsigned-byte IDX file (bad magic {data[:4].hex()}); "
            "expected the original MNIST-format files"
        )
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise ValueError(
            f"{path}: header says shape {dims} ({int(np.prod(dims))} bytes) but the file "
            f"holds {payload.size}; the file is truncated, re-download it"
        )
    return payload.reshape(dims)


def idx_file_names(prefix: str = "") -> dict[str, tuple[str, str]]:
    """part -> (images stem, labels stem); each may also exist with a ``.gz`` suffix."""
    return {
        "train": (f"{prefix}train-images-idx3-ubyte", f"{prefix}train-labels-idx1-ubyte"),
        "test": (f"{prefix}t10k-images-idx3-ubyte", f"{prefix}t10k-labels-idx1-ubyte"),
    }


def _find_idx_files(directory: Path, prefix: str) -> tuple[dict, list[str]]:
    found, missing = {}, []
    for part, stems in idx_file_names(prefix).items():
        paths = []
        for stem in stems:
            options = [directory / (stem + s) for s in ("", ".gz")]
            hit = next((p for p in options if p.is_file()), None)
            if hit is None:
                missing.append(stem + "[.gz]")
            paths.append(hit)
        found[part] = paths
    return found, missing


@dataclass(frozen=True)
class IdxSource:
    """A directory of MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST).

    Expected files (each plain or ``.gz``)::

        <dir>/<prefix>train-images-idx3-ubyte   <dir>/<prefix>train-labels-idx1-ubyte
        <dir>/<prefix>t10k-images-idx3-ubyte    <dir>/<prefix>t10k-labels-idx1-ubyte

    ``<dir>`` is ``<data root>/<subdir>`` (or ``subdir`` itself when absolute), then each of
    ``fallbacks`` in order. EMNIST uses ``prefix="emnist-digits-"`` and ``transpose=True``
    (its files store images column-major).
    """

    subdir: str
    fallbacks: tuple[str, ...] = ()
    prefix: str = ""
    transpose: bool = False
    kind: str = "idx"

    def describe(self) -> str:
        return f"idx:{self.subdir}"

    def candidates(self, root: Path) -> list[Path]:
        first = Path(self.subdir) if os.path.isabs(self.subdir) else root / self.subdir
        return [first, *(Path(p) for p in self.fallbacks)]

    def locate(self, root: Path) -> tuple[bool, str]:
        problems = []
        for d in self.candidates(root):
            _, missing = _find_idx_files(d, self.prefix)
            if not missing:
                return True, str(d)
            problems.append(f"{d} (missing {', '.join(missing)})")
        return False, "no IDX files in " + "; ".join(problems)

    def open(self, root: Path) -> ArrayReader:
        ok, where = self.locate(root)
        if not ok:
            names = ", ".join(s for p in idx_file_names(self.prefix).values() for s in p)
            raise FileNotFoundError(
                f"{where}. Put the four IDX files ({names}, plain or .gz) in "
                f"{self.candidates(root)[0]}, or pass data_dir / set QVEC_DATA_DIR "
                "to a root that holds them."
            )
        files, _ = _find_idx_files(Path(where), self.prefix)
        parts = {}
        for part, (img_path, lab_path) in files.items():
            images, labels = read_idx(img_path), read_idx(lab_path)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(
                    f"IDX mismatch: {img_path} has shape {images.shape}, {lab_path} has "
                    f"shape {labels.shape}; expected [n, h, w] images and [n] labels"
                )
            if self.transpose:
                images = images.transpose(0, 2, 1)
            parts[part] = (images, labels.astype(np.int64))
        return ArrayReader(parts, max_value=255.0, where=where)


# ----------------------------------------------------------------------------- image folder


def _decode_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(
            f"cannot decode image {path}: {e}; delete or replace this file and retry"
        ) from e


@dataclass(frozen=True)
class FolderSource:
    """An image folder, one subdirectory per class::

        <data root>/<subdir>/train/<class name>/**/*.png|jpg|jpeg|ppm|bmp
        <data root>/<subdir>/test/<class name>/**/*.png|jpg|jpeg|ppm|bmp

    Class index = position of the class directory name in sorted order of ``train/``
    (e.g. GTSRB ``00000``..``00042``; FER2013 ``angry, disgust, fear, happy, neutral, sad,
    surprise``). Files are searched recursively inside each class directory, so
    TinyImageNet's ``train/<wnid>/images/*.JPEG`` works as is; its labelled ``val`` set
    must be rearranged into ``test/<wnid>/``. Images are decoded with PIL as RGB.
    """

    subdir: str
    kind: str = "folder"

    def describe(self) -> str:
        return f"folder:{self.subdir}"

    def path(self, root: Path) -> Path:
        return Path(self.subdir) if os.path.isabs(self.subdir) else root / self.subdir

    def locate(self, root: Path) -> tuple[bool, str]:
        base = self.path(root)
        missing = [p for p in PARTS if not (base / p).is_dir()]
        if missing:
            return False, f"{base} lacks {', '.join(m + '/' for m in missing)}"
        return True, str(base)

    def class_names(self, root: Path) -> list[str]:
        return sorted(d.name for d in (self.path(root) / "train").iterdir() if d.is_dir())

    def open(self, root: Path) -> ArrayReader:
        ok, where = self.locate(root)
        base = self.path(root)
        if not ok:
            raise FileNotFoundError(
                f"image folder {where}. Expected layout: {base}/train/<class>/*.png|jpg and "
                f"{base}/test/<class>/*.png|jpg (see FolderSource); "
                "or pass data_dir / set QVEC_DATA_DIR."
            )
        classes = self.class_names(root)
        index = {c: i for i, c in enumerate(classes)}
        parts = {}
        for part in PARTS:
            images, labels = [], []
            for d in sorted(p for p in (base / part).iterdir() if p.is_dir()):
                if d.name not in index:
                    raise ValueError(
                        f"{d} is a class that {base}/train/ does not have; the class "
                        f"directories of test/ must also exist in train/ ({len(classes)} there)"
                    )
                files = sorted(
                    f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                )
                images += [_decode_image(f) for f in files]
                labels += [index[d.name]] * len(files)
            if not images:
                raise FileNotFoundError(
                    f"no images ({'|'.join(IMAGE_EXTENSIONS)}) under {base / part}/<class>/"
                )
            parts[part] = (images, np.asarray(labels, dtype=np.int64))
        return ArrayReader(parts, max_value=255.0, where=where)


__all__ = [
    "ArrayReader",
    "DigitsSource",
    "FolderSource",
    "IdxSource",
    "data_root",
    "idx_file_names",
    "read_idx",
]
