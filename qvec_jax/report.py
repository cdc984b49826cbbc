"""Metrics, tables and plots over the stored cells of a transfer grid.

Pure functions over the cell records that :mod:`qvec_jax.transfer` appends to
``cells.jsonl`` (one JSON object per line)::

    {"kind": "fp" | "ptq_fp" | "ptq_qat" | "patch", "receiver": R,
     "donor": D or None, "lam": float or None, "acc": {"val": a, "test": b},
     "n": {"val": n, "test": m}, ...}

Metrics follow METHOD.md exactly. Accuracies are post-PTQ on the receiver:

- ``delta(D, R, lam) = acc(PTQ(FP_R + lam * QV_D)) - acc(PTQ(FP_R))``;
- ``ceiling(R)`` is the self pair at ``lam = 1`` (``D == R``);
- ``recovery = delta / ceiling``, undefined (None) when ``ceiling <= 0``;
- a win is ``delta > 0``; win rate, mean and median are over cross-task pairs.

Three lambda modes, always labelled: ``lambda=1`` (zero-shot, no receiver data),
``lambda_best`` (argmax of the receiver's *val* accuracy, read on test: uses receiver
data; ties go to the lambda closest to 1, then the smaller one) and the full curve.

Accuracies and deltas are fractions in ``grid.csv``/``summary.json`` and percentage
points in ``summary.md`` and the plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

ZERO_SHOT = "lambda=1 (zero-shot)"
LAMBDA_BEST = "lambda_best (chosen on receiver val: uses receiver data)"
CURVE = "full lambda curve"
BASELINE_KINDS = ("fp", "ptq_fp", "ptq_qat")
SPLITS = ("val", "test")
CELLS_FILE = "cells.jsonl"
GRID_META_FILE = "grid.json"

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


# ----------------------------------------------------------------------------- cells


def lam_key(lam: float | None) -> str:
    """Canonical string for a lambda value (stable across float round trips)."""
    return "" if lam is None else f"{float(lam):.6g}"


def cell_key(cell: dict) -> tuple[str, str, str, str]:
    """Identity of a cell: (kind, donor, receiver, lambda)."""
    return (cell["kind"], cell.get("donor") or "", cell["receiver"], lam_key(cell.get("lam")))


def load_cells(workdir: str | os.PathLike) -> list[dict]:
    """Read ``cells.jsonl``; a later record with the same key replaces an earlier one.

    A truncated last line (a run killed mid-write) is ignored; any other bad line is
    an error naming the file and line.
    """
    path = Path(workdir) / CELLS_FILE
    if not path.exists():
        return []
    cells: dict[tuple, dict] = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            cell = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # interrupted append: the cell will simply be recomputed
                continue
            raise ValueError(f"{path}:{i}: not a JSON cell record ({e}); fix or delete it") from e
        cells[cell_key(cell)] = cell
    return list(cells.values())


def load_grid_meta(workdir: str | os.PathLike) -> dict:
    path = Path(workdir) / GRID_META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------------- metrics


def _stats(deltas: list[float], recoveries: list[float]) -> dict:
    n = len(deltas)
    wins = sum(d > 0 for d in deltas)
    return {
        "n_pairs": n,
        "wins": wins,
        "win_rate": wins / n if n else None,
        "mean_delta": statistics.fmean(deltas) if n else None,
        "median_delta": statistics.median(deltas) if n else None,
        "n_recovery": len(recoveries),
        "mean_recovery": statistics.fmean(recoveries) if recoveries else None,
        "median_recovery": statistics.median(recoveries) if recoveries else None,
    }


def recovery(delta: float | None, ceiling: float | None) -> float | None:
    """``delta / ceiling``; None (undefined) when either is missing or ``ceiling <= 0``."""
    if delta is None or ceiling is None or ceiling <= 0:
        return None
    return delta / ceiling


def choose_lambda_best(val_acc: dict[float, float]) -> float | None:
    """Argmax of val accuracy over lambdas; ties go to the lambda closest to 1, then smaller."""
    if not val_acc:
        return None
    best = max(val_acc.values())
    tied = [lam for lam, a in val_acc.items() if a == best]
    return min(tied, key=lambda lam: (round(abs(lam - 1.0), 9), lam))


def compute_metrics(
    cells: list[dict], *, tasks: list[str] | None = None, lambdas: list[float] | None = None
) -> dict:
    """All derived numbers of a grid, as plain dicts (fractions, not points).

    Returns ``{"tasks", "lambdas", "baselines", "pairs", "modes", "donors",
    "receivers", "n_cells"}``. ``pairs[(D, R)]`` holds the curve (per lambda: val/test
    acc and delta), ``lambda_best`` and the deltas/recoveries at lambda=1 and at
    lambda_best (all on test). ``modes`` holds the cross-task summary statistics per
    lambda mode (the curve mode is keyed by lambda).
    """
    base: dict[str, dict[str, dict[str, float]]] = {}
    patch: dict[tuple[str, str], dict[float, dict[str, float]]] = {}
    for c in cells:
        if c["kind"] in BASELINE_KINDS:
            base.setdefault(c["receiver"], {})[c["kind"]] = dict(c["acc"])
        elif c["kind"] == "patch":
            patch.setdefault((c["donor"], c["receiver"]), {})[float(c["lam"])] = dict(c["acc"])
        else:
            raise ValueError(f"unknown cell kind {c['kind']!r} in {c}")
    seen = sorted({r for r in base} | {t for pair in patch for t in pair})
    tasks = list(tasks) if tasks else seen
    asked_tasks, asked_lams = set(tasks), set(lambdas or [])
    tasks += [t for t in seen if t not in tasks]
    lam_seen = sorted({lam for curve in patch.values() for lam in curve})
    lambdas = sorted(set(lambdas or []) | set(lam_seen))
    asked_lams = asked_lams or set(lambdas)

    def delta(receiver: str, acc: dict, split: str) -> float | None:
        b = base.get(receiver, {}).get("ptq_fp", {}).get(split)
        a = acc.get(split)
        return None if a is None or b is None else a - b

    baselines: dict[str, dict] = {}
    for r in tasks:
        b = base.get(r, {})
        self1 = patch.get((r, r), {}).get(1.0, {})
        baselines[r] = {
            **{k: b.get(k) for k in BASELINE_KINDS},
            "ceiling": delta(r, self1, "test"),
            "ceiling_val": delta(r, self1, "val"),
        }

    pairs: dict[tuple[str, str], dict] = {}
    for (d, r), curve in patch.items():
        ceiling = baselines.get(r, {}).get("ceiling")
        points = {
            lam: {
                "val": acc.get("val"),
                "test": acc.get("test"),
                "delta": delta(r, acc, "test"),
                "delta_val": delta(r, acc, "val"),
            }
            for lam, acc in sorted(curve.items())
        }
        val_acc = {lam: p["val"] for lam, p in points.items() if p["val"] is not None}
        lam_best = choose_lambda_best(val_acc)
        d1 = points.get(1.0, {}).get("delta")
        dbest = points[lam_best]["delta"] if lam_best is not None else None
        pairs[(d, r)] = {
            "donor": d,
            "receiver": r,
            "self": d == r,
            "curve": points,
            "complete": all(lam in points for lam in lambdas),
            "lambda_best": lam_best,
            "delta_1": d1,
            "delta_best": dbest,
            "recovery_1": recovery(d1, ceiling),
            "recovery_best": recovery(dbest, ceiling),
        }

    cross = [p for p in pairs.values() if not p["self"]]

    def mode_stats(get_delta, get_rec) -> dict:
        ds = [get_delta(p) for p in cross]
        keep = [(dd, get_rec(p)) for p, dd in zip(cross, ds) if dd is not None]
        return _stats([dd for dd, _ in keep], [rr for _, rr in keep if rr is not None])

    zero = mode_stats(lambda p: p["delta_1"], lambda p: p["recovery_1"])
    best = mode_stats(lambda p: p["delta_best"], lambda p: p["recovery_best"])
    lbs = [p["lambda_best"] for p in cross if p["lambda_best"] is not None]
    best["median_lambda_best"] = statistics.median(lbs) if lbs else None
    curve_stats = {}
    for lam in lambdas:

        def at(p, lam=lam):
            return p["curve"].get(lam, {}).get("delta")

        curve_stats[lam] = mode_stats(
            at, lambda p, lam=lam: recovery(at(p), baselines.get(p["receiver"], {}).get("ceiling"))
        )

    def group(key: str) -> dict[str, dict]:
        out = {}
        for t in tasks:
            ps = [p for p in cross if p[key] == t and p["delta_1"] is not None]
            out[t] = _stats([p["delta_1"] for p in ps], [])
        return out

    return {
        "tasks": tasks,
        "lambdas": lambdas,
        "baselines": baselines,
        "pairs": pairs,
        "modes": {ZERO_SHOT: zero, LAMBDA_BEST: best, CURVE: curve_stats},
        "donors": group("donor"),
        "receivers": group("receiver"),
        "n_cells": len(cells),
        "n_cells_in_grid": sum(
            c["receiver"] in asked_tasks
            and (
                c["kind"] != "patch"
                or (c["donor"] in asked_tasks and float(c["lam"]) in asked_lams)
            )
            for c in cells
        ),
    }


def tidy_rows(cells: list[dict], metrics: dict, meta: dict | None = None) -> list[dict]:
    """One row per cell and split, with base accuracy, delta, ceiling and recovery."""
    meta = meta or {}
    rows = []
    order = {k: i for i, k in enumerate(BASELINE_KINDS + ("patch",))}
    for c in sorted(cells, key=lambda c: (c["receiver"], order[c["kind"]], cell_key(c))):
        r = c["receiver"]
        b = metrics["baselines"].get(r, {})
        pair = metrics["pairs"].get((c.get("donor"), r)) if c["kind"] == "patch" else None
        for split in SPLITS:
            acc = c["acc"].get(split)
            if acc is None:
                continue
            base_acc = (b.get("ptq_fp") or {}).get(split)
            ceiling = b.get("ceiling") if split == "test" else b.get("ceiling_val")
            d = acc - base_acc if (pair is not None and base_acc is not None) else None
            rows.append(
                {
                    "kind": c["kind"],
                    "donor": c.get("donor") or "",
                    "receiver": r,
                    "lam": "" if c.get("lam") is None else float(c["lam"]),
                    "self": "" if pair is None else pair["self"],
                    "split": split,
                    "acc": acc,
                    "n": c.get("n", {}).get(split, ""),
                    "base_acc": "" if base_acc is None else base_acc,
                    "delta": "" if d is None else d,
                    "ceiling": "" if pair is None or ceiling is None else ceiling,
                    "recovery": _blank(recovery(d, ceiling)) if pair is not None else "",
                    "is_lambda_best": ""
                    if pair is None
                    else float(c["lam"]) == pair["lambda_best"],
                    "bits": c.get("bits", meta.get("bits", "")),
                    "granularity": c.get("granularity", meta.get("granularity", "")),
                }
            )
    return rows


def _blank(x):
    return "" if x is None else x


# ----------------------------------------------------------------------------- markdown


def _pts(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _rate(s: dict) -> str:
    if not s["n_pairs"]:
        return "n/a"
    return f"{s['wins']}/{s['n_pairs']} ({100 * s['win_rate']:.1f}%)"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


_STAT_HEADER = [
    "win rate (delta>0)",
    "mean delta",
    "median delta",
    "mean recovery",
    "median recovery",
    "pairs with recovery",
]


def _stat_cells(s: dict) -> list[str]:
    return [
        _rate(s),
        _pts(s["mean_delta"], True),
        _pts(s["median_delta"], True),
        _ratio(s["mean_recovery"]),
        _ratio(s["median_recovery"]),
        f"{s['n_recovery']}/{s['n_pairs']}",
    ]


def summary_markdown(metrics: dict, meta: dict | None = None) -> str:
    """The human summary: one table per lambda mode, baselines, donors, missing tasks."""
    meta = meta or {}
    tasks, lambdas = metrics["tasks"], metrics["lambdas"]
    bits, gran = meta.get("bits", "?"), meta.get("granularity", "?")
    modes = metrics["modes"]
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
    expected = meta.get("expected_cells")
    if expected:
        present = metrics["n_cells_in_grid"]
        state = "complete" if present >= expected else "**incomplete**"
        lines.append(f"Cells: {present} of {expected} ({state}).")
    missing = meta.get("missing") or []
    lines += ["", "## Missing checkpoints", ""]
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
    lines += [
        "",
        f"## {ZERO_SHOT}",
        "",
        "No receiver data is used: lambda is fixed at 1.",
        "",
        _table(["lambda mode", *_STAT_HEADER], [[ZERO_SHOT, *_stat_cells(modes[ZERO_SHOT])]]),
        "",
        f"## {LAMBDA_BEST}",
        "",
        "Lambda is the argmax of post-PTQ accuracy on the receiver's **val** split "
        "(so this uses receiver data and is not zero-shot); the delta is read on test.",
        "",
        _table(
            ["lambda mode", *_STAT_HEADER, "median lambda_best"],
            [
                [
                    LAMBDA_BEST,
                    *_stat_cells(modes[LAMBDA_BEST]),
                    _num(modes[LAMBDA_BEST]["median_lambda_best"]),
                ]
            ],
        ),
        "",
        f"## {CURVE}",
        "",
        "Every lambda of the grid, each applied to every pair (test split).",
        "",
        _table(
            ["lambda", *_STAT_HEADER],
            [[f"{lam:g}", *_stat_cells(s)] for lam, s in modes[CURVE].items()],
        ),
        "",
        "## Per-receiver baselines",
        "",
        "Test accuracy (val in parentheses). Ceiling = `PTQ(FP_R + QV_R) - PTQ(FP_R)` "
        "(self pair at lambda=1). Cross-task columns: this receiver under the other donors "
        "at lambda=1.",
        "",
    ]
    rows = []
    for r in tasks:
        b = metrics["baselines"][r]
        rs = metrics["receivers"][r]
        rows.append(
            [
                f"`{r}`",
                *[_acc_pair(b.get(k)) for k in BASELINE_KINDS],
                _pts(b["ceiling"], True),
                _rate(rs),
                _pts(rs["mean_delta"], True),
            ]
        )
    lines.append(
        _table(
            [
                "receiver",
                "FP",
                "PTQ(FP)",
                "PTQ(QAT)",
                "ceiling",
                "wins @ lambda=1",
                "mean delta @ lambda=1",
            ],
            rows,
        )
    )
    lines += ["", "## Per-donor transfer at lambda=1 (zero-shot)", ""]
    lines.append(
        _table(
            ["donor", "wins", "mean delta", "median delta"],
            [
                [
                    f"`{d}`",
                    _rate(s),
                    _pts(s["mean_delta"], True),
                    _pts(s["median_delta"], True),
                ]
                for d, s in metrics["donors"].items()
            ],
        )
    )
    if len(tasks) <= 30:
        lines += [
            "",
            f"## Delta matrix, {ZERO_SHOT} (test, points; rows donor, columns receiver; "
            "diagonal = ceiling)",
            "",
        ]
        mrows = []
        for d in tasks:
            row = [f"`{d}`"]
            for r in tasks:
                p = metrics["pairs"].get((d, r))
                row.append(_pts(p["delta_1"], True) if p else "-")
            mrows.append(row)
        lines.append(_table(["donor \\ receiver", *[f"`{r}`" for r in tasks]], mrows))
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:g}"


def _acc_pair(acc: dict | None) -> str:
    if not acc:
        return "n/a"
    return f"{_pts(acc.get('test'))} ({_pts(acc.get('val'))})"


# ----------------------------------------------------------------------------- plots


def _matrix(metrics: dict, value) -> list[list[float]]:
    tasks = metrics["tasks"]
    nan = float("nan")
    out = []
    for d in tasks:
        row = []
        for r in tasks:
            p = metrics["pairs"].get((d, r))
            v = value(p) if p else None
            row.append(nan if v is None else v)
        out.append(row)
    return out


def _matrix_notes(metrics: dict) -> list[list[str]]:
    tasks, pairs = metrics["tasks"], metrics["pairs"]
    return [
        [
            f"λ={pairs[(d, r)]['lambda_best']:g}"
            if pairs.get((d, r)) and pairs[(d, r)]["lambda_best"] is not None
            else ""
            for r in tasks
        ]
        for d in tasks
    ]


def plot_heatmap(
    matrix: list[list[float]],
    tasks: list[str],
    path: Path,
    *,
    title: str,
    fmt: str,
    cbar_label: str,
    missing: dict[str, str] | None = None,
    limit: float | None = None,
    notes: list[list[str]] | None = None,
) -> Path:
    """Donor (rows) x receiver (columns) heatmap, diverging colormap centred at 0.

    ``missing`` maps a task to a label suffix (e.g. "no QAT"); ``notes`` adds a small
    second line to each cell (e.g. the chosen lambda).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    m = np.array(matrix, dtype=float)
    n = len(tasks)
    finite = np.abs(m[np.isfinite(m)])
    lim = limit or (float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    size = max(5.8, 0.62 * n + 2.6)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-lim, vmax=lim)
    missing = missing or {}
    labels = [f"{t} ({missing[t]})" if t in missing else t for t in tasks]
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("receiver R")
    ax.set_ylabel("donor D (QV_D)")
    fontsize = 10 if n <= 8 else (8 if n <= 14 else 6)
    for i in range(n):
        for j in range(n):
            v = m[i, j]
            if not np.isfinite(v):
                text, color = ("" if tasks[i] in missing and i != j else "n/a"), "#555555"
            else:
                text = fmt.format(v)
                if not text.lstrip("+-").strip("0."):  # "-0.0" / "+0.00": no sign on zero
                    text = text.lstrip("+-")
                if notes and notes[i][j]:
                    text += "\n" + notes[i][j]
                color = "white" if abs(v) > 0.6 * lim else "black"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color=color,
                linespacing=1.1,
            )
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, lw=2.0, ec="black"))
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(cbar_label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def plot_curves(metrics: dict, path: Path, *, title_suffix: str = "") -> Path:
    """Per-receiver delta-vs-lambda curves (one line per donor) plus the cross-task mean.

    One shared legend: a colour per donor, the self pair dashed black, a star at each
    pair's lambda_best (chosen on the receiver's val split).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tasks = [t for t in metrics["tasks"] if any(p[1] == t for p in metrics["pairs"])]
    n = len(tasks) + 1
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.9 * cols + 2.2, 3.0 * rows + 0.8), squeeze=False
    )
    donors = [d for d in metrics["tasks"] if any(p[0] == d for p in metrics["pairs"])]
    cmap = plt.get_cmap("tab10" if len(donors) <= 10 else "tab20")
    colors = {t: cmap(i % cmap.N) for i, t in enumerate(donors)}
    for k, (ax, r) in enumerate(zip(axes.flat, tasks)):
        for d in donors:
            p = metrics["pairs"].get((d, r))
            if not p:
                continue
            lams = [lam for lam, v in p["curve"].items() if v["delta"] is not None]
            ys = [100 * p["curve"][lam]["delta"] for lam in lams]
            if p["self"]:
                style = dict(color="black", ls="--", lw=2.0, zorder=3)
            else:
                style = dict(color=colors[d], lw=1.3, alpha=0.9)
            ax.plot(lams, ys, marker="o", ms=2.5, **style)
            lb = p["lambda_best"]
            if lb is not None and p["curve"][lb]["delta"] is not None and not p["self"]:
                ax.plot(
                    [lb],
                    [100 * p["curve"][lb]["delta"]],
                    marker="*",
                    ms=10,
                    ls="none",
                    color=style["color"],
                    mec="black",
                    mew=0.5,
                    zorder=4,
                )
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"receiver {r}", fontsize=10)
        if k % cols == 0:
            ax.set_ylabel("delta (pts, test)")
        if k >= (rows - 1) * cols - (rows * cols - n):
            ax.set_xlabel("lambda")
    ax = axes.flat[len(tasks)]
    curve = metrics["modes"][CURVE]
    lams = [lam for lam, s in curve.items() if s["mean_delta"] is not None]
    ax.plot(
        lams,
        [100 * curve[lam]["mean_delta"] for lam in lams],
        marker="o",
        color="C0",
        label="mean delta",
    )
    ax.plot(
        lams,
        [100 * curve[lam]["median_delta"] for lam in lams],
        marker="o",
        ls="--",
        color="C0",
        alpha=0.6,
        label="median delta",
    )
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("lambda")
    ax.set_ylabel("cross-task delta (pts, test)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(
        lams,
        [100 * curve[lam]["win_rate"] for lam in lams],
        marker="s",
        color="C3",
        label="win rate",
    )
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("win rate (%)", color="C3")
    ax.legend(fontsize=7, loc="lower center")
    ax.set_title("all cross-task pairs", fontsize=10)
    for extra in list(axes.flat)[n:]:
        extra.axis("off")
    handles = [Line2D([], [], color=colors[d], lw=1.5, label=d) for d in donors]
    handles += [
        Line2D([], [], color="black", ls="--", lw=2, label="self pair (QV_R on R)"),
        Line2D(
            [],
            [],
            color="grey",
            marker="*",
            ms=10,
            mec="black",
            ls="none",
            label="lambda_best (receiver val)",
        ),
    ]
    fig.legend(
        handles=handles,
        title="donor D",
        loc="center right",
        fontsize=8,
        title_fontsize=9,
        frameon=False,
    )
    fig.suptitle(
        "delta of PTQ(FP_R + lambda * QV_D) vs PTQ(FP_R), per receiver; lambda=1 is "
        "zero-shot, the star is chosen on receiver val" + title_suffix,
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 0.97))
    _save_fig(fig, path)
    plt.close(fig)
    return path


def _save_fig(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- writing


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _jsonable(metrics: dict, meta: dict) -> dict:
    pairs = [
        {
            **{k: v for k, v in p.items() if k != "curve"},
            "curve": [{"lam": lam, **v} for lam, v in p["curve"].items()],
        }
        for p in metrics["pairs"].values()
    ]
    modes = dict(metrics["modes"])
    modes[CURVE] = [{"lam": lam, **s} for lam, s in modes[CURVE].items()]
    return {
        "bits": meta.get("bits"),
        "granularity": meta.get("granularity"),
        "tasks": metrics["tasks"],
        "lambdas": metrics["lambdas"],
        "missing": meta.get("missing", []),
        "n_cells": metrics["n_cells"],
        "expected_cells": meta.get("expected_cells"),
        "modes": modes,
        "baselines": metrics["baselines"],
        "donors": metrics["donors"],
        "receivers": metrics["receivers"],
        "pairs": pairs,
    }


def write_report(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Regenerate every report file of a grid workdir from its ``cells.jsonl``.

    Writes (atomically) ``grid.csv``, ``summary.md``, ``summary.json``,
    ``heatmap_delta_lambda1.png``, ``heatmap_delta_lambda_best.png``,
    ``heatmap_recovery.png`` and ``lambda_curves.png`` into ``out_dir`` (default: the
    workdir). Returns ``{"paths": {name: Path}, "summary": markdown text, "metrics": ...}``.
    """
    workdir = Path(workdir)
    if not (workdir / CELLS_FILE).exists() and not (workdir / GRID_META_FILE).exists():
        raise FileNotFoundError(
            f"{workdir} holds no {CELLS_FILE} or {GRID_META_FILE}; pass the grid workdir "
            "written by `qvec grid` (or run `qvec grid` first)"
        )
    out = Path(out_dir) if out_dir else workdir
    out.mkdir(parents=True, exist_ok=True)
    meta = load_grid_meta(workdir)
    cells = load_cells(workdir)
    metrics = compute_metrics(cells, tasks=meta.get("tasks"), lambdas=meta.get("lambdas"))
    missing_modes: dict[str, list[str]] = {}
    for m in meta.get("missing", []):
        missing_modes.setdefault(m["task"], []).append(m["mode"].upper())
    missing_tasks = {t: "no " + " & ".join(ms) for t, ms in missing_modes.items()}
    paths = {
        "grid_csv": out / "grid.csv",
        "summary_md": out / "summary.md",
        "summary_json": out / "summary.json",
        "heatmap_delta_lambda1": out / "heatmap_delta_lambda1.png",
        "heatmap_delta_lambda_best": out / "heatmap_delta_lambda_best.png",
        "heatmap_recovery": out / "heatmap_recovery.png",
        "lambda_curves": out / "lambda_curves.png",
    }
    _atomic_write_text(paths["grid_csv"], _csv_text(tidy_rows(cells, metrics, meta)))
    summary = summary_markdown(metrics, meta)
    _atomic_write_text(paths["summary_md"], summary)
    _atomic_write_text(
        paths["summary_json"], json.dumps(_jsonable(metrics, meta), indent=1, default=str) + "\n"
    )
    tasks = metrics["tasks"]
    bits = f"{meta.get('bits', '?')}-bit {meta.get('granularity', '')}".strip()
    delta1 = _matrix(metrics, lambda p: None if p["delta_1"] is None else 100 * p["delta_1"])
    deltab = _matrix(metrics, lambda p: None if p["delta_best"] is None else 100 * p["delta_best"])
    finite = [abs(v) for row in delta1 + deltab for v in row if math.isfinite(v)]
    lim = max(finite) if finite and max(finite) > 0 else 1.0
    common = dict(
        missing=missing_tasks, fmt="{:+.1f}", limit=lim, cbar_label="delta vs PTQ(FP_R), test (pts)"
    )
    plot_heatmap(
        delta1,
        tasks,
        paths["heatmap_delta_lambda1"],
        title=f"Zero-shot (lambda=1): delta of PTQ(FP_R + QV_D), {bits}\n"
        "diagonal (boxed) = self pair = ceiling",
        **common,
    )
    plot_heatmap(
        deltab,
        tasks,
        paths["heatmap_delta_lambda_best"],
        title=f"lambda_best chosen on receiver VAL (uses receiver data), {bits}\n"
        "delta read on test; 2nd line: the chosen lambda; boxed diagonal = self pair",
        notes=_matrix_notes(metrics),
        **common,
    )
    rec = _matrix(metrics, lambda p: p["recovery_1"])
    plot_heatmap(
        rec,
        tasks,
        paths["heatmap_recovery"],
        title=f"Zero-shot (lambda=1) recovery = delta / ceiling, {bits}\n"
        "n/a where the receiver's ceiling <= 0; diagonal = 1 by definition",
        fmt="{:.2f}",
        cbar_label="recovery (1 = as good as QAT on R; colour clipped at 1)",
        missing=missing_tasks,
        limit=1.0,
    )
    plot_curves(metrics, paths["lambda_curves"], title_suffix=f", {bits}")
    return {"paths": paths, "summary": summary, "metrics": metrics}


def report_status(metrics: dict) -> dict[str, Any]:
    """The headline numbers (zero-shot and lambda_best), for printing after a run."""
    z, b = metrics["modes"][ZERO_SHOT], metrics["modes"][LAMBDA_BEST]
    return {ZERO_SHOT: _stat_cells(z), LAMBDA_BEST: _stat_cells(b)}
