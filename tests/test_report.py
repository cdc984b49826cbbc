"""Report metrics on hand-made cells, and the files `write_report` produces."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
from test_cli_safety import refused, snapshot

from qvec_jax import cli, demo
from qvec_jax import report as rp
from qvec_jax.config import load_config
from qvec_jax.data import TASKS, View, get_task, split_task_names, task_sets


def base_cells(r, fp, ptq_fp, ptq_qat):
    return [
        {"kind": k, "receiver": r, "donor": None, "lam": None, "acc": {"val": v, "test": v}}
        for k, v in (("fp", fp), ("ptq_fp", ptq_fp), ("ptq_qat", ptq_qat))
    ]


def patch_cell(d, r, lam, val, test):
    return {
        "kind": "patch",
        "donor": d,
        "receiver": r,
        "lam": lam,
        "acc": {"val": val, "test": test},
    }


def hand_grid():
    """Two receivers a, b and a donor-only task c; base PTQ(FP): a 0.50, b 0.60."""
    cells = base_cells("a", 0.90, 0.50, 0.85) + base_cells("b", 0.80, 0.60, 0.55)
    # self pairs: ceiling a = 0.80 - 0.50 = +0.30 ; ceiling b = 0.55 - 0.60 = -0.05 (undefined)
    cells += [patch_cell("a", "a", 0.5, 0.70, 0.71), patch_cell("a", "a", 1.0, 0.79, 0.80)]
    cells += [patch_cell("b", "b", 0.5, 0.58, 0.58), patch_cell("b", "b", 1.0, 0.56, 0.55)]
    # b -> a: lambda=1 delta +0.10 (test); val prefers 0.5 whose test delta is +0.20
    cells += [patch_cell("b", "a", 0.5, 0.75, 0.70), patch_cell("b", "a", 1.0, 0.65, 0.60)]
    # c -> a: hurts at 1 (-0.10), val ties at both lambdas -> lambda closest to 1 wins
    cells += [patch_cell("c", "a", 0.5, 0.45, 0.46), patch_cell("c", "a", 1.0, 0.45, 0.40)]
    # a -> b: +0.05 at lambda=1, but the receiver's ceiling is negative: recovery undefined
    cells += [patch_cell("a", "b", 0.5, 0.62, 0.50), patch_cell("a", "b", 1.0, 0.61, 0.65)]
    return cells


def test_metrics_on_hand_made_cells():
    m = rp.compute_metrics(hand_grid(), tasks=["a", "b", "c"])
    base = m["baselines"]
    assert base["a"]["ceiling"] == pytest.approx(0.30)
    assert base["b"]["ceiling"] == pytest.approx(-0.05)
    assert base["c"]["ceiling"] is None and base["c"]["ptq_fp"] is None

    ba, ca, ab = m["pairs"][("b", "a")], m["pairs"][("c", "a")], m["pairs"][("a", "b")]
    assert ba["delta_1"] == pytest.approx(0.10)
    assert ba["lambda_best"] == 0.5 and ba["delta_best"] == pytest.approx(0.20)
    assert ba["recovery_1"] == pytest.approx(0.10 / 0.30)
    assert ba["recovery_best"] == pytest.approx(0.20 / 0.30)
    assert ca["lambda_best"] == 1.0  # tie on val -> closest to 1
    assert ca["delta_1"] == pytest.approx(-0.10)
    assert ab["delta_1"] == pytest.approx(0.05)
    assert ab["recovery_1"] is None  # ceiling <= 0

    zero = m["modes"][rp.ZERO_SHOT]
    assert zero["n_pairs"] == 3  # self pairs excluded
    assert zero["wins"] == 2 and zero["win_rate"] == pytest.approx(2 / 3)
    assert zero["mean_delta"] == pytest.approx((0.10 - 0.10 + 0.05) / 3)
    assert zero["median_delta"] == pytest.approx(0.05)
    assert zero["n_recovery"] == 2
    assert zero["mean_recovery"] == pytest.approx((0.10 / 0.30 - 0.10 / 0.30) / 2)

    best = m["modes"][rp.LAMBDA_BEST]
    # a->b: val prefers 0.5 (0.62) whose test delta is 0.50 - 0.60 = -0.10
    assert ab["lambda_best"] == 0.5 and ab["delta_best"] == pytest.approx(-0.10)
    assert best["wins"] == 1
    assert best["mean_delta"] == pytest.approx((0.20 - 0.10 - 0.10) / 3)
    assert best["median_lambda_best"] == 0.5

    curve = m["modes"][rp.CURVE]
    assert list(curve) == [0.5, 1.0]
    assert curve[1.0] == zero
    assert curve[0.5]["mean_delta"] == pytest.approx((0.20 - 0.04 - 0.10) / 3)

    assert m["receivers"]["a"]["n_pairs"] == 2 and m["receivers"]["a"]["wins"] == 1
    assert m["donors"]["c"]["mean_delta"] == pytest.approx(-0.10)


def test_recovery_and_lambda_best_rules():
    assert rp.recovery(0.1, 0.0) is None
    assert rp.recovery(0.1, -0.2) is None
    assert rp.recovery(None, 0.2) is None
    assert rp.recovery(-0.1, 0.2) == pytest.approx(-0.5)
    assert rp.choose_lambda_best({}) is None
    assert rp.choose_lambda_best({0.9: 0.5, 1.1: 0.5, 0.3: 0.4}) == 0.9  # equal |.-1|: smaller
    assert rp.choose_lambda_best({0.9: 0.5, 1.05: 0.5}) == 1.05
    assert rp.choose_lambda_best({0.15: 0.7, 1.0: 0.6}) == 0.15


def test_later_records_replace_earlier_and_truncated_tail_is_ignored(tmp_path):
    cells = hand_grid()
    redo = dict(cells[0], acc={"val": 0.1, "test": 0.2})
    lines = [json.dumps(c) for c in cells + [redo]] + ['{"kind": "patch", "rece']
    (tmp_path / rp.CELLS_FILE).write_text("\n".join(lines))
    loaded = rp.load_cells(tmp_path)
    assert len(loaded) == len(cells)
    fp_a = next(c for c in loaded if c["kind"] == "fp" and c["receiver"] == "a")
    assert fp_a["acc"] == {"val": 0.1, "test": 0.2}
    (tmp_path / rp.CELLS_FILE).write_text("garbage\n" + "\n".join(lines[:3]))
    with pytest.raises(ValueError, match=r"cells.jsonl:1"):
        rp.load_cells(tmp_path)


def write_hand_workdir(path, missing=()):
    path.mkdir(parents=True, exist_ok=True)
    (path / rp.CELLS_FILE).write_text("\n".join(json.dumps(c) for c in hand_grid()) + "\n")
    meta = {
        "tasks": ["a", "b", "c", *[m["task"] for m in missing]],
        "lambdas": [0.5, 1.0],
        "bits": 2,
        "granularity": "channel",
        "missing": list(missing),
    }
    (path / rp.GRID_META_FILE).write_text(json.dumps(meta))


def test_write_report_files_and_numbers_agree(tmp_path):
    missing = [{"task": "d", "mode": "qat", "path": "/runs/d/qat/params", "reason": "not found"}]
    write_hand_workdir(tmp_path, missing)
    out = rp.write_report(tmp_path)
    for p in out["paths"].values():
        assert p.exists() and p.stat().st_size > 0, p
    for name in (
        "heatmap_delta_lambda1",
        "heatmap_delta_lambda_best",
        "heatmap_recovery",
        "lambda_curves",
    ):
        assert out["paths"][name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = list(csv.DictReader(out["paths"]["grid_csv"].open()))
    assert len(rows) == 2 * len(hand_grid())  # one row per cell and split
    assert {r["split"] for r in rows} == {"val", "test"}
    cross1 = [
        float(r["delta"])
        for r in rows
        if r["kind"] == "patch"
        and r["split"] == "test"
        and r["self"] == "False"
        and float(r["lam"]) == 1.0
    ]
    best = [
        r
        for r in rows
        if r["is_lambda_best"] == "True" and r["split"] == "test" and r["self"] == "False"
    ]
    assert len(best) == 3

    summary = out["summary"]
    assert summary == out["paths"]["summary_md"].read_text()
    assert "2-bit channel" in summary
    for mode in (rp.ZERO_SHOT, rp.LAMBDA_BEST, rp.CURVE):
        assert f"## {mode}" in summary
    assert "`d` qat: /runs/d/qat/params" in summary
    wins = sum(d > 0 for d in cross1)
    mean = 100 * statistics.fmean(cross1)
    zero_row = next(ln for ln in summary.splitlines() if ln.startswith(f"| {rp.ZERO_SHOT}"))
    assert f"{wins}/{len(cross1)}" in zero_row
    assert f"{mean:+.1f}" in zero_row
    best_mean = 100 * statistics.fmean(float(r["delta"]) for r in best)
    best_row = next(ln for ln in summary.splitlines() if ln.startswith(f"| {rp.LAMBDA_BEST}"))
    assert f"{best_mean:+.1f}" in best_row

    js = json.loads(out["paths"]["summary_json"].read_text())
    assert js["modes"][rp.ZERO_SHOT]["wins"] == wins
    assert math.isclose(js["modes"][rp.ZERO_SHOT]["mean_delta"], mean / 100)
    assert js["missing"] == missing


def test_report_on_empty_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="qvec grid"):
        rp.write_report(tmp_path)


def test_cells_outside_the_requested_grid_do_not_count_as_present():
    cells = hand_grid()
    m = rp.compute_metrics(cells, tasks=["a", "b"], lambdas=[1.0])
    # a, b baselines (6) + patch cells among {a, b} at lambda=1 (a->a, b->b, a->b... b->a)
    assert m["n_cells_in_grid"] == 6 + 4
    assert m["n_cells"] == len(cells)
    text = rp.summary_markdown(m, {"expected_cells": 2 * 3 + 4 * 1, "bits": 2})
    assert "Cells: 10 of 10 (complete)" in text
    text = rp.summary_markdown(m, {"expected_cells": 3 * 3 + 9 * 1, "bits": 2})
    assert "Cells: 10 of 18 (**incomplete**)" in text


def test_headline_is_the_mode_tables_of_summary_md(tmp_path):
    write_hand_workdir(tmp_path)
    out = rp.write_report(tmp_path)
    head = rp.headline(out["metrics"])
    blocks = head.strip("\n").split("\n\n")
    assert len(blocks) == 2
    for block, mode in zip(blocks, (rp.ZERO_SHOT, rp.LAMBDA_BEST)):
        header, rule, row = block.splitlines()
        assert row.startswith(f"| {mode} |")
        assert f"\n## {mode}\n" in out["summary"] and block in out["summary"]
    # the numbers of the hand grid (test_metrics_on_hand_made_cells), in points
    zero, best = (b.splitlines()[2] for b in blocks)
    assert "| 2/3 (66.7%) | +1.7 | +5.0 |" in zero  # deltas +10, -10, +5
    assert "| 1/3 (33.3%) | +0.0 | -10.0 |" in best and best.endswith("| 0.5 |")
    status = rp.report_status(out["metrics"])
    assert " | ".join(status[rp.ZERO_SHOT]) in zero and " | ".join(status[rp.LAMBDA_BEST]) in best


# ----------------------------------------------------------------------------- issue 20

TEST_VIEWS = split_task_names(load_config(demo.CONFIG).demo.test_tasks)


def square_grid(path, tasks, lambdas=(1.0,), *, keep=None, file=rp.CELLS_FILE, torn=False,
                meta=None) -> int:  # fmt: skip
    """A complete grid over ``tasks`` (every pair, self pairs included) written as `qvec
    grid` writes it; ``keep``: only the first ``keep`` cells, in ``file``; ``torn``: then
    half a record, as a killed writer leaves it. Returns the number of cells it implies."""
    cells = [c for i, t in enumerate(tasks) for c in base_cells(t, 0.9, 0.5 + 0.01 * i, 0.8)]
    cells += [patch_cell(d, r, lam, 0.6, 0.6) for d in tasks for r in tasks for lam in lambdas]
    expected = len(cells)
    text = "".join(json.dumps(c) + "\n" for c in cells[:keep])
    path.mkdir(parents=True)
    (path / file).write_text(text + (json.dumps(cells[-1])[:25] if torn else ""))
    info = {"tasks": list(tasks), "lambdas": list(lambdas), "bits": 2, "granularity": "channel"}
    (path / rp.GRID_META_FILE).write_text(
        json.dumps(info | {"expected_cells": expected} | (meta or {}))
    )
    return expected


def _qvec(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "how",
    [{"keep": -2}, {"keep": -1, "torn": True}, {"keep": 7, "file": "cells.shard-0-of-2.jsonl"}],
)
def test_a_partial_grid_is_marked_loudly_and_tune_refuses_it(tmp_path, capsys, how):
    """Fewer cells than tasks x lambdas imply (a run still going, a torn record file, one
    shard of two): `qvec report` says INCOMPLETE on the console and atop summary.md,
    `qvec tune` refuses it naming the counts; neither touches the grid."""
    grid_dir = tmp_path / "g"
    expected = square_grid(grid_dir, ["a", "b", "c"], (0.5, 1.0), **how)
    present = len(rp.load_cells(grid_dir))
    assert present < expected
    before = snapshot(grid_dir)
    rc, out, err = _qvec(capsys, "report", grid_dir, "--out", tmp_path / "rep")
    says = f"INCOMPLETE grid: {present} of the {expected} cells its tasks x lambdas imply"
    assert rc == 0 and f"qvec report: WARNING: {says}" in err
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert (
        summary.splitlines()[2] == f"> **WARNING: {says}; every number is over the cells "
        "present only. Finish it (rerun `qvec grid`, every --shard) before reading them.**"
    )
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["warnings"][0].startswith(
        says
    )
    refused(capsys, tmp_path, ["tune", grid_dir, "--out", tmp_path / "t"],
            [grid_dir, "incomplete", f"{present} of the {expected} cells"])  # fmt: skip
    assert not (tmp_path / "t").exists() and snapshot(grid_dir) == before
    # once complete, no warning at all
    whole = tmp_path / "whole"
    square_grid(whole, ["a", "b", "c"], (0.5, 1.0))
    rc, _, err = _qvec(capsys, "report", whole)
    assert rc == 0 and "WARNING" not in err and "WARNING" not in (whole / "summary.md").read_text()


def test_a_grid_of_test_set_views_is_marked_and_tune_refuses_it_by_view_key(tmp_path, capsys):
    """Matched by view key, not by the grid's label: a test view under another spelling
    (a registered class subset plus the rest of the view) in a grid labelled "custom"."""
    alias = None
    for name in TEST_VIEWS:
        src, view = name.partition("@")[0], get_task(name).view
        base = next((t for t, task in TASKS.items() if task.view == View(classes=view.classes)
                     and task.sources == get_task(src).sources and view.classes), None)  # fmt: skip
        if base:
            rest = View(rot90=view.rot90, hflip=view.hflip, invert=view.invert)
            alias = task_sets.view_name(base, rest)
            break
    assert alias is not None and alias not in TEST_VIEWS
    assert task_sets.view_key(alias) in {task_sets.view_key(n) for n in TEST_VIEWS}
    for tasks in ([TEST_VIEWS[0], "digits"], ["digits", alias]):
        grid_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        square_grid(grid_dir, tasks, meta={"task_set": {"name": "custom", "about": "x"}})
        named = [t for t in tasks if t != "digits"]
        before = snapshot(grid_dir)
        rc, _, err = _qvec(capsys, "report", grid_dir, "--out", grid_dir / "rep")
        assert rc == 0 and f"qvec report: WARNING: TEST-SET tasks: {named[0]} (views" in err
        assert (
            f"> **WARNING: TEST-SET tasks: {named[0]}"
            in (grid_dir / "rep" / "summary.md").read_text()
        )
        refused(capsys, grid_dir, ["tune", grid_dir, "--out", tmp_path / "t"],
                ["TEST task set", named[0], "view key"])  # fmt: skip
        assert not (tmp_path / "t").exists()
        assert {k: v for k, v in snapshot(grid_dir).items() if not k.startswith("rep")} == before
    assert task_sets.in_test_sets(["digits", "digits_a", "nosuch", "a"]) == []


def test_tune_out_inside_an_input_checkpoint_is_refused(tmp_path, capsys):
    ck = tmp_path / "runs" / "a" / "fp" / "params"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text("{}")
    grid_dir = tmp_path / "g"
    square_grid(grid_dir, ["a", "b"], meta={"checkpoints": {"a/fp": {"path": str(ck)}}})
    for out in (ck / "tune", ck):
        refused(capsys, tmp_path, ["tune", grid_dir, "--out", out], ["--out", out, "inside input"])
