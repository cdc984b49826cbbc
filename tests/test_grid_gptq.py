"""GPTQ rows of the grid (issue 15) on tiny random ViT checkpoints: a cell per calibration
source and per GPTQ+QV pair, cells equal to GPTQ evaluated directly, receiver calibration
from the train split only, the needs/gives table, resume, and a summary without GPTQ."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_grid_run import make_runs

import qvec_jax as q
from qvec_jax import checkpoints, evaluate, gptq, grid, quant, select
from qvec_jax import data as qdata
from qvec_jax import report as rp
from qvec_jax.data import overlap
from qvec_jax.grid.gptq import GptqCells
from qvec_jax.grid.inputs import GridError, checkpoint_path, find_checkpoints
from qvec_jax.grid.store import GridStore, cell_key
from qvec_jax.report import baselines

TASKS = ("digits", "digits_rot90")
OPTS = GptqCells(calib_size=16, pretext="digits", strategy="norm-ratio")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"), TASKS)


def make_grid(runs, workdir, extras=OPTS, **kw):
    kw = {"bits": 2, "lambdas": (0.5, 1.0), "batch_size": 64, "progress": False, **kw}
    return grid.run_grid(list(TASKS), runs, workdir, extras=extras, **kw)


@pytest.fixture(scope="module")
def done(runs, tmp_path_factory):
    """A grid with its GPTQ cells: (workdir, cells)."""
    workdir = tmp_path_factory.mktemp("grid")
    return workdir, make_grid(runs, workdir)


def by_key(cells):
    return {cell_key(c): c for c in cells}


def test_a_cell_for_every_source_and_pair(done):
    _, cells = done
    mine = [c for c in cells if grid.gptq.is_gptq_cell(c)]
    kinds = {(c["kind"], c["receiver"], c["donor"]) for c in mine}
    for r, d in (("digits", "digits_rot90"), ("digits_rot90", "digits")):
        for src in grid.gptq.SOURCES:
            assert (f"gptq:{src}", r, None) in kinds
        assert ("gptq+qv:donor", r, d) in kinds
        assert ("gptq+qv:donor@norm-ratio", r, d) in kinds
    assert len(mine) == 2 * (4 + 2)
    for c in mine:
        assert set(c["acc"]) == {"val", "test"} and all(0 <= a <= 1 for a in c["acc"].values())
        assert c["calib"]["n"] == 16 and c["bits"] == 2
    rule = {c["receiver"]: c["calib"]["task"] for c in mine if c["kind"] == "gptq:donor"}
    assert rule == {"digits": "digits_rot90", "digits_rot90": "digits"}  # the next task
    flagged = {(c["kind"], c["receiver"]) for c in mine if c["calib_used"]["receiver_images"]}
    # the receiver's own images, and the pretext set (digits) for the digits receiver
    assert flagged == {
        ("gptq:receiver", "digits"),
        ("gptq:receiver", "digits_rot90"),
        ("gptq:pretext", "digits"),
    }
    for c in (c for c in mine if "@" in c["kind"]):
        assert c["choice"]["strategy"] == "norm-ratio" and c["lam"] == c["choice"]["lam"]
        assert c["lam"] in (0.0, 0.5, 1.0)  # 0 and the grid's lambdas


def _direct(runs, r, calib, tree_of=lambda fp: fp):
    fp, meta = checkpoints.restore_params(checkpoint_path(runs, r, "fp"))
    model = checkpoints.model_from_meta(meta)
    images = grid.gptq.calib_images(calib, 28)
    params = gptq.gptq(tree_of(fp), model, images, quant.QuantSpec(2))
    return evaluate.accuracy(model, params, qdata.load_split(r, "test", image_size=28))


def test_cells_equal_gptq_evaluated_directly(runs, done):
    _, cells = done
    cells = by_key(cells)
    cell = cells[("gptq:receiver", "", "digits_rot90", "")]
    assert cell["acc"]["test"] == pytest.approx(_direct(runs, "digits_rot90", cell["calib"]))
    fp_d, _ = checkpoints.restore_params(checkpoint_path(runs, "digits", "fp"))
    qat_d, _ = checkpoints.restore_params(checkpoint_path(runs, "digits", "qat"))
    qv = q.quantization_vector(qat_d, fp_d)
    cell = cells[("gptq+qv:donor", "digits", "digits_rot90", "1")]
    assert cell["calib"]["task"] == "digits"  # the QV donor's images
    acc = _direct(runs, "digits_rot90", cell["calib"], lambda fp: q.patch(fp, qv, 1.0))
    assert cell["acc"]["test"] == pytest.approx(acc)


def test_receiver_calibration_reads_only_the_train_split(done, monkeypatch):
    _, cells = done
    cell = by_key(cells)[("gptq:receiver", "", "digits", "")]
    assert cell["calib_used"] == {"n": 16, "split": "train", "receiver_images": True}
    asked = []
    real = qdata.load_split

    def spy(task, split, **kw):
        asked.append((str(getattr(task, "name", task)), split))
        return real(task, split, **kw)

    monkeypatch.setattr(qdata, "load_split", spy)
    images = grid.gptq.calib_images(cell["calib"], 28)
    assert asked == [("digits", "train")]
    train = real("digits", "train", image_size=28).images
    # every calibration image is one of the train split's inputs
    rows = {x.tobytes() for x in np.asarray(train)}
    assert len(images) == 16 and all(x.tobytes() in rows for x in np.asarray(images))


def test_needs_gives_table(done):
    workdir, cells = done
    out = rp.write_report(workdir, cells=cells)
    rows = baselines.needs_gives(cells, out["metrics"])
    text = out["summary"]
    assert f"## {baselines.TITLE}" in text and "| " + " | ".join(baselines.HEADER) + " |" in text
    names = [r["approach"] for r in rows]
    assert names[0] == "RTN(FP_R)" and len(rows) == 1 + 2 + 4 + 2
    rtn = {r: out["metrics"]["baselines"][r]["ptq_fp"]["test"] for r in TASKS}
    mine = [c for c in cells if grid.gptq.is_gptq_cell(c)]
    for row in rows:
        assert row["receiver_labels"] == "no"
        is_qv = "QV" in row["approach"]
        assert row["donor_qat"] == ("yes" if is_qv else "no")
        assert row["over"] == ("pairs" if is_qv else "receivers")
    for src in grid.gptq.SOURCES:
        row = next(r for r in rows if r["approach"].startswith(f"GPTQ(FP_R), calibration: {src}"))
        accs = [(c["acc"]["test"], rtn[c["receiver"]]) for c in mine if c["kind"] == f"gptq:{src}"]
        assert row["mean_test_acc"] == pytest.approx(np.mean([a for a, _ in accs]))
        assert (row["wins"], row["compared"]) == (sum(a > b for a, b in accs), 2)
        want = {"receiver": "16 unlabelled (train split)", "pretext": "none by design, but "
                "1/2 calibration sets hold receiver images"}.get(src, "none")  # fmt: skip
        assert row["receiver_images"] == want
    js = json.loads((workdir / "summary.json").read_text())
    assert [r["approach"] for r in js["needs_gives"]] == names
    # a grid resumed with another strategy holds both strategies' cells: one RTN row each,
    # each named by its own strategy and scored at its own choices
    other = [c | {"kind": c["kind"].replace("@norm-ratio", "@lam=1"),
                  "choice": c["choice"] | {"lam": 1.0, "data": "none"}}
             for c in mine if "@" in c["kind"]]  # fmt: skip
    both = baselines.needs_gives(cells + other, out["metrics"])
    rtn_rows = [r for r in both if r["approach"].startswith("RTN(FP_R + lambda QV_D)")]
    assert [r["approach"] for r in rtn_rows] == [
        "RTN(FP_R + lambda QV_D), lambda by `lam=1` (data: none)",
        "RTN(FP_R + lambda QV_D), lambda by `norm-ratio` (data: none)",
    ]
    at1 = next(r for r in both if r["approach"].startswith("RTN(FP_R + QV_D), lambda = 1"))
    assert rtn_rows[0]["mean_test_acc"] == pytest.approx(at1["mean_test_acc"])
    assert rtn_rows[1] == next(r for r in rows if r["approach"] == rtn_rows[1]["approach"])


def test_resume_computes_nothing_new(runs, done, tmp_path):
    workdir, cells = done
    store = GridStore(workdir)
    before = store.cells_path.read_bytes()
    ckpts = find_checkpoints(TASKS, runs)[0]
    assert OPTS.run(list(TASKS), ckpts, store, quant.QuantSpec(2), [0.5, 1.0]) == 0
    make_grid(runs, workdir)
    assert store.cells_path.read_bytes() == before
    # a run killed after some GPTQ cells: the rerun computes exactly the missing ones
    lines = before.decode().splitlines(keepends=True)
    (tmp_path / "cells.jsonl").write_text("".join(lines[:-3]))
    (tmp_path / "grid.json").write_bytes((workdir / "grid.json").read_bytes())
    again = make_grid(runs, tmp_path)
    assert len((tmp_path / "cells.jsonl").read_text().splitlines()) == len(lines)
    assert {k: c["acc"] for k, c in by_key(again).items()} == {
        k: c["acc"] for k, c in by_key(cells).items()
    }


def test_without_gptq_the_summary_is_the_rtn_grids(runs, done, tmp_path):
    workdir, cells = done
    plain = make_grid(runs, tmp_path, extras=None)
    assert not any(grid.gptq.is_gptq_cell(c) for c in plain)
    summary = rp.write_report(tmp_path, cells=plain)["summary"]
    assert baselines.TITLE not in summary
    with_gptq = rp.write_report(workdir, cells=cells)["summary"]
    section = "\n" + "\n".join(baselines.gptq_sections(cells, rp.compute_metrics(plain)))
    assert with_gptq.replace(section, "", 1) == summary  # the GPTQ section is all that differs


def test_options_are_checked_before_any_work():
    with pytest.raises(GridError, match="receiver data"):
        GptqCells(strategy="val-best")
    with pytest.raises(GridError, match="qv_source"):
        GptqCells(qv_source="receiver")
    for bad in (0, 1.5, True):
        with pytest.raises(GridError, match="calib_size"):
            GptqCells(calib_size=bad)
    with pytest.raises(GridError, match="pretext"):
        GptqCells(qv_source="pretext")
    with pytest.raises(GridError, match="sources"):
        GptqCells(sources=("receiver", "val"))
    with pytest.raises(select.SelectError):
        GptqCells(strategy="no-such")


def test_strategy_lambda_comes_from_the_grids_scores_cells(runs, tmp_path):
    scores = grid.extras.Extras(strategy="proxy-donor16-kl", methods=(), proxy_n=16, rx_shots=(8,))
    opts = GptqCells(calib_size=16, sources=("noise",), qv_at_one=False, strategy=scores.strategy)
    cells = make_grid(runs, tmp_path, extras=[scores, opts])
    picks = {(c["receiver"], c["donor"]): c["scores"] for c in cells if c["kind"] == "scores"}
    mine = [c for c in cells if c["kind"] == "gptq+qv:donor@proxy-donor16-kl"]
    assert len(mine) == 2 and len(picks) == 2
    for c in mine:
        want = picks[(c["receiver"], c["donor"])]["choices"]["proxy-donor16-kl"]
        assert c["choice"] == want | {"from": "the grid's scores cell"} and c["lam"] == want["lam"]


def test_cli_gptq_adds_only_its_section(runs, tmp_path, capsys):
    from qvec_jax import cli

    common = ["grid", "--tasks", ",".join(TASKS), "--runs", str(runs), "--bits", "2"]
    common += ["--lambdas", "0.5,1", "--batch-size", "64", "--no-progress", "--workdir"]
    assert cli.main([*common, str(tmp_path / "plain"), "--no-gptq"]) == 0
    argv = [*common, str(tmp_path / "g"), "--gptq", "--calib-size", "8", "--strategy", "lam=1"]
    assert cli.main(argv) == 0
    plain = (tmp_path / "plain" / "summary.md").read_text()
    with_gptq = (tmp_path / "g" / "summary.md").read_text()
    assert baselines.TITLE not in plain and f"## {baselines.TITLE}" in with_gptq
    start = with_gptq.index(f"\n\n## {baselines.TITLE}")
    assert with_gptq[:start] + "\n" == plain  # the GPTQ section comes last
    cells = GridStore(tmp_path / "g").cells()
    assert {c["calib"]["n"] for c in cells if grid.gptq.is_gptq_cell(c)} == {8}
    assert not any(c["kind"] == "gptq:pretext" for c in cells)  # no --pretext, no pretext rows
    capsys.readouterr()
    assert cli.main([*common, str(tmp_path / "x"), "--calib-size", "8"]) == 1
    assert "--calib-size applies with --gptq only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- issue 20


def test_calibration_sets_that_hold_receiver_images_say_so_per_split(done, tmp_path):
    """The pretext (digits) calibration set of the digits receiver IS digits images: the
    cell counts them per split and the table says so; a grid made before the cells carried
    the counts reports the same, counted from the calibration spec."""
    workdir, cells = done
    mine = [c for c in cells if grid.gptq.is_gptq_cell(c)]
    for c in mine:
        calib, r = c["calib"], c["receiver"]
        want = (select.images_overlap(calib["task"], 16, r, seed=calib["seed"])
                if calib["task"] else overlap.zero_counts())  # fmt: skip
        assert c["calib_overlap"] == want, c["kind"]
        assert c["calib_used"]["receiver_images"] is overlap.has_overlap(want)
    pre = by_key(cells)[("gptq:pretext", "", "digits", "")]["calib_overlap"]
    assert pre == {"train": 16, "val": 0, "test": 0}
    text = rp.write_report(workdir, tmp_path / "a", cells=cells)["summary"]
    line = next(
        ln for ln in text.splitlines() if ln.startswith("| GPTQ(FP_R), calibration: pretext")
    )
    assert ("calibration images hold receiver images for 1/2 receivers: 16 train, 0 val, 0 test "
            "(NOT receiver-free)") in line  # fmt: skip
    noise = next(
        ln for ln in text.splitlines() if ln.startswith("| GPTQ(FP_R), calibration: noise")
    )
    assert "NOT receiver-free" not in noise
    old = [{k: v for k, v in c.items() if k != "calib_overlap"} for c in cells]
    assert rp.write_report(workdir, tmp_path / "b", cells=old)["summary"] == text
    # a lambda choice on pretext images measured by the GPTQ stage: counted from its sample
    choice = {"strategy": "proxy-pretext16-kl", "data": "pretext", "from": "measured"}
    got = baselines.choice_overlap(cells, {("digits", "digits_rot90"): choice})
    assert got["hit"] == 1 and got["counts"] == {"train": 16, "val": 0, "test": 0}


def test_two_tasks_make_no_one_donor_merge_and_the_report_says_why(runs, done, tmp_path):
    workdir, _ = done
    ex = grid.extras.Extras(methods=("mean",), proxy_n=8, rx_shots=(4,), strategy="lam=1")
    ckpts = find_checkpoints(TASKS, runs)[0]
    planned = grid.extras.plan_extras(ex, list(TASKS), ckpts, (0.5, 1.0), (0.0, 0.5, 1.0), {})
    assert planned and not [c for c in planned if c["donor"].startswith("loo:")]
    work = tmp_path / "g"
    shutil.copytree(workdir, work)
    cells = make_grid(runs, work, extras=[ex])
    assert not [c for c in cells if c["kind"] == "merge" or c["donor"] == "loo:mean"]
    plain = rp.write_report(work, tmp_path / "a")["summary"]
    why = ("No merge rows: a leave-one-out merge needs at least 2 donors per receiver, and "
           "this grid's receivers have 1 other donor each")  # fmt: skip
    assert why in plain and "`loo:mean`" not in plain
    # one-donor "merge" cells stored by an older version: not reported, and counted
    score = next(c for c in cells if c["kind"] == "scores")
    r, d = score["receiver"], score["donor"]
    recipe = {"merge": {"method": "mean"}, "donors": [d]}
    stale = [score | {"donor": "loo:mean", "setup": score["setup"] | recipe}]
    acc = {"acc": {"val": 0.5, "test": 0.5}, "n": {"val": 1, "test": 1}}
    stale += [{"kind": "merge", "receiver": r, "donor": "loo:mean", "lam": lam, "setup": recipe,
               **acc} for lam in (0.5, 1.0)]  # fmt: skip
    with (work / "cells.jsonl").open("a") as f:
        f.write("".join(json.dumps(c) + "\n" for c in stale))
    text = rp.write_report(work, tmp_path / "b")["summary"]
    assert f"{why} (3 stored one-donor merge cells are not reported)" in text
    assert "`loo:mean`" not in text
