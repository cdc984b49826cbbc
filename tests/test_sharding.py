"""sharding: batch rounding, placement and FSDP layouts, on 1 and on 8 forced host devices."""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from qvec_jax import sharding


def test_round_batch_and_put_on_one_device():
    mesh = sharding.make_mesh()
    n = mesh.devices.size
    assert [sharding.round_batch(b, mesh) for b in (1, n, n + 1)] == [n, n, 2 * n]
    rep = sharding.replicated(mesh)
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    placed = sharding.put(tree, rep)
    assert all(x.sharding == rep for x in jax.tree.leaves(placed))
    again = sharding.put(placed, rep)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(placed)))
    np.testing.assert_array_equal(np.asarray(placed["w"]), tree["w"])


def test_fsdp_layouts_and_rounding_on_8_devices():
    from conftest import run_multidevice

    out = run_multidevice(
        """
        import json, jax, numpy as np
        from qvec_jax import sharding
        mesh = sharding.make_mesh()
        abstract = {"k": jax.ShapeDtypeStruct((16, 12), np.float32),
                    "odd": jax.ShapeDtypeStruct((5, 3), np.float32),
                    "s": jax.ShapeDtypeStruct((), np.float32)}
        fsdp = sharding.state_shardings(abstract, mesh, fsdp=True)
        rep = sharding.state_shardings(abstract, mesh)
        print(json.dumps({
            "round": [sharding.round_batch(b, mesh) for b in (1, 8, 60)],
            "fsdp": {k: str(s.spec) for k, s in fsdp.items()},
            "rep": sorted({str(s.spec) for s in rep.values()}),
            "rows": str(sharding.host_rows(64, mesh)),
        }))
        """
    )
    got = json.loads(out.strip().splitlines()[-1])
    assert got["round"] == [8, 8, 64]
    # the largest dim divisible by 8 is sharded; nothing divisible, or a scalar: replicated
    assert got["fsdp"] == {"k": str(P("data", None)), "odd": str(P()), "s": str(P())}
    assert got["rep"] == [str(P())]
    assert got["rows"] == "slice(0, 64, None)"  # one process feeds every row
