"""Our checkpoints: params + typed meta as one orbax Composite, the first format still read,
the train state as train.py saves it, backbone ids, ``qvec convert``."""

# ruff: noqa: F811  (the fixtures ref and google_npz are imported from vit_layouts)

from __future__ import annotations

import json
import os
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file
from vit_layouts import (  # noqa: F401
    assert_trees_equal,
    google_npz,
    images,
    logits,
    random_params,
    ref,
    to_timm,
)

from qvec_jax import checkpoints as ck
from qvec_jax import pretrained, train
from qvec_jax.cli import main as cli_main

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
    m2, p2 = pretrained.load_pretrained(out, num_classes=2, image_size=28)
    assert m2.num_classes == 2 and p2["head"]["kernel"].shape == (32, 2)


def test_checkpoint_is_one_orbax_composite_of_params_and_meta(tmp_path):
    path = ck.save_params(tmp_path / "ck", {"w": np.ones(3, np.float32)}, {"task": "t"})
    assert {"meta", "params"} <= {p.name for p in path.iterdir()}
    assert ck.meta_file(path) == path / "meta" / ck.META_FILE
    crc = {"w": f"{zlib.crc32(np.ones(3, np.float32).tobytes()):08x}"}  # the leaf's bytes
    assert json.loads(ck.meta_file(path).read_text()) == {
        "kind": "params", "task": "t", "crc32": crc,
    }  # fmt: skip
    assert ck.is_checkpoint(path) and ck.read_meta(path) == {"kind": "params", "task": "t"}
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left


def test_interrupted_save_leaves_no_partial_checkpoint(tmp_path, ref, monkeypatch):
    path = ck.save_params(tmp_path / "ck", ref[1], {"steps": 1})

    def preempted(self, directory):  # every item is written ... then preemption, pre-rename
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", preempted)
    with pytest.raises(KeyboardInterrupt):
        ck.save_params(tmp_path / "new", {"w": np.ones(3)}, {"steps": 2})
    with pytest.raises(KeyboardInterrupt):  # orbax removes the old one before writing
        ck.save_params(path, {"w": np.ones(3)}, {"steps": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # neither a partial checkpoint nor a temporary dir
    for p in (path, tmp_path / "new"):
        assert not ck.is_checkpoint(p)
        with pytest.raises(FileNotFoundError, match=p.name):
            ck.restore_params(p)
    ck.save_params(path, {"w": np.ones(3, np.float32)}, {"steps": 3})
    params, meta = ck.restore_params(path)
    assert meta["steps"] == 3 and np.array_equal(params["w"], np.ones(3))


def test_first_format_checkpoints_are_still_read(tmp_path, ref):
    """``<path>/params`` (orbax) next to ``<path>/qvec_meta.json``, as written before."""
    path = tmp_path / "old"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", ref[1])
    ckptr.wait_until_finished()
    meta = {"kind": "params", "variant": "test/4", "num_classes": 5, "image_size": 28}
    (path / ck.META_FILE).write_text(json.dumps({**meta, "representation_size": 32}))
    assert ck.is_checkpoint(path) and ck.meta_file(path) == path / ck.META_FILE
    params, rmeta = ck.restore_params(path)
    assert rmeta == {**meta, "representation_size": 32}
    assert_trees_equal(params, ref[1])
    model, p2 = pretrained.load_pretrained(path, image_size=28)
    np.testing.assert_array_equal(logits(model, p2, images()), ref[2])
    ck.save_params(path, params, rmeta)  # an overwrite writes the new format
    assert ck.meta_file(path) == path / "meta" / ck.META_FILE


def test_save_refuses_foreign_dirs_and_bad_meta(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("user data")
    with pytest.raises(ck.CheckpointError, match="not a qvec checkpoint; refusing"):
        ck.save_params(tmp_path / "data", {"w": np.ones(2)}, {})
    assert (tmp_path / "data" / "keep.txt").exists()
    with pytest.raises(ck.CheckpointError, match="not JSON-serializable"):
        ck.save_params(tmp_path / "x", {"w": np.ones(2)}, {"config": {"bad": object()}})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"task_name": "t"}, "unknown checkpoint meta key 'task_name'; did you mean task"),
        ({"bits": "2"}, r"bits='2' is a str, expected int"),
        ({"bits": True}, r"bits=True is a bool, expected int"),
        ({"kind": "weights"}, r"kind='weights' is not in \('params', 'qv'\)"),
        ({"global_norm": "big"}, r"global_norm='big' is a str, expected a number"),
    ],
)
def test_meta_is_validated_on_save_and_on_read(tmp_path, meta, match):
    with pytest.raises(ck.CheckpointError, match=match):
        ck.save_params(tmp_path / "ck", {"w": np.ones(2)}, meta)
    assert not (tmp_path / "ck").exists()
    path = ck.save_params(tmp_path / "ok", {"w": np.ones(2)}, {"global_norm": 1, "bits": None})
    ck.meta_file(path).write_text(json.dumps(meta))  # a hand-edited file
    with pytest.raises(ck.CheckpointError, match=match):
        ck.restore_params(path)


def test_restore_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        ck.restore_params(tmp_path / "nothere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ck.CheckpointError, match="plain: not a qvec checkpoint"):
        ck.restore_params(tmp_path / "plain")
    path = ck.save_params(tmp_path / "ck", {"w": np.ones(4, np.float32)}, {})
    ck.meta_file(path).write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="corrupt JSON"):
        ck.restore_params(path)
    ck.meta_file(path).write_text("{}")
    for f in (path / "params").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"\0" * 10)
    shutil.rmtree(path / "params" / "d", ignore_errors=True)
    with pytest.raises(ck.CheckpointError, match="ck: cannot restore params"):
        ck.restore_params(path)


# ------------------------------------------------------------ train state (train.py's)


def test_train_state_roundtrip_keeps_structure_dtypes_and_the_optimizer(tmp_path, ref):
    """The resumable state as ``train`` checkpoints it (train.workdir's CheckpointManager)."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
    params = jax.tree.map(jnp.asarray, ref[1])
    grads = jax.tree.map(lambda x: np.full(x.shape, 0.1, np.float32), ref[1])
    update = jax.jit(tx.update)  # eager optax compiles op by op: slow
    _, opt_state = update(grads, jax.jit(tx.init)(params), params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(17)}
    mngr = train.workdir.checkpoint_manager(str(tmp_path), keep=2)
    train.workdir.save_state(mngr, 17, state, crc=12345)
    mngr.wait_until_finished()
    abstract = jax.eval_shape(lambda: state)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    restored, step, crc = train.workdir.restore_state(mngr, abstract, shardings)
    assert (step, crc) == (17, 12345)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the optimizer continues from the restored state exactly as from the original
    u1, _ = update(grads, state["opt_state"], params)
    u2, _ = update(grads, restored["opt_state"], restored["params"])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, u1, u2)))
    wrong = {**abstract, "params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    with pytest.raises(ValueError):
        train.workdir.restore_state(mngr, wrong, {**shardings, "params": {"w": shardings["step"]}})
    mngr.close()


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
    meta_file = json.loads(ck.meta_file(out).read_text())
    assert meta == {k: v for k, v in meta_file.items() if k != "crc32"}  # checksums: on disk
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


def test_cli_convert_of_unnamed_dims_writes_an_explicit_variant(tmp_path, capsys):
    model0, params0 = random_params(2, num_classes=3, image_size=16, variant="w96d2m64h4/4")
    src = tmp_path / "w96.safetensors"
    save_file(to_timm(params0), str(src))
    assert cli_main(["convert", str(src), str(tmp_path / "a")]) == 1
    assert "--num-heads" in capsys.readouterr().err
    assert cli_main(["convert", str(src), str(tmp_path / "b"), "--num-heads", "4"]) == 0
    assert "ViT w96d2m64h4/4 @ 16px" in capsys.readouterr().out
    params, meta = ck.restore_params(tmp_path / "b")
    assert meta["variant"] == "w96d2m64h4/4"
    x = images(size=16)
    want = logits(model0, params0, x)
    np.testing.assert_allclose(logits(ck.model_from_meta(meta), params, x), want, atol=1e-5)


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
