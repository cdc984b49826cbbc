"""Training data that lives on the devices: uint8 images gathered inside the jitted step.

When a split's uint8 images and labels fit ``data.device_bytes`` per device, they are
placed on the mesh once (:func:`place_split`), and each train step gathers its batch
from the *stream positions* (``data.loader.stream_positions``: the same order as
:class:`~qvec_jax.data.loader.TrainLoader`, so the batches and the training are
bit-identical) inside the jitted step (:func:`gather`). The host then sends ``B`` int32
positions a step instead of ``B`` images, and reads no image.

Layouts, chosen by the budget:

- ``replicated``: every device holds the whole split (bytes <= budget). The positions
  are sharded like the batch, so each device gathers its own rows from its own copy;
  no communication.
- ``sharded``: the rows are split over the ``data`` axis (bytes / devices <= budget,
  rows padded to a multiple of the device count). Each device picks the batch rows it
  holds (zeros elsewhere) and one ``psum`` over ``data`` assembles the batch: exact,
  since each row has exactly one non-zero contribution. The all-reduce moves ``B`` uint8
  images, not the split.
- neither fits: ``None``; the loop streams batches through ``TrainLoader``.

Multi-host: every process holds the split in host memory (``Split.raw``) and places
the shards of its own devices (``jax.make_array_from_callback``); positions are the
same on every process.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qvec_jax.data.loader import CRC_STRIDE

__all__ = [
    "ResidentSplit", "gather", "place_split", "positions_array", "positions_sharding", "sample_crc",
]  # fmt: skip

LAYOUTS = ("replicated", "sharded")


@dataclasses.dataclass(frozen=True)
class ResidentSplit:
    """A split's uint8 images ``[n', h, w(, c)]`` and int32 labels ``[n']`` on ``mesh``
    (``n' >= n``: padding rows of a sharded layout are never gathered)."""

    images: jax.Array
    labels: jax.Array
    layout: str  # one of LAYOUTS
    mesh: Mesh
    n: int  # rows of the split (before padding)
    axis: str = "data"

    @property
    def nbytes(self) -> int:
        """Bytes on each device."""
        shard = self.images.addressable_shards[0].data
        return int(shard.nbytes + self.labels.addressable_shards[0].data.nbytes)


def split_bytes(split) -> int:
    """Bytes of a split's uint8 images and int32 labels (0 when it is not in memory)."""
    if not getattr(split, "in_memory", False):
        return 0
    return int(split.raw.nbytes + split.labels.nbytes)


def choose_layout(nbytes: int, n_devices: int, budget: int) -> str | None:
    """``replicated`` if ``nbytes`` fit ``budget`` on one device, ``sharded`` if a
    ``1/n_devices`` share does (and there are several devices), else None."""
    if nbytes <= budget:
        return "replicated"
    if n_devices > 1 and math.ceil(nbytes / n_devices) <= budget:
        return "sharded"
    return None


def place_split(split, mesh: Mesh, budget: int, axis: str = "data") -> ResidentSplit | None:
    """Put ``split`` (in memory) on ``mesh`` in the layout ``budget`` (bytes a device)
    allows; None when it is streamed (not in memory, or too big even sharded)."""
    if budget <= 0 or not getattr(split, "in_memory", False):
        return None
    raw, labels = split.raw, np.asarray(split.labels, np.int32)
    nd = mesh.devices.size
    layout = choose_layout(split_bytes(split), nd, budget)
    if layout is None:
        return None
    if layout == "sharded":
        pad = -len(raw) % nd
        raw = np.concatenate([raw, np.zeros((pad, *raw.shape[1:]), raw.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, np.int32)])
        specs = (P(axis, *([None] * (raw.ndim - 1))), P(axis))
    else:
        specs = (P(), P())

    def put(a, spec):
        sh = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

    return ResidentSplit(put(raw, specs[0]), put(labels, specs[1]), layout, mesh, len(split),
                         axis)  # fmt: skip


def positions_sharding(res: ResidentSplit) -> NamedSharding:
    """Of positions ``[k, B]``: sharded over the batch like the batch (replicated layout:
    each device gathers its own rows) or whole on every device (sharded layout)."""
    return NamedSharding(res.mesh, P(None, res.axis) if res.layout == "replicated" else P())


def positions_array(res: ResidentSplit, positions: np.ndarray) -> jax.Array:
    """Host positions ``[k, B]`` (the same on every process) -> the device array that
    :func:`gather` takes, one step's row at a time."""
    positions = np.asarray(positions, np.int32)
    sh = positions_sharding(res)
    return jax.make_array_from_callback(positions.shape, sh, lambda idx: positions[idx])


def gather(res: ResidentSplit, images, labels, positions) -> tuple[jax.Array, jax.Array]:
    """Traced, inside a jitted step: the batch ``(images, labels)`` at ``positions``
    (``[B]`` int32) of the resident ``images``/``labels`` (``res`` gives the layout),
    sharded over the batch."""
    batch = NamedSharding(res.mesh, P(res.axis))
    if res.layout == "replicated":
        x, y = jnp.take(images, positions, axis=0), jnp.take(labels, positions, axis=0)
    else:
        x, y = _sharded_gather(res, images, labels, positions)
    return (jax.lax.with_sharding_constraint(x, batch),
            jax.lax.with_sharding_constraint(y, batch))  # fmt: skip


def _sharded_gather(res: ResidentSplit, images, labels, positions):
    """Each device contributes the batch rows it holds (zeros elsewhere); a psum over
    the axis sums exactly one non-zero row into each position."""
    axis = res.axis
    rows = images.shape[0] // res.mesh.shape[axis]

    def local(xs, ys, pos):
        lo = jax.lax.axis_index(axis) * rows
        mine = (pos >= lo) & (pos < lo + rows)
        i = jnp.where(mine, pos - lo, 0)
        x = jnp.where(mine.reshape(-1, *([1] * (xs.ndim - 1))), xs[i], jnp.zeros((), xs.dtype))
        y = jnp.where(mine, ys[i], 0)
        return jax.lax.psum(x, axis), jax.lax.psum(y, axis)

    spec_x = P(axis, *([None] * (images.ndim - 1)))
    return jax.shard_map(local, mesh=res.mesh, in_specs=(spec_x, P(axis), P()),
                         out_specs=(P(), P()))(images, labels, positions)  # fmt: skip


def sample_crc(crc: int, split, positions: np.ndarray) -> int:
    """``data.loader.batch_crc`` of ``split.get(positions)`` without gathering the
    images: it reads only the image bytes the fingerprint samples."""
    raw = split.raw
    flat = raw.reshape(len(raw), -1)
    m = flat.shape[1]
    k = np.arange(0, len(positions) * m, CRC_STRIDE)
    labels = np.asarray(split.labels)[positions]
    crc = zlib.crc32(np.ascontiguousarray(labels).tobytes(), crc)
    return zlib.crc32(np.ascontiguousarray(flat[positions[k // m], k % m]).tobytes(), crc)
