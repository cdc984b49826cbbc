"""The grid's ``summary.md`` and its headline: markdown tables over the metrics.

Accuracies and deltas are shown in percentage points, recoveries as ratios; ``n/a``
marks an undefined number. :func:`headline` is the zero-shot and lambda_best tables
exactly as they appear in ``summary.md``, for printing after a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qvec_jax.report.metrics import BASELINE_KINDS, CURVE, LAMBDA_BEST, ZERO_SHOT

_STAT_HEADER = [
    "win rate (delta>0)",
    "mean delta",
    "median delta",
    "mean recovery",
    "median recovery",
    "pairs with recovery",
]


def _pts(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:g}"


def _rate(s: dict) -> str:
    if not s["n_pairs"]:
        return "n/a"
    return f"{s['wins']}/{s['n_pairs']} ({100 * s['win_rate']:.1f}%)"


def _acc_pair(acc: dict | None) -> str:
    if not acc:
        return "n/a"
    return f"{_pts(acc.get('test'))} ({_pts(acc.get('val'))})"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _stat_cells(s: dict) -> list[str]:
    return [
        _rate(s),
        _pts(s["mean_delta"], True),
        _pts(s["median_delta"], True),
        _ratio(s["mean_recovery"]),
        _ratio(s["median_recovery"]),
        f"{s['n_recovery']}/{s['n_pairs']}",
    ]


def mode_table(metrics: dict, mode: str) -> str:
    """The one-row table of a lambda mode (``ZERO_SHOT`` or ``LAMBDA_BEST``)."""
    s = metrics["modes"][mode]
    if mode == LAMBDA_BEST:
        header = ["lambda mode", *_STAT_HEADER, "median lambda_best"]
        return table(header, [[mode, *_stat_cells(s), _num(s["median_lambda_best"])]])
    return table(["lambda mode", *_STAT_HEADER], [[mode, *_stat_cells(s)]])


def headline(metrics: dict) -> str:
    """The zero-shot and lambda_best tables of ``summary.md``, from the metrics."""
    return "\n\n".join(mode_table(metrics, m) for m in (ZERO_SHOT, LAMBDA_BEST)) + "\n"


def report_status(metrics: dict) -> dict[str, Any]:
    """The headline numbers (zero-shot and lambda_best) as the cells of their tables."""
    z, b = metrics["modes"][ZERO_SHOT], metrics["modes"][LAMBDA_BEST]
    return {ZERO_SHOT: _stat_cells(z), LAMBDA_BEST: _stat_cells(b)}


# ----------------------------------------------------------------------------- sections


def _intro(metrics: dict, meta: dict) -> list[str]:
    tasks, lambdas = metrics["tasks"], metrics["lambdas"]
    bits, gran = meta.get("bits", "?"), meta.get("granularity", "?")
    lines = [
        "# Quantization-vector transfer grid",
        "",
        f"Weights quantized to **{bits}-bit {gran}** round-to-nearest (PTQ) after patching "
        "`FP_R + lambda * QV_D`, with `QV_D = QAT_D - FP_D` (head excluded).",
        "Accuracies in %, deltas in percentage points vs `PTQ(FP_R)` on the receiver's "
        "**test** split; recovery = delta / ceiling (ceiling = self pair at lambda=1), "
        "undefined when the ceiling is <= 0. Statistics are over cross-task pairs (D != R).",
        "",
        f"Tasks ({len(tasks)}): {', '.join(tasks)}. Lambda grid: "
        f"{', '.join(f'{lam:g}' for lam in lambdas)}.",
    ]
    if meta.get("compute_dtype"):  # only when not float32 (grid.json omits the default)
        dt = meta["compute_dtype"]
        lines.append(f"Model compute: **{dt}** (params, QVs and PTQ in float32).")
    if meta.get("task_set"):  # qvec demo's set (issue 12): which tasks these are
        ts = meta["task_set"]
        lines.append(f"Task set: **{ts['name']}** ({ts['about']}).")
    expected = meta.get("expected_cells")
    if expected:
        present = metrics["n_cells_in_grid"]
        state = "complete" if present >= expected else "**incomplete**"
        lines.append(f"Cells: {present} of {expected} ({state}).")
    return lines


def _missing_and_warnings(meta: dict) -> list[str]:
    missing = meta.get("missing") or []
    lines = ["", "## Missing checkpoints", ""]
    if missing:
        lines.append(
            "These were requested but not found; every cell needing them is absent "
            "from all tables below:"
        )
        lines.append("")
        lines += [f"- `{m['task']}` {m['mode']}: {m['path']} ({m['reason']})" for m in missing]
    else:
        lines.append("None: every requested task has its FP and QAT checkpoints.")
    if meta.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in meta["warnings"]]
    return lines


def _mode_sections(metrics: dict) -> list[str]:
    curve = metrics["modes"][CURVE]
    return [
        "",
        f"## {ZERO_SHOT}",
        "",
        "No receiver data is used: lambda is fixed at 1.",
        "",
        mode_table(metrics, ZERO_SHOT),
        "",
        f"## {LAMBDA_BEST}",
        "",
        "Lambda is the argmax of post-PTQ accuracy on the receiver's **val** split "
        "(so this uses receiver data and is not zero-shot); the delta is read on test.",
        "",
        mode_table(metrics, LAMBDA_BEST),
        "",
        f"## {CURVE}",
        "",
        "Every lambda of the grid, each applied to every pair (test split).",
        "",
        table(
            ["lambda", *_STAT_HEADER], [[f"{lam:g}", *_stat_cells(s)] for lam, s in curve.items()]
        ),
    ]


def _baseline_section(metrics: dict) -> list[str]:
    rows = []
    for r in metrics["tasks"]:
        b, rs = metrics["baselines"][r], metrics["receivers"][r]
        rows.append(
            [
                f"`{r}`",
                *[_acc_pair(b.get(k)) for k in BASELINE_KINDS],
                _pts(b["ceiling"], True),
                _rate(rs),
                _pts(rs["mean_delta"], True),
            ]
        )
    header = ["receiver", "FP", "PTQ(FP)", "PTQ(QAT)", "ceiling"]
    header += ["wins @ lambda=1", "mean delta @ lambda=1"]
    return [
        "",
        "## Per-receiver baselines",
        "",
        "Test accuracy (val in parentheses). Ceiling = `PTQ(FP_R + QV_R) - PTQ(FP_R)` "
        "(self pair at lambda=1). Cross-task columns: this receiver under the other donors "
        "at lambda=1.",
        "",
        table(header, rows),
    ]


def _donor_section(metrics: dict) -> list[str]:
    rows = [
        [f"`{d}`", _rate(s), _pts(s["mean_delta"], True), _pts(s["median_delta"], True)]
        for d, s in metrics["donors"].items()
    ]
    return [
        "",
        "## Per-donor transfer at lambda=1 (zero-shot)",
        "",
        table(["donor", "wins", "mean delta", "median delta"], rows),
    ]


def _matrix_section(metrics: dict) -> list[str]:
    tasks = metrics["tasks"]
    if len(tasks) > 30:
        return []
    rows = []
    for d in tasks:
        row = [f"`{d}`"]
        for r in tasks:
            p = metrics["pairs"].get((d, r))
            row.append(_pts(p["delta_1"], True) if p else "-")
        rows.append(row)
    return [
        "",
        f"## Delta matrix, {ZERO_SHOT} (test, points; rows donor, columns receiver; "
        "diagonal = ceiling)",
        "",
        table(["donor \\ receiver", *[f"`{r}`" for r in tasks]], rows),
    ]


def summary_markdown(
    metrics: dict, meta: dict | None = None, extra: Sequence[str] = (), warnings=()
) -> str:
    """The human summary: one table per lambda mode, baselines, donors, missing tasks.
    ``extra``: lines of further sections (e.g. ``report.baselines.gptq_sections``), placed
    after the RTN grid's; without them the summary is the RTN grid's alone. ``warnings``:
    what the numbers cannot be trusted for (``report.checks``), right below the title."""
    meta = meta or {}
    lines = _intro(metrics, meta)
    loud = [ln for w in warnings for ln in ("", f"> **WARNING: {w}.**")]
    lines = lines[:1] + loud + lines[1:] + _missing_and_warnings(meta) + _mode_sections(metrics)
    lines += _baseline_section(metrics) + _donor_section(metrics) + _matrix_section(metrics)
    return "\n".join(lines + list(extra)) + "\n"
