"""Top-1 accuracy of a param tree on a data split, optionally after PTQ.

The jitted evaluation function takes ``params`` as an argument (never closes over
them), so evaluating many trees of the same shape (the donor x receiver x lambda grid)
compiles once per (model, bits, granularity). PTQ happens inside that function with
``fake_quant_tree``: the same rule, axes and numbers as ``qvec_jax.ptq``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qvec_jax import data as qdata
from qvec_jax import quant


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all, on every host)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


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


@functools.partial(jax.jit, static_argnames=("model", "bits", "granularity"))
def _correct(params, images, labels, mask, *, model, bits, granularity):
    if bits is not None:
        params = quant.fake_quant_tree(params, bits, granularity=granularity)
    logits = model.apply({"params": params}, images)
    hit = (jnp.argmax(logits, axis=-1) == labels) & mask
    return jnp.sum(hit.astype(jnp.int32))


def accuracy(
    model,
    params,
    split,
    *,
    batch_size: int = 256,
    bits: int | None = None,
    granularity: str = "channel",
    mesh: Mesh | None = None,
) -> float:
    """Top-1 accuracy of ``model`` with ``params`` on ``split`` (a ``data.Split``).

    ``bits``: evaluate ``PTQ(params)`` at that width (round-to-nearest, ``granularity``
    "channel" or "tensor", ``quant.VIT_RULE``). The batch is sharded over ``mesh``'s
    ``"data"`` axis and params replicated; ``batch_size`` is rounded up to a multiple
    of the device count.
    """
    if bits is not None:
        bits = quant.check_bits(bits)
    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    batch_size = -(-int(batch_size) // n_dev) * n_dev
    params = put(params, NamedSharding(mesh, P()))
    total = jnp.zeros((), jnp.int32)
    count = 0
    for images, labels, mask in qdata.eval_batches(split, batch_size):
        count += int(np.sum(mask))
        x, y, m = qdata.shard_batch((images, labels, np.asarray(mask, bool)), mesh)
        total = total + _correct(params, x, y, m, model=model, bits=bits, granularity=granularity)
    if count == 0:
        raise ValueError(f"split {getattr(split, 'split', split)!r} has no examples")
    return int(total) / count
