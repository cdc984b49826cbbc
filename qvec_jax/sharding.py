"""Meshes and array placement: the one place that decides where arrays live.

Everything here works multi-host: a batch is a *global* numpy batch that every
process computes identically, and each process hands JAX only the rows its own
devices hold; params are placed from an identical host copy on every process.
Training, evaluation and the transfer grid all place arrays through these functions.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "host_rows",
    "make_mesh",
    "put",
    "replicated",
    "round_batch",
    "shard_batch",
    "state_shardings",
]


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all, on every host)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that holds a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """``batch_size`` rounded up to a multiple of ``mesh``'s device count (so it shards)."""
    n_dev = mesh.devices.size
    return -(-int(batch_size) // n_dev) * n_dev


def put(tree, sharding_or_tree):
    """Place host/device arrays with the given sharding(s); works multi-host.

    ``jax.make_array_from_callback`` lets every process supply just its addressable
    shards from the (identical) host copy, for replicated and sharded layouts alike.
    """

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            return jax.device_put(x, s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    if isinstance(sharding_or_tree, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, sharding_or_tree), tree)
    return jax.tree.map(one, tree, sharding_or_tree)


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool = False):
    """Replicated shardings, or FSDP: each leaf's largest dim divisible by the mesh size."""
    n = mesh.devices.size

    def spec(x):
        if not fsdp or x.ndim == 0 or n == 1:
            return replicated(mesh)
        dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % n == 0]
        if not dims:
            return replicated(mesh)
        axes = [None] * x.ndim
        axes[int(dims[0])] = "data"
        return NamedSharding(mesh, P(*axes))

    return jax.tree.map(spec, abstract_state)


def host_rows(global_batch: int, mesh: Mesh, axis: str = "data") -> slice:
    """Rows of a global batch that this process feeds (contiguous block of its devices)."""
    sharding = NamedSharding(mesh, P(axis))
    idx = sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted(
        {(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()}
    )
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(
            f"process {jax.process_index()} owns non-contiguous rows {starts} of the batch; "
            f"order the mesh devices by process so each host owns one block of axis {axis!r}"
        )
    return slice(lo, hi)


def shard_batch(batch, mesh: Mesh, axis: str = "data"):
    """Global jax arrays, sharded on the leading (batch) axis over ``mesh`` axis ``axis``.

    ``batch`` is any pytree of numpy arrays holding the GLOBAL batch (every host computes
    the same one deterministically); each process passes only its rows to
    ``jax.make_array_from_process_local_data``.
    """
    if axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}; no axis named {axis!r}")
    n_dev = mesh.shape[axis]

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n_dev:
            raise ValueError(
                f"batch leaf of shape {x.shape} cannot be split over {n_dev} devices of mesh axis "
                f"{axis!r}; use a batch size divisible by {n_dev} (eval_batches pads to it)"
            )
        rows = host_rows(x.shape[0], mesh, axis)
        sharding = NamedSharding(mesh, P(axis, *([None] * (x.ndim - 1))))
        return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)

    return jax.tree.map(one, batch)
