"""The grid's extras on tiny random checkpoints: lambda-strategy measurements (scores
cells) and leave-one-out merges (merge cells), their report sections, resume, and
``--no-extras``."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from test_cli_safety import refused, snapshot
from test_grid_run import LAMBDAS, TASKS, make_runs

import qvec_jax as q
from qvec_jax import checkpoints, cli, grid, merge, select
from qvec_jax import data as qdata
from qvec_jax import report as rp
from qvec_jax.cli import grid_cmds
from qvec_jax.data import overlap
from qvec_jax.evaluate import accuracy
from qvec_jax.grid.inputs import checkpoint_path, find_checkpoints
from qvec_jax.grid.store import GridStore, cell_key, lam_key
from qvec_jax.report import extras as rx
from qvec_jax.report import strategies as rs
from qvec_jax.report import tune

METHODS = ("mean", "ties")
EXTRAS = grid.extras.Extras(methods=METHODS, pretext="digits_b")
KW = {"bits": 2, "lambdas": LAMBDAS, "batch_size": 64, "progress": False}


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """``(runs, main-only workdir, workdir with extras)``: one main grid, copied, then the
    extras computed in the copy."""
    tmp = tmp_path_factory.mktemp("extras")
    runs = make_runs(tmp / "runs")
    grid.run_grid(list(TASKS), runs, tmp / "main", **KW)
    shutil.copytree(tmp / "main", tmp / "ext")
    grid.run_grid(list(TASKS), runs, tmp / "ext", extras=EXTRAS, **KW)
    return runs, tmp / "main", tmp / "ext"


def _cells(workdir, kind):
    return [c for c in GridStore(workdir).cells() if c["kind"] == kind]


def _by_key(workdir):
    return {cell_key(c): c for c in GridStore(workdir).cells()}


def test_extras_cells_exist_and_are_complete(grids):
    _, _, ext = grids
    scores, merges = _cells(ext, "scores"), _cells(ext, "merge")
    pairs = {(d, r) for d in TASKS for r in TASKS if d != r}
    loo = {(grid.extras.loo_donor(m), r) for m in METHODS for r in TASKS}
    assert {(c["donor"], c["receiver"]) for c in scores} == pairs | loo
    assert len(scores) == len(pairs | loo)
    want = {(grid.extras.loo_donor(m), r, lam_key(lam)) for m in METHODS for r in TASKS
            for lam in LAMBDAS}  # fmt: skip
    assert {(c["donor"], c["receiver"], lam_key(c["lam"])) for c in merges} == want
    assert all(set(c["acc"]) == {"val", "test"} for c in merges)
    measured = {s.name for s in grid.extras.measured_strategies()}
    for c in scores:
        rec = c["scores"]
        assert rec["candidates"] == [0.0, *LAMBDAS]
        assert set(rec["choices"]) == measured  # every strategy, pretext included
        assert set(rec["not_measured"]) == {"val-best"}
        n_donor = 256 * (len(TASKS) - 1 if c["donor"].startswith("loo:") else 1)
        assert c["inputs"] == {"unlabelled receiver": 128, "pretext": 256, "donor": n_donor}
        # the receiver proxy reads only train images: as many as it asked for, no more
        assert rec["proxy/unlabelled receiver/n=32/seed=0"]["n"] == 32


def test_proxy_images_are_a_seeded_train_sample():
    split = qdata.load_split("digits_rot90", "train", image_size=28)
    x = select.train_images("digits_rot90", 32, image_size=28, seed=0)
    pos = np.sort(np.random.default_rng(0).choice(len(split), 32, replace=False))
    np.testing.assert_array_equal(x, split.inputs(pos))
    assert x.shape == (32, 28, 28, 3)


def test_strategy_score_is_the_patch_cell_at_its_pick(grids):
    _, _, ext = grids
    cells = GridStore(ext).cells()
    main = [c for c in cells if c["kind"] in ("fp", "ptq_fp", "ptq_qat", "patch")]
    metrics = rp.compute_metrics(main)
    strategies = grid.extras.measured_strategies()
    sm = rs.strategy_metrics(cells, metrics, strategies, "proxy-donor-kl")
    by = _by_key(ext)
    picks = 0
    for s in strategies:
        row = rs.row_of(sm, s.name)
        assert row["measured"], s.name
        deltas = []
        for (d, r), got in row["pairs"].items():
            lam = select.choose(s, by[("scores", d, r, "")]["scores"]).lam
            base = by[("ptq_fp", "", r, "")]["acc"]["test"]
            cell = by[("ptq_fp", "", r, "")] if lam == 0 else by[("patch", d, r, lam_key(lam))]
            assert got["lam"] == lam and got["acc"] == cell["acc"]["test"], (s.name, d, r)
            deltas.append(cell["acc"]["test"] - base)
            picks += lam == 0
        assert row["stats"]["mean_delta"] == pytest.approx(np.mean(deltas))
        regret = max(
            metrics["pairs"][k]["delta_best"] - p["delta"] for k, p in row["pairs"].items()
        )
        assert row["stats"]["worst_regret"] == pytest.approx(regret)
    assert picks > 0  # lam = 0 was picked somewhere and read from ptq_fp
    one = rs.row_of(sm, "lam=1")["stats"]
    assert one["mean_delta"] == pytest.approx(metrics["modes"][rp.ZERO_SHOT]["mean_delta"])
    assert rs.row_of(sm, rp.LAMBDA_BEST)["stats"]["captured"] == pytest.approx(1.0)


def test_loo_merge_excludes_the_receiver(grids):
    runs, _, ext = grids
    ckpts, _ = find_checkpoints(list(TASKS), runs)
    run = grid.extras._ExtrasRun(EXTRAS, ckpts, q.QuantSpec(2), (0.0, *LAMBDAS), {})
    r = "digits_rot90"
    cell = _by_key(ext)[("merge", "loo:ties", r, lam_key(0.5))]
    others = [t for t in TASKS if t != r]
    assert cell["setup"]["donors"] == others
    qvs = []
    for d in others:
        qat, _ = checkpoints.restore_params(checkpoint_path(runs, d, "qat"))
        fp, _ = checkpoints.restore_params(checkpoint_path(runs, d, "fp"))
        qvs.append(q.quantization_vector(qat, fp))
    want = merge.merge_qvs(qvs, "ties", density=0.2)
    got = run.merged_qv(cell)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # and the cell is PTQ(FP_R + 0.5 * merged) on R's test split
    fp_r, meta = checkpoints.restore_params(checkpoint_path(runs, r, "fp"))
    test = qdata.load_split(r, "test", image_size=28)
    acc = accuracy(checkpoints.model_from_meta(meta), q.ptq(q.patch(fp_r, want, 0.5), 2), test)
    assert cell["acc"]["test"] == pytest.approx(acc, abs=1e-9)


def test_report_has_a_row_per_strategy_and_merge(grids, tmp_path):
    _, _, ext = grids
    out = rp.write_report(ext, tmp_path)
    text = out["summary"]
    for s in grid.extras.measured_strategies():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| `{s.name}` |"))
        assert f"| {rs.DATA_LABELS[s.data]} |" in line
    assert f"| `{rp.LAMBDA_BEST}` | {rs.DATA_LABELS['labelled receiver']} |" in text
    for m in METHODS:
        assert f"| `loo:{m}` | receivers |" in text
    assert "| average single donor | pairs |" in text
    assert "(no receiver data) | receivers |" in text
    assert "| oracle best single donor (uses receiver test labels) | receivers |" in text
    fixed = grid.extras.DEFAULT_STRATEGY
    assert f"Fixed in advance (not chosen on these tasks): **`{fixed}`**" in text
    assert out["paths"][rx.STRATEGY_FIGURE].is_file()
    js = json.loads(out["paths"]["summary_json"].read_text())
    assert js["extras"]["strategies"]["fixed"] == fixed


def test_unmeasured_strategies_are_listed_not_dropped(grids):
    """A grid without pretext images: the pretext rows say so (records edited as such a
    grid stores them)."""
    _, _, ext = grids
    cells = json.loads(json.dumps(GridStore(ext).cells()))
    for c in cells:
        if c["kind"] == "scores":
            del c["scores"]["proxy/pretext/n=256/seed=0"]
            c["scores"]["not_measured"]["proxy-pretext-kl"] = "no pretext inputs given"
    main = [c for c in cells if c["kind"] in ("fp", "ptq_fp", "ptq_qat", "patch")]
    em = rx.extras_metrics(cells, rp.compute_metrics(main), ext, "proxy-noise-kl")
    row = rs.row_of(em["strategies"], "proxy-pretext-kl")
    assert not row["measured"] and row["reason"] == "no pretext inputs given"
    text = "\n".join(rx.extras_markdown(em))
    assert "| `proxy-pretext-kl` | pretext train images | not measured: no pretext inputs" in text


def test_resume_computes_nothing_new(grids, tmp_path):
    runs, _, ext = grids
    before = {p.name: p.read_text() for p in GridStore(ext).cell_files() if p.exists()}
    grid.run_grid(list(TASKS), runs, ext, extras=EXTRAS, **KW)
    after = {p.name: p.read_text() for p in GridStore(ext).cell_files() if p.exists()}
    assert after == before
    # a run killed during the extras: only the lost extras are recomputed
    work = tmp_path / "killed"
    shutil.copytree(ext, work)
    lines = (work / "cells.jsonl").read_text().splitlines(keepends=True)
    lost = [json.loads(x) for x in lines[-3:]]
    assert all(c["kind"] in grid.extras.EXTRA_KINDS for c in lost)
    (work / "cells.jsonl").write_text("".join(lines[:-3]) + lines[-3][:20])  # torn tail
    grid.run_grid(list(TASKS), runs, work, extras=EXTRAS, **KW)
    new = (work / "cells.jsonl").read_text().splitlines()
    assert new[:-3] == [x.rstrip("\n") for x in lines[:-3]]
    assert {cell_key(json.loads(x)) for x in new[-3:]} == {cell_key(c) for c in lost}


def test_changed_setup_recomputes_the_scores_cells(grids):
    runs, _, ext = grids
    ckpts, _ = find_checkpoints(list(TASKS), runs)
    done = {cell_key(c): c for c in GridStore(ext).cells()}
    cands = (0.0, *LAMBDAS)
    assert grid.extras.plan_extras(EXTRAS, list(TASKS), ckpts, LAMBDAS, cands, done) == []
    other = grid.extras.Extras(methods=METHODS, pretext="digits_b", seed=1)
    todo = grid.extras.plan_extras(other, list(TASKS), ckpts, LAMBDAS, cands, done)
    assert {c["kind"] for c in todo} == {"scores"} and len(todo) == len(_cells(ext, "scores"))


def test_no_extras_leaves_summary_identical(grids, tmp_path):
    _, main, ext = grids
    plain = rp.write_report(main, tmp_path / "plain")["summary"]
    off = rp.write_report(ext, tmp_path / "off", extras=False)
    assert off["summary"] == plain
    assert rx.STRATEGY_FIGURE not in off["paths"]
    on = rp.write_report(ext, tmp_path / "on")["summary"]
    assert on != plain and "## Lambda strategies" in on
    assert (tmp_path / "off" / "grid.csv").read_text() == (
        tmp_path / "plain" / "grid.csv"
    ).read_text()


def test_cli_refuses_bad_extras_options(grids, tmp_path, capsys):
    runs, _, ext = grids
    base = ["grid", "--tasks", ",".join(TASKS), "--runs", str(runs), "--bits", "2"]
    rc = cli.main([*base, "--workdir", str(tmp_path / "a"), "--pretext", "digits_b"])
    assert rc != 0 and "--pretext applies with --extras or --gptq only" in capsys.readouterr().err
    rc = cli.main(
        [*base, "--workdir", str(tmp_path / "b"), "--extras", "--strategy", "proxy-rx32-kl"]
    )
    assert rc != 0 and "uses unlabelled receiver data" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    rc = cli.main(["report", str(ext), "--out", str(tmp_path / "r"), "--strategy", "nope"])
    err = capsys.readouterr().err
    assert rc != 0 and "unknown lambda strategy 'nope'" in err and "this grid measured" in err
    out = tmp_path / "tuned"
    assert (
        cli.main(["report", str(ext), "--out", str(out), "--strategy", "norm-ratio:multiple=2"])
        == 0
    )
    assert "`norm-ratio:multiple=2`" in (out / "summary.md").read_text()


def test_tune_ranks_variants_by_the_fixed_rule_and_refuses_the_test_set(grids, tmp_path, capsys):
    _, _, ext = grids
    out = tmp_path / "tuned"
    assert cli.main(["tune", str(ext), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    js = json.loads((out / "tune.json").read_text())
    assert (
        f"winner: {js['winner']}" in printed
        and f"`{js['winner']}`" in (out / "tune.md").read_text()
    )
    rows = js["rows"]
    names = [r["name"] for r in rows]
    # every measured family at every value of its constant, each scored once
    assert len(names) == len(set(names)) and "proxy-donor-kl:margin=0.2" in names
    assert {"norm-ratio:multiple=0.25", "alignment:scale=16", "model-stock:k=1"} <= set(names)
    zero = [r for r in rows if r["data"] not in rs.RECEIVER_DATA]
    assert rows[: len(zero)] == zero and js["winner"] == zero[0]["name"]
    w = zero[0]["stats"]  # the printed numbers are the winner's
    assert f"{w['wins']} wins, mean delta {100 * w['mean_delta']:+.1f} pts" in printed
    one = js["lam1"]
    keys = [tune.rank_key({"name": r["name"], "stats": r["stats"]}, {"stats": one}) for r in zero]
    assert keys == sorted(keys)  # ranked: safe first, then mean delta, regret, name
    # scored exactly as the report scores a strategy
    cells, meta = GridStore(ext).cells(), GridStore(ext).meta()
    metrics = rp.compute_metrics(
        [c for c in cells if c["kind"] in (*rp.BASELINE_KINDS, "patch")],
        tasks=meta["tasks"], lambdas=meta["lambdas"],
    )  # fmt: skip
    s = select.get_strategy(js["winner"], grid.extras.measured_strategies())
    sm = rs.strategy_metrics(cells, metrics, [s], s.name)
    assert sm["rows"][0]["stats"] == next(r["stats"] for r in rows if r["name"] == s.name)
    # never on the test task set
    test_grid = tmp_path / "test-grid"
    shutil.copytree(ext, test_grid)
    store = GridStore(test_grid)
    store.write_meta(store.meta() | {"task_set": {"name": "test", "about": "x"}})
    assert cli.main(["tune", str(test_grid)]) != 0
    assert "TEST task set: constants are never chosen on it" in capsys.readouterr().err
    assert not (test_grid / "tune.md").exists()


def test_the_default_strategy_follows_the_pretext_and_names_are_canonical():
    assert select.get_strategy(grid.extras.DEFAULT_STRATEGY).data == "pretext"  # the dev pick
    assert select.get_strategy(grid.extras.NO_PRETEXT_STRATEGY).data == "donor"
    for make in (grid.extras.Extras, grid.gptq.GptqCells):
        assert make().strategy == grid.extras.NO_PRETEXT_STRATEGY  # "auto", no pretext
        assert make(pretext="digits_b").strategy == grid.extras.DEFAULT_STRATEGY
        # one spelling per strategy, so resumed cells are found under any spelling
        assert (
            make(strategy="proxy-donor256-kl:margin=0.050").strategy == "proxy-donor-kl:margin=0.05"
        )
        assert make(strategy="proxy-donor-kl:margin=0").strategy == "proxy-donor-kl"
    with pytest.raises(select.SelectError, match="reads pretext images: name the pretext"):
        grid.extras.Extras(strategy=grid.extras.DEFAULT_STRATEGY)
    with pytest.raises(grid.gptq.GridError, match="reads pretext images: name the pretext"):
        grid.gptq.GptqCells(strategy="proxy-pretext-kl")


def test_tune_rank_keeps_lam1_unless_a_variant_is_safe_and_better():
    def row(name, wins, mean, regret):
        return {"name": name, "stats": {"wins": wins, "mean_delta": mean, "worst_regret": regret}}

    one = row("lam=1", 14, 0.04, 0.06)
    key = lambda r: tune.rank_key(r, one)  # noqa: E731
    twin = row("alignment:scale=2", 14, 0.04, 0.06)  # an exact tie: lam=1 first
    better = row("proxy-pretext-kl:margin=0.05", 16, 0.046, 0.061 - 0.001)
    riskier = row("proxy-pretext-kl", 16, 0.05, 0.136)  # more gain, larger worst regret
    fewer = row("proxy-donor-kl", 12, 0.09, 0.01)  # fewer wins than lam=1
    assert sorted([riskier, fewer, twin, one], key=key) == [one, twin, fewer, riskier]
    assert sorted([riskier, one, better, twin], key=key)[0] == better


# ----------------------------------------------------------------------------- issue 20


def _counts_text(c: dict) -> str:
    return f"{c['train']} train, {c['val']} val, {c['test']} test"


def test_strategy_rows_count_the_receiver_images_their_data_holds(grids, tmp_path):
    """digits_b (the pretext) holds digits images (classes 5-9, same view), in its train
    AND val splits; digits and digits_a hold each other's. The rows say so, per split, from
    the counts the scores cells carry, and from names alone for cells made before."""
    _, _, ext = grids
    for c in _cells(ext, "scores"):
        donors = c["setup"].get("donors") or [c["donor"]]
        r = c["receiver"]
        assert c["overlap"]["donor"] == select.images_overlap(donors, 256, r, measured=256)
        assert c["overlap"]["pretext"] == select.images_overlap("digits_b", 256, r)
    pre = select.images_overlap("digits_b", 256, "digits")
    assert pre["train"] > 0 and pre["val"] > 0 and pre["test"] == 0
    assert select.images_overlap("digits_b", 256, "digits_a") == overlap.zero_counts()
    donor = overlap.add_counts([select.images_overlap("digits", 256, "digits_a"),
                                select.images_overlap("digits_a", 256, "digits")])  # fmt: skip
    text = rp.write_report(ext, tmp_path / "a")["summary"]
    lines = text.splitlines()

    def row(name):
        return next(ln for ln in lines if ln.startswith(f"| `{name}` |"))

    assert rs.SHARED_HEADER in text
    for m in ("kl", "agree", "cos"):
        assert row(f"proxy-pretext-{m}").endswith(
            f"| they hold receiver images for 1/3 receivers: {_counts_text(pre)} "
            "(NOT receiver-free) |"
        )
        assert row(f"proxy-donor-{m}").endswith(
            f"| they hold receiver images for 2/6 pairs: {_counts_text(donor)} "
            "(NOT receiver-free) |"
        )
        assert row(f"proxy-noise-{m}").endswith("| none |")
    assert row("lam=1").endswith("| none |") and row("norm-ratio").endswith("| none |")
    fixed = next(ln for ln in lines if ln.startswith("Fixed in advance"))
    assert f"1/3 receivers: {_counts_text(pre)} (NOT receiver-free)" in fixed
    # the merge rows' fixed strategy reads the same pretext images, and says so
    assert (
        f"`@ {grid.extras.DEFAULT_STRATEGY}` reads pretext train images in the merge rows" in text
    )
    # a grid stored before the cells carried counts reports the same, counted from names
    old = tmp_path / "old"
    shutil.copytree(ext, old)
    recs = [json.loads(x) for x in (old / "cells.jsonl").read_text().splitlines()]
    (old / "cells.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in c.items() if k != "overlap"}) + "\n" for c in recs)
    )
    assert not any("overlap" in c for c in GridStore(old).cells())
    assert rp.write_report(old, tmp_path / "b")["summary"] == text


def test_another_proxy_size_sizes_the_strategy_instead_of_naming_an_unknown_one(grids, tmp_path):
    for pretext, want in ((None, "proxy-donor64-kl:margin=0.2"),
                          ("digits_b", "proxy-pretext64-kl:margin=0.05")):  # fmt: skip
        assert grid.extras.Extras(proxy_n=64, pretext=pretext).strategy == want
    assert grid.extras.Extras(strategy="proxy-donor-agree", proxy_n=64).strategy == (
        "proxy-donor64-agree"
    )
    with pytest.raises(select.SelectError, match="'proxy-donor128-kl'"):  # the user's own name
        grid.extras.Extras(strategy="proxy-donor128-kl", proxy_n=64)
    # the CLI: the extras and the GPTQ rows run the same sized strategy
    argv = ["grid", "--tasks", ",".join(TASKS), "--workdir", "w", "--bits", "2", "--extras"]
    args = cli.build_parser().parse_args([*argv, "--gptq", "--proxy-size", "64"])
    ex = grid_cmds.extras_of(args)
    assert ex.strategy == "proxy-donor64-kl:margin=0.2" and ex.proxy_n == 64
    assert grid_cmds.gptq_of(args, ex).strategy == ex.strategy
    # end to end: the grid runs with 8 proxy images and reports its sized strategy
    runs, main, _ = grids
    work = tmp_path / "p8"
    shutil.copytree(main, work)
    cmd = ["grid", "--tasks", ",".join(TASKS), "--runs", str(runs), "--workdir", str(work),
           "--bits", "2", "--lambdas", "0.5,1", "--batch-size", "64", "--no-progress",
           "--extras", "--proxy-size", "8", "--merge-methods", "mean",
           "--pretext", "digits_b"]  # fmt: skip
    assert cli.main(cmd) == 0
    assert {c["setup"]["proxy_n"] for c in _cells(work, "scores")} == {8}
    summary = (work / "summary.md").read_text()
    assert "**`proxy-pretext8-kl:margin=0.05`**" in summary and "unknown" not in summary


def test_extras_options_without_extras_are_refused_naming_them(grids, tmp_path, capsys):
    runs, _, _ = grids
    base = ["grid", "--tasks", ",".join(TASKS), "--runs", runs, "--bits", "2", "--workdir"]
    before = snapshot(runs)
    for extra, says in [
        (["--strategy", "lam=1"], "--strategy applies with --extras or --gptq only"),
        (["--merge-methods", "mean"], "--merge-methods applies with --extras only"),
        (["--proxy-size", "8"], "--proxy-size applies with --extras only"),
        (["--gptq", "--proxy-size", "8"], "--proxy-size applies with --extras only"),
        (["--gptq", "--merge-methods", "mean"], "--merge-methods applies with --extras only"),
        (["--extras", "--strategy", "norm-ratio:multiple=1:multiple=2"],
         "constant 'multiple' is given twice"),
    ]:  # fmt: skip
        refused(capsys, tmp_path, [*base, tmp_path / "w", *extra], [says])
        assert not (tmp_path / "w").exists()
    assert snapshot(runs) == before


def test_report_refuses_a_strategy_the_grid_refuses(grids, tmp_path, capsys):
    _, _, ext = grids
    before = snapshot(ext)
    for name, says in [
        ("proxy-rx32-kl", "uses unlabelled receiver data"),
        ("proxy-pretext-kl:margin=0.1:margin=0.2", "constant 'margin' is given twice"),
        ("val-best", "unknown lambda strategy 'val-best'"),
    ]:
        argv = ["report", ext, "--out", tmp_path / "r", "--strategy", name]
        err = refused(capsys, tmp_path, argv, ["--strategy", says])
        assert name.split(":")[0] in err
        assert not (tmp_path / "r").exists()
    assert snapshot(ext) == before
    # a grid measured without pretext images: a pretext strategy is refused as grid refuses it
    cells = [c | {"setup": {**c["setup"], "pretext": None}} if c["kind"] == "scores" else c
             for c in GridStore(ext).cells()]  # fmt: skip
    main = [c for c in cells if c["kind"] in ("fp", "ptq_fp", "ptq_qat", "patch")]
    with pytest.raises(select.SelectError, match="reads pretext images: name the pretext"):
        rx.extras_metrics(cells, rp.compute_metrics(main), ext, "proxy-pretext-kl")
