"""The grain training input (data/loader.py): the order is grain's per-epoch index
shuffle, a pure function of (seed, step); resume at any step; per-host rows; worker
processes change nothing but speed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qvec_jax import data as D
from qvec_jax.data.loader import TrainLoader, place_rows, stream_positions

B = 64


@pytest.fixture(scope="module")
def split():
    return D.load_split("digits", "train", image_size=8)


def take(loader, k):
    with loader:
        return list(itertools.islice(loader, k))


def same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_every_epoch_is_a_permutation_and_epochs_differ(split):
    n = len(split)
    pos = stream_positions(n, seed=3, start=0, stop=3 * n)
    epochs = pos.reshape(3, n)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], stream_positions(n, seed=4, start=0, stop=n))
    # any window is the same slice of the stream (O(1) access, no state)
    np.testing.assert_array_equal(stream_positions(n, 3, n - 5, n + 7), pos[n - 5 : n + 7])


@pytest.mark.parametrize(
    "n,seed,start,stop",
    [(1, 0, 0, 3), (7, 2**32 - 2, 0, 30), (64, 11, 100, 300), (1000, 2038, 2990, 3010),
     (5, 3, 4, 4)],
)  # fmt: skip
def test_stream_positions_are_grains_public_shuffle(n, seed, start, stop):
    """The direct index-shuffle calls give grain's public chain element for element,
    across epoch boundaries (and its per-epoch seed wrapping past 2**32)."""
    import grain

    ref = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    want = np.array([ref[j] for j in range(start, stop)], np.int64)
    np.testing.assert_array_equal(stream_positions(n, seed, start, stop), want)


def test_batches_are_the_split_at_the_stream_positions(split):
    n, steps = len(split), 30  # 30 * 64 > 1 epoch: batches run across the boundary
    got = take(TrainLoader(split, B, seed=2038), steps)
    pos = stream_positions(n, 2038, 0, steps * B).reshape(steps, B)
    same(got, [split.get(p) for p in pos])


def test_resume_at_any_step_replays_the_stream(split):
    full = take(TrainLoader(split, B, seed=1, end_step=25), 30)
    assert len(full) == 25  # end_step bounds the stream
    same(take(TrainLoader(split, B, seed=1, start_step=17), 8), full[17:25])


def test_host_rows_partition_the_global_batch(split):
    full = take(TrainLoader(split, B, seed=5), 3)
    lo = take(TrainLoader(split, B, seed=5, rows=slice(0, 24)), 3)
    hi = take(TrainLoader(split, B, seed=5, rows=slice(24, B)), 3)
    same([(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])) for a, b in zip(lo, hi)],
         full)  # fmt: skip


def test_worker_processes_yield_the_same_batches(split):
    """Two real grain worker processes (spawned): the same batches, in order."""
    same(take(TrainLoader(split, B, seed=9, start_step=3, workers=2), 6),
         take(TrainLoader(split, B, seed=9, start_step=3), 6))  # fmt: skip


def test_place_rows_builds_the_global_batch(split):
    import jax

    from qvec_jax.sharding import make_mesh

    mesh = make_mesh()
    x, y = take(TrainLoader(split, B, seed=0, mesh=mesh), 1)[0]
    gx, gy = place_rows((x, y), mesh, B)
    assert gx.shape == (B, *x.shape[1:])
    np.testing.assert_array_equal(jax.device_get(gy), y)


@pytest.mark.parametrize(
    "kw",
    [dict(workers=-1), dict(batch_size=0), dict(seed=-1), dict(start_step=5, end_step=2),
     dict(rows=slice(0, 65)), dict(workers=True), dict(seed=2**32)],
)  # fmt: skip
def test_bad_settings_are_refused(split, kw):
    args = {"batch_size": B, "seed": 0, **kw}
    with pytest.raises(ValueError, match="out of range|rows|seed"):
        TrainLoader(split, **args)
