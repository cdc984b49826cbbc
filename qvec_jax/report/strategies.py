"""Lambda strategies scored on a grid (issue 13): pure functions of its cells.

A strategy's choice on a cross-task pair (D, R) is ``select.choose(strategy, record)``
of the pair's ``scores`` cell (:mod:`qvec_jax.grid.extras`); its score is the test
accuracy at that lambda, read from the ``patch`` cell ``(D, R, lam)``, or from the
``ptq_fp`` cell when ``lam = 0`` (no patch). Nothing is recomputed, so any strategy,
with any constants, can be scored from a stored grid.

Per strategy, over the cross-task pairs it was measured on: wins (delta > 0), mean and
median delta, mean recovery, the fraction of lambda_best's mean gain over lambda=1 it
captures, ``(mean d_s - mean d_1) / (mean d_best - mean d_1)``, and the worst regret
against lambda_best, ``max_pairs acc(lambda_best) - acc(lambda_s)``. Fractions here.
"""

from __future__ import annotations

import statistics

from qvec_jax import select
from qvec_jax.grid.store import lam_key
from qvec_jax.report.markdown import _pts, _rate, _ratio, table
from qvec_jax.report.metrics import LAMBDA_BEST, _stats, recovery
from qvec_jax.report.overlap import overlap_text, scores_overlap, summarize
from qvec_jax.report.plots import plot_heatmap

#: What "data" says for each kind a strategy declares (printed beside every row).
DATA_LABELS = {
    "none": "none (weights only)",
    "donor": "donor train images",
    "pretext": "pretext train images",
    "noise": "synthetic noise",
    "unlabelled receiver": "unlabelled receiver train images (NOT zero-shot)",
    "labelled receiver": "labelled receiver val (NOT zero-shot)",
}
#: Kinds of data that are the receiver's own: a strategy using them is not zero-shot.
RECEIVER_DATA = ("unlabelled receiver", "labelled receiver")
#: Kinds of data that are another task's images, which may still be the receiver's.
SAMPLED_DATA = ("donor", "pretext")


def pair_overlap(data: str, pairs, shared: dict) -> dict | None:
    """:func:`~qvec_jax.report.overlap.summarize` of the receiver images a strategy on
    ``data`` read over ``pairs`` ((donor, receiver) keys; ``shared``: ``scores_overlap``):
    per receiver for the pretext sample (one sample per receiver), per pair for donors.
    None for data that is no sample of another task."""
    if data not in SAMPLED_DATA:
        return None
    counts = {}
    for d, r in pairs:
        c = (shared.get((d, r)) or {}).get(data)
        counts[r if data == "pretext" else (d, r)] = c
    return summarize(counts, "receivers" if data == "pretext" else "pairs")


def data_label(row: dict) -> str:
    """What a line says a row's data is: its kind, and the receiver images it holds."""
    label = DATA_LABELS.get(row["data"], row["data"])
    more = overlap_text(row.get("overlap"), "they")
    return f"{label}; {more}" if more else label


#: The tables' last column: the receiver's own images in a row's data, per split.
SHARED_HEADER = "receiver images in its data (train, val, test)"


def shared_cell(row: dict) -> str:
    """The :data:`SHARED_HEADER` column of a strategy row."""
    if row["data"] == "unlabelled receiver":
        return "its own train images (NOT zero-shot)"
    if row["data"] == "labelled receiver":
        return "its own val images and labels (NOT zero-shot)"
    if row["data"] not in SAMPLED_DATA or not row.get("overlap"):
        return "none"
    return overlap_text(row["overlap"], "they") or "none (counted)"


def scores_records(cells: list[dict], merged: bool = False) -> dict[tuple[str, str], dict]:
    """``{(donor, receiver): candidate_scores record}`` of the ``scores`` cells: single
    cross-task donors, or (``merged``) the leave-one-out merges ``"loo:<method>"``."""
    return {
        (c["donor"], c["receiver"]): c["scores"]
        for c in cells
        if c["kind"] == "scores" and c["donor"].startswith("loo:") == merged
    }


def test_curves(cells: list[dict], kind: str) -> dict[tuple[str, str], dict[str, float]]:
    """``{(donor, receiver): {lam_key: test acc}}`` of the cells of ``kind``."""
    out: dict = {}
    for c in cells:
        if c["kind"] == kind and c["acc"].get("test") is not None:
            out.setdefault((c["donor"], c["receiver"]), {})[lam_key(c["lam"])] = c["acc"]["test"]
    return out


def acc_at(curve: dict[str, float], base: float | None, lam: float) -> float | None:
    """Test accuracy at ``lam`` on a curve; ``lam = 0`` is ``PTQ(FP_R)``, the base."""
    return base if float(lam) == 0.0 else curve.get(lam_key(lam))


def score_pair(strategy, record: dict, curve: dict, base: float | None, ceiling) -> dict:
    """One strategy on one pair: the chosen ``lam``, the test ``acc`` there, ``delta``
    against ``PTQ(FP_R)`` and ``recovery`` (None where a cell is missing)."""
    lam = select.choose(strategy, record).lam
    acc = acc_at(curve, base, lam)
    delta = None if acc is None or base is None else acc - base
    return {"lam": lam, "acc": acc, "delta": delta, "recovery": recovery(delta, ceiling)}


def _measured(strategy, records: dict) -> str | None:
    """None if every record measured ``strategy``, else why not (the first reason)."""
    for rec in records.values():
        if strategy.key is not None and strategy.key not in rec:
            return rec.get("not_measured", {}).get(strategy.name, "not in the stored record")
    return None


def stats_of(points: list[dict]) -> dict:
    """``metrics``' statistics of the points' ``delta`` (and ``recovery``) where known."""
    ds = [p for p in points if p["delta"] is not None]
    rs = [p["recovery"] for p in ds if p["recovery"] is not None]
    return _stats([p["delta"] for p in ds], rs)


def _row_stats(pairs: dict, ref: dict) -> dict:
    """Statistics of a strategy's per-pair deltas, with capture and worst regret against
    the pairs' ``delta_1``/``delta_best`` (``ref``), over the pairs where all are known."""
    keys = [k for k, p in pairs.items() if p["delta"] is not None]
    s = stats_of(list(pairs.values()))
    both = [k for k in keys if ref[k]["delta_1"] is not None and ref[k]["delta_best"] is not None]
    if both:
        mean = lambda f: statistics.fmean(f(k) for k in both)  # noqa: E731
        gain = mean(lambda k: ref[k]["delta_best"]) - mean(lambda k: ref[k]["delta_1"])
        mine = mean(lambda k: pairs[k]["delta"]) - mean(lambda k: ref[k]["delta_1"])
        s["captured"] = mine / gain if gain > 0 else None
        s["worst_regret"] = max(ref[k]["delta_best"] - pairs[k]["delta"] for k in both)
    else:
        s["captured"] = s["worst_regret"] = None
    return s


def strategy_metrics(cells: list[dict], metrics: dict, strategies: list, fixed: str) -> dict:
    """Every strategy (``strategies``: ``select.Strategy`` objects) scored on the
    cross-task pairs that have a ``scores`` cell, plus the lambda_best row.

    Returns ``{"rows": [{"name", "data", "measured", "reason", "stats", "pairs"}],
    "fixed": name, "best_here": name or None, "n_pairs"}``; ``best_here`` is the
    no-receiver-data strategy with the highest mean delta ON THESE TASKS (chosen on their
    test labels, so not a fair pick).
    """
    records = {k: v for k, v in scores_records(cells).items() if k in metrics["pairs"]}
    curves = test_curves(cells, "patch")
    base = {r: (b.get("ptq_fp") or {}).get("test") for r, b in metrics["baselines"].items()}
    ceil = {r: b.get("ceiling") for r, b in metrics["baselines"].items()}
    ref = {k: metrics["pairs"][k] for k in records}
    shared = scores_overlap([c for c in cells if (c["donor"], c["receiver"]) in records])
    rows = []
    for s in strategies:
        why = _measured(s, records)
        pairs = {} if why else {
            (d, r): score_pair(s, rec, curves.get((d, r), {}), base.get(r), ceil.get(r))
            for (d, r), rec in records.items()
        }  # fmt: skip
        rows.append(_row(s.name, s.data, why, pairs, ref) | {
            "overlap": None if why else pair_overlap(s.data, pairs, shared)})  # fmt: skip
    best_pairs = {
        k: {"lam": p["lambda_best"], "delta": p["delta_best"], "recovery": p["recovery_best"],
            "acc": acc_at(curves.get(k, {}), base.get(k[1]), p["lambda_best"] or 0.0)}
        for k, p in ref.items()
    }  # fmt: skip
    rows.append(_row(LAMBDA_BEST, "labelled receiver", None, best_pairs, ref))
    fair = [r for r in rows[:-1] if r["measured"] and r["data"] not in RECEIVER_DATA]
    fair = [r for r in fair if r["stats"]["mean_delta"] is not None]
    best = max(fair, key=lambda r: r["stats"]["mean_delta"], default=None)
    return {
        "rows": rows,
        "fixed": fixed,
        "best_here": best and best["name"],
        "n_pairs": len(records),
    }


def _row(name: str, data: str, why: str | None, pairs: dict, ref: dict) -> dict:
    return {
        "name": name,
        "data": data,
        "measured": why is None,
        "reason": why,
        "stats": _row_stats(pairs, ref) if why is None else None,
        "pairs": pairs,
    }


def row_of(strategy_metrics_: dict, name: str) -> dict | None:
    """The row of strategy ``name`` (None if not in the table)."""
    return next((r for r in strategy_metrics_["rows"] if r["name"] == name), None)


# ----------------------------------------------------------------------------- summary.md

_HEADER = [
    "strategy", "data", "wins (delta>0)", "mean delta", "median delta", "mean recovery",
    "captured of lambda_best's gain over lambda=1", "worst regret vs lambda_best",
    SHARED_HEADER,
]  # fmt: skip


def strategy_section(sm: dict) -> list[str]:
    """The ``summary.md`` section: one row per strategy, the data it uses beside it."""
    rows = []
    for r in sm["rows"]:
        label = DATA_LABELS.get(r["data"], r["data"])
        if not r["measured"]:
            rows.append([f"`{r['name']}`", label, f"not measured: {r['reason']}"] + [""] * 6)
            continue
        s = r["stats"]
        rows.append([
            f"`{r['name']}`", label, _rate(s), _pts(s["mean_delta"], True),
            _pts(s["median_delta"], True), _ratio(s["mean_recovery"]), _ratio(s["captured"]),
            _pts(s["worst_regret"]), shared_cell(r),
        ])  # fmt: skip
    one = row_of(sm, "lam=1")
    regret1 = _pts(one["stats"]["worst_regret"]) if one and one["measured"] else "n/a"
    fixed = row_of(sm, sm["fixed"])
    lines = [
        "",
        "## Lambda strategies (choosing lambda without receiver labels)",
        "",
        f"Each strategy picks lambda from 0 (no patch: `PTQ(FP_R)`) and the grid's lambdas; "
        f"its score on a pair is the test accuracy at its pick (the patch cell, or `PTQ(FP_R)` "
        f"at 0). Over {sm['n_pairs']} cross-task pairs. Captured = (mean delta - mean delta "
        "at lambda=1) / (mean delta at lambda_best - mean delta at lambda=1); worst regret = "
        "max over pairs of acc(lambda_best) - acc(pick), in points. Rows whose data is the "
        "receiver's own are not zero-shot, and so are rows whose donor or pretext images hold "
        "receiver images (the same example in the same view; counted per split).",
        "",
        table(_HEADER, rows),
        "",
        f"Worst regret of lambda=1 (the paper's zero-shot choice): {regret1} points.",
        f"Fixed in advance (not chosen on these tasks): **`{sm['fixed']}`** "
        f"({data_label(fixed) if fixed else 'not in the table'}); "
        "its heatmap is `heatmap_delta_strategy.png`.",
    ]
    if sm["best_here"]:
        lines.append(
            f"On THIS task set the no-receiver-data strategy with the highest mean delta would "
            f"be `{sm['best_here']}` (picked on these tasks' test labels: not a fair choice; "
            "choose on a DEV task set)."
        )
    return lines


def plot_strategy_heatmap(sm: dict, tasks: list[str], path, bits: str):
    """Donor x receiver heatmap of the fixed strategy's delta (points), its pick below."""
    row = row_of(sm, sm["fixed"])
    pairs = row["pairs"] if row and row["measured"] else {}
    nan = float("nan")
    m = [[100 * p["delta"] if (p := pairs.get((d, r))) and p["delta"] is not None else nan
          for r in tasks] for d in tasks]  # fmt: skip
    notes = [[f"λ={pairs[(d, r)]['lam']:g}" if (d, r) in pairs else "" for r in tasks]
             for d in tasks]  # fmt: skip
    why = "" if pairs else " (NOT MEASURED: no cells)"
    shared = (row or {}).get("overlap") or {}
    data = "no receiver data"
    if shared.get("hit") or shared.get("unknown"):
        data = (f"its {row['data']} images hold receiver images for {shared['hit']}/"
                f"{shared['of']} {shared['unit']}: NOT receiver-free")  # fmt: skip
    return plot_heatmap(
        m, tasks, path, fmt="{:+.1f}", notes=notes,
        cbar_label="delta vs PTQ(FP_R), test (pts)",
        title=f"lambda chosen by {sm['fixed']} (fixed in advance; {data}){why}, "
        f"{bits}\ndelta read on test; 2nd line: the chosen lambda (0 = no patch)",
    )  # fmt: skip
