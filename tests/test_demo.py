"""End to end: `qvec demo --quick` writes every report file, and summary.md agrees with
grid.csv; the README's example and the two notebooks that read the demo run on it."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from test_notebooks import run_notebook

from qvec_jax import checkpoints, cli, demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", "--quick", "--no-progress", "--workdir", str(workdir)])
    assert rc == 0
    return workdir


def _rows(workdir):
    with open(workdir / "grid" / "grid.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_stage_and_report_file_exists(quick_demo):
    info = json.loads((quick_demo / "demo.json").read_text())
    for t in info["tasks"]:
        for mode in ("fp", "qat"):
            assert checkpoints.meta_file(quick_demo / "runs" / t / mode / "params").is_file()
            assert (quick_demo / "runs" / t / mode / "results.json").is_file()
    report = {k: Path(v) for k, v in info["report"].items()}
    assert {
        "grid_csv",
        "summary_md",
        "heatmap_delta_lambda1",
        "heatmap_delta_lambda_best",
        "heatmap_recovery",
        "lambda_curves",
    } <= set(report)
    for name, path in report.items():
        assert path.parent == quick_demo / "grid", name
        assert path.is_file() and path.stat().st_size > 0, name
    assert set(info["seconds"]) == {"pretext", "finetune", "grid", "report"}


@pytest.mark.slow
def test_summary_matches_grid_csv(quick_demo):
    rows = [r for r in _rows(quick_demo) if r["split"] == "test"]
    cross = [
        r
        for r in rows
        if r["kind"] == "patch" and r["donor"] != r["receiver"] and float(r["lam"]) == 1.0
    ]
    assert cross, "no cross-task cells at lambda=1"
    wins = sum(float(r["delta"]) > 0 for r in cross)
    summary = (quick_demo / "grid" / "summary.md").read_text()
    zero_shot = next(line for line in summary.splitlines() if line.startswith("| lambda=1"))
    assert f"{wins}/{len(cross)}" in zero_shot
    mean_delta = sum(float(r["delta"]) for r in cross) / len(cross) * 100
    assert f"{mean_delta:+.1f}".lstrip("+") in zero_shot.replace("+", "")

    # per-receiver baselines: test accuracy in points, as in grid.csv
    for r in rows:
        if r["kind"] in ("fp", "ptq_fp", "ptq_qat"):
            pts = f"{float(r['acc']) * 100:.1f}"
            line = next(ln for ln in summary.splitlines() if ln.startswith(f"| `{r['receiver']}`"))
            assert re.search(rf"\| {re.escape(pts)} \(", line), (r, line)


@pytest.mark.slow
def test_rerun_resumes_without_recomputing(quick_demo):
    before = (quick_demo / "grid" / "cells.jsonl").read_text()
    out = demo.run_demo(quick_demo, quick=True, progress=False)
    assert (quick_demo / "grid" / "cells.jsonl").read_text() == before
    assert out["seconds"]["grid"] < 30


def test_unavailable_demo_tasks_fall_back_to_digits_and_say_so(tmp_path, monkeypatch):
    from qvec_jax.config import load_config

    monkeypatch.setenv("QVEC_DATA_DIR", str(tmp_path))  # no TFDS data here
    cfg = load_config(demo.CONFIG, ["demo.dev_tasks=cifar10,digits"])
    chosen = demo.choose_tasks(cfg, "dev")
    assert (chosen.pretext, chosen.pretext_epochs) == (
        cfg.demo.fallback_pretext_task,
        cfg.demo.fallback_pretext_epochs,
    )
    assert chosen.tasks == cfg.demo.fallback_dev_tasks.split(",")
    assert "cifar10" in chosen.note and "dataset-fashion-mnist" in chosen.note

    cfg = load_config(demo.CONFIG, ["demo.fallback_dev_tasks=cifar10"])
    cfg.demo.dev_tasks = "cifar10"
    with pytest.raises(FileNotFoundError, match="cifar10"):
        demo.choose_tasks(cfg, "dev")


@pytest.mark.slow
def test_readme_method_example_runs(quick_demo):
    """The README's 15-line example, on the quick demo's checkpoints (other task names)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## The method in 15 lines\n.*?```python\n(.*?)```", readme, re.S).group(1)
    code = (
        code.replace("runs/demo-dev/", f"{quick_demo}/")
        .replace("/fmnist_a/", "/digits_rot90/")
        .replace("/digits/", "/digits_inv/")
    )
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # the snippet asserts dequantize == ptq
    q = ns["q"]
    assert q.size_report(ns["patched"], bits=2)["compression"] > 4
    assert set(q.flatten(ns["qv"])) < set(q.flatten(ns["fp_d"]))  # the head is left out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_transfer_grid.ipynb"])
def test_notebook_runs_on_the_quick_demo(name, quick_demo, monkeypatch, tmp_path):
    env = {"QVEC_NB_QUICK": "1", "QVEC_NB_WORKDIR": str(quick_demo)}
    run_notebook(name, env, monkeypatch, tmp_path)  # run_demo inside reuses every stage
    if name == "02_transfer_grid.ipynb":
        assert (quick_demo / "grid_small" / "summary.md").is_file()
