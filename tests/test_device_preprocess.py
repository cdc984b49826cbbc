"""Device-side preprocessing (data.device) against the host path it replaced, and bf16.

The reference ``host_before`` is the former host path (NumPy view, PIL bilinear in float32
per channel, grey->RGB, scaling to [-1, 1]); the device path must match it to
``TOL = 2e-5`` on the [-1, 1] scale (PIL widens the bilinear filter when downscaling;
``jax.image.resize(..., antialias=True)`` does the same).
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from qvec_jax import data as D
from qvec_jax import evaluate, quant
from qvec_jax.models import vit
from qvec_jax.sharding import make_mesh, replicated, shard_batch
from qvec_jax.train.step import create_state, loss_fn, make_train_step

TOL = 2e-5


def host_before(raw, max_value, size, rot90=0, hflip=False, invert=False):
    """The host path before device preprocessing: view, PIL bilinear per plane, [-1, 1]."""
    x = np.asarray(raw, np.float32)
    x = x[..., None] if x.ndim == 3 else x[..., :3]
    x = np.flip(np.rot90(x, rot90, axes=(1, 2)), 2) if hflip else np.rot90(x, rot90, axes=(1, 2))
    x = max_value - x if invert else x

    def plane(p):
        im = Image.fromarray(np.ascontiguousarray(p), mode="F")
        return np.asarray(im.resize((size, size), Image.BILINEAR), np.float32)

    if x.shape[1:3] != (size, size):
        x = np.stack([np.stack([plane(i[..., c]) for c in range(x.shape[-1])], -1) for i in x])
    x = np.broadcast_to(x, (*x.shape[:3], 3))
    return np.clip(x * (2.0 / max_value) - 1.0, -1.0, 1.0)


def _u8(shape, seed=0, high=256):
    return np.random.default_rng(seed).integers(0, high, shape, dtype=np.uint8)


@pytest.mark.parametrize(
    "shape,size,max_value",
    [((3, 28, 28), 16, 255.0), ((3, 8, 8), 16, 16.0), ((2, 32, 32, 3), 24, 255.0),
     ((2, 10, 6, 4), 7, 255.0), ((2, 9, 9, 1), 9, 255.0), ((2, 32, 32, 3), 224, 255.0)],
)  # fmt: skip
def test_matches_the_former_host_path(shape, size, max_value):
    x = _u8(shape, high=int(max_value) + 1)
    got = np.asarray(D.DevicePreprocess(size, max_value).jitted(x))
    assert got.dtype == np.float32 and got.shape == (shape[0], size, size, 3)
    np.testing.assert_allclose(got, host_before(x, max_value, size), atol=TOL, rtol=0)


@pytest.mark.parametrize("rot90", [0, 1, 2, 3])
@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("invert", [False, True])
def test_views_are_numpy_rot90_flip_invert(rot90, hflip, invert):
    x = _u8((2, 5, 7, 3), seed=rot90)
    want = np.rot90(x.astype(np.float32), rot90, axes=(1, 2))
    want = want[:, :, ::-1] if hflip else want
    want = 255.0 - want if invert else want
    prep = D.DevicePreprocess(want.shape[1], 255.0, rot90=rot90, hflip=hflip, invert=invert)
    if want.shape[1] == want.shape[2]:  # no resize: the view alone, exactly
        np.testing.assert_array_equal(np.asarray(prep.jitted(x)), want / 127.5 - 1.0)
    resized = D.DevicePreprocess(6, 255.0, rot90=rot90, hflip=hflip, invert=invert).jitted(x)
    np.testing.assert_allclose(resized, host_before(x, 255.0, 6, rot90, hflip, invert), atol=TOL)
    # the same view as data (one compile for every view of a square stored shape)
    sq = _u8((2, 6, 6, 3), seed=rot90)
    prep = D.DevicePreprocess(9, 255.0, rot90=rot90, hflip=hflip, invert=invert)
    as_data = jax.jit(lambda x, v: D.device_preprocess(x, image_size=9, max_value=255.0, view=v))
    np.testing.assert_array_equal(as_data(sq, prep.view_code), prep.jitted(sq))


def test_grey_becomes_three_equal_channels():
    x = _u8((4, 8, 8))
    for grey in (x, x[..., None]):
        y = np.asarray(D.device_preprocess(grey, image_size=12, max_value=255.0))
        assert y.shape == (4, 12, 12, 3)
        assert np.array_equal(y[..., 0], y[..., 1]) and np.array_equal(y[..., 0], y[..., 2])


def test_bad_shapes_and_values_are_refused():
    with pytest.raises(ValueError, match=r"\[n, h, w\]"):
        D.device_preprocess(np.zeros((2, 4, 4, 2), np.uint8), image_size=4, max_value=255.0)
    with pytest.raises(ValueError, match="my source.*whole numbers"):
        D.device.to_uint8(np.array([0.5, 1.0]), "my source")
    assert D.device.to_uint8(np.array([0.0, 16.0]), "x").dtype == np.uint8


# ----------------------------------------------------------------------------- the demo's inputs

DEMO_TASKS = ("digits", "digits_rot90", "fashion_mnist", "fmnist_a", "fmnist_b", "fmnist_rot90")


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_demo_inputs_at_16_px_match_the_host_path(task):
    if not D.availability(task)[0]:
        pytest.skip(f"{task}: data not present")
    for name in ("val", "test"):
        s = D.load_split(task, name, image_size=16)
        v = s.task.view
        want = host_before(s.raw, s.reader.max_value, 16, v.rot90, v.hflip, v.invert)
        diff = float(np.max(np.abs(s.images - want)))
        print(f"{task}/{name}: max abs diff device vs host = {diff:.2e} over {len(s)} images")
        assert diff <= TOL


# ----------------------------------------------------------------------------- eval and train


@pytest.fixture(scope="module")
def small():
    model = vit.create_model("test/4", num_classes=10, image_size=16)
    split = D.load_split("digits", "test", image_size=16)
    return model, model.init_params(jax.random.key(0)), split


def test_eval_set_caches_uint8_at_stored_size(small):
    model, params, split = small
    es = evaluate.EvalSet(split, 64, cache_bytes=1 << 20)
    assert es.cached is not None
    xs = [x for x, _, _ in es.cached]
    assert all(x.dtype == jnp.uint8 and x.shape == (64, 8, 8) for x in xs)
    assert sum(x.nbytes for x in xs) == len(xs) * 64 * 8 * 8  # 1 byte a pixel, 8x8 as stored
    assert split.item_bytes == 64
    logits = jax.jit(model.apply)({"params": params}, split.images)
    want = float(np.mean(np.argmax(np.asarray(logits), -1) == split.labels))
    assert es.accuracy(model, params) == pytest.approx(want, abs=1e-12)
    assert evaluate.EvalSet(split, 64, cache_bytes=len(split) * 64 - 1).cached is None
    # another view of the same stored shape: the same compiled eval, the view as data
    rot = D.load_split("digits_rot90", "test", image_size=16)
    before = evaluate.count_correct._cache_size()
    got = evaluate.EvalSet(rot, 64, cache_bytes=1 << 20).accuracy(model, params)
    assert evaluate.count_correct._cache_size() == before
    logits = jax.jit(model.apply)({"params": params}, rot.images)
    want = float(np.mean(np.argmax(np.asarray(logits), -1) == rot.labels))
    assert got == pytest.approx(want, abs=1e-12)


def _step(model, params, mode, preprocess, spec=None):
    mesh = make_mesh()
    tx = optax.adamw(1e-3)
    sh = jax.tree.map(lambda _: replicated(mesh), jax.eval_shape(
        lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)},
        params))  # fmt: skip
    fn = make_train_step(model, tx, mesh, sh, mode=mode, spec=spec, preprocess=preprocess)
    return fn, create_state(params, tx, sh), mesh


def test_train_step_on_uint8_equals_step_on_host_preprocessed(small):
    model, params, split = small
    x, y = D.load_split("digits", "train", image_size=16).get(np.arange(32))
    assert x.dtype == np.uint8
    fn, state, mesh = _step(model, params, "fp", split.preprocessor)
    s_u8, m_u8 = fn(state, *shard_batch((x, y), mesh))
    fn, state, mesh = _step(model, params, "fp", None)
    s_f32, m_f32 = fn(state, *shard_batch((split.preprocessor.jitted(x), y), mesh))
    np.testing.assert_allclose(m_u8["loss"], m_f32["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s_u8["params"]), jax.tree.leaves(s_f32["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- bf16


def test_bf16_step_keeps_float32_params_and_optimizer_state(small):
    model, params, split = small
    bf16 = model.clone(dtype=jnp.bfloat16)
    x, y = D.load_split("digits", "train", image_size=16).get(np.arange(32))
    fn, state, mesh = _step(bf16, params, "qat", split.preprocessor, quant.QuantSpec(2))
    state, m = fn(state, *shard_batch((x, y), mesh))
    floats = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floats and all(a.dtype == jnp.float32 for a in floats)
    assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))
    # the model does compute in bf16: its dense layers' dot products take bf16 operands
    x2 = split.images[:2]
    jaxpr = jax.make_jaxpr(lambda p: bf16.apply({"params": p}, x2))(params)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert not dots or all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_bf16_fake_quant_rounds_the_float32_params(small):
    model, params, split = small
    bf16 = model.clone(dtype=jnp.bfloat16)
    spec = quant.QuantSpec(2)
    x2, y2 = split.images[:2], split.labels[:2]
    jaxpr = jax.make_jaxpr(lambda p: loss_fn(p, bf16, x2, y2, spec=spec))(params)

    def eqns(j):
        for e in j.eqns:
            yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from eqns(sub)

    rounds = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "round"]
    assert rounds and all(e.invars[0].aval.dtype == jnp.float32 for e in rounds)


def test_bf16_eval_is_close_to_float32(small):
    model, _, split = small
    x, y = split.images, jnp.asarray(split.labels)
    params = model.init_params(jax.random.key(1))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(p, o):
        g = jax.grad(loss_fn)(p, model, x, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    for _ in range(60):  # fit the 359 test images a little, so accuracy means something
        params, opt = step(params, opt)
    fp32 = evaluate.accuracy(model, params, split, batch_size=128)
    bf = evaluate.accuracy(model.clone(dtype=jnp.bfloat16), params, split, batch_size=128)
    assert fp32 > 0.5 and abs(fp32 - bf) <= 0.02
