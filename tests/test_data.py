"""Tests for qvec_jax.data: registry, sources, splits, batching and sharding."""

from __future__ import annotations

import gzip
import itertools
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qvec_jax import data as D
from qvec_jax.data.loader import TrainLoader, stream_positions
from qvec_jax.data.pipeline import split_positions
from qvec_jax.data.registry import UnknownTaskError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers


def write_idx(path, arr: np.ndarray, gz: bool) -> None:
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(header + arr.tobytes())


def id_images(ids: np.ndarray, size: int = 6) -> np.ndarray:
    """Images whose first two pixels encode a unique id (< 65536)."""
    rng = np.random.default_rng(123)
    img = rng.integers(0, 256, (len(ids), size, size), dtype=np.uint8)
    img[:, 0, 0] = ids // 256
    img[:, 0, 1] = ids % 256
    return img


def decode_ids(images: np.ndarray) -> np.ndarray:
    """Invert preprocess ([-1, 1]) on the id pixels of channel 0."""
    px = np.rint((images[:, 0, :2, 0] + 1.0) * 255.0 / 2.0).astype(np.int64)
    return px[:, 0] * 256 + px[:, 1]


N_TRAIN, N_TEST = 230, 37


@pytest.fixture()
def idx_task(tmp_path):
    """An IDX dir with N_TRAIN + N_TEST uniquely-identified 6x6 images, 10 classes."""
    ids_train = np.arange(N_TRAIN)
    ids_test = np.arange(N_TRAIN, N_TRAIN + N_TEST)
    labels = lambda ids: (ids * 7) % 10  # noqa: E731
    write_idx(tmp_path / "train-images-idx3-ubyte", id_images(ids_train), gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels(ids_train), gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", id_images(ids_test), gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels(ids_test), gz=False)
    task = D.Task("tmp_idx", D.IdxSource(str(tmp_path)), 10)
    yield task, labels
    D.clear_cache()


# ----------------------------------------------------------------------------- registry


def test_registry_has_the_papers_22_tasks_with_epochs():
    paper = D.list_tasks(paper_only=True)
    assert len(paper) == 22
    epochs = {n: D.get_task(n).epochs for n in paper}
    assert epochs["cars"] == 35 and epochs["flowers102"] == 147 and epochs["imagenet"] == 1
    assert all(isinstance(e, int) and e >= 1 for e in epochs.values())
    kinds = {n: D.get_task(n).source.kind for n in paper}
    assert {n for n, k in kinds.items() if k == "folder"} == {
        "gtsrb",
        "fer2013",
        "renderedsst2",
        "tiny_imagenet",
    }
    tfds_names = {s.name for n in paper for s in D.get_task(n).sources if s.kind == "tfds"}
    assert {"cars196", "eurosat/rgb", "resisc45", "imagenet2012", "patch_camelyon"} <= tfds_names
    for n in ("digits", "fashion_mnist", "fmnist_a", "fmnist_b", "fmnist_rot90", "digits_rot90"):
        assert n in D.TASKS


def test_unknown_task_lists_close_matches():
    with pytest.raises(UnknownTaskError, match="imagenet") as e:
        D.get_task("imagent")
    assert isinstance(e.value, KeyError) and "qvec tasks" in str(e.value)


def test_derive_composes_views_and_relabels_names():
    a = D.derive("fashion_mnist", "x_a", classes=[5, 7, 9])
    b = D.derive(a, "x_b", classes=[2, 0], rot90=1)
    assert b.view.classes == (9, 5) and b.num_classes == 2
    assert b.class_names == ("Ankle boot", "Sandal")
    flipped = D.derive(D.derive("digits", "f", hflip=True), "fr", rot90=1)
    assert flipped.view.hflip and flipped.view.rot90 == 3
    with pytest.raises(ValueError, match="outside"):
        D.derive("digits_a", "bad", classes=[5])


# ----------------------------------------------------------------------------- splits


def test_digits_split_sizes_disjoint_and_cover_sklearn():
    from sklearn.datasets import load_digits

    n_off = 1797 - round(0.2 * 1797)
    n_val = min(5000, int(0.1 * n_off))
    s = {k: D.load_split("digits", k, image_size=8) for k in D.SPLITS}
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (n_off - n_val, n_val, 1797 - n_off)
    assert s["train"].part == s["val"].part == "train" and s["test"].part == "test"
    tr, va = set(s["train"].indices), set(s["val"].indices)
    assert not tr & va and tr | va == set(range(n_off))
    # the fixed test split + official train are exactly sklearn's images (as multisets)
    reader = s["train"].reader
    raw = np.concatenate([reader.read(p, np.arange(reader.size(p)))[0] for p in ("train", "test")])
    key = lambda a: sorted(x.tobytes() for x in a.astype(np.float32))  # noqa: E731
    assert key(raw) == key(load_digits().images)
    # preprocessing at the source size is exact scaling to [-1, 1] with 3 equal channels
    x, y = s["test"].images, s["test"].labels
    assert x.shape == (len(y), 8, 8, 3) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x[..., 0], raw[n_off:] / 8.0 - 1.0, atol=1e-6)
    assert np.array_equal(x[..., 0], x[..., 2])


def test_idx_dir_split_sizes_disjoint_and_labels(idx_task):
    task, labels = idx_task
    s = {k: D.load_split(task, k, image_size=6) for k in D.SPLITS}
    n_val = int(0.1 * N_TRAIN)
    assert [len(s[k]) for k in D.SPLITS] == [N_TRAIN - n_val, n_val, N_TEST]
    ids = {k: decode_ids(s[k].images) for k in D.SPLITS}
    assert set(ids["train"]).isdisjoint(ids["val"])
    assert set(ids["train"]) | set(ids["val"]) == set(range(N_TRAIN))
    assert set(ids["test"]) == set(range(N_TRAIN, N_TRAIN + N_TEST))
    for k in D.SPLITS:
        assert np.array_equal(s[k].labels, labels(ids[k]))
    # val does not depend on anything but split seed 0
    assert np.array_equal(s["val"].indices, split_positions(N_TRAIN)["val"])


def test_class_subset_view_filters_then_splits(idx_task):
    task, labels = idx_task
    sub = D.derive(task, "tmp_sub", classes=[3, 1])
    s = {k: D.load_split(sub, k, image_size=6) for k in D.SPLITS}
    kept = [i for i in range(N_TRAIN) if labels(i) in (1, 3)]
    assert len(s["train"]) + len(s["val"]) == len(kept)
    assert len(s["val"]) == int(0.1 * len(kept))
    for k in D.SPLITS:
        ids = decode_ids(s[k].images)
        assert np.array_equal(s[k].labels, np.where(labels(ids) == 3, 0, 1))


def test_views_rotate_flip_invert_the_images():
    base = D.load_split("digits", "val", image_size=8).images
    rot = D.load_split("digits_rot90", "val", image_size=8).images
    inv = D.load_split("digits_inv", "val", image_size=8).images
    flip = D.load_split("digits_flip", "val", image_size=8).images
    assert np.array_equal(rot, np.rot90(base, 1, axes=(1, 2)))
    assert np.array_equal(flip, base[:, :, ::-1])
    np.testing.assert_allclose(inv, -base, atol=1e-6)


def test_resize_upscales_bilinear_within_range():
    x = D.load_split("digits", "test", image_size=28)
    assert x.images.shape == (len(x), 28, 28, 3)
    assert x.images.min() >= -1.0 and x.images.max() <= 1.0
    flat = D.device_preprocess(np.full((2, 8, 8), 4, np.uint8), max_value=16.0, image_size=20)
    np.testing.assert_allclose(flat, -0.5, atol=1e-6)  # a constant image stays constant
    black = D.device_preprocess(np.zeros((1, 5, 9, 3), np.uint8), max_value=255, image_size=6)
    white = D.device_preprocess(np.full((1, 7, 4), 255, np.uint8), max_value=255, image_size=6)
    assert black.shape == white.shape == (1, 6, 6, 3)
    assert black.max() == -1.0 and np.allclose(white, 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- batching


def test_training_stream_is_a_function_of_the_seed_at_stored_size():
    """The training input is data.loader.TrainLoader (grain), the one training order.
    Here: two loaders with one seed agree batch for batch, another seed differs, every
    batch is uint8 at the stored size. tests/test_loader.py asserts the rest against the
    same loader: every epoch a permutation, O(1) resume at any step, per-host rows,
    worker processes changing nothing."""
    split = D.load_split("digits", "train", image_size=8)
    n, b = len(split), 128

    def stream(seed, k=25):
        with TrainLoader(split, b, seed=seed) as it:
            return list(itertools.islice(it, k))

    a, c = stream(2038), stream(2038)
    for (xa, ya), (xc, yc) in zip(a, c, strict=True):
        assert np.array_equal(xa, xc) and np.array_equal(ya, yc)
    assert not np.array_equal(stream(7, 1)[0][1], a[0][1])
    assert all(x.shape == (b, 8, 8) and x.dtype == np.uint8 for x, _ in a)  # stored size
    pos = stream_positions(n, 2038, 0, 25 * b).reshape(25, b)  # 25 batches > 2 epochs
    assert all(np.array_equal(y, split.labels[p]) for (_, y), p in zip(a, pos, strict=True))
    assert D.num_train_steps(split, b, 15) == -(-15 * n // b)


def test_eval_batches_every_example_exactly_once(idx_task):
    task, labels = idx_task
    split = D.load_split(task, "test", image_size=6)
    bs = 8  # 37 is not a multiple of 8
    assert N_TEST % bs
    seen, n_batches = [], 0
    for x, y, m in D.eval_batches(split, bs):
        n_batches += 1
        assert x.shape == (bs, 6, 6) and x.dtype == np.uint8  # as stored, no host resize
        assert y.shape == (bs,) and m.dtype == bool
        assert np.all(x[~m] == 0)
        ids = x[m][:, 0, 0].astype(np.int64) * 256 + x[m][:, 0, 1]
        assert np.array_equal(y[m], labels(ids))
        seen += list(ids)
    assert n_batches == -(-N_TEST // bs)
    assert sorted(seen) == list(range(N_TRAIN, N_TRAIN + N_TEST))


# ----------------------------------------------------------------------------- bad input


def test_missing_idx_files_name_path_and_expected_files(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 4, 4)), gz=False)
    task = D.Task("tmp_missing", D.IdxSource(str(tmp_path)), 10)
    with pytest.raises(FileNotFoundError) as e:
        D.load_split(task, "train", image_size=4)
    msg = str(e.value)
    assert str(tmp_path) in msg and "t10k-labels-idx1-ubyte" in msg and "QVEC_DATA_DIR" in msg
    assert "missing train-labels-idx1-ubyte" in msg


def test_truncated_idx_file(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 4, 4) + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        D.read_idx(p)


def test_label_out_of_range_is_reported(tmp_path):
    for part, n in (("train", 20), ("t10k", 5)):
        write_idx(tmp_path / f"{part}-images-idx3-ubyte", np.zeros((n, 4, 4)), gz=False)
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte", np.arange(n) % 12, gz=False)
    task = D.Task("tmp_badlabels", D.IdxSource(str(tmp_path)), 10)
    with pytest.raises(ValueError, match=r"range 0\.\.11 .* declares 10 classes"):
        D.load_split(task, "train", image_size=4)
    D.clear_cache()


def _write_png(path, value, shape=(5, 7)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def test_image_folder_source_and_undecodable_file(tmp_path):
    for part, n in (("train", 4), ("test", 2)):
        for cls, v in (("cat", 0), ("dog", 255)):
            for i in range(n):
                _write_png(tmp_path / "pets" / part / cls / f"{i}.png", v)
    task = D.Task("tmp_folder", D.FolderSource("pets"), 2, ("cat", "dog"))
    test = D.load_split(task, "test", image_size=3, data_dir=tmp_path)
    assert len(test) == 4 and list(test.labels) == [0, 0, 1, 1]
    np.testing.assert_allclose(test.images[test.labels == 1], 1.0, atol=1e-6)
    assert test.get([0])[0].shape == (1, 5, 7, 3)  # one size: travels as stored, RGB
    with pytest.raises(ValueError, match="'val' is empty"):  # 10% of 8 rounds down to 0
        D.load_split(task, "val", image_size=3, data_dir=tmp_path)
    D.clear_cache()
    bad = tmp_path / "pets" / "test" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        D.load_split(task, "test", image_size=3, data_dir=tmp_path)
    D.clear_cache()


def test_tfds_task_that_is_not_prepared_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.load_split("resisc45", "train", image_size=32, data_dir=tmp_path)
    msg = str(e.value)
    assert "tfds build resisc45" in msg and "--file_format=array_record" in msg
    assert str(tmp_path / "downloads" / "manual") in msg and "NWPU-RESISC45.rar" in msg


def test_cli_tasks_lists_every_task(capsys, tmp_path):
    from qvec_jax.cli import main

    assert main(["tasks", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in D.TASKS:
        assert f"\n{name} " in out
    assert "sklearn:digits" in out and "tfds:imagenet2012" in out
    digits_line = next(line for line in out.splitlines() if line.startswith("digits "))
    assert " yes " in digits_line
    cars_line = next(line for line in out.splitlines() if line.startswith("cars "))
    assert cars_line.rstrip().endswith("no")
    assert main(["tasks", "imagent"]) == 1
    assert "imagenet" in capsys.readouterr().err


# ----------------------------------------------------------------------------- named views


@pytest.mark.parametrize(
    "name, base, kw",
    [
        ("fashion_mnist@classes=0,2,4,6,8", "fashion_mnist", dict(classes=[0, 2, 4, 6, 8])),
        ("digits@rot90=3,invert", "digits", dict(rot90=3, invert=True)),
        ("fmnist_a@classes=4,0,hflip,epochs=2", "fmnist_a", dict(classes=[4, 0], hflip=True,
                                                                 epochs=2)),
        ("digits_rot90@rot90=1", "digits_rot90", dict(rot90=1)),
    ],
)  # fmt: skip
def test_a_view_of_any_task_is_named_by_its_options(name, base, kw):
    t = D.get_task(name)
    assert t == D.derive(base, name, **kw)  # same view, names, epochs as from Python
    assert t.name == name and name not in D.TASKS  # not registered: parsed where named
    assert D.parse_view(name) == t


def test_named_view_is_the_derived_data_and_a_run_directory_name(tmp_path):
    from qvec_jax.grid.inputs import checkpoint_path

    got = D.load_split("digits@rot90=1", "test", image_size=8)
    want = D.load_split("digits_rot90", "test", image_size=8)
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.labels, want.labels)
    name = "digits@classes=3,1,invert"
    path = checkpoint_path(tmp_path, name, "fp")
    path.mkdir(parents=True)  # a plain directory name on POSIX, found again by listing
    (listed,) = os.listdir(tmp_path)
    assert listed == name and D.get_task(listed).num_classes == 2
    assert D.get_task(listed).class_names == ("3", "1")


@pytest.mark.parametrize(
    "name, match",
    [
        ("fashon_mnist@invert", "unknown task 'fashon_mnist'. Did you mean: fashion_mnist"),
        ("digits@invrt", "unknown option 'invrt' .did you mean invert.."),
        ("digits@clases=1,2", "unknown option 'clases' .did you mean classes.."),
        ("digits@classes=0,12", r"classes \[12\] outside 0..9"),
        ("digits@classes=1,1", "duplicates"),
        ("digits@classes=01", "without leading zeros"),
        ("digits@rot90=4", "rot90 must be 1, 2 or 3"),
        ("digits@rot90", "rot90 needs a value"),
        ("digits@invert=1", "invert is a flag: write it bare"),
        ("digits@rot90=1,rot90=2", "rot90 is given twice"),
        ("digits@invert,rot90=3", "write the options in the order rot90,invert"),
        ("digits@", "expected one BASE@OPTIONS"),
        ("a/b@invert", "without '/'"),
        ("digits@invert@hflip", "expected one BASE@OPTIONS"),
    ],
)
def test_bad_view_names_say_what_is_wrong(name, match):
    with pytest.raises(UnknownTaskError, match=match) as e:
        D.get_task(name)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_task_lists_split_around_the_commas_of_views():
    text = "digits, fmnist_a@classes=0,2,rot90=1,digits@invert,hflip,digits_inv,,"
    assert D.split_task_names(text) == [
        "digits",
        "fmnist_a@classes=0,2,rot90=1",
        "digits@invert,hflip",
        "digits_inv",
    ]
    assert D.split_task_names("digits,digits_rot90") == ["digits", "digits_rot90"]


def test_cli_tasks_accepts_views_and_documents_them(capsys):
    from qvec_jax.cli import main

    assert main(["tasks", "digits@rot90=3,invert"]) == 0
    out = capsys.readouterr().out
    assert "digits@rot90=3,invert sklearn:digits [rot270, invert]" in out
    with pytest.raises(SystemExit):
        main(["tasks", "--help"])
    assert D.VIEW_SYNTAX in capsys.readouterr().out
    assert main(["tasks", "digits@invrt"]) == 1
    assert "did you mean invert" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sharding

SHARD_CODE = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec
    from qvec_jax import data as D
    assert jax.device_count() == 8, jax.devices()
    split = D.load_split("digits", "val", image_size=8)
    x, y = split.get(np.arange(64))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    gx, gy = D.shard_batch((x, y), mesh)
    assert gx.shape == x.shape and gy.shape == y.shape
    assert gx.sharding.spec == PartitionSpec("data", None, None)
    assert len(gx.addressable_shards) == 8
    assert all(s.data.shape == (8, 8, 8) for s in gx.addressable_shards)
    np.testing.assert_array_equal(np.asarray(gx), x)
    np.testing.assert_array_equal(np.asarray(gy), y)
    mesh2 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    ex, ey, em = next(D.eval_batches(split, 12))
    g = D.shard_batch({"x": ex, "m": em}, mesh2)
    assert all(s.data.shape[0] == 3 for s in g["x"].addressable_shards)
    np.testing.assert_array_equal(np.asarray(g["m"]), em)
    try:
        D.shard_batch((x[:12],), mesh)
    except ValueError as e:
        assert "divisible by 8" in str(e)
    else:
        raise AssertionError("expected ValueError")
    print("SHARD_OK")
    """
)


def test_shard_batch_on_8_forced_host_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run(
        [sys.executable, "-c", SHARD_CODE],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "SHARD_OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist_idx_and_class_views():
    s = {k: D.load_split("fmnist_a", k, image_size=28) for k in D.SPLITS}
    assert s["test"].source.endswith("/usr/share/datasets/fashion-mnist")
    # Fashion-MNIST has 6000 train / 1000 test images per class
    assert [len(s[k]) for k in D.SPLITS] == [27000, 3000, 5000]
    assert set(np.unique(s["val"].labels)) == set(range(5))
    full = D.load_split("fashion_mnist", "val", image_size=28)
    assert len(full) == 5000 and len(D.load_split("fashion_mnist", "train", image_size=28)) == 55000
    D.clear_cache()
