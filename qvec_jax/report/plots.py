"""The grid's figures: donor x receiver heatmaps and delta-vs-lambda curves.

Deltas are plotted in percentage points. Every figure is written atomically (through
:func:`qvec_jax.files.atomic_path`), so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qvec_jax.files import atomic_path
from qvec_jax.report.metrics import CURVE

#: The figures of a report, by the name :func:`qvec_jax.report.write_report` returns.
FIGURES = (
    "heatmap_delta_lambda1",
    "heatmap_delta_lambda_best",
    "heatmap_recovery",
    "lambda_curves",
)


def _pyplot():
    """pyplot on the non-interactive Agg backend (imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    return path


def matrix(metrics: dict, value) -> list[list[float]]:
    """``value(pair)`` per donor (rows) and receiver (columns); NaN where undefined."""
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


# ----------------------------------------------------------------------------- heatmap


def _cell_text(v: float, fmt: str, note: str) -> str:
    text = fmt.format(v)
    if not text.lstrip("+-").strip("0."):  # "-0.0" / "+0.00": no sign on zero
        text = text.lstrip("+-")
    return text + ("\n" + note if note else "")


def _annotate(ax, m, tasks, missing: dict, fmt: str, notes, lim: float) -> None:
    """Each cell's value (and note) in a contrasting colour; the diagonal boxed."""
    from matplotlib.patches import Rectangle

    n = len(tasks)
    fontsize = 10 if n <= 8 else (8 if n <= 14 else 6)
    for i in range(n):
        for j in range(n):
            v = m[i, j]
            if not np.isfinite(v):
                text, color = ("" if tasks[i] in missing and i != j else "n/a"), "#555555"
            else:
                text = _cell_text(v, fmt, notes[i][j] if notes else "")
                color = "white" if abs(v) > 0.6 * lim else "black"
            kw = dict(ha="center", va="center", fontsize=fontsize, color=color, linespacing=1.1)
            ax.text(j, i, text, **kw)
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, lw=2.0, ec="black"))


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
    plt = _pyplot()
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
    _annotate(ax, m, tasks, missing, fmt, notes, lim)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(cbar_label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_fig(fig, path)


# ----------------------------------------------------------------------------- curves


def _receiver_panel(ax, metrics: dict, r: str, donors: list[str], colors: dict) -> None:
    """One receiver's delta-vs-lambda line per donor, a star at each lambda_best."""
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


def _mean_panel(ax, curve: dict) -> None:
    """Mean and median cross-task delta, and the win rate, per lambda."""
    lams = [lam for lam, s in curve.items() if s["mean_delta"] is not None]
    for key, style in (("mean_delta", {}), ("median_delta", dict(ls="--", alpha=0.6))):
        ys = [100 * curve[lam][key] for lam in lams]
        ax.plot(lams, ys, marker="o", color="C0", label=key.replace("_", " "), **style)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("lambda")
    ax.set_ylabel("cross-task delta (pts, test)", color="C0")
    ax2 = ax.twinx()
    win = [100 * curve[lam]["win_rate"] for lam in lams]
    ax2.plot(lams, win, marker="s", color="C3", label="win rate")
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("win rate (%)", color="C3")
    ax.legend(fontsize=7, loc="lower center")
    ax.set_title("all cross-task pairs", fontsize=10)


def _legend(fig, donors: list[str], colors: dict) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[d], lw=1.5, label=d) for d in donors]
    handles += [
        Line2D([], [], color="black", ls="--", lw=2, label="self pair (QV_R on R)"),
        Line2D(
            [], [], color="grey", marker="*", ms=10, mec="black", ls="none",
            label="lambda_best (receiver val)",
        ),
    ]  # fmt: skip
    fig.legend(
        handles=handles,
        title="donor D",
        loc="center right",
        fontsize=8,
        title_fontsize=9,
        frameon=False,
    )


def plot_curves(metrics: dict, path: Path, *, title_suffix: str = "") -> Path:
    """Per-receiver delta-vs-lambda curves (one line per donor) plus the cross-task mean.

    One shared legend: a colour per donor, the self pair dashed black, a star at each
    pair's lambda_best (chosen on the receiver's val split).
    """
    plt = _pyplot()
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
        _receiver_panel(ax, metrics, r, donors, colors)
        if k % cols == 0:
            ax.set_ylabel("delta (pts, test)")
        if k >= (rows - 1) * cols - (rows * cols - n):
            ax.set_xlabel("lambda")
    _mean_panel(axes.flat[len(tasks)], metrics["modes"][CURVE])
    for extra in list(axes.flat)[n:]:
        extra.axis("off")
    _legend(fig, donors, colors)
    fig.suptitle(
        "delta of PTQ(FP_R + lambda * QV_D) vs PTQ(FP_R), per receiver; lambda=1 is "
        "zero-shot, the star is chosen on receiver val" + title_suffix,
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 0.97))
    return save_fig(fig, path)


# ----------------------------------------------------------------------------- the report's


def _pts_or_none(x: float | None) -> float | None:
    return None if x is None else 100 * x


def write_figures(metrics: dict, meta: dict, paths: dict[str, Path]) -> None:
    """The report's four figures, at ``paths[name]`` for every name in :data:`FIGURES`."""
    missing_modes: dict[str, list[str]] = {}
    for m in meta.get("missing", []):
        missing_modes.setdefault(m["task"], []).append(m["mode"].upper())
    missing = {t: "no " + " & ".join(ms) for t, ms in missing_modes.items()}
    tasks = metrics["tasks"]
    bits = f"{meta.get('bits', '?')}-bit {meta.get('granularity', '')}".strip()
    delta1 = matrix(metrics, lambda p: _pts_or_none(p["delta_1"]))
    deltab = matrix(metrics, lambda p: _pts_or_none(p["delta_best"]))
    finite = [abs(v) for row in delta1 + deltab for v in row if math.isfinite(v)]
    lim = max(finite) if finite and max(finite) > 0 else 1.0
    common = dict(
        missing=missing, fmt="{:+.1f}", limit=lim, cbar_label="delta vs PTQ(FP_R), test (pts)"
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
    plot_heatmap(
        matrix(metrics, lambda p: p["recovery_1"]),
        tasks,
        paths["heatmap_recovery"],
        title=f"Zero-shot (lambda=1) recovery = delta / ceiling, {bits}\n"
        "n/a where the receiver's ceiling <= 0; diagonal = 1 by definition",
        fmt="{:.2f}",
        cbar_label="recovery (1 = as good as QAT on R; colour clipped at 1)",
        missing=missing,
        limit=1.0,
    )
    plot_curves(metrics, paths["lambda_curves"], title_suffix=f", {bits}")
