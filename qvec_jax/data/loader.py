"""The training input on grain: batches read in worker processes, prefetched, per host.

The stream is a pure function of ``(seed, step)``:

- the order of the examples is grain's index shuffle, reseeded every epoch
  (``grain.MapDataset.range(n).shuffle(seed).repeat()``): element ``j`` of the stream is
  a position of the split, computed in O(1) for any ``j`` without materialising a
  permutation; batch ``s`` holds stream elements ``s*B .. s*B+B-1`` (batches run across
  epoch boundaries, so every batch is full). :func:`stream_positions` computes them by
  calling grain's index shuffle directly: through the MapDataset chain each element
  cost about 0.2 ms of Python (27 ms for a batch of 128, more than a demo-size train
  step on an H200, and the reason extra grain workers did not help), directly about
  3.5 us;
- a ``grain.MapDataset`` over the *steps* maps step ``s`` to the rows of batch ``s``
  that this host feeds (``sharding.host_rows``: each process reads only its own rows),
  so resuming at step ``k`` is ``MapDataset.range(k, end)``: O(1) at any step;
- ``workers`` > 0 reads and decodes in that many grain worker processes
  (``mp_prefetch``; the output order does not depend on the worker count), 0 reads in
  this process; either way ``prefetch`` batches are read ahead by threads.

Each batch is ``split.get(positions)`` (the Split decides the image dtype and size), so
FP and QAT runs with one seed see the same batches. The order changed once, from NumPy
epoch permutations (the former ``pipeline.train_positions``) to grain's shuffle: runs started
before cannot be resumed bit for bit (their checkpoints' data fingerprint names it).
"""

from __future__ import annotations

import sys
import zlib

import grain
import jax
import numpy as np

# grain's per-element index shuffle (C++), the one ShuffleMapDataset calls; private in
# grain 0.2, so tests/test_loader.py pins stream_positions to the public MapDataset chain.
from grain._src.python.experimental.index_shuffle.python.index_shuffle_module import (
    index_shuffle as _index_shuffle,
)
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qvec_jax.sharding import host_rows

__all__ = ["TrainLoader", "batch_crc", "place_rows", "stream_positions"]

#: The stream's fingerprint reads every CRC_STRIDE-th image byte (and every label).
CRC_STRIDE = 997


def batch_crc(crc: int, images, labels) -> int:
    """Running fingerprint of the data stream: CRC-32 of a batch's labels, then of
    every ``CRC_STRIDE``-th byte of its images (in metrics.jsonl and checkpoints)."""
    crc = zlib.crc32(np.ascontiguousarray(labels).tobytes(), crc)
    sample = np.asarray(images).reshape(-1)[::CRC_STRIDE]
    return zlib.crc32(np.ascontiguousarray(sample).tobytes(), crc)


def _grain_flags() -> None:
    """grain 0.2.x reads an absl flag in its worker code; outside an absl app the flags
    are unparsed and that read raises (google/grain#1355, fixed upstream in #1362).
    Marking them parsed keeps every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def stream_positions(n: int, seed: int, start: int, stop: int) -> np.ndarray:
    """Positions (0..n-1 in the split) of stream elements ``start:stop``: exactly
    ``grain.MapDataset.range(n).shuffle(seed).repeat()[start:stop]`` (tests pin it), by
    grain's own index shuffle called per element with the per-epoch seed that
    ``ShuffleMapDataset`` uses, ``(seed + epoch) mod 2**32``, without the chain's
    per-element overhead (grain has no vectorised public entry point for it)."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed}: the training order needs 0 <= seed < 2**32")
    if n < 1 or not 0 <= start <= stop:
        raise ValueError(f"stream_positions: need n >= 1 and 0 <= start <= stop, got "
                         f"n={n}, start={start}, stop={stop}")  # fmt: skip
    out = np.empty(stop - start, np.int64)
    for epoch in range(start // n, (stop - 1) // n + 1 if stop > start else 0):
        lo, hi = max(start, epoch * n), min(stop, (epoch + 1) * n)
        s = (seed + epoch) % 2**32
        out[lo - start : hi - start] = [
            _index_shuffle(i, max_index=n - 1, seed=s, rounds=4)
            for i in range(lo - epoch * n, hi - epoch * n)
        ]
    return out


class _ReadBatch:
    """Step -> this host's rows of that batch (picklable: it runs in grain workers)."""

    def __init__(self, split, batch_size: int, seed: int, rows: slice):
        self.split, self.batch_size, self.seed, self.rows = split, batch_size, seed, rows

    def __call__(self, step: int):
        b0 = int(step) * self.batch_size
        lo, hi = b0 + self.rows.start, b0 + self.rows.stop
        return self.split.get(stream_positions(len(self.split), self.seed, lo, hi))


class TrainLoader:
    """Iterate ``(images, labels)``: this host's rows of batches ``start_step:end_step``
    (``end_step=None``: endless). Use as a context manager or call
    :meth:`close` (it stops the worker processes).

    ``mesh``: the rows are those of this process's devices (``sharding.host_rows``);
    None: the whole batch; ``rows`` names them directly instead. ``workers``: grain
    worker processes (0: read here). ``prefetch``: batches read ahead.
    """

    def __init__(
        self,
        split,
        batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        end_step: int | None = None,
        mesh: Mesh | None = None,
        rows: slice | None = None,
        workers: int = 0,
        prefetch: int = 2,
    ):
        bad = [
            f"{name}={v!r}"
            for name, v, lo in (
                ("batch_size", batch_size, 1),
                ("seed", seed, 0),
                ("start_step", start_step, 0),
                ("workers", workers, 0),
                ("prefetch", prefetch, 1),
            )  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo
        ]
        if bad or (end_step is not None and end_step < start_step):
            raise ValueError(
                f"training input: {', '.join(bad) or f'end_step={end_step!r}'} is out of range; "
                "need batch_size >= 1, prefetch >= 1, seed/start_step/workers >= 0, "
                "end_step >= start_step (data.workers in the config)"
            )
        stream_positions(1, int(seed), 0, 0)  # the seed's range, checked here, not in a worker
        if rows is None:
            rows = slice(0, batch_size) if mesh is None else host_rows(batch_size, mesh)
        if not 0 <= (rows.start or 0) <= (rows.stop or 0) <= batch_size:
            raise ValueError(f"rows {rows} are not rows of a batch of {batch_size}")
        rows = slice(rows.start or 0, rows.stop)
        end = sys.maxsize if end_step is None else int(end_step)
        steps = grain.MapDataset.range(int(start_step), end)
        ds = steps.map(_ReadBatch(split, int(batch_size), int(seed), rows)).to_iter_dataset(
            grain.ReadOptions(
                num_threads=max(1, min(int(prefetch), 8)), prefetch_buffer_size=int(prefetch)
            )  # fmt: skip
        )
        if workers:
            _grain_flags()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=int(workers), per_worker_buffer_size=int(prefetch)))  # fmt: skip
        self.rows, self.batch_size = rows, int(batch_size)
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self) -> None:
        """Stop the worker processes and free their shared memory."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = iter(())  # drop grain's iterator now, not at interpreter exit

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def place_rows(batch, mesh: Mesh, global_size: int, axis: str = "data", *, steps: bool = False):
    """Global arrays of ``global_size`` rows, sharded on ``axis``, from this host's rows
    (what :class:`TrainLoader` yields for ``mesh``). ``steps``: the arrays are several
    steps' batches stacked, ``[k, rows, ...]``; the rows are their second axis."""

    def one(x):
        x = np.asarray(x)
        lead = (x.shape[0],) if steps else ()
        rest = x.shape[len(lead) + 1 :]
        spec = P(*([None] * len(lead)), axis, *([None] * len(rest)))
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_process_local_data(sharding, x, (*lead, global_size, *rest))

    return jax.tree.map(one, batch)
