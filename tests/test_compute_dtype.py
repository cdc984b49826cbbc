"""bf16 compute in eval and the grid (its extras and GPTQ cells too): the model computes
in bfloat16, params, QVs, merges, the patch, PTQ and GPTQ stay float32 (PTQ before the
cast); grid.json names a non-default dtype
(float32 leaves grid.json and summary.md as they were) and a rerun in another is refused."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest
from test_grid_run import make_runs

import qvec_jax as q
from qvec_jax import (
    checkpoints,
    cli,
    evaluate,
    gptq,
    grid,
    merge,
    trees,
)
from qvec_jax import data as qdata
from qvec_jax import report as rp
from qvec_jax.grid.inputs import checkpoint_path

TASK = "digits"
KW = {"bits": 2, "lambdas": (1.0,), "batch_size": 64, "progress": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"), tasks=(TASK,))


def reference(runs, kind: str, dtype) -> float:
    """Test accuracy of FP_R (``kind="fp"``) or PTQ(FP_R) by the definition: float32
    params (PTQ on them), the model computing in ``dtype``."""
    fp, meta = checkpoints.restore_params(checkpoint_path(runs, TASK, "fp"))
    model = checkpoints.model_from_meta(meta).clone(dtype=dtype)
    spec = q.QuantSpec(2) if kind == "ptq_fp" else None
    test = qdata.load_split(TASK, "test", image_size=28)
    return evaluate.accuracy(model, fp, test, spec, batch_size=64)  # the batches of KW


def acc_of(cells, kind: str) -> float:
    (cell,) = [c for c in cells if c["kind"] == kind]
    return cell["acc"]["test"]


def test_grid_in_bfloat16_is_the_definition_and_named(runs, tmp_path):
    cells = grid.run_grid([TASK], runs, tmp_path, compute_dtype="bfloat16", **KW)
    for kind in ("fp", "ptq_fp"):
        assert acc_of(cells, kind) == pytest.approx(reference(runs, kind, jnp.bfloat16), abs=1e-12)
    assert rp.load_grid_meta(tmp_path)["compute_dtype"] == "bfloat16"
    rp.write_report(tmp_path, cells=cells)
    summary = (tmp_path / "summary.md").read_text()
    assert "Model compute: **bfloat16** (params, QVs and PTQ in float32)." in summary
    size = (tmp_path / rp.CELLS_FILE).stat().st_size
    again = grid.run_grid([TASK], runs, tmp_path, compute_dtype=jnp.bfloat16, **KW)
    assert (tmp_path / rp.CELLS_FILE).stat().st_size == size and len(again) == len(cells)
    with pytest.raises(grid.GridError, match="computed in bfloat16, not float32; use another"):
        grid.run_grid([TASK], runs, tmp_path, **KW)


def test_float32_grid_json_and_summary_are_unchanged(runs, tmp_path):
    cells = grid.run_grid([TASK], runs, tmp_path, **KW)
    meta_text = (tmp_path / rp.GRID_META_FILE).read_text()
    assert "compute_dtype" not in json.loads(meta_text)
    want = reference(runs, "ptq_fp", jnp.float32)
    assert acc_of(cells, "ptq_fp") == pytest.approx(want, abs=1e-12)
    rp.write_report(tmp_path, cells=cells)
    summary = (tmp_path / "summary.md").read_text()
    assert "Model compute" not in summary
    # float32 named explicitly is the default: nothing recomputed, the same files
    grid.run_grid([TASK], runs, tmp_path, compute_dtype="float32", **KW)
    rp.write_report(tmp_path)
    assert (tmp_path / rp.GRID_META_FILE).read_text() == meta_text
    assert (tmp_path / "summary.md").read_text() == summary
    with pytest.raises(grid.GridError, match="computed in float32, not bfloat16"):
        grid.run_grid([TASK], runs, tmp_path, compute_dtype="bfloat16", **KW)


@pytest.mark.parametrize("dtype", ["float16", "bf16", None])
def test_other_compute_dtypes_are_refused(runs, tmp_path, dtype):
    with pytest.raises(grid.GridError, match="compute_dtype=.*use one of"):
        grid.run_grid([TASK], runs, tmp_path, compute_dtype=dtype, **KW)
    assert not (tmp_path / rp.GRID_META_FILE).exists()


def test_bfloat16_extras_and_gptq_cells_compute_in_bfloat16(tmp_path):
    """The extras' merge cells and the GPTQ cells evaluate with the model in bfloat16;
    the merge, the patch, PTQ and GPTQ's Hessians stay float32 (the definition)."""
    tasks = ("digits", "digits_rot90", "digits_a")  # a leave-one-out merge needs 2 donors
    runs = make_runs(tmp_path / "runs", tasks=tasks)
    extras = (
        grid.extras.Extras(methods=("mean",), proxy_n=16, rx_shots=(8,), strategy="lam=1"),
        grid.gptq.GptqCells(calib_size=8, sources=("noise",), strategy=None, qv_at_one=False),
    )
    cells = grid.run_grid(list(tasks), runs, tmp_path / "g", compute_dtype="bfloat16",
                              extras=extras, **KW)  # fmt: skip
    cells = rp.load_cells(tmp_path / "g")
    r = "digits"
    fp, meta = checkpoints.restore_params(checkpoint_path(runs, r, "fp"))
    bf16 = checkpoints.model_from_meta(meta).clone(dtype=jnp.bfloat16)
    test = qdata.load_split(r, "test", image_size=28)
    (m,) = [c for c in cells if c["kind"] == "merge" and c["receiver"] == r]
    qv = merge.merge_qvs(
        [trees.quantization_vector(*(checkpoints.restore_params(checkpoint_path(runs, d, k))[0]
                                     for k in ("qat", "fp"))) for d in m["setup"]["donors"]],
        merge.MergeSpec.from_dict(m["setup"]["merge"]),
    )  # fmt: skip
    want = evaluate.accuracy(bf16, q.patch(fp, qv, m["lam"]), test, q.QuantSpec(2), batch_size=64)
    assert m["acc"]["test"] == pytest.approx(want, abs=1e-12)
    (g,) = [c for c in cells if c["kind"].startswith("gptq") and c["receiver"] == r]
    images = grid.gptq.calib_images(g["calib"], 28)
    gq = gptq.gptq(fp, checkpoints.model_from_meta(meta), images, q.QuantSpec(2),
                   batch_size=grid.gptq.GptqCells.batch_size)  # fmt: skip
    assert g["acc"]["test"] == pytest.approx(evaluate.accuracy(bf16, gq, test, batch_size=64),
                                             abs=1e-12)  # fmt: skip
    assert rp.load_grid_meta(tmp_path / "g")["compute_dtype"] == "bfloat16"


def test_cli_eval_and_grid_take_the_compute_dtype(runs, tmp_path, capsys):
    ckpt = checkpoint_path(runs, TASK, "fp")
    for dtype, extra in (("bfloat16", ["--compute-dtype", "bfloat16"]), ("float32", [])):
        out = tmp_path / f"{dtype}.json"
        argv = ["eval", str(ckpt), "--bits", "2", "--splits", "test", "--batch-size", "64"]
        assert cli.main(argv + extra + ["--json", str(out)]) == 0
        got = json.loads(out.read_text())
        assert got.get("compute_dtype") == (None if dtype == "float32" else dtype)
        want = reference(runs, "ptq_fp", jnp.dtype(dtype))
        assert got["test"] == pytest.approx(want, abs=1e-12)
    work = tmp_path / "grid"
    argv = ["grid", "--tasks", TASK, "--runs", str(runs), "--workdir", str(work), "--bits", "2",
            "--lambdas", "1", "--no-progress", "--compute-dtype", "bfloat16"]  # fmt: skip
    assert cli.main(argv) == 0
    assert rp.load_grid_meta(work)["compute_dtype"] == "bfloat16"
    assert cli.main(argv[:-1] + ["float32"]) == 1  # a rerun in another dtype: refused
    assert "computed in bfloat16, not float32" in capsys.readouterr().err
