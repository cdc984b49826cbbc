"""GPTQ of the bank-patched receiver (issue 23) on tiny random ViT checkpoints: a cell per
receiver, merge method and data-free source; a cell equals GPTQ of FP_R + the
leave-one-out merge evaluated directly; resume; options checked first; the study's
``qvec quantize`` table from such cells."""

from __future__ import annotations

import numpy as np
import pytest
from test_grid_run import make_runs

import qvec_jax as q
from qvec_jax import checkpoints, evaluate, gptq, grid, merge, quant
from qvec_jax import data as qdata
from qvec_jax.grid.gptq_bank import BankCells, is_bank_cell
from qvec_jax.grid.inputs import GridError, checkpoint_path, find_checkpoints
from qvec_jax.grid.store import GridStore, cell_key
from qvec_jax.report.quantize import quantize_section

TASKS = ("digits", "digits_rot90", "digits_a")
OPTS = BankCells(methods=("ties",), lams=(0.5, 1.0), calib_size=16, pretext="digits_a")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"), TASKS)


def make_grid(runs, workdir, extras=OPTS):
    return grid.run_grid(
        list(TASKS), runs, workdir, extras=extras, bits=2, lambdas=(1.0,), batch_size=64,
        progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def done(runs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("grid")
    return workdir, make_grid(runs, workdir)


def test_a_cell_per_receiver_method_and_source(done):
    _, cells = done
    mine = [c for c in cells if is_bank_cell(c)]
    got = {(c["kind"], c["receiver"], c["donor"], c["lam"]) for c in mine}
    want = {
        (f"gptq+bank:{s}", r, f"loo:{m}", lam)
        for r in TASKS
        for m in ("ties",)
        for s in ("noise", "pretext")
        for lam in (0.5, 1.0)
    }
    assert got == want and len(mine) == len(want)
    for c in mine:
        assert c["bits"] == 2 and c["calib"]["n"] == 16
        assert c["setup"]["donors"] == [t for t in TASKS if t != c["receiver"]]  # never R's QAT
        assert set(c["acc"]) == {"val", "test"}
    # the pretext images (digits_a) are those of digits_a, and a class subset of digits
    flagged = {(c["kind"], c["receiver"]) for c in mine if c["calib_used"]["receiver_images"]}
    assert flagged == {("gptq+bank:pretext", "digits_a"), ("gptq+bank:pretext", "digits")}


def test_a_cell_equals_gptq_of_the_patched_receiver(runs, done):
    _, cells = done
    cell = {cell_key(c): c for c in cells}[("gptq+bank:noise", "loo:ties", "digits", "0.5")]
    qvs = []
    for d in ("digits_rot90", "digits_a"):
        qat, _ = checkpoints.restore_params(checkpoint_path(runs, d, "qat"))
        fp_d, _ = checkpoints.restore_params(checkpoint_path(runs, d, "fp"))
        qvs.append(q.quantization_vector(qat, fp_d))
    bank = merge.merge_qvs(qvs, merge.MergeSpec("ties"))
    fp, meta = checkpoints.restore_params(checkpoint_path(runs, "digits", "fp"))
    model = checkpoints.model_from_meta(meta)
    images = grid.gptq.calib_images(cell["calib"], 28)
    params = gptq.gptq(q.patch(fp, bank, 0.5), model, images, quant.QuantSpec(2))
    acc = evaluate.accuracy(model, params, qdata.load_split("digits", "test", image_size=28))
    assert cell["acc"]["test"] == pytest.approx(acc)


def test_resume_computes_nothing_and_a_lost_cell_again(runs, done, tmp_path):
    workdir, cells = done
    store = GridStore(workdir)
    ckpts = find_checkpoints(TASKS, runs)[0]
    assert OPTS.run(list(TASKS), ckpts, store, quant.QuantSpec(2), [1.0]) == 0
    lines = store.cells_path.read_text().splitlines(keepends=True)
    (tmp_path / "cells.jsonl").write_text("".join(lines[:-2]))
    (tmp_path / "grid.json").write_bytes((workdir / "grid.json").read_bytes())
    store2 = GridStore(tmp_path)
    assert OPTS.run(list(TASKS), ckpts, store2, quant.QuantSpec(2), [1.0]) == 2
    again = {cell_key(c): c["acc"] for c in store2.cells() if is_bank_cell(c)}
    assert again == {cell_key(c): c["acc"] for c in cells if is_bank_cell(c)}


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"methods": ("avg",)}, "bank methods"),
        ({"sources": ("receiver",)}, "no receiver data"),
        ({"calib_size": 0}, "calib_size"),
        ({"lams": (float("nan"),)}, "lam"),
        ({"lams": (1.0, 1.0)}, "distinct"),
    ],
)
def test_options_are_checked_before_any_work(kw, needle):
    with pytest.raises((GridError, ValueError), match=needle):
        BankCells(**kw)


def test_the_quantize_table_pairs_recipes_on_receivers():
    tasks = ["a", "b", "c", "d"]
    acc = {
        "gptq_pretext": [0.60, 0.70, 0.50, 0.80],
        "gptq_bank_ties_pretext@1": [0.65, 0.72, 0.55, 0.81],
    }
    by_key = {
        k: {"unit": "receiver", "acc": {(t, None): v for t, v in zip(tasks, vals)}}
        for k, vals in acc.items()
    }
    base = dict(zip(tasks, [0.3, 0.4, 0.2, 0.5]))
    q_ = quantize_section(by_key, base, tasks)
    rows = {r["key"]: r for r in q_["rows"]}
    assert set(rows) == {"rtn", "gptq_pretext", "gptq_bank_ties_pretext@1"}
    assert q_["best"] == "gptq_bank_ties_pretext@1"
    d = rows["gptq_bank_ties_pretext@1"]["vs_reference"]
    assert d["point"] == pytest.approx(np.mean([0.05, 0.02, 0.05, 0.01]))
    assert d["lo"] > 0 and q_["best_beats_reference"]  # above on every receiver
    assert rows["rtn"]["above_reference"]["point"] == 0.0
    assert q_["names"]["gptq_bank_ties_pretext@1"] == "gptq+bank (ties, lam 1):pretext"
    assert quantize_section({}, base, tasks) is None  # no gptq:pretext: no table
