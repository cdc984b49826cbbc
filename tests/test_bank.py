"""The QV bank (``qvec_jax.bank``, ``qvec qv-bank``): a built bank is the merge of its
donors' QVs and survives a save/load bit for bit; damage and edits are caught by the
checksum, naming the file; mixed donors and unfit receivers are refused in one line that
names the donor or receiver; the CLI builds from a runs dir and from ``--pair``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from test_cli_methods import run_ok
from test_cli_safety import refused, snapshot
from vit_layouts import random_params

import qvec_jax as q
from qvec_jax import bank, checkpoints, cli, merge

IMAGE = 16
META = {"variant": "test/4", "num_classes": 10, "image_size": IMAGE, "backbone_id": "b0"}
QAT = {"bits": 2, "granularity": "channel"}
TASKS = ("digits", "digits_rot90", "digits_inv")


def _nudge(params, seed, scale):
    rng = np.random.default_rng(seed)
    return q.unflatten(
        {
            p: x + scale * rng.normal(0, 0.05, x.shape).astype(np.float32)
            for p, x in q.flatten(params).items()
        }
    )


_, BASE = random_params(0, num_classes=10, image_size=IMAGE)


def _trees(i: int) -> tuple[dict, dict]:
    """(qat, fp) params of donor ``i``: nearby fine-tunes of BASE."""
    fp = _nudge(BASE, 10 + i, 0.2)
    return _nudge(fp, 20 + i, 0.3), fp


def pair(i: int, task: str | None = None, qat: dict = (), fp: dict = ()) -> bank.DonorPair:
    """An in-memory donor ``i`` (paths /donors/<task>/...), its metas updated by qat/fp."""
    task = task or TASKS[i % len(TASKS)]
    tq, tf = _trees(i)
    mq = {**META, **QAT, "task": task, "mode": "qat", **dict(qat)}
    mf = {**META, **QAT, "task": task, "mode": "fp", **dict(fp)}
    return bank.DonorPair((tq, mq), (tf, mf), f"/donors/{task}{i}/qat", f"/donors/{task}{i}/fp")


def assert_trees_equal(a, b):
    fa, fb = q.flatten(a), q.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _qv(p: bank.DonorPair) -> dict:
    return q.quantization_vector(p.qat[0], p.fp[0])


# ----------------------------------------------------------------------------- library


@pytest.mark.parametrize("method", [None, "mean"])
def test_round_trip_is_bit_exact_and_equals_merge_qvs(tmp_path, method):
    pairs = [pair(i) for i in range(3)]
    built = bank.build_bank(pairs, method=method, lam=0.75)
    method = method or bank.DEFAULT_METHODS[2]  # None: the 2-bit donors' dev-chosen method
    assert_trees_equal(built.qv, merge.merge_qvs([_qv(p) for p in pairs], method))
    n = bank.save_bank(built, tmp_path / "b.safetensors")
    assert n == (tmp_path / "b.safetensors").stat().st_size
    loaded = bank.load_bank(tmp_path / "b.safetensors")
    assert_trees_equal(loaded.qv, built.qv)
    assert all(v.dtype == np.float32 for v in q.flatten(loaded.qv).values())
    assert loaded.provenance == built.provenance
    assert (loaded.bits, loaded.granularity, loaded.backbone_id) == (2, "channel", "b0")
    assert (loaded.lam, loaded.donors, loaded.method) == (0.75, list(TASKS), method)
    prov = loaded.provenance
    assert prov["merge"] == {**merge.MergeSpec(method).to_dict(), "n_donors": 3}
    assert (prov["variant"], prov["image_size"], prov["format"]) == ("test/4", IMAGE, bank.FORMAT)
    assert prov["rule"] == [[rx.pattern, list(v)] for rx, v in q.VIT_RULE.patterns]
    assert prov["donors"][1] == {
        "task": "digits_rot90",
        "qat": "/donors/digits_rot901/qat",
        "fp": "/donors/digits_rot901/fp",
        "qat_crc": checkpoints.backbone_id(pairs[1].qat[0]),
        "fp_crc": checkpoints.backbone_id(pairs[1].fp[0]),
    }
    assert not any(k.startswith(("head/", "pre_logits/")) for k in q.flatten(loaded.qv))
    text = bank.describe(loaded)
    assert f"{method}" in text and "3 donors" in text and loaded.checksum in text


def test_a_single_donor_bank_is_its_qv():
    p = pair(0)
    built = bank.build_bank([p])
    want = {k: np.asarray(v, np.float32) for k, v in q.flatten(_qv(p)).items()}
    assert_trees_equal(built.qv, q.unflatten(want))
    assert built.provenance["merge"] == {"method": "single", "n_donors": 1}
    assert built.method == "single" and built.donors == ["digits"] and built.lam == 1.0


def _header(path: Path) -> tuple[int, dict]:
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return n, json.loads(path.read_bytes()[8 : 8 + n])


def test_the_checksum_catches_a_flipped_byte_naming_the_file_and_leaf(tmp_path):
    path = tmp_path / "b.safetensors"
    bank.save_bank(bank.build_bank([pair(0), pair(1)]), path)
    n, header = _header(path)
    leaf = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
    start = 8 + n + header[leaf]["data_offsets"][0] + 5
    data = bytearray(path.read_bytes())
    data[start] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(bank.BankError, match="damaged") as e:
        bank.load_bank(path)
    assert str(path) in str(e.value) and leaf in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p.update(lam=0.5),
        lambda p: p["donors"][0].update(task="cifar10"),
        lambda p: p.update(bits=3),
    ],
)
def test_the_checksum_catches_an_edited_provenance(tmp_path, edit):
    path = tmp_path / "b.safetensors"
    bank.save_bank(bank.build_bank([pair(0), pair(1)]), path)
    with safe_open(str(path), framework="numpy") as f:
        tensors, md = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    prov = json.loads(md["qvec_jax"])
    edit(prov)
    save_file(tensors, str(path), metadata={**md, "qvec_jax": json.dumps(prov)})
    with pytest.raises(bank.BankError, match="damaged or was edited") as e:
        bank.load_bank(path)
    assert str(path) in str(e.value) and "qvec qv-bank build" in str(e.value)


@pytest.mark.parametrize(
    "metadata, says",
    [
        ({"format": "qvec_jax.packed", "qvec_jax": "{}"}, "not a QV bank"),
        ({"format": bank.FORMAT, "qvec_jax": '{"version": 2}'}, "version 2 is not 1"),
        ({"format": bank.FORMAT, "qvec_jax": '{"version": 1}'}, "lacks 'format'"),
        ({"format": bank.FORMAT, "qvec_jax": "{not json"}, "not a readable"),
    ],
)
def test_other_files_are_refused_in_one_line(tmp_path, metadata, says):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, str(path), metadata=metadata)
    with pytest.raises(bank.BankError, match=says) as e:
        bank.load_bank(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "junk").write_bytes(b"\x00" * 40)
    with pytest.raises(bank.BankError, match="not a readable"):
        bank.load_bank(tmp_path / "junk")


@pytest.mark.parametrize(
    "pairs, names, says",
    [
        (lambda: [pair(0), pair(1, qat={"backbone_id": "b1"})], ["digits_rot901/qat"], "backbon"),
        (lambda: [pair(0), pair(1, fp={"backbone_id": "b1"})], ["digits_rot901/fp"], "backbon"),
        (lambda: [pair(0), pair(1, qat={"bits": 3})], ["digits0/qat", "rot901/qat"], "quant spec"),
        (
            lambda: [pair(0), pair(1, qat={"granularity": "tensor"})],
            ["digits0/qat", "rot901/qat"],
            "quant spec",
        ),
        (lambda: [pair(0), pair(1, fp={"image_size": 32})], ["digits_rot901/fp"], "image size"),
        (lambda: [pair(0), pair(1, fp={"variant": "demo/4"})], ["digits_rot901/fp"], "variant"),
        (lambda: [pair(0), pair(1, qat={"mode": "fp"})], ["digits_rot901/qat"], "mode='fp'"),
        (lambda: [pair(0, fp={"mode": "qat"})], ["digits0/fp"], "mode='qat'"),
        (lambda: [pair(0, fp={"task": "fashion"})], ["digits0/qat", "digits0/fp"], "tasks"),
        (lambda: [pair(0, qat={"kind": "qv"})], ["digits0/qat"], "quantization vector"),
        (lambda: [pair(0, qat={"bits": None})], ["digits0/qat"], "quant spec"),
        (lambda: [pair(0), pair(0, task="digits")], ["digits0/qat"], "same checkpoint"),
        (lambda: [], [], "no donors"),
    ],
)
def test_mixed_or_wrong_donors_are_refused_naming_them(pairs, names, says):
    with pytest.raises(bank.BankError, match=says) as e:
        bank.build_bank(pairs())
    assert "\n" not in str(e.value)
    for name in names:
        assert name in str(e.value), (name, str(e.value))


def test_an_all_zero_qv_and_a_bad_recipe_are_refused():
    p = pair(0)
    same = bank.DonorPair((p.fp[0], p.qat[1]), p.fp, "/d/qat", "/d/fp")
    with pytest.raises(bank.BankError, match="same checkpoint"):
        bank.build_bank([same])
    with pytest.raises(bank.BankError, match="method"):
        bank.build_bank([p], method="median")
    with pytest.raises(bank.BankError, match="lam"):
        bank.build_bank([p], lam=float("nan"))


def test_check_receiver_refuses_what_does_not_fit():
    built = bank.build_bank([pair(0), pair(1)])
    rx = _nudge(BASE, 99, 0.2)
    built.check_receiver({**META, "task": "cifar"}, rx)  # fits
    built.check_receiver({}, None)  # nothing known: nothing to refuse
    for meta, says in (
        ({**META, "backbone_id": "b9"}, "backbone_id 'b9'"),
        ({**META, "variant": "demo/4"}, "variant 'demo/4'"),
        ({**META, "image_size": 32}, "image_size 32"),
        ({**META, "kind": "qv"}, "quantization vector"),
    ):
        with pytest.raises(bank.BankError, match=says) as e:
            built.check_receiver(meta, rx, where="runs/cifar/fp")
        assert str(e.value).startswith("runs/cifar/fp ")
    flat = dict(q.flatten(rx))
    leaf = "Transformer/encoderblock_0/LayerNorm_0/scale"
    for tree, says in (
        ({k: v for k, v in flat.items() if k != leaf}, f"no leaf {leaf}"),
        ({**flat, leaf: np.zeros(7, np.float32)}, f"leaf {leaf} of shape (7,)"),
    ):
        with pytest.raises(bank.BankError, match="bank's backbone") as e:
            built.check_receiver(META, q.unflatten(tree), where="RX")
        assert says in str(e.value) and str(e.value).startswith("RX ")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    """A pretext checkpoint (task digits_flip) and ``runs/<task>/{qat,fp}/params`` as
    ``qvec finetune`` leaves them, whose config names the pretext as init.path."""
    root = tmp_path_factory.mktemp("bank")
    checkpoints.save_params(root / "pretext", BASE, {**META, "task": "digits_flip", "mode": "fp"})
    config = {"init": {"kind": "pretrained", "path": str(root / "pretext")}}
    for i, task in enumerate(TASKS[:2]):
        for mode, tree in zip(("qat", "fp"), _trees(i)):
            info = {**META, **QAT, "task": task, "mode": mode, "config": config}
            checkpoints.save_params(root / "runs" / task / mode / "params", tree, info)
    (root / "runs" / "grid").mkdir()  # not a task dir: skipped
    return root


def _restored(ck: Path, task: str) -> bank.DonorPair:
    qat, fp = (ck / "runs" / task / m / "params" for m in ("qat", "fp"))
    return bank.DonorPair(checkpoints.restore_params(qat), checkpoints.restore_params(fp),
                          str(qat), str(fp))  # fmt: skip


def test_cli_builds_from_a_runs_dir_and_shows_it(capsys, ck, tmp_path):
    out_file = tmp_path / "b.safetensors"
    out = run_ok(capsys, "qv-bank", "build", out_file, "--runs", ck / "runs")
    assert "donor 1/2: digits " in out and "donor 2/2: digits_rot90 " in out
    assert bank.DEFAULT_METHODS[2] == "ties"  # the 2-bit donors' default
    assert f"wrote {out_file} (2 donors, ties, 2-bit channel, backbone b0" in out
    got = bank.load_bank(out_file)
    want = bank.build_bank([_restored(ck, t) for t in TASKS[:2]])
    assert_trees_equal(got.qv, want.qv)
    assert got.pretext == "digits_flip" and got.donors == list(TASKS[:2])
    assert got.provenance["donors"][0]["qat"] == str(ck / "runs" / "digits" / "qat" / "params")
    assert run_ok(capsys, "qv-bank", "show", out_file).strip() == bank.describe(got)
    shown = json.loads(run_ok(capsys, "qv-bank", "show", out_file, "--json"))
    assert shown == got.provenance


def test_cli_builds_from_a_task_dir_and_pairs(capsys, ck, tmp_path):
    out_file = tmp_path / "b.safetensors"
    qat, fp = (ck / "runs" / "digits_rot90" / m / "params" for m in ("qat", "fp"))
    argv = ["qv-bank", "build", out_file, "--runs", ck / "runs" / "digits"]
    run_ok(capsys, *argv, "--pair", qat, fp, "--method", "mean", "--lam", "0.5")
    got = bank.load_bank(out_file)
    want = bank.build_bank([_restored(ck, t) for t in TASKS[:2]], method="mean", lam=0.5)
    assert_trees_equal(got.qv, want.qv)
    assert got.lam == 0.5 and got.method == "mean"
    out = run_ok(capsys, "qv-bank", "build", tmp_path / "one", "--pair", qat, fp)
    assert "(1 donor, single, " in out
    assert_trees_equal(
        bank.load_bank(tmp_path / "one").qv, bank.build_bank([_restored(ck, "digits_rot90")]).qv
    )


def test_cli_refusals_name_the_file_and_leave_nothing(capsys, ck, tmp_path):
    runs = ck / "runs"
    qat, fp = (runs / "digits" / m / "params" for m in ("qat", "fp"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "half" / "qat").mkdir(parents=True)
    for argv, names in (
        (["build", tmp_path / "o", "--runs", tmp_path / "empty"], ["empty", "task dir"]),
        (
            ["build", tmp_path / "o", "--runs", tmp_path / "half"],
            ["half/qat", "no finished fine-tune"],
        ),
        (["build", tmp_path / "o", "--runs", tmp_path / "none"], ["none", "no such"]),
        (["build", tmp_path / "o", "--pair", fp, qat], [str(fp), "mode='fp'"]),
        (["build", tmp_path / "o", "--pair", qat, fp, "--pair", qat, fp], ["same checkpoint"]),
        (["build", qat / "x", "--runs", runs], ["would overwrite input"]),
        (["build", tmp_path / "o"], ["no donors"]),
        (["show", tmp_path / "nothing"], ["nothing", "no such file"]),
        (["show", qat], [str(qat), "a directory"]),
    ):
        refused(capsys, tmp_path, ["qv-bank", *argv], names)
        assert not (tmp_path / "o").exists()
    before = snapshot(ck)
    bank.save_bank(bank.build_bank([pair(0)]), tmp_path / "o")
    refused(capsys, tmp_path, ["qv-bank", "build", tmp_path / "o", "--runs", runs], ["exists"])
    assert snapshot(ck) == before


def test_help_ends_with_an_example(capsys):
    for argv in (["qv-bank", "--help"], ["qv-bank", "build", "--help"], ["qv-bank", "show", "-h"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "example:\n  qvec qv-bank " in capsys.readouterr().out
