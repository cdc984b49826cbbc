"""The report of a ``qvec study`` (issue 21): ``study.md``, ``study.json`` and its figures.

A pure rendering of the ``analysis`` dict that :mod:`qvec_jax.report.study_analysis` computes
(every approach on the donor -> receiver pairs of one half of the view pool, 95% intervals
from a bootstrap over tasks). Nothing is recomputed here. Numbers are fractions in the
analysis and ``study.json``, percentage points in ``study.md`` and the plots; every file is
written atomically (``files.atomic_write_text``, ``plots.save_fig``).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

from qvec_jax.files import atomic_write_text
from qvec_jax.report.markdown import table
from qvec_jax.report.plots import _pyplot, save_fig
from qvec_jax.report.quantize import quantize_markdown

__all__ = ["study_markdown", "write_study_report"]

#: Keys every analysis has (``qvec_jax.report.study_analysis``); checked before anything is drawn.
REQUIRED = ("half", "tasks", "seeds", "n_pairs", "lambdas", "strategy", "baseline", "approaches")
#: The 5-task-draw win rate the paper's regime reports, and the line drawn for it.
PAPER_RATE, DRAW_LINE = 0.766, 0.75

# ----------------------------------------------------------------------------- numbers


def _iv(iv: dict | None, fmt: str, unit: str = "") -> str:
    """An interval in points, ``+1.2 [-0.3, +2.8]``; ``n/a`` for each missing number."""
    if not iv or iv.get("point") is None:
        return "n/a"
    lo, hi = ("n/a" if iv.get(k) is None else format(100 * iv[k], fmt) for k in ("lo", "hi"))
    return f"{format(100 * iv['point'], fmt)}{unit} [{lo}, {hi}]"


def pts(iv: dict | None) -> str:
    """A delta interval in signed percentage points: ``+1.2 [-0.3, +2.8]``."""
    return _iv(iv, "+.1f")


def pct(iv: dict | None) -> str:
    """A rate interval in whole percent: ``62% [51, 72]``."""
    return _iv(iv, ".0f", "%")


def acc(iv: dict | None) -> str:
    """An accuracy interval in percent: ``71.3 [68.0, 74.6]``."""
    return _iv(iv, ".1f")


def _cell(text) -> str:
    """A table cell: ``-`` for nothing, pipes escaped so they do not split the row."""
    return "-" if text is None or text == "" else str(text).replace("|", "\\|")


def _check(analysis) -> None:
    if not isinstance(analysis, dict):
        raise TypeError("study report: analysis must be the dict of qvec_jax.report.study_analysis")
    missing = [k for k in REQUIRED if k not in analysis]
    if missing:
        raise ValueError(
            f"study report: analysis lacks {', '.join(missing)}; pass the dict that "
            "qvec_jax.report.study_analysis computes (or rerun `qvec study`)"
        )


def _names(analysis: dict) -> dict[str, str]:
    return {a["key"]: a["name"] for a in analysis["approaches"]}


def _intervals(analysis: dict):
    yield analysis["baseline"].get("mean_acc")
    for a in analysis["approaches"]:
        yield from (a.get(k) for k in ("win_rate", "mean_delta", "mean_acc"))


def _replicates(analysis: dict) -> str:
    bs = sorted({iv["b"] for iv in _intervals(analysis) if iv and iv.get("b") is not None})
    return "/".join(str(b) for b in bs) or "n/a"


# ----------------------------------------------------------------------------- sections


def _intro(a: dict) -> list[str]:
    k, seeds = len(a["tasks"]), a["seeds"]
    sample = f"{a['eval_n']} images per val/test split" if a.get("eval_n") else "whole splits"
    lines = [
        f"{k} views: {', '.join(f'`{t}`' for t in a['tasks'])}.",
        f"{a['n_pairs']} ordered donor -> receiver pairs per seed (K*(K-1)), "
        f"{len(seeds)} fine-tune seed(s): {', '.join(str(s) for s in seeds)}.",
        f"Evaluated on {sample}. {a.get('eval_note') or ''}".rstrip(),
        f"RTN lambda screen: {', '.join(f'{lam:g}' for lam in a['lambdas'])}.",
        f'Lambda without receiver data ("the choice"): **{a["strategy"]}**, from '
        f"{a.get('strategy_source') or 'an unstated source'}.",
        "Delta = accuracy of the approach minus that of RTN(FP_R), in points; a win is "
        "delta > 0. Accuracies are the receiver's test split, in %.",
        "Every interval: 95%, bootstrap over tasks (receivers and donors resampled), "
        f"B={_replicates(a)}.",
    ]
    return [f"- {ln}" for ln in lines]


def _main_table(a: dict) -> list[str]:
    header = ["approach", "data used", "zero-shot?", "overlap with receiver", "unit", "n"]
    header += ["win rate [lo, hi]", "mean delta pts [lo, hi]", "mean acc % [lo, hi]"]
    base = a["baseline"]
    rows = [
        [f"{base['name']} (baseline)", _cell(base.get("data")), "yes", "-", "receiver",
         _cell((base.get("mean_acc") or {}).get("n")), "-", "0 (reference)",
         acc(base.get("mean_acc"))]
    ]  # fmt: skip
    for p in a["approaches"]:
        rows.append(
            [_cell(p["name"]), _cell(p.get("data")), "yes" if p.get("zero_shot") else "**no**",
             _cell(p.get("overlap")), _cell(p.get("unit")), _cell(p.get("n")),
             pct(p.get("win_rate")), pts(p.get("mean_delta")), acc(p.get("mean_acc"))]
        )  # fmt: skip
    return ["", "## Approaches", "", table(header, rows)]


def _paired_table(a: dict) -> list[str]:
    paired = a.get("paired") or []
    if not paired:
        return []
    names = _names(a)
    header = ["comparison", "a", "b", "n", "mean a - b pts [lo, hi]"]
    header.append("share of units a > b [lo, hi]")
    rows = [
        [_cell(p["name"]), _cell(names.get(p["a"], p["a"])), _cell(names.get(p["b"], p["b"])),
         _cell(p.get("n")), pts(p.get("mean_diff")), pct(p.get("a_wins"))]
        for p in paired
    ]  # fmt: skip
    intro = "Differences on the units both approaches measure (same pairs or receivers)."
    return ["", "## Paired differences", "", intro, "", table(header, rows)]


def _draws_section(a: dict) -> list[str]:
    d = a.get("draws")
    head = ["", "## What one demo run would show", ""]
    if not d:
        return head + ["No k-task draws in this analysis."]
    name = _names(a).get(d["approach"], d["approach"])
    k, n = d["k"], d["n_draws"]
    return head + [
        f"Each of {n} {k}-task subsets of the {len(a['tasks'])} views is one possible "
        f"{k}-task demo; within it, the win rate of **{name}**:",
        "",
        f"- median **{100 * d['median']:.0f}%**, 5-95% range "
        f"[{100 * d['p05']:.0f}, {100 * d['p95']:.0f}]%;",
        f"- >= 75% in **{100 * d['frac_ge_75']:.0f}%** of the draws (the paper's 5-task "
        f"regime reports {100 * PAPER_RATE:.1f}%).",
    ]


def _seed_section(a: dict) -> list[str]:
    s = a.get("seed_spread")
    if not s:
        if a.get("per_seed") is False:
            return ["", "One fine-tune seed: the spread over seeds is not measured."]
        return []
    name = _names(a).get(s["approach"], s["approach"])
    rows = [
        [str(r["seed"]), _cell(r.get("n")), f"{100 * r['win_rate']:.0f}%",
         f"{100 * r['mean_delta']:+.1f}"]
        for r in s["per_seed"]
    ]  # fmt: skip
    sd_w, sd_d = s.get("sd_win_rate"), s.get("sd_mean_delta")
    sd = (
        f"SD over seeds: win rate {'n/a' if sd_w is None else f'{100 * sd_w:.1f}'} pts, "
        f"mean delta {'n/a' if sd_d is None else f'{100 * sd_d:.1f}'} pts."
    )
    table_ = table(["seed", "n", "win rate", "mean delta pts"], rows)
    return ["", f"## Spread over fine-tune seeds ({name})", "", table_, "", sd]


def _grouped(rows: list[dict]) -> list[dict]:
    """``rows`` with each predictor's groups together, predictors in first-seen order."""
    order = list(dict.fromkeys(r["predictor"] for r in rows))
    return sorted(rows, key=lambda r: order.index(r["predictor"]))


def _conditions_section(a: dict) -> list[str]:
    rows = _grouped(a.get("by_condition") or [])
    if not rows:
        return []
    key = a.get("conditions_approach")
    name = _names(a).get(key, key)
    cells = [
        [_cell(r["predictor"]), _cell(r["group"]), _cell(r.get("n")),
         pct(r.get("win_rate")), pts(r.get("mean_delta"))]
        for r in rows
    ]  # fmt: skip
    header = ["predictor", "group", "n", "win rate [lo, hi]", "mean delta pts [lo, hi]"]
    return ["", f"## When does it help? ({name})", "", table(header, cells)]


def _figures_and_time(a: dict) -> list[str]:
    lines = ["", "## Figures", "", "![mean delta per approach](study_forest.png)"]
    if a.get("draws"):
        lines += ["", "![win rates of the k-task draws](study_draws.png)"]
    if a.get("by_condition"):
        lines += ["", "![when does it help](study_predictors.png)"]
    if a.get("seconds"):
        spent = ", ".join(f"{k} {v:.0f} s" for k, v in a["seconds"].items())
        lines += ["", f"Time per stage: {spent}."]
    return lines


def study_markdown(analysis: dict) -> str:
    """``study.md``: the warnings, how the study was run, the approaches with their
    intervals, paired differences, what a 5-task demo would show, seeds, and when the
    conditions' approach helps."""
    _check(analysis)
    a = analysis
    title = f"# qvec study: {a['half'].upper()} half ({len(a['tasks'])} views)"
    loud = [ln for w in a.get("warnings") or [] for ln in ("", f"> **WARNING: {w}**")]
    lines = [title, *loud, "", *_intro(a), *_main_table(a), *_paired_table(a)]
    lines += quantize_markdown(a)
    lines += _draws_section(a) + _seed_section(a) + _conditions_section(a)
    return "\n".join(lines + _figures_and_time(a)) + "\n"


# ----------------------------------------------------------------------------- figures


def _wrap(text: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def _interval_points(ax, ys, ivs, **style) -> None:
    """Points at ``100 * point`` with horizontal bars over [lo, hi] (where known);
    ``style``: a matplotlib ``fmt`` and line/marker keywords."""
    style = dict(style)
    fmt = style.pop("fmt", "o")
    for y, iv in zip(ys, ivs):
        if not iv or iv.get("point") is None:
            continue
        x = 100 * iv["point"]
        if iv.get("lo") is not None and iv.get("hi") is not None:
            err = [[x - 100 * iv["lo"]], [100 * iv["hi"] - x]]
            ax.errorbar([x], [y], xerr=err, fmt=fmt, capsize=3, lw=1.4, **style)
        else:
            ax.plot([x], [y], fmt, **style)


def plot_forest(a: dict, path: Path) -> Path:
    """Every approach's mean delta (pts) with its interval; zero-shot ones filled blue
    circles, those using receiver data open red squares; a line at 0."""
    plt = _pyplot()
    rows = a["approaches"]
    n = len(rows)
    fig, ax = plt.subplots(figsize=(9.5, 1.4 + 0.5 * n))
    kinds = {
        "zero-shot (no receiver data)": dict(fmt="o", color="C0", mfc="C0", ms=7),
        "uses receiver data": dict(fmt="s", color="C3", mfc="white", ms=7),
    }
    for (label, style), zs in zip(kinds.items(), (True, False)):
        idx = [i for i, p in enumerate(rows) if bool(p.get("zero_shot")) == zs]
        _interval_points(ax, idx, [rows[i].get("mean_delta") for i in idx], **style)
        ax.plot([], [], style["fmt"], color=style["color"], mfc=style["mfc"], label=label)
    for i, p in enumerate(rows):
        note = f"{pts(p.get('mean_delta'))}  wins {pct(p.get('win_rate'))}"
        ax.annotate(note, (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=7)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(n), [_wrap(p["name"]) for p in rows], fontsize=8 if n <= 10 else 6)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("mean delta vs RTN(FP_R), test (pts); bars: 95% task-bootstrap interval")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(
        f"{a['half'].upper()} half: {len(a['tasks'])} views, {a['n_pairs']} pairs x "
        f"{len(a['seeds'])} seed(s)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_fig(fig, path)


def plot_draws(a: dict, path: Path) -> Path:
    """Histogram of the win rates of the k-task draws, lines at 75% and at the whole
    study's win rate, annotated with how often a draw reaches 75%."""
    plt = _pyplot()
    d = a["draws"]
    name = _names(a).get(d["approach"], d["approach"])
    rates = 100 * np.asarray(d["rates"], dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    counts, _, _ = ax.hist(rates, bins=np.arange(-2.5, 105, 5), color="C0", alpha=0.75,
                           edgecolor="white")  # fmt: skip
    ax.set_ylim(0, 1.4 * max(counts.max(), 1))  # headroom: the legend and note sit above
    ax.axvline(100 * DRAW_LINE, color="C3", ls="--", lw=1.5,
               label=f"75% (paper's regime reports {100 * PAPER_RATE:.1f}%)")  # fmt: skip
    whole = next((p.get("win_rate") for p in a["approaches"] if p["key"] == d["approach"]), None)
    if whole and whole.get("point") is not None:
        ax.axvline(100 * whole["point"], color="black", lw=1.5,
                   label=f"whole study: {100 * whole['point']:.0f}%")  # fmt: skip
    ax.text(0.02, 0.95, f">= 75% in {100 * d['frac_ge_75']:.0f}% of {d['n_draws']} draws",
            transform=ax.transAxes, va="top", fontsize=9,
            bbox=dict(boxstyle="round", fc="white", ec="grey"))  # fmt: skip
    ax.set_xlim(-2.5, 102.5)
    ax.set_xlabel(f"win rate within a {d['k']}-task subset (%)")
    ax.set_ylabel("subsets")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(
        f"{a['half'].upper()} half: what one {d['k']}-task demo would show\n{_wrap(name, 70)}",
        fontsize=10,
    )
    fig.tight_layout()
    return save_fig(fig, path)


def _predictor_rows(rows: list[dict]) -> tuple[list[str], list[float], list[dict], list[int]]:
    """Tick labels, y of each group, the groups, and the y of each predictor's header."""
    labels, ys, groups, heads, y = [], [], [], [], 0
    for pred in dict.fromkeys(r["predictor"] for r in rows):
        labels.append(_wrap(pred, 40))
        heads.append(y)
        y += 1
        for r in (r for r in rows if r["predictor"] == pred):
            labels.append(f"{_wrap(r['group'], 30)} (n={r.get('n')})")
            ys.append(y)
            groups.append(r)
            y += 1
    return labels, ys, groups, heads


def plot_predictors(a: dict, path: Path) -> Path:
    """The "when does it help?" table as two panels sharing the groups: win rate and mean
    delta, each with its interval, groups under a bold header per predictor."""
    plt = _pyplot()
    labels, ys, groups, heads = _predictor_rows(a["by_condition"])
    n = len(labels)
    fig, (a1, a2) = plt.subplots(1, 2, sharey=True, figsize=(10, 1.4 + 0.36 * n))
    style = dict(fmt="o", color="C0", ms=5)
    _interval_points(a1, ys, [g.get("win_rate") for g in groups], **style)
    _interval_points(a2, ys, [g.get("mean_delta") for g in groups], **style)
    a1.axvline(50, color="grey", lw=0.8, ls=":")
    a2.axvline(0, color="grey", lw=1)
    a1.set_xlim(0, 100)
    a1.set_xlabel("win rate (%)")
    a2.set_xlabel("mean delta (pts)")
    a1.set_yticks(range(n), labels, fontsize=8 if n <= 16 else 6)
    for i in heads:
        a1.get_yticklabels()[i].set_fontweight("bold")
        for ax in (a1, a2):
            ax.axhline(i - 0.5, color="lightgrey", lw=0.8)
    a1.set_ylim(n - 0.5, -0.5)
    key = a.get("conditions_approach")
    name = _names(a).get(key, key)
    fig.suptitle(
        f"{a['half'].upper()} half: when does it help? {_wrap(name, 60)}\n"
        "95% task-bootstrap intervals",
        fontsize=10,
    )
    fig.tight_layout()
    return save_fig(fig, path)


def write_study_report(analysis: dict, out_dir) -> dict[str, Path]:
    """Write ``study.md``, ``study.json`` and ``study_forest.png`` into ``out_dir`` (made if
    needed), plus ``study_draws.png`` when the analysis has draws and
    ``study_predictors.png`` when it has ``by_condition`` rows, all atomically. Returns
    ``{"study_md", "study_json", "study_forest", ["study_draws"], ["study_predictors"]}``."""
    _check(analysis)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"study_md": out / "study.md", "study_json": out / "study.json"}
    atomic_write_text(paths["study_md"], study_markdown(analysis))
    atomic_write_text(paths["study_json"], json.dumps(analysis, indent=1, default=str) + "\n")
    paths["study_forest"] = plot_forest(analysis, out / "study_forest.png")
    if analysis.get("draws"):
        paths["study_draws"] = plot_draws(analysis, out / "study_draws.png")
    if analysis.get("by_condition"):
        paths["study_predictors"] = plot_predictors(analysis, out / "study_predictors.png")
    return paths
