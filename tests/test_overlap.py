"""The one overlap rule (issue 20): when a sample of one task's train images holds another
task's images, counted per split, and checked against the model inputs themselves
(the same example through the same view is the same input; a turned view is not)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from qvec_jax import data, grid, select
from qvec_jax.data import overlap as ov

SIZE = 16
FASHION = "/usr/share/datasets/fashion-mnist"


def _rows(x) -> set[bytes]:
    return {r.tobytes() for r in np.asarray(x)}


def _by_inputs(sample, receiver: str) -> dict[str, int]:
    """How many rows of ``sample`` (model inputs) are model inputs of each receiver split."""
    out = {}
    for split in ov.SPLITS:
        have = _rows(data.load_split(receiver, split, image_size=SIZE).images)
        out[split] = sum(r.tobytes() in have for r in np.asarray(sample))
    return out


def test_the_rule_from_definitions_alone():
    yes = [("fashion_mnist", "fmnist_a"), ("digits", "digits_a"), ("digits_a", "digits"),
           ("digits_rot90", "digits@rot90=1"), ("digits@classes=0,2", "digits_a")]  # fmt: skip
    no = [("fmnist_a", "fmnist_b"), ("fmnist_rot90", "fashion_mnist"), ("digits", "digits_rot90"),
          ("digits_inv", "digits"), ("digits@classes=0,2", "digits_b"), ("mnist", "emnist"),
          ("digits", None), ("digits", "")]  # fmt: skip
    for a, b in yes:
        assert ov.may_overlap(a, b) and ov.may_overlap(b, a), (a, b)
        assert grid.gptq.overlaps(a, b)  # the grid's rule is this one
    for a, b in no:
        assert not ov.may_overlap(a, b), (a, b)
        assert not grid.gptq.overlaps(a, b)
    # one task under two spellings is the same images; a class subset is not the same task
    assert ov.same_task("digits_a@invert", "digits@classes=0,1,2,3,4,invert")
    assert ov.same_task("digits_rot90", "digits@rot90=1")
    assert not ov.same_task("digits_a", "digits") and not ov.same_task("digits", "digits_inv")
    # a name this registry does not know equals only itself
    assert ov.may_overlap("nosuch", "nosuch") and not ov.may_overlap("nosuch", "digits")


def test_counts_are_the_shared_model_inputs_on_digits():
    """A sample of digits_a's train images in digits' splits: the counts are the rows of
    the sample that ARE digits' model inputs, split by split; a turned view shares none."""
    sample = select.train_images("digits_a", 300, image_size=SIZE, seed=3)
    got = ov.overlap_counts("digits_a", 300, "digits", seed=3)
    assert got == _by_inputs(sample, "digits")
    assert got["train"] > 0 and got["val"] > 0 and got["test"] == 0  # val too: its own split
    assert sum(got.values()) == len(sample)  # every digits_a train image is a digits one
    assert ov.overlap_counts("digits_a", 300, "digits_rot90", seed=3) == ov.zero_counts()
    assert _by_inputs(sample, "digits_rot90") == ov.zero_counts()
    assert ov.overlap_counts("digits_a", 300, "digits_b", seed=3) == ov.zero_counts()
    # the receiver's own sample: all of it in its train split
    assert ov.overlap_counts("digits", 50, "digits") == {"train": 50, "val": 0, "test": 0}


def test_the_sample_is_the_one_train_images_draws():
    split = data.load_split("digits_a", "train", image_size=SIZE)
    src, idx = ov.sample_indices("digits_a", 40, seed=5)
    pos = ov.draw_positions(len(split), 40, seed=5)
    assert np.array_equal(idx, split.indices[pos])
    assert _rows(select.train_images("digits_a", 40, image_size=SIZE, seed=5)) == _rows(
        split.inputs(pos)
    )
    with pytest.raises(ValueError, match="n >= 1"):
        ov.draw_positions(10, 0)


def test_a_merges_donor_images_are_counted_as_the_proxy_measures_them():
    """Two donors' images concatenated, then the Proxy's subsample of them: the counts are
    those of the rows the Proxy measures on."""
    donors, n, measured = ["digits_a", "digits_rot90"], 64, 48
    x = np.concatenate([select.train_images(t, n, image_size=SIZE) for t in donors])
    kept = x[select.subsample(len(x), measured, 0)]
    got = select.images_overlap(donors, n, "digits", measured=measured)
    assert got == _by_inputs(kept, "digits")
    assert 0 < sum(got.values()) < measured  # the turned donor's images are no digits input
    # all of them when the Proxy measures every given input
    assert select.images_overlap(donors, n, "digits") == _by_inputs(x, "digits")


def test_unknown_data_is_refused_not_counted_as_zero(tmp_path):
    assert ov.may_overlap("gtsrb", "gtsrb@classes=3,4")
    with pytest.raises(OSError, match="gtsrb"):  # an image folder that is not there
        ov.overlap_counts("gtsrb", 8, "gtsrb@classes=3,4", data_dir=tmp_path / "none")
    none = ov.overlap_counts("gtsrb", 8, "gtsrb@hflip", data_dir=tmp_path / "none")
    assert none == ov.zero_counts()  # another view: nothing to read, nothing shared
    # tasks that cannot overlap read no data at all
    assert ov.overlap_counts("mnist", 8, "digits", data_dir=tmp_path / "none") == ov.zero_counts()
    assert not (tmp_path / "none").exists()


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="needs Debian's dataset-fashion-mnist")
def test_the_demo_pretext_sample_holds_fmnist_a_train_and_val_images():
    """The issue's case: the demo's pretext sample (256 Fashion-MNIST train images, seed 0)
    holds 124 train and 14 val images of fmnist_a; none of the turned fmnist_rot90."""
    counts = {r: ov.overlap_counts("fashion_mnist", 256, r) for r in ("fmnist_a", "fmnist_b")}
    assert counts == {
        "fmnist_a": {"train": 124, "val": 14, "test": 0},
        "fmnist_b": {"train": 105, "val": 13, "test": 0},
    }
    assert ov.overlap_counts("fashion_mnist", 256, "fmnist_rot90") == ov.zero_counts()
    sample = select.train_images("fashion_mnist", 256, image_size=SIZE)
    for split, want in (("train", 124), ("val", 14)):
        have = _rows(data.load_split("fmnist_a", split, image_size=SIZE).images)
        assert sum(r.tobytes() in have for r in np.asarray(sample)) == want
