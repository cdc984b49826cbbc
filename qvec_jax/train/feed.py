"""The training input of one run, a chunk of steps at a time, for ``train.make_train_chunk``.

Both feeds serve the same stream (``data.loader.stream_positions``: batch ``s`` is
elements ``s*B .. s*B+B-1`` of grain's per-epoch shuffle), so a run trains bit for bit
the same whichever one it gets; both keep the data fingerprint (``data.loader.batch_crc``
of this host's rows) that checkpoints and ``metrics.jsonl`` carry:

- :class:`ResidentFeed`: the split lives on the devices (``data.resident``); a chunk
  is its ``[k, B]`` int32 positions, computed on the host from the step numbers (no
  state: resume at any step is O(1)); the fingerprint reads only the image bytes it
  samples. Host work a step: ``B`` index-shuffle calls and one small transfer.
- :class:`StreamFeed`: :class:`~qvec_jax.data.loader.TrainLoader` (grain, optional
  worker processes) reads the batches; a chunk is ``k`` of them stacked and sent at
  once. For splits over the device budget, or not in memory.

:func:`chunks` cuts ``start..end`` at every metrics record and checkpoint, so what
the loop records and saves is unchanged by the chunking.
"""

from __future__ import annotations

import numpy as np

from qvec_jax.data.loader import TrainLoader, batch_crc, place_rows, stream_positions
from qvec_jax.data.resident import ResidentSplit, positions_array, sample_crc
from qvec_jax.sharding import host_rows

__all__ = ["ResidentFeed", "StreamFeed", "chunks"]

#: Most bytes of streamed input one dispatch carries (k stacked host batches).
STREAM_CHUNK_BYTES = 256 << 20


def chunks(start: int, end: int, k: int, *every: int):
    """``(s0, s1)`` pieces of ``start..end`` of at most ``k`` steps that never cross a
    multiple of any of ``every`` (records and checkpoints happen at those steps)."""
    s = start
    while s < end:
        stop = min([end, s + k] + [(s // e + 1) * e for e in every])
        yield s, stop
        s = stop


class ResidentFeed:
    """Positions into a device-resident split (``data.place_split``)."""

    def __init__(self, split, res: ResidentSplit, batch_size: int, seed: int, mesh):
        self.split, self.res, self.seed = split, res, int(seed)
        self.batch_size, self.rows = int(batch_size), host_rows(batch_size, mesh)
        self.data = (res.images, res.labels)

    def max_steps(self, k: int) -> int:
        return k

    def chunk(self, s0: int, s1: int, crc: int):
        """``(xs, crc)`` of steps ``s0..s1``: positions ``[k, B]`` on the mesh and the
        fingerprint after them."""
        b = self.batch_size
        pos = stream_positions(len(self.split), self.seed, s0 * b, s1 * b).reshape(-1, b)
        for p in pos:
            crc = sample_crc(crc, self.split, p[self.rows])
        return positions_array(self.res, pos), crc

    def close(self) -> None:
        pass


class StreamFeed:
    """Host batches from :class:`TrainLoader`, ``k`` steps stacked per transfer."""

    def __init__(self, split, batch_size: int, seed: int, start: int, end: int, mesh,
                 workers: int):  # fmt: skip
        self.loader = TrainLoader(split, batch_size, seed=seed, start_step=start, end_step=end,
                                  mesh=mesh, workers=workers)  # fmt: skip
        self.mesh, self.batch_size, self.data = mesh, int(batch_size), ()
        self.item_bytes = int(split.item_bytes)

    def max_steps(self, k: int) -> int:
        """``k`` capped so a chunk's images stay under :data:`STREAM_CHUNK_BYTES`."""
        return max(1, min(k, STREAM_CHUNK_BYTES // max(1, self.item_bytes * self.batch_size)))

    def chunk(self, s0: int, s1: int, crc: int):
        """``(xs, crc)``: the next ``s1 - s0`` batches stacked on the mesh, fingerprinted."""
        images, labels = [], []
        for _ in range(s1 - s0):
            x, y = next(self.loader)
            crc = batch_crc(crc, x, y)
            images.append(x)
            labels.append(y)
        xs = place_rows((np.stack(images), np.stack(labels)), self.mesh, self.batch_size,
                        steps=True)  # fmt: skip
        return xs, crc

    def close(self) -> None:
        self.loader.close()
