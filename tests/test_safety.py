"""Nothing harmed, nothing corrupt passed on (issue 11, library and run level).

Each case refuses with the offending name in the message, leaves its inputs' bytes as
they were, and writes no partial output: non-finite and ill-typed lambdas, NaN/Inf
weights in PTQ, empty trees, diverging and ill-configured fine-tunes, torn metrics,
corrupt checkpoint data (leaf checksums), identical QV endpoints, heads that do not fit
the task, corrupt JSON, and two runs in one workdir (OS file locks, two processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import vit_tree, with_int_leaves
from test_grid_run import make_runs
from test_train import _tiny_cfg

import qvec_jax as q
from qvec_jax import checkpoints as ck
from qvec_jax import data as qdata
from qvec_jax import evaluate, grid, packing, quant, train
from qvec_jax.files import WorkdirLocked, workdir_lock
from qvec_jax.grid.inputs import checkpoint_path
from qvec_jax.grid.store import GridStore, GridStoreError
from qvec_jax.models import vit

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"


def host_copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_same(a, b):
    fa, fb = q.flatten(a), q.flatten(b)
    assert fa.keys() == fb.keys()
    for p in fa:
        np.testing.assert_array_equal(np.asarray(fa[p]), fb[p], err_msg=p)


def with_bad(tree, value, path=KERNEL):
    flat = {p: np.array(x, copy=True) for p, x in q.flatten(tree).items()}
    flat[path].reshape(-1)[3] = value
    return q.unflatten(flat)


def files_under(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ lambda


@pytest.mark.parametrize("lam", [np.inf, -np.inf, np.nan, 1e39, -1e39])
def test_patch_refuses_non_finite_lam(lam):
    fp = vit_tree(0)
    qv = q.quantization_vector(vit_tree(1), fp)
    before = host_copy(fp), host_copy(qv)
    with pytest.raises(ValueError, match=r"lam=.*not a finite float32"):
        q.patch(fp, qv, lam=lam)
    assert_same(fp, before[0])
    assert_same(qv, before[1])


@pytest.mark.parametrize("lam", ["1.0", True, None, [1.0]])
def test_patch_refuses_a_lam_that_is_not_a_number(lam):
    fp = vit_tree(0)
    with pytest.raises(TypeError, match="lam must be a real number"):
        q.patch(fp, q.quantization_vector(vit_tree(1), fp), lam=lam)


def test_patch_accepts_numpy_and_jax_scalars_and_a_traced_lam():
    fp = vit_tree(0)
    qv = q.quantization_vector(vit_tree(1), fp)
    ref = q.patch(fp, qv, 0.5)
    assert_same(q.patch(fp, qv, np.float32(0.5)), host_copy(ref))
    assert_same(q.patch(fp, qv, jnp.float32(0.5)), host_copy(ref))
    assert_same(jax.jit(q.patch)(fp, qv, 0.5), host_copy(ref))


@pytest.mark.parametrize(
    "lambdas, match",
    [([0.5, float("nan")], r"lambdas\[1\]=nan"), ([float("inf")], r"lambdas\[0\]=inf"),
     ([1e39], r"lambdas\[0\]=1e\+39"), ([], "lambdas is empty"), (["0.5"], r"lambdas\[0\]")],
)  # fmt: skip
def test_grid_refuses_bad_lambdas_before_writing(tmp_path, lambdas, match):
    work = tmp_path / "grid"
    with pytest.raises((TypeError, ValueError), match=match):
        grid.run_grid(["digits"], tmp_path / "runs", work, bits=2, lambdas=lambdas)
    assert not work.exists()


# ------------------------------------------------------------------ PTQ inputs


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "fn",
    [
        lambda t: q.ptq(t, 2),
        lambda t: quant.fake_quant_tree(t, 3),
        lambda t: packing.quantize(t, 4),
    ],
    ids=["ptq", "fake_quant_tree", "quantize"],
)
def test_ptq_refuses_non_finite_weights_with_the_path(fn, bad):
    tree = with_bad(vit_tree(0), bad)
    before = host_copy(tree)
    with pytest.raises(ValueError, match=f"{KERNEL}: NaN or Inf in params"):
        fn(tree)
    assert_same(tree, before)


def test_ptq_refuses_non_finite_unquantized_leaves_too():
    path = "Transformer/encoder_norm/scale"
    with pytest.raises(ValueError, match=f"{path}: NaN or Inf"):
        q.ptq(with_bad(vit_tree(0), np.nan, path), 2)


def test_under_jit_the_value_check_is_skipped():
    """Inside jit the values are unknown: no error, the NaN's channel is garbage, the other
    leaves are the eager PTQ's (documented in the README)."""
    out = q.flatten(jax.jit(lambda t: q.ptq(t, 2))(with_bad(vit_tree(0), np.nan)))
    ref = q.flatten(q.ptq(vit_tree(0), 2))
    assert out[KERNEL].shape == ref[KERNEL].shape
    for p in ref:
        if p != KERNEL:
            np.testing.assert_array_equal(np.asarray(out[p]), np.asarray(ref[p]), err_msg=p)


def test_fake_quant_refuses_integer_arrays():
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    with pytest.raises(TypeError, match="float array, got dtype int32"):
        quant.fake_quant(x, 3)


def test_quantization_vector_of_an_empty_or_integer_only_tree_is_refused():
    for tree in ({}, {"step": jnp.int32(3), "rng": jnp.zeros(2, jnp.uint32)}):
        with pytest.raises(ValueError, match="QV would be empty"):
            q.quantization_vector(tree, tree)


def test_size_report_of_an_empty_tree_is_refused():
    with pytest.raises(ValueError, match="no leaves"):
        q.size_report({}, 3)


def test_qv_of_a_run_with_itself_is_refused_when_asked():
    fp = with_int_leaves(vit_tree(0))
    assert q.global_norm(q.quantization_vector(fp, fp)) == 0.0  # the library default
    with pytest.raises(ValueError, match="same run"):
        q.quantization_vector(fp, host_copy(fp), require_nonzero=True)
    q.quantization_vector(with_int_leaves(vit_tree(1)), fp, require_nonzero=True)


def test_cli_extract_refuses_the_same_checkpoint_twice(tmp_path):
    runs = make_runs(tmp_path / "runs", ("digits",))
    fp = checkpoint_path(runs, "digits", "fp")
    before = files_under(fp)
    r = subprocess.run(
        [sys.executable, "-m", "qvec_jax.cli", "extract", str(fp), str(fp), str(tmp_path / "qv")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode != 0 and "same run" in r.stderr and str(fp) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert files_under(fp) == before and not (tmp_path / "qv").exists()


# ------------------------------------------------------------------ checkpoints


def save_legacy(path: Path, params, meta: dict) -> Path:
    """A checkpoint of the first format (no checksums): ``params/`` + ``qvec_meta.json``."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", params)
    ckptr.wait_until_finished()
    (path / ck.META_FILE).write_text(json.dumps(meta))
    return path


def test_flipped_bytes_in_a_data_file_are_caught_with_the_leaf(tmp_path):
    params = {"a": {"w": np.random.default_rng(0).standard_normal((256, 256), np.float32)},
              "b": np.arange(4, dtype=np.float32)}  # fmt: skip
    path = ck.save_params(tmp_path / "ck", params, {"task": "t"})
    ck.restore_params(path)  # intact: restores
    data = max((p for p in (path / "params").rglob("*") if p.is_file()), key=os.path.getsize)
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(255 - b for b in raw[mid : mid + 64])
    data.write_bytes(bytes(raw))
    with pytest.raises(ck.CheckpointError, match=rf"{path}: leaf a/w does not match its saved"):
        ck.restore_params(path)


def test_older_checkpoints_without_checksums_still_restore(tmp_path):
    params = {"w": np.ones((2, 3), np.float32)}
    path = save_legacy(tmp_path / "old", params, {"kind": "params", "task": "t"})
    got, meta = ck.restore_params(path)
    assert_same(got, params)
    assert meta == {"kind": "params", "task": "t"}


def test_nan_checkpoints_are_refused_at_save_and_restore(tmp_path):
    bad = {"enc": {"w": np.array([1.0, np.nan], np.float32)}}
    with pytest.raises(ck.CheckpointError, match=r"refusing to save .*new: leaf enc/w holds NaN"):
        ck.save_params(tmp_path / "new", bad)
    assert not (tmp_path / "new").exists()
    path = save_legacy(tmp_path / "old", bad, {"kind": "params"})
    with pytest.raises(ck.CheckpointError, match=rf"{path}: leaf enc/w holds NaN or Inf"):
        ck.restore_params(path)


def test_a_nan_checkpoint_in_a_grid_names_the_checkpoint_and_the_leaf(tmp_path):
    runs = make_runs(tmp_path / "runs", ("digits",))
    fp = checkpoint_path(runs, "digits", "fp")
    params, meta = ck.restore_params(fp)
    bad = with_bad(params, np.nan, "Transformer/encoder_norm/bias")
    shutil.rmtree(fp)
    fp.mkdir()
    save_legacy(fp, bad, {"kind": "params", **meta})
    work = tmp_path / "grid"
    with pytest.raises(ck.CheckpointError, match=rf"{fp}: leaf Transformer/encoder_norm/bias"):
        grid.run_grid(["digits"], runs, work, bits=2, lambdas=[1.0], progress=False)
    assert GridStore(work).cells() == []  # no cell computed from it


def test_corrupt_meta_and_grid_json_name_the_file(tmp_path):
    path = ck.save_params(tmp_path / "ck", {"w": np.ones(2, np.float32)})
    ck.meta_file(path).write_text('{"kind": "par')
    with pytest.raises(ck.CheckpointError, match=rf"{ck.meta_file(path)}: corrupt JSON"):
        ck.read_meta(path)
    store = GridStore(tmp_path / "grid")
    store.workdir.mkdir()
    store.meta_path.write_text("{oops")
    with pytest.raises(GridStoreError, match=rf"{store.meta_path}: not JSON"):
        grid.run_grid(["digits"], tmp_path, store.workdir, bits=2, progress=False)
    assert store.meta_path.read_text() == "{oops"


# ------------------------------------------------------------------ eval


def test_eval_warns_when_the_head_has_more_classes_than_the_task():
    split = qdata.load_split("digits_a", "val", image_size=28)  # 5 classes
    model = vit.create_model("test/4", num_classes=10, image_size=28)
    params = vit.init_params(model, 0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        evaluate.accuracy(model, params, split)
    assert any("head has 10 classes but the task only 5" in str(x.message) for x in w)
    small = vit.create_model("test/4", num_classes=3, image_size=28)
    with pytest.raises(evaluate.EvalError, match="5 classes but the model's head only 3"):
        evaluate.accuracy(small, vit.init_params(small, 0), split)


# ------------------------------------------------------------------ fine-tuning


@pytest.mark.parametrize(
    "over, match",
    [({"optim.lr": float("inf")}, "optim.lr=inf"), ({"batch_size": 0}, "batch_size=0"),
     ({"optim.lr": float("nan")}, "optim.lr=nan"), ({"log_every": -1}, "log_every=-1"),
     ({"optim.b2": 1.0}, "optim.b2=1.0"), ({"init.kind": "pretrained"}, "init.path")],
)  # fmt: skip
def test_bad_config_fails_before_the_workdir_is_created(tmp_path, over, match):
    with pytest.raises(train.TrainError, match=match):
        train.finetune(_tiny_cfg(**over), str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()


def test_a_setup_failure_leaves_no_workdir_so_the_rerun_is_not_refused(tmp_path):
    # warmup >= total steps fails inside the setup, after the lock is taken
    with pytest.raises(train.TrainError, match="optim.warmup_steps=8"):
        train.finetune(_tiny_cfg(**{"optim.warmup_steps": 8}), str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("stop_after", [0, -5, 2.5, True])
def test_stop_after_must_be_a_positive_step_count(tmp_path, stop_after):
    with pytest.raises(train.TrainError, match="stop_after"):
        train.finetune(_tiny_cfg(), str(tmp_path / "w"), stop_after=stop_after, progress=False)
    assert not (tmp_path / "w").exists()


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # warmup: step 1 has lr 0 (a good checkpoint); step 2 jumps the params to ~1e37
    cfg = _tiny_cfg(**{"optim.lr": 1e37, "checkpoint_every": 1, "log_every": 4})
    work = tmp_path / "w"
    with pytest.raises(train.TrainError, match=r"step \d: the (loss|grad_norm|params).*optim.lr"):
        train.finetune(cfg, str(work), progress=False)
    assert not (work / "params").exists() and not (work / "results.json").exists()
    steps = sorted(int(p.name) for p in (work / "ckpt").iterdir() if p.name.isdigit())
    assert steps, "the last good checkpoint is kept"
    for s in steps:  # no checkpoint holds a non-finite value
        saved = ocp.StandardCheckpointer().restore(work / "ckpt" / str(s) / "state")
        assert bool(train.all_finite(saved["params"])), s
    for line in (work / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert np.isfinite(rec["loss"]) and np.isfinite(rec["grad_norm"])


def test_a_corrupt_config_json_names_the_file_and_is_left_alone(tmp_path):
    (tmp_path / "w").mkdir()
    cfg_file = tmp_path / "w" / "config.json"
    cfg_file.write_text('{"task": "dig')
    with pytest.raises(train.TrainError, match=rf"{cfg_file}: corrupt JSON.*--force"):
        train.finetune(_tiny_cfg(), str(tmp_path / "w"), progress=False)
    assert cfg_file.read_text() == '{"task": "dig'


def test_torn_metrics_tail_is_dropped_and_other_bad_lines_name_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.9}\n{"step": 6, "lo')
    train.workdir.truncate_metrics(str(path), 4)
    assert path.read_text() == '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.9}\n'
    path.write_text('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(train.TrainError, match=rf"{path}:2: not a JSON metrics record"):
        train.workdir.truncate_metrics(str(path), 4)
    assert path.read_text() == '{"step": 2}\nnot json\n{"step": 4}\n'


# ------------------------------------------------------------------ workdir locks

HOLDER = """
import sys
from qvec_jax.grid.store import GridStore
from qvec_jax.files import workdir_lock
work, what = sys.argv[1], sys.argv[2]
if what == "finetune":
    lock = workdir_lock(work, "finetune", command="holder finetune")
elif what == "grid":
    lock = GridStore(work).lock(command="holder grid")
else:
    lock = GridStore(work).lock((0, 2), command="holder shard")
with lock:
    print("locked", flush=True)
    sys.stdin.readline()
"""


class Holder:
    """A second process holding a lock of ``work`` until it is told to exit or killed."""

    def __init__(self, work: Path, what: str):
        self.p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(HOLDER), str(work), what],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        assert self.p.stdout.readline().strip() == "locked"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def test_a_second_finetune_in_one_workdir_stops_at_once_naming_the_holder(tmp_path):
    work = tmp_path / "w"
    with Holder(work, "finetune") as h:
        with pytest.raises(WorkdirLocked, match=rf"finetune.lock is held by pid {h.p.pid} .*"
                           r"holder finetune"):  # fmt: skip
            train.finetune(_tiny_cfg(), str(work), progress=False)
        assert sorted(os.listdir(work)) == ["finetune.lock"]  # nothing written
        h.p.kill()  # a dead holder's lock is released by the OS
        h.p.wait()
        with workdir_lock(work, "finetune"):
            pass


def test_a_second_grid_stops_at_once_and_shards_share_a_workdir(tmp_path):
    work = tmp_path / "g"
    with Holder(work, "grid") as h:
        with pytest.raises(WorkdirLocked, match=rf"grid.lock is held by pid {h.p.pid}"):
            grid.run_grid(["digits"], tmp_path / "runs", work, bits=2, progress=False)
        assert sorted(os.listdir(work)) == ["grid.lock"]
    with Holder(work, "shard") as h:
        with GridStore(work).lock((1, 2)):  # another shard runs alongside
            pass
        with pytest.raises(
            WorkdirLocked, match=rf"grid.shard-0-of-2.lock is held by pid {h.p.pid}"
        ):
            with GridStore(work).lock((0, 2)):
                pass
        with pytest.raises(WorkdirLocked, match="grid.lock is held by shared runs"):
            with GridStore(work).lock():
                pass
        h.p.stdin.write("\n")
        h.p.stdin.flush()
        h.p.wait()
    with GridStore(work).lock():  # released on exit
        pass
