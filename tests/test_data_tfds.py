"""The TFDS path on a tiny dataset prepared here in array_record format, without TensorFlow.

tfds encodes ``Image`` features with TensorFlow only for numpy inputs; PNG bytes are
stored as they are, so ``download_and_prepare(file_format="array_record")`` works with
tensorflow-datasets + array_record alone. Nothing of TFDS is mocked.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from qvec_jax import data as D  # noqa: E402
from qvec_jax.data.loader import TrainLoader  # noqa: E402

pytestmark = pytest.mark.tfds

N = {"train": 60, "test": 13}
SIZE = 10


def png(ids: int, seed: int) -> bytes:
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    a[0, 0, 0], a[0, 1, 0] = ids // 256, ids % 256
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="png")
    return buf.getvalue()


def label_of(i: int) -> int:
    return (i * 5) % 4


class QvecTinyTfds(tfds.core.GeneratorBasedBuilder):
    """73 uniquely-identified 10x10 RGB images, 4 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c", "d"]),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self, features=features, supervised_keys=("image", "label")
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(0, N["train"]),
            "test": self._generate_examples(N["train"], N["train"] + N["test"]),
        }

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"image": png(i, i), "label": label_of(i)}


@pytest.fixture(scope="module")
def tfds_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    QvecTinyTfds(data_dir=str(root), file_format="array_record").download_and_prepare()
    yield root
    D.clear_cache()


def ids_of(images):
    """Ids from uint8 batches (as stored) or model inputs in [-1, 1]."""
    px = images[:, 0, :2, 0].astype(np.int64)
    if images.dtype != np.uint8:
        px = np.rint((images[:, 0, :2, 0] + 1.0) * 255.0 / 2.0).astype(np.int64)
    return px[:, 0] * 256 + px[:, 1]


TASK = D.Task("tiny_tfds", D.TfdsSource("qvec_tiny_tfds"), 4)


@pytest.mark.parametrize("in_memory", [True, False])
def test_tfds_splits_sizes_disjoint_labels(tfds_root, in_memory):
    assert D.availability(TASK, tfds_root)[0]
    s = {
        k: D.load_split(TASK, k, image_size=SIZE, data_dir=tfds_root, in_memory=in_memory)
        for k in D.SPLITS
    }
    n_val = int(0.1 * N["train"])
    assert [len(s[k]) for k in D.SPLITS] == [N["train"] - n_val, n_val, N["test"]]
    assert all(s[k].in_memory == in_memory for k in D.SPLITS)
    ids = {}
    for k in D.SPLITS:
        x, y, m = zip(*D.eval_batches(s[k], 7))
        x, y, m = np.concatenate(x), np.concatenate(y), np.concatenate(m)
        ids[k] = ids_of(x[m])
        assert x.shape[1:] == (SIZE, SIZE, 3) and x.dtype == np.uint8  # travels as stored
        assert np.array_equal(y[m], [label_of(i) for i in ids[k]])
        assert len(ids[k]) == len(set(ids[k])) == len(s[k])
    assert set(ids["train"]).isdisjoint(ids["val"])
    assert set(ids["train"]) | set(ids["val"]) == set(range(N["train"]))
    assert set(ids["test"]) == set(range(N["train"], N["train"] + N["test"]))
    # labels scanned without decoding images agree with the decoded ones
    assert np.array_equal(s["test"].labels, [label_of(i) for i in ids["test"]])
    D.clear_cache()


def test_tfds_streaming_matches_in_memory_and_resizes(tfds_root):
    mem = D.load_split(TASK, "train", image_size=16, data_dir=tfds_root, in_memory=True)
    stream = D.load_split(TASK, "train", image_size=16, data_dir=tfds_root, in_memory=False)
    a, b = (next(TrainLoader(s, 32, seed=3, start_step=2, end_step=3)) for s in (mem, stream))
    assert a[0].shape == (32, SIZE, SIZE, 3) and a[0].dtype == np.uint8  # stored size
    assert mem.inputs([0, 1]).shape == (2, 16, 16, 3)  # resized on the device
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    D.clear_cache()


def test_tfds_class_subset_view(tfds_root):
    sub = D.derive(TASK, "tiny_sub", classes=[2, 0])
    test = D.load_split(sub, "test", image_size=SIZE, data_dir=tfds_root)
    ids = ids_of(test.images)
    want = [i for i in range(N["train"], N["train"] + N["test"]) if label_of(i) in (0, 2)]
    assert sorted(ids) == want
    assert np.array_equal(test.labels, [0 if label_of(i) == 2 else 1 for i in ids])
    D.clear_cache()


def test_tfds_tfrecord_prepared_dataset_is_refused_with_instructions(tfds_root, tmp_path):
    shutil.copytree(tfds_root / "qvec_tiny_tfds", tmp_path / "qvec_tiny_tfds")
    info = next((tmp_path / "qvec_tiny_tfds").glob("*/dataset_info.json"))
    meta = json.loads(info.read_text())
    meta["fileFormat"] = "tfrecord"
    info.write_text(json.dumps(meta))
    ok, _, why = D.availability(TASK, tmp_path)
    assert not ok and "tfrecord" in why and "tfds build qvec_tiny_tfds" in why
    with pytest.raises(FileNotFoundError, match="--file_format=array_record"):
        D.load_split(TASK, "test", image_size=SIZE, data_dir=tmp_path)
