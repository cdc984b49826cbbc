"""Metrics, tables and plots over the stored cells of a transfer grid.

Split by job: :mod:`~qvec_jax.report.metrics` (pure functions of the cell records that
:mod:`qvec_jax.grid.run` stores through :class:`qvec_jax.grid.store.GridStore`),
:mod:`~qvec_jax.report.markdown` (``summary.md`` and the printed headline) and
:mod:`~qvec_jax.report.plots` (heatmaps and curves). :func:`write_report` writes them
all. Accuracies and deltas are fractions in ``grid.csv``/``summary.json`` and
percentage points in ``summary.md`` and the plots.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from qvec_jax.files import atomic_write_text
from qvec_jax.grid.store import CELLS_FILE, GRID_META_FILE, SPLITS, GridStore, cell_key, lam_key
from qvec_jax.report.baselines import gptq_sections, needs_gives
from qvec_jax.report.checks import grid_checks, warning_lines
from qvec_jax.report.extras import (
    extras_json,
    extras_markdown,
    extras_metrics,
    measured_of,
    write_extras_figures,
)
from qvec_jax.report.markdown import headline, report_status, summary_markdown
from qvec_jax.report.metrics import (
    BASELINE_KINDS,
    CURVE,
    LAMBDA_BEST,
    ZERO_SHOT,
    choose_lambda_best,
    compute_metrics,
    jsonable,
    recovery,
    tidy_rows,
)
from qvec_jax.report.plots import FIGURES, plot_curves, plot_heatmap, write_figures
from qvec_jax.report.tune import TuneError, tune_markdown, tune_strategies

__all__ = [
    "BASELINE_KINDS",
    "CELLS_FILE",
    "CSV_COLUMNS",
    "CURVE",
    "GRID_META_FILE",
    "LAMBDA_BEST",
    "SPLITS",
    "ZERO_SHOT",
    "cell_key",
    "choose_lambda_best",
    "compute_metrics",
    "headline",
    "lam_key",
    "load_cells",
    "load_grid_meta",
    "plot_curves",
    "plot_heatmap",
    "recovery",
    "report_status",
    "summary_markdown",
    "tidy_rows",
    "tune_grid",
    "TuneError",
    "write_report",
]

CSV_COLUMNS = [
    "kind",
    "donor",
    "receiver",
    "lam",
    "self",
    "split",
    "acc",
    "n",
    "base_acc",
    "delta",
    "ceiling",
    "recovery",
    "is_lambda_best",
    "bits",
    "granularity",
]


def load_cells(workdir: str | os.PathLike) -> list[dict]:
    """The stored cells of a grid workdir (see :meth:`GridStore.cells`)."""
    return GridStore(workdir).cells()


def load_grid_meta(workdir: str | os.PathLike) -> dict:
    """The ``grid.json`` of a grid workdir (``{}`` if none; see :meth:`GridStore.meta`)."""
    return GridStore(workdir).meta()


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _grid(workdir, every=None) -> tuple[GridStore, dict, list[dict], list[dict], dict]:
    """``(store, meta, every cell, the RTN grid's cells, their metrics)`` of a workdir
    (``every``: its cells when the caller already holds them)."""
    store = GridStore(workdir)
    if not store.exists():
        raise FileNotFoundError(
            f"{store.workdir} holds no {CELLS_FILE} or {GRID_META_FILE}; pass the grid workdir "
            "written by `qvec grid` (or run `qvec grid` first)"
        )
    meta, every = store.meta(), store.cells() if every is None else every
    # the RTN grid's cells; other kinds (GPTQ, ...) have sections of their own
    cells = [c for c in every if c["kind"] in (*BASELINE_KINDS, "patch")]
    metrics = compute_metrics(cells, tasks=meta.get("tasks"), lambdas=meta.get("lambdas"))
    return store, meta, every, cells, metrics


def tune_grid(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Tune the lambda strategies' constants on a DEV grid (:mod:`qvec_jax.report.tune`)
    and write ``tune.md`` and ``tune.json`` (atomically) into ``out_dir`` (default: the
    workdir). Refuses a grid labelled as the test task set, one whose tasks include a
    test-set view, and an incomplete one (``report.checks``). Returns the dict of
    ``tune_strategies``, with ``"paths"``."""
    store, meta, every, _, metrics = _grid(workdir)
    result = tune_strategies(every, metrics, measured_of(every), meta)
    out = Path(out_dir) if out_dir else store.workdir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"tune_md": out / "tune.md", "tune_json": out / "tune.json"}
    atomic_write_text(paths["tune_md"], tune_markdown(result))
    slim = {k: v for k, v in result.items() if k not in ("rows", "lam1", "lambda_best")}
    rows = [{k: r.get(k) for k in ("name", "data", "stats", "overlap")} for r in result["rows"]]
    js = slim | {"lam1": result["lam1"]["stats"], "rows": rows}
    atomic_write_text(paths["tune_json"], json.dumps(js, indent=1) + "\n")
    return result | {"paths": paths}


def write_report(
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    cells: list[dict] | None = None,
    extras: bool = True,
    strategy: str | None = None,
) -> dict:
    """Regenerate every report file of a grid workdir from its stored cells.

    Writes (atomically) ``grid.csv``, ``summary.md``, ``summary.json``,
    ``heatmap_delta_lambda1.png``, ``heatmap_delta_lambda_best.png``,
    ``heatmap_recovery.png`` and ``lambda_curves.png`` into ``out_dir`` (default: the
    workdir). ``cells``: the grid's cells when the caller already holds them (as
    :func:`qvec_jax.grid.run.run_grid` returns them); read from the workdir otherwise.
    ``extras``: add the lambda-strategy and merge sections (and
    ``heatmap_delta_strategy.png``) when the grid has their cells (``report.extras``;
    ``strategy``: the fixed strategy they use, default the grid's).
    Returns ``{"paths": {name: Path}, "summary": markdown text, "metrics": ...,
    "warnings": lines}``; :func:`headline` of the metrics is what to print after a run,
    with the ``warnings`` (an incomplete grid, test-set tasks: ``report.checks``) before
    it, as ``summary.md`` opens with them.
    """
    store, meta, every, cells, metrics = _grid(workdir, cells)
    warnings = warning_lines(grid_checks(meta, metrics))
    needs = needs_gives(every, metrics)
    em = extras_metrics(every, metrics, store.workdir, strategy) if extras else None
    out = Path(out_dir) if out_dir else store.workdir  # made once the inputs are checked
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "grid_csv": out / "grid.csv",
        "summary_md": out / "summary.md",
        "summary_json": out / "summary.json",
        **{name: out / f"{name}.png" for name in FIGURES},
    }
    atomic_write_text(paths["grid_csv"], _csv_text(tidy_rows(cells, metrics, meta)))
    more = [*gptq_sections(every, metrics, needs), *extras_markdown(em)]
    summary = summary_markdown(metrics, meta, more, warnings)
    atomic_write_text(paths["summary_md"], summary)
    js_obj = jsonable(metrics, meta) | ({"needs_gives": needs} if needs else {}) | extras_json(em)
    js_obj |= {"warnings": warnings} if warnings else {}
    js = json.dumps(js_obj, indent=1, default=str) + "\n"
    atomic_write_text(paths["summary_json"], js)
    write_figures(metrics, meta, paths)
    paths |= write_extras_figures(em, metrics, meta, out)
    return {"paths": paths, "summary": summary, "metrics": metrics, "warnings": warnings}
