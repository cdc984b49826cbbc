"""Training input on the devices (data/resident.py, train/feed.py) and several steps per
dispatch (train.make_train_chunk): the same batches, the same fingerprint, and the same
params bit for bit as streamed batches and one step per dispatch."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qvec_jax import data as D
from qvec_jax import quant, train
from qvec_jax.data.loader import TrainLoader, batch_crc, place_rows, stream_positions
from qvec_jax.data.resident import choose_layout, place_split, sample_crc, split_bytes
from qvec_jax.sharding import make_mesh, state_shardings
from qvec_jax.train.feed import ResidentFeed, StreamFeed, chunks

sys.path.insert(0, os.path.dirname(__file__))
from conftest import run_multidevice  # noqa: E402
from test_train import _metrics, _params, _tiny_cfg  # noqa: E402


@pytest.fixture(scope="module")
def split():
    return D.load_split("digits", "train", image_size=16)


def test_chunks_stop_at_every_record_and_checkpoint():
    assert list(chunks(0, 10, 4, 3)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(chunks(5, 12, 100, 4, 6)) == [(5, 6), (6, 8), (8, 12)]
    assert list(chunks(7, 7, 4, 2)) == []
    assert list(chunks(0, 5, 1, 50)) == [(i, i + 1) for i in range(5)]


def test_layout_follows_the_budget():
    assert choose_layout(100, 8, 100) == "replicated"
    assert choose_layout(800, 8, 100) == "sharded"
    assert choose_layout(801, 8, 100) is None
    assert choose_layout(200, 1, 100) is None


def test_resident_feed_gathers_the_streamed_batches_and_their_fingerprint(split):
    """Positions gathered on device == TrainLoader's host batches, crc included."""
    mesh, b = make_mesh(), 32
    res = place_split(split, mesh, split_bytes(split))
    assert res.layout == "replicated" and res.n == len(split)
    assert place_split(split, mesh, split_bytes(split) - 1) is None  # one device: stream
    feed = ResidentFeed(split, res, b, 7, mesh)
    xs, crc = feed.chunk(3, 9, 11)
    from qvec_jax.data.resident import gather

    got = jax.jit(lambda im, lb, p: [gather(res, im, lb, p[i]) for i in range(6)])(*feed.data, xs)
    want_crc = 11
    with TrainLoader(split, b, seed=7, start_step=3, end_step=9) as loader:
        for (x, y), (gx, gy) in zip(loader, got):
            np.testing.assert_array_equal(np.asarray(gx), x)
            np.testing.assert_array_equal(np.asarray(gy), y)
            want_crc = batch_crc(want_crc, x, y)
    assert crc == want_crc
    stream = StreamFeed(split, b, 7, 3, 9, mesh, 0)
    assert stream.chunk(3, 9, 11)[1] == want_crc
    stream.close()


def test_sample_crc_reads_only_the_sampled_bytes(split):
    pos = stream_positions(len(split), 3, 0, 50)
    assert sample_crc(5, split, pos) == batch_crc(5, *split.get(pos))


def test_k_steps_in_one_dispatch_equal_k_dispatches(split):
    """make_train_chunk's lax.scan of 4 steps == 4 calls of make_train_step, bit for bit
    (params, optimizer state and every step's metrics); QAT, the costlier path."""
    cfg = _tiny_cfg(mode="qat")
    model, params = train.build_model_and_params(cfg, 10)
    tx, _ = train.make_optimizer(cfg.optim, 8)
    mesh = make_mesh()
    sh = state_shardings(train.abstract_state(params, tx), mesh)
    kw = dict(mode="qat", spec=quant.QuantSpec(2), preprocess=split.preprocessor)
    step = train.make_train_step(model, tx, mesh, sh, **kw)
    chunk = train.make_train_chunk(model, tx, mesh, sh, **kw)
    batches = [place_rows(b, mesh, 32) for b in TrainLoader(split, 32, seed=1, end_step=4)]
    one, norms = train.create_state(params, tx, sh), []
    for x, y in batches:
        one, m = step(one, x, y)
        norms.append(float(m["grad_norm"]))
    xs = jax.device_put(
        tuple(jnp.stack(v) for v in zip(*batches)), NamedSharding(mesh, P(None, "data"))
    )
    many, ms = chunk(train.create_state(params, tx, sh), xs, ())
    assert [float(g) for g in ms["grad_norm"]] == norms
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "over",
    [{"data.device_bytes": 0, "steps_per_dispatch": 3}, {"steps_per_dispatch": 1}],
    ids=["streamed-k3", "resident-k1"],
)
def test_finetune_is_bit_identical_whatever_the_feed_and_chunk(qat_run, tmp_path, over):
    """The default (resident split, log_every steps a dispatch) against streamed batches
    three steps a dispatch, and one step a dispatch: same params, same metrics."""
    d = str(tmp_path / "run")
    train.finetune(_tiny_cfg(mode="qat", **over), d, progress=False)
    (a, _), (b, _) = _params(qat_run), _params(d)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    keys = ("step", "loss", "lr", "grad_norm", "data_crc")
    pick = lambda rows: [[r[k] for k in keys] for r in rows]
    assert pick(_metrics(d)) == pick(_metrics(qat_run))


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qat_default"))
    train.finetune(_tiny_cfg(mode="qat"), d, progress=False)
    return d


def test_bad_input_settings_are_refused(tmp_path):
    for over, key in (({"data.device_bytes": -1}, "device_bytes"),
                      ({"steps_per_dispatch": -2}, "steps_per_dispatch")):  # fmt: skip
        with pytest.raises(train.TrainError, match=key):
            train.finetune(_tiny_cfg(mode="fp", **over), str(tmp_path / "x"), progress=False)
        assert not os.path.exists(tmp_path / "x")


def test_sharded_split_gathers_across_four_devices():
    """A split over the budget of one device, sharded over 4: every gathered batch is
    the host batch (shard_map + psum, one non-zero row each)."""
    out = run_multidevice(
        """
        import jax, numpy as np
        from qvec_jax import data as D
        from qvec_jax.data.loader import stream_positions
        from qvec_jax.data.resident import gather, place_split, positions_array, split_bytes
        from qvec_jax.sharding import make_mesh
        split = D.load_split("digits", "train", image_size=8)
        mesh = make_mesh()
        for budget in (split_bytes(split), split_bytes(split) // 3):
            res = place_split(split, mesh, budget)
            pos = stream_positions(len(split), 5, 0, 3 * 16).reshape(3, 16)
            f = jax.jit(lambda im, lb, p: [gather(res, im, lb, p[i]) for i in range(3)])
            for p, (x, y) in zip(pos, f(res.images, res.labels, positions_array(res, pos))):
                want = split.get(p)
                assert np.array_equal(np.asarray(x), want[0]), res.layout
                assert np.array_equal(np.asarray(y), want[1]), res.layout
                assert x.sharding.spec[0] == "data"
            print(res.layout, res.nbytes < split_bytes(split))
        """,
        n=4,
    )
    assert out.split() == ["replicated", "False", "sharded", "True"]


def test_speed_only_settings_do_not_change_a_runs_identity(qat_run):
    """data.workers, data.device_bytes and steps_per_dispatch change the speed, not the
    numbers: a finished run is not refused (nor redone) under other values, configs
    written before the keys existed still match, and the study's recipe is the same."""
    from qvec_jax import config as qconfig
    from qvec_jax.study.run import recipe_fingerprint

    faster = _tiny_cfg(mode="qat", **{"data.workers": 2, "data.device_bytes": 0,
                                      "steps_per_dispatch": 3})  # fmt: skip
    assert train.finetune(faster, qat_run, progress=False)["steps"] == 8
    old = qconfig.training_json(faster)
    assert "device_bytes" not in old["data"] and "steps_per_dispatch" not in old
    assert qconfig.training_diff(old, faster) == []
    base = qconfig.load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                            "demo_tiny.py"))  # fmt: skip
    other = qconfig.apply_overrides(base, [("steps_per_dispatch", 5), ("data.workers", 3)])
    assert recipe_fingerprint(other) == recipe_fingerprint(base)
