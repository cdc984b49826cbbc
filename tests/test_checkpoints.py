"""Checkpoint import (Google/big_vision .npz, timm/HF safetensors), orbax save/restore, convert.

The layouts are written here by hand, with the exact key names of each source, from one
random tree in our (original Google) layout; ``test_torch_ref.py`` checks the timm/HF key
mapping against the real libraries.
"""

from __future__ import annotations

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

import qvec_jax as q
from qvec_jax import checkpoints as ck
from qvec_jax.cli import main as cli_main
from qvec_jax.models import create_model

ATT = "MultiHeadDotProductAttention_1"


def random_params(seed=0, num_classes=5, rep=None, image_size=28):
    """test/4 params with every leaf random (so a mis-mapped leaf cannot hide)."""
    model = create_model("test/4", num_classes=num_classes, image_size=image_size,
                         representation_size=rep)  # fmt: skip
    rng = np.random.default_rng(seed)
    return model, jax.tree.map(
        lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), model.abstract_params()
    )


def images(n=2, size=28, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def logits(model, params, x):
    return np.asarray(model.apply({"params": params}, x))


def to_big_vision(params, scan=False) -> dict[str, np.ndarray]:
    f = dict(q.flatten(params))
    pe = f.pop("Transformer/posembed_input/pos_embedding")
    out = {"pos_embedding": pe[:, 1:], "cls": f.pop("cls") + pe[:, :1]}
    ren = {ATT: "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1"}
    ren["MlpBlock_3"] = "MlpBlock_0"
    for k, v in f.items():
        out["/".join(ren.get(p, p) for p in k.split("/"))] = v
    if scan:
        blocks = sorted(k for k in out if k.startswith("Transformer/encoderblock_0/"))
        for k in blocks:
            sub = k.split("/", 2)[2]
            out["Transformer/encoderblock/" + sub] = np.stack(
                [out.pop(f"Transformer/encoderblock_{i}/{sub}") for i in range(2)]
            )
    return out


def to_timm(params) -> dict[str, np.ndarray]:
    f = q.flatten(params)
    sd = {
        "cls_token": f["cls"],
        "pos_embed": f["Transformer/posembed_input/pos_embedding"],
        "patch_embed.proj.weight": f["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": f["embedding/bias"],
        "norm.weight": f["Transformer/encoder_norm/scale"],
        "norm.bias": f["Transformer/encoder_norm/bias"],
        "head.weight": f["head/kernel"].T,
        "head.bias": f["head/bias"],
    }
    for i in range(2):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        qkv = [f[b + f"{ATT}/{n}/kernel"].reshape(32, 32).T for n in ("query", "key", "value")]
        sd[t + "attn.qkv.weight"] = np.concatenate(qkv, 0)
        sd[t + "attn.qkv.bias"] = np.concatenate(
            [f[b + f"{ATT}/{n}/bias"].reshape(-1) for n in ("query", "key", "value")]
        )
        sd[t + "attn.proj.weight"] = f[b + f"{ATT}/out/kernel"].reshape(32, 32).T
        sd[t + "attn.proj.bias"] = f[b + f"{ATT}/out/bias"]
        for ln, tn in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            sd[t + tn + ".weight"] = f[b + ln + "/scale"]
            sd[t + tn + ".bias"] = f[b + ln + "/bias"]
        for d, tn in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            sd[t + f"mlp.{tn}.weight"] = f[b + f"MlpBlock_3/{d}/kernel"].T
            sd[t + f"mlp.{tn}.bias"] = f[b + f"MlpBlock_3/{d}/bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def to_hf(params) -> dict[str, np.ndarray]:
    """ViTForImageClassification.save_pretrained key names."""
    f = q.flatten(params)
    e = "vit.embeddings."
    sd = {
        e + "cls_token": f["cls"],
        e + "position_embeddings": f["Transformer/posembed_input/pos_embedding"],
        e + "patch_embeddings.projection.weight": f["embedding/kernel"].transpose(3, 2, 0, 1),
        e + "patch_embeddings.projection.bias": f["embedding/bias"],
        "vit.layernorm.weight": f["Transformer/encoder_norm/scale"],
        "vit.layernorm.bias": f["Transformer/encoder_norm/bias"],
        "classifier.weight": f["head/kernel"].T,
        "classifier.bias": f["head/bias"],
    }
    for i in range(2):
        b, t = f"Transformer/encoderblock_{i}/", f"vit.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            sd[t + f"attention.attention.{n}.weight"] = f[b + f"{ATT}/{n}/kernel"].reshape(32, 32).T
            sd[t + f"attention.attention.{n}.bias"] = f[b + f"{ATT}/{n}/bias"].reshape(-1)
        sd[t + "attention.output.dense.weight"] = f[b + f"{ATT}/out/kernel"].reshape(32, 32).T
        sd[t + "attention.output.dense.bias"] = f[b + f"{ATT}/out/bias"]
        sd[t + "intermediate.dense.weight"] = f[b + "MlpBlock_3/Dense_0/kernel"].T
        sd[t + "intermediate.dense.bias"] = f[b + "MlpBlock_3/Dense_0/bias"]
        sd[t + "output.dense.weight"] = f[b + "MlpBlock_3/Dense_1/kernel"].T
        sd[t + "output.dense.bias"] = f[b + "MlpBlock_3/Dense_1/bias"]
        for ln, hn in (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")):
            sd[t + hn + ".weight"] = f[b + ln + "/scale"]
            sd[t + hn + ".bias"] = f[b + ln + "/bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


@pytest.fixture(scope="module")
def ref():
    model, params = random_params(0, rep=32)
    return model, params, logits(model, params, images())


@pytest.fixture
def google_npz(tmp_path, ref):
    path = tmp_path / "vit.npz"
    np.savez(path, **q.flatten(ref[1]))
    return path


def assert_trees_equal(a, b):
    fa, fb = q.flatten(a), q.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# ------------------------------------------------------------------------------ layouts


def test_google_npz_loads_exactly(google_npz, ref):
    model, params = ck.load_pretrained(google_npz, image_size=28)
    assert (model.width, model.depth, model.num_heads, model.patch_size) == (32, 2, 2, 4)
    assert model.num_classes == 5 and model.representation_size == 32
    assert_trees_equal(params, ref[1])
    np.testing.assert_array_equal(logits(model, params, images()), ref[2])


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_npz_gives_the_same_logits(tmp_path, ref, scan):
    path = tmp_path / "bv.npz"
    np.savez(path, **to_big_vision(ref[1], scan=scan))
    model, params = ck.load_pretrained(path, variant="test/4", image_size=28)
    pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert pe.shape == (1, 50, 32) and not np.any(np.asarray(pe[:, 0]))
    np.testing.assert_allclose(logits(model, params, images()), ref[2], rtol=1e-5, atol=1e-5)


def test_timm_and_hf_safetensors_load_exactly(tmp_path):
    model0, params0 = random_params(1, num_classes=7)
    for name, sd in (("timm", to_timm(params0)), ("hf", to_hf(params0))):
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
        model, params = ck.load_pretrained(path, image_size=None)
        assert model.image_size == 28 and model.num_classes == 7, name
        assert_trees_equal(params, params0)


def test_pickle_files_are_refused(tmp_path):
    for name in ("model.pt", "pytorch_model.bin", "weird.weights"):
        p = tmp_path / name
        p.write_bytes(pickle.dumps({"a": 1}))
        with pytest.raises(ck.CheckpointError, match=r"pickle.*safetensors"):
            ck.load_pretrained(p)
    p = tmp_path / "obj.npz"
    np.savez(p, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ck.CheckpointError, match="pickled objects"):
        ck.load_pretrained(p)


# ------------------------------------------------------------------- head and posemb


def test_new_head_is_fresh_seeded_and_drops_pre_logits(google_npz, ref):
    m3, p3 = ck.load_pretrained(google_npz, num_classes=3, image_size=28, seed=1)
    _, p3b = ck.load_pretrained(google_npz, num_classes=3, image_size=28, seed=1)
    _, p3c = ck.load_pretrained(google_npz, num_classes=3, image_size=28, seed=2)
    assert m3.num_classes == 3 and m3.representation_size is None
    assert "pre_logits" not in p3 and p3["head"]["kernel"].shape == (32, 3)
    assert not np.any(np.asarray(p3["head"]["bias"]))
    assert 0 < float(jnp.std(p3["head"]["kernel"])) < 0.05
    np.testing.assert_array_equal(p3["head"]["kernel"], p3b["head"]["kernel"])
    assert not np.array_equal(p3["head"]["kernel"], p3c["head"]["kernel"])
    backbone = {k: v for k, v in ref[1].items() if k not in ("head", "pre_logits")}
    assert_trees_equal({k: v for k, v in p3.items() if k != "head"}, backbone)
    assert logits(m3, p3, images()).shape == (2, 3)
    m0, p0 = ck.load_pretrained(google_npz, num_classes=0, image_size=28)
    assert m0.num_classes is None and "head" not in p0
    assert logits(m0, p0, images()).shape == (2, 32)


def test_posemb_resampled_for_a_new_image_size(google_npz, ref):
    model, params = ck.load_pretrained(google_npz, num_classes=4, image_size=36)
    pe = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    old = ref[1]["Transformer"]["posembed_input"]["pos_embedding"]
    assert pe.shape == (1, 1 + 9 * 9, 32)
    np.testing.assert_array_equal(pe[:, 0], old[:, 0])  # class token's slot kept
    g_old, g_new = old[0, 1:].reshape(7, 7, 32), pe[0, 1:].reshape(9, 9, 32)
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # bilinear, corners aligned
        np.testing.assert_allclose(g_new[i, j], g_old[i, j], rtol=1e-6, atol=1e-6)
    lo, hi = g_old.min(axis=(0, 1)), g_old.max(axis=(0, 1))
    assert np.all(g_new >= lo - 1e-6) and np.all(g_new <= hi + 1e-6)  # interpolation only
    assert logits(model, params, images(size=36)).shape == (2, 4)


def test_resample_posemb_is_linear_on_a_linear_grid():
    g0, g1 = 4, 7
    yy, xx = np.meshgrid(np.arange(g0), np.arange(g0), indexing="ij")
    grid = np.stack([yy, xx, 2 * yy - xx], -1).reshape(1, g0 * g0, 3).astype(np.float32)
    pe = np.concatenate([np.full((1, 1, 3), 9.0, np.float32), grid], 1)
    out = ck.resample_posemb(pe, 1 + g1 * g1)
    t = np.linspace(0, g0 - 1, g1)
    ny, nx = np.meshgrid(t, t, indexing="ij")
    want = np.stack([ny, nx, 2 * ny - nx], -1).reshape(1, -1, 3)
    np.testing.assert_allclose(out[:, 1:], want, atol=1e-5)
    assert np.all(out[:, 0] == 9.0)
    assert ck.resample_posemb(pe, pe.shape[1]) is pe


# --------------------------------------------------------------------------- bad files


def test_corrupt_and_truncated_files(tmp_path, google_npz):
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(ck.CheckpointError, match="garbage.npz.*corrupt or truncated"):
        ck.load_pretrained(bad)
    data = google_npz.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="cut.npz"):
        ck.load_pretrained(cut)
    st = tmp_path / "cut.safetensors"
    save_file({"a": np.zeros((100, 100), np.float32)}, str(st))
    st.write_bytes(st.read_bytes()[:5000])
    with pytest.raises(ck.CheckpointError, match="cut.safetensors.*corrupt or truncated"):
        ck.load_pretrained(st)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        ck.load_pretrained(tmp_path / "nope.npz")
    other = tmp_path / "other.npz"
    np.savez(other, foo=np.zeros(3))
    with pytest.raises(ck.CheckpointError, match="not a ViT checkpoint.*foo"):
        ck.load_pretrained(other)


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, ref):
    f = dict(q.flatten(ref[1]))
    del f["Transformer/encoderblock_1/LayerNorm_2/scale"]
    f["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3, np.float32)
    f["Transformer/encoder_norm/bias"] = np.zeros(31, np.float32)
    path = tmp_path / "broken.npz"
    np.savez(path, **f)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_pretrained(path, image_size=28)
    msg = str(e.value)
    assert "broken.npz" in msg
    assert "missing keys (1)" in msg and "encoderblock_1/LayerNorm_2/scale" in msg
    assert "unexpected keys (1)" in msg and "encoderblock_0/extra/kernel" in msg
    assert "wrong shapes (1)" in msg and "encoder_norm/bias: checkpoint (31,) vs model (32,)" in msg


def test_wrong_variant_is_named(google_npz):
    with pytest.raises(ck.CheckpointError, match=r"not a S/16: width 32 \(a S/16 has 384\)"):
        ck.load_pretrained(google_npz, variant="S/16")
    with pytest.raises(ck.CheckpointError, match="looks like a test/4"):
        ck.load_pretrained(google_npz, variant="B/4")


# ------------------------------------------------------------------------ orbax params


def test_save_restore_params_roundtrip(tmp_path, ref):
    params = dict(ref[1], extra={"bf": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)})
    meta = {"variant": "test/4", "num_classes": 5, "image_size": 28, "representation_size": 32}
    out = ck.save_params(tmp_path / "ck", params, meta)
    restored, rmeta = ck.restore_params(out)
    assert rmeta == {**meta, "kind": "params"}
    assert_trees_equal(restored, params)
    assert restored["extra"]["bf"].dtype == jnp.bfloat16
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))
    model = ck.model_from_meta(rmeta)
    del restored["extra"]
    np.testing.assert_array_equal(logits(model, restored, images()), ref[2])
    # a qvec checkpoint is also a valid load_pretrained source
    out = ck.save_params(tmp_path / "ck", ref[1], meta)  # overwrites, without "extra"
    m2, p2 = ck.load_pretrained(out, num_classes=2, image_size=28)
    assert m2.num_classes == 2 and p2["head"]["kernel"].shape == (32, 2)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, ref, monkeypatch):
    path = tmp_path / "ck"
    ck.save_params(path, ref[1], {"version": 1})

    real_save = ck._orbax_save

    def exploding_save(directory, tree):
        real_save(directory, tree)  # the new arrays are fully written ...
        raise KeyboardInterrupt  # ... then preemption, before meta and the swap

    monkeypatch.setattr(ck, "_orbax_save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_params(path, {"w": np.ones(3)}, {"version": 2})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # temp dir cleaned up
    params, meta = ck.restore_params(path)
    assert meta["version"] == 1
    assert_trees_equal(params, ref[1])
    # a crash between the two renames of the swap is recovered on the next access
    ck.save_params(path, {"w": np.ones(3, np.float32)}, {"version": 3})
    os.rename(path, ck._backup(path))
    params, meta = ck.restore_params(path)
    assert meta["version"] == 3 and np.array_equal(params["w"], np.ones(3))


def test_save_refuses_foreign_dirs_and_bad_meta(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("user data")
    with pytest.raises(ck.CheckpointError, match="not a qvec checkpoint; refusing"):
        ck.save_params(tmp_path / "data", {"w": np.ones(2)}, {})
    assert (tmp_path / "data" / "keep.txt").exists()
    with pytest.raises(ck.CheckpointError, match="not JSON-serializable"):
        ck.save_params(tmp_path / "x", {"w": np.ones(2)}, {"bad": object()})
    assert not (tmp_path / "x").exists()


def test_restore_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        ck.restore_params(tmp_path / "nothere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ck.CheckpointError, match="plain: not a qvec checkpoint"):
        ck.restore_params(tmp_path / "plain")
    path = ck.save_params(tmp_path / "ck", {"w": np.ones(4, np.float32)}, {})
    (path / ck.META_FILE).write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="corrupt JSON"):
        ck.restore_params(path)
    (path / ck.META_FILE).write_text("{}")
    for f in (path / "params").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"\0" * 10)
    import shutil

    shutil.rmtree(path / "params" / "d", ignore_errors=True)
    with pytest.raises(ck.CheckpointError, match="ck: cannot restore params"):
        ck.restore_params(path)


# ------------------------------------------------------------------------ train state


def test_train_state_roundtrip_keeps_structure_and_dtypes(tmp_path, ref):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
    params = jax.tree.map(jnp.asarray, ref[1])
    grads = jax.tree.map(lambda x: np.full(x.shape, 0.1, np.float32), ref[1])
    update = jax.jit(tx.update)  # eager optax compiles op by op: slow
    _, opt_state = update(grads, jax.jit(tx.init)(params), params)
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.int32(17),
        "rng": jax.random.key(3),
        "ema": jnp.ones((2,), jnp.bfloat16),
    }
    ck.save_train_state(tmp_path / "st", state, {"step": 17})
    target = jax.eval_shape(lambda: state)
    restored, meta = ck.restore_train_state(tmp_path / "st", target)
    assert meta == {"kind": "train_state", "step": 17}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
    )
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
        {k: v for k, v in restored.items() if k != "rng"},
        {k: v for k, v in state.items() if k != "rng"},
    )
    assert all(jax.tree.leaves(same))
    # the optimizer continues from the restored state exactly as from the original
    u1, _ = update(grads, state["opt_state"], params)
    u2, _ = update(grads, restored["opt_state"], restored["params"])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, u1, u2)))
    wrong = {**target, "params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    with pytest.raises(ck.CheckpointError, match="st: cannot restore the train state"):
        ck.restore_train_state(tmp_path / "st", wrong)


# -------------------------------------------------------------------- backbone id + CLI


def test_backbone_id_ignores_the_head_only(ref):
    params = ref[1]
    bid = ck.backbone_id(params)
    assert len(bid) == 12 and bid == ck.backbone_id(jax.tree.map(jnp.asarray, params))
    other_head = dict(params, head={"kernel": np.zeros((32, 9)), "bias": np.zeros(9)})
    assert ck.backbone_id({k: v for k, v in other_head.items() if k != "pre_logits"}) == bid
    bumped = jax.tree.map(np.copy, params)
    bumped["Transformer"]["encoderblock_1"]["LayerNorm_0"]["bias"][3] += 1e-3
    assert ck.backbone_id(bumped) != bid


def test_cli_convert(tmp_path, google_npz, ref, capsys):
    out = tmp_path / "conv"
    rc = cli_main(
        ["convert", str(google_npz), str(out), "--num-classes", "3", "--image-size", "32"]
    )
    assert rc == 0
    assert "test/4" in capsys.readouterr().out
    params, meta = ck.restore_params(out)
    meta_file = json.loads((out / ck.META_FILE).read_text())
    assert meta == meta_file
    assert meta["variant"] == "test/4" and meta["num_classes"] == 3 and meta["image_size"] == 32
    assert meta["representation_size"] is None and meta["source"].endswith("vit.npz")
    assert meta["backbone_id"] == ck.backbone_id(params)
    model = ck.model_from_meta(meta)
    assert logits(model, params, images(size=32)).shape == (2, 3)
    # keeping the head keeps the checkpoint's backbone id (no posemb change)
    rc = cli_main(["convert", str(google_npz), str(tmp_path / "keep")])
    assert rc == 0
    _, meta2 = ck.restore_params(tmp_path / "keep")
    assert meta2["backbone_id"] == ck.backbone_id(ref[1]) and meta2["num_classes"] == 5
    assert meta2["image_size"] == 28
    rc = cli_main(["convert", str(tmp_path / "missing.npz"), str(tmp_path / "o")])
    assert rc == 1 and "missing.npz" in capsys.readouterr().err


_TWO_PROCESS_SCRIPT = """
import sys, jax, numpy as np
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
from qvec_jax import checkpoints
assert jax.process_count() == 2
if pid == 0:  # as train.py does: only process 0 writes the gathered params
    checkpoints.save_params(out, {"w": np.arange(6.0).reshape(2, 3)}, {"task": "t"})
    p, m = checkpoints.restore_params(out)
    assert np.array_equal(p["w"], np.arange(6.0).reshape(2, 3)) and m["task"] == "t"
print("ok", pid, flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_params_save_and_restore_from_one_process_of_a_multi_process_run(tmp_path):
    """save_params/restore_params called by process 0 alone must not wait for the others."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free loopback port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    out = str(tmp_path / "ckpt")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for i, (p, (so, se)) in enumerate(zip(procs, results)):
        assert p.returncode == 0 and f"ok {i}" in so, se[-2000:]
