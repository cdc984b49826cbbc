"""Batched grid cells (issue 22): a group of one receiver's and donor's lambdas is patched,
quantized and evaluated as one stack, with params, counts and records identical to the
per-cell path; groups fit the memory budget; a kill mid-group resumes to the same file."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_grid_run import TASKS, _count_compiles, make_runs

from qvec_jax import checkpoints, grid, trees
from qvec_jax import data as qdata
from qvec_jax.evaluate import EvalSet, count_correct, count_correct_stack
from qvec_jax.grid.cells import GridRun, cell_groups, default_group, patch_and_quantize_stack
from qvec_jax.grid.inputs import checkpoint_path, find_checkpoints
from qvec_jax.grid.store import CELLS_FILE
from qvec_jax.quant import QuantSpec

LAMS = (0.15, 1.0, 1.5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"), TASKS[:2])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stack_params_and_counts_are_bit_identical_to_per_cell(runs, dtype):
    fp, meta = checkpoints.restore_params(checkpoint_path(runs, "digits", "fp"))
    qat_d, _ = checkpoints.restore_params(checkpoint_path(runs, "digits_rot90", "qat"))
    fp_d, _ = checkpoints.restore_params(checkpoint_path(runs, "digits_rot90", "fp"))
    qv = trees.quantization_vector(qat_d, fp_d)
    spec = QuantSpec(2)
    model = checkpoints.model_from_meta(meta).clone(dtype=jnp.dtype(dtype))
    stack = patch_and_quantize_stack(fp, qv, jnp.asarray(LAMS, jnp.float32), spec=spec)
    per = [grid.patch_and_quantize(fp, qv, jnp.float32(lam), spec=spec) for lam in LAMS]
    for i, params in enumerate(per):  # every leaf of every cell, bit for bit
        for a, b in zip(jax.tree.leaves(stack), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))
    ev = EvalSet(qdata.load_split("digits", "val", image_size=28), 64, cache_bytes=1 << 30)
    for x, y, m in ev.batches():  # each batch's count of each cell
        kw = {"model": model, "prep": ev.prep, "view": ev.view}
        got = np.asarray(count_correct_stack(stack, x, y, m, **kw))
        want = [int(count_correct(p, x, y, m, spec=None, **kw)) for p in per]
        assert got.tolist() == want
    assert ev.accuracies(model, stack) == [ev.accuracy(model, p) for p in per]


def _cells(kinds_donors):
    return [{"kind": k, "receiver": "r", "donor": d, "lam": lam} for k, d, lam in kinds_donors]


def test_groups_are_consecutive_balanced_runs_of_one_donor():
    base = [("fp", None, None), ("ptq_fp", None, None), ("ptq_qat", None, None)]
    patch = [("patch", d, lam) for d in ("a", "b") for lam in range(11)]
    cells = _cells(base + patch + [("patch", "a", 99)])
    groups = cell_groups(cells, 8)
    assert [c for g in groups for c in g] == cells  # the order of the records is kept
    assert [len(g) for g in groups] == [1, 1, 1, 5, 6, 5, 6, 1]  # 11 -> 5 + 6, never 8 + 3
    assert all(len({c["donor"] for c in g}) == 1 for g in groups)
    assert [len(g) for g in cell_groups(cells, 1)] == [1] * len(cells)
    assert [len(g) for g in cell_groups(cells, 4)][3:6] == [3, 4, 4]


def test_group_size_fits_the_memory_budget(runs):
    ckpts, _ = find_checkpoints(["digits"], runs)
    fp, _ = checkpoints.restore_params(checkpoint_path(runs, "digits", "fp"))
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(fp))

    def size(cell_group, group_bytes):
        run = GridRun(ckpts, QuantSpec(2), data_dir=None, cell_group=cell_group,
                      group_bytes=group_bytes)  # fmt: skip
        return run.group_size(fp)

    assert size(8, 100 * nbytes) == 8
    assert size(8, 3 * nbytes + 1) == 3  # the stack of 3 fits, 4 do not
    assert size(8, nbytes - 1) == 1  # not even one: the per-cell path
    assert size(1, 100 * nbytes) == 1
    assert size(None, 100 * nbytes) == 8  # the default rule: a small model on CPU
    assert default_group(300_000, "cpu") == 8  # the demo's model
    assert default_group(5_500_000, "cpu") == default_group(300_000, "gpu") == 1


def _records(workdir) -> list[dict]:
    """The record file's records, in order, without their timings."""
    lines = (workdir / CELLS_FILE).read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def test_batched_grid_writes_the_per_cell_records_and_resumes_a_kill_mid_group(runs, tmp_path):
    kw = {"bits": 2, "lambdas": (0.5, 1.5), "batch_size": 64, "progress": False}
    tasks = list(TASKS[:2])
    grid.run_grid(tasks, runs, tmp_path / "one", cell_group=1, **kw)
    grid.run_grid(tasks, runs, tmp_path / "two", cell_group=2, **kw)  # 3 lambdas: 2 + 1
    one = _records(tmp_path / "one")
    assert _records(tmp_path / "two") == one  # same cells, order, accuracies, everything
    assert len({c["acc"]["test"] for c in one if c["kind"] == "patch"}) > 3  # cells differ

    # killed while appending a group: 3 baselines, 1 of a group's 2 records, a torn line
    lines = (tmp_path / "two" / CELLS_FILE).read_text().splitlines()
    kill = tmp_path / "killed"
    kill.mkdir()
    (kill / CELLS_FILE).write_text("\n".join(lines[:4]) + '\n{"kind": "pat')
    compiles = _count_compiles(lambda: grid.run_grid(tasks, runs, kill, cell_group=2, **kw))
    assert _records(kill) == one
    assert compiles == 0  # other groups of the sizes compiled above: nothing new
    with pytest.raises(grid.GridError, match="cell_group=0: a whole number of cells >= 1"):
        grid.run_grid(tasks, runs, kill, cell_group=0, **kw)
