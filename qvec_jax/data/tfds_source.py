"""TFDS datasets prepared in ``array_record`` format, read without TensorFlow.

:class:`TfdsSource` is the source (locate: prepared? readable?), :class:`TfdsReader`
its random-access reader over the two official parts; both follow the source/reader
protocol of :mod:`qvec_jax.data.sources`. Reading needs the ``tfds`` extra
(``tensorflow-datasets``, ``array_record``), imported only when a dataset is opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvec_jax.data.sources import PARTS, check_part

__all__ = ["TfdsReader", "TfdsSource"]


@dataclass(frozen=True)
class TfdsSource:
    """A TFDS dataset prepared in ``array_record`` format, read with ``tfds`` data sources.

    Reading needs ``tensorflow-datasets`` and ``array_record`` but no TensorFlow.
    Preparing needs TensorFlow once: ``tfds build <name> --data_dir=<root>
    --file_format=array_record``. ``train``/``test`` are TFDS split expressions for the
    official parts (e.g. ``"train+validation"``, ``"train[:80%]"``). ``manual`` names the
    files a manual-download dataset needs in ``<root>/downloads/manual/``.
    """

    name: str
    train: str = "train"
    test: str = "test"
    image_key: str = "image"
    label_key: str = "label"
    manual: tuple[str, ...] = ()
    kind: str = "tfds"

    def describe(self) -> str:
        return f"tfds:{self.name}"

    def version_dir(self, root: Path) -> Path | None:
        base = root / self.name
        if not base.is_dir():
            return None
        versions = [d for d in base.iterdir() if (d / "dataset_info.json").is_file()]

        def key(d):
            try:
                return tuple(int(x) for x in d.name.split("."))
            except ValueError:
                return (-1,)

        return max(versions, key=key) if versions else None

    def how_to_prepare(self, root: Path) -> str:
        steps = ["pip install 'qvec-jax[tfds]' tensorflow"]
        if self.manual:
            steps.append(f"put {', '.join(self.manual)} in {root / 'downloads' / 'manual'}/")
        steps.append(f"tfds build {self.name} --data_dir={root} --file_format=array_record")
        return "prepare it once (needs TensorFlow): " + " && ".join(steps)

    def locate(self, root: Path) -> tuple[bool, str]:
        vdir = self.version_dir(root)
        if vdir is None:
            return False, f"not prepared under {root / self.name}; {self.how_to_prepare(root)}"
        fmt = json.loads((vdir / "dataset_info.json").read_text()).get("fileFormat", "tfrecord")
        if fmt != "array_record":
            return False, (
                f"{vdir} is prepared as {fmt}, which cannot be read without TensorFlow; "
                f"delete it or use another data_dir, then {self.how_to_prepare(root)}"
            )
        try:
            import array_record  # noqa: F401
            import tensorflow_datasets  # noqa: F401
        except ImportError:
            return False, f"{vdir} found but reading needs: pip install 'qvec-jax[tfds]'"
        return True, str(vdir)

    def open(self, root: Path) -> TfdsReader:
        ok, where = self.locate(root)
        if not ok:
            raise FileNotFoundError(f"TFDS dataset {self.name!r}: {where}")
        return TfdsReader(self, Path(where))


class TfdsReader:
    """Random access into a prepared array_record TFDS dataset; decodes only what is read."""

    in_memory = False
    max_value = 255.0

    def __init__(self, source: TfdsSource, vdir: Path):
        import tensorflow_datasets as tfds

        self.source, self.where = source, str(vdir)
        self._builder = tfds.builder_from_directory(str(vdir))
        self._ds = {p: self._builder.as_data_source(split=getattr(source, p)) for p in PARTS}
        self._labels: dict[str, np.ndarray] = {}

    def class_names(self) -> list[str]:
        return list(self._builder.info.features[self.source.label_key].names)

    def size(self, part: str) -> int:
        check_part(part)
        return len(self._ds[part])

    def image_shape(self, part: str) -> tuple | None:
        """The image feature's shape when TFDS declares it fully (cifar10: (32, 32, 3)),
        else None (cars196, food101, ...: sizes vary)."""
        check_part(part)
        shape = getattr(self._builder.info.features[self.source.image_key], "shape", None)
        return tuple(shape) if shape is not None and None not in shape else None

    def labels(self, part: str) -> np.ndarray:
        """All labels of ``part``; scans the split once without decoding images (cached)."""
        check_part(part)
        if part not in self._labels:
            import tensorflow_datasets as tfds

            ds = self._builder.as_data_source(
                split=getattr(self.source, part),
                decoders={self.source.image_key: tfds.decode.SkipDecoding()},
            )
            key = self.source.label_key
            labels = (ds[i][key] for i in range(len(ds)))
            self._labels[part] = np.fromiter(labels, np.int64, len(ds))
        return self._labels[part]

    def read(self, part: str, indices):
        check_part(part)
        ds = self._ds[part]
        idx = [int(i) for i in indices]
        records = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
        images = [np.asarray(r[self.source.image_key]) for r in records]
        labels = np.asarray([r[self.source.label_key] for r in records], dtype=np.int64)
        return images, labels
