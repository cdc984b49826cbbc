"""evaluate.accuracy: exact counting, PTQ inside the jitted fn, one compile for many trees."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import qvec_jax.quant as quant
from qvec_jax import data as qdata
from qvec_jax import evaluate
from qvec_jax.models import vit


@pytest.fixture(scope="module")
def setup():
    model = vit.create_model("test/4", num_classes=10, image_size=28)
    params = [model.init_params(jax.random.key(s)) for s in (0, 1)]
    split = qdata.load_split("digits", "test", image_size=28)
    return model, params, split


def _by_hand(model, params, split):
    logits = jax.jit(model.apply)({"params": params}, split.images)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == split.labels))


def test_accuracy_counts_every_example_once(setup):
    model, (p0, _), split = setup
    want = _by_hand(model, p0, split)
    assert len(split) % 100  # the last batch is padded
    for bs in (100, 512):
        assert evaluate.accuracy(model, p0, split, batch_size=bs) == pytest.approx(want, abs=1e-12)


def test_ptq_inside_equals_ptq_before_and_compiles_once_per_bits(setup):
    model, (p0, p1), split = setup
    before = evaluate.count_correct._cache_size()
    for p in (p0, p1):
        inside = evaluate.accuracy(model, p, split, batch_size=128, bits=2)
        outside = evaluate.accuracy(model, quant.ptq(p, 2), split, batch_size=128)
        assert inside == outside
        assert inside == pytest.approx(_by_hand(model, quant.ptq(p, 2), split), abs=1e-12)
    # one entry for bits=2, one for bits=None, whatever the number of trees
    assert evaluate.count_correct._cache_size() - before <= 2
    t = evaluate.accuracy(model, p0, split, batch_size=128, bits=2, granularity="tensor")
    assert t == pytest.approx(_by_hand(model, quant.ptq(p0, 2, granularity="tensor"), split))
    spec = quant.QuantSpec(2, "tensor")
    assert evaluate.accuracy(model, p0, split, spec, batch_size=128) == t


def test_bad_bits_are_refused(setup):
    model, (p0, _), split = setup
    with pytest.raises(ValueError, match="bits"):
        evaluate.accuracy(model, p0, split, batch_size=128, bits=1)
    with pytest.raises(ValueError, match="granularity"):
        evaluate.accuracy(model, p0, split, batch_size=128, bits=2, granularity="row")
    with pytest.raises(TypeError, match="not both"):
        evaluate.accuracy(model, p0, split, quant.QuantSpec(2), bits=3)


def test_eval_set_cached_and_streamed_count_the_same(setup):
    model, (p0, _), split = setup
    cached = evaluate.EvalSet(split, 100, cache_bytes=1 << 30)
    streamed = evaluate.EvalSet(split, 100)
    assert cached.cached is not None and streamed.cached is None
    assert cached.n == streamed.n == len(split)
    want = _by_hand(model, p0, split)
    for es in (cached, streamed):
        assert es.accuracy(model, p0) == pytest.approx(want, abs=1e-12)
        assert es.accuracy(model, p0, quant.QuantSpec(2)) == evaluate.accuracy(
            model, p0, split, batch_size=100, bits=2
        )


def test_head_warning_is_one_clean_line_and_still_catchable(tmp_path):
    import subprocess
    import sys
    import warnings
    from pathlib import Path

    from qvec_jax import checkpoints

    model = vit.create_model("test/4", num_classes=10, image_size=28)
    meta = {"variant": "test/4", "num_classes": 10, "image_size": 28}
    ck = checkpoints.save_params(tmp_path / "ck", model.init_params(jax.random.key(0)), meta)
    r = subprocess.run(
        [sys.executable, "-m", "qvec_jax.cli", "eval", str(ck), "--task", "digits_a",
         "--splits", "val"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [
        "HeadWarning: digits_a/val: the model's head has 10 classes but the task only 5; is "
        "this the checkpoint of another task? (predictions of the extra classes count as wrong)"
    ], r.stderr  # no "file.py:line:" prefix, no source line under it
    # library use: a warning like any other, which a caller catches or turns into an error
    split = qdata.load_split("digits_a", "val", image_size=28)
    with pytest.warns(evaluate.HeadWarning, match="head has 10 classes but the task only 5"):
        evaluate.check_head(model, split)
    with warnings.catch_warnings():
        warnings.simplefilter("error", evaluate.HeadWarning)
        with pytest.raises(evaluate.HeadWarning):
            evaluate.check_head(model, split)
