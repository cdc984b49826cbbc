"""Leave-one-out QV merges scored on a grid (issue 14): pure functions of its cells.

For each receiver R and merge method m, the ``merge`` cells hold the test accuracy of
``PTQ(FP_R + lam * merge_m(QV_D, D != R))`` per lambda (``lam = 0`` is ``PTQ(FP_R)``)
and a ``scores`` cell (donor ``"loo:<m>"``) lets any lambda strategy choose for it.
Rows, at lambda=1 and under the fixed no-receiver-data strategy:

- each merge method, over receivers;
- the average single donor: over every cross-task pair (the mean over donors);
- the best single donor chosen without receiver data: per receiver, the donor whose
  QV has the highest cosine with the receiver's own PTQ residual ``PTQ(FP_R) - FP_R``
  on the quantized kernels (weights only; from the pair's ``scores`` record);
- the oracle best single donor: per receiver, the donor with the highest test delta
  (it reads the receiver's test labels: an upper bound, not a method).
"""

from __future__ import annotations

from qvec_jax.report.markdown import _pts, _rate, _ratio, table
from qvec_jax.report.metrics import recovery
from qvec_jax.report.overlap import overlap_text, scores_overlap
from qvec_jax.report.strategies import (
    DATA_LABELS,
    acc_at,
    pair_overlap,
    row_of,
    score_pair,
    scores_records,
    stats_of,
    test_curves,
)

#: The rule that picks the "best single donor" without receiver data.
NO_DATA_DONOR_RULE = "highest cos(QV_D, PTQ(FP_R) - FP_R) on the quantized kernels"


def _cos(record: dict) -> float:
    w = record.get("weights") or {}
    den = (w.get("qv_norm") or 0.0) * (w.get("residual_norm") or 0.0)
    return w.get("dot", 0.0) / den if den > 0 else float("-inf")


def _loo_rows(cells, metrics, strategy, base, ceil) -> list[dict]:
    """One row per merge method: its receivers at lambda=1 and under ``strategy``."""
    curves, records = test_curves(cells, "merge"), scores_records(cells, merged=True)
    methods = sorted({d for d, _ in curves} | {d for d, _ in records})
    rows = []
    for m in methods:
        at1, at_s = [], []
        for r in metrics["tasks"]:
            curve = curves.get((m, r))
            if curve is None:
                continue
            acc = acc_at(curve, base.get(r), 1.0)
            d1 = None if acc is None or base.get(r) is None else acc - base[r]
            at1.append({"receiver": r, "delta": d1, "recovery": recovery(d1, ceil.get(r))})
            rec = records.get((m, r))
            if rec is not None and strategy is not None and strategy.key in rec:
                at_s.append(
                    {"receiver": r, **score_pair(strategy, rec, curve, base.get(r), ceil.get(r))}
                )
        rows.append({"donor": m, "labels": False, "unit": "receivers", "at_1": at1, "at_s": at_s})
    return rows


def _single_rows(sm: dict, fixed_name: str) -> list[dict]:
    """Average, no-data-best and oracle-best single donor, from the strategy rows."""
    one, fixed = row_of(sm, "lam=1"), row_of(sm, fixed_name)
    p1 = one["pairs"] if one and one["measured"] else {}
    ps = fixed["pairs"] if fixed and fixed["measured"] else {}
    records = sm.get("records", {})
    out = [{"donor": "average single donor", "labels": False, "unit": "pairs",
            "at_1": list(p1.values()), "at_s": list(ps.values())}]  # fmt: skip
    chosen_1, chosen_s, oracle_1, oracle_s = [], [], [], []
    for r in sorted({r for _, r in p1}):
        donors = [d for d, rr in p1 if rr == r]
        by_cos = max(donors, key=lambda d: _cos(records.get((d, r), {})))
        chosen_1.append(p1[(by_cos, r)])
        if (by_cos, r) in ps:
            chosen_s.append(ps[(by_cos, r)])
        oracle_1.append(_oracle([p1[(d, r)] for d in donors]))
        if any((d, r) in ps for d in donors):
            oracle_s.append(_oracle([ps[(d, r)] for d in donors if (d, r) in ps]))
    out.append(
        {
            "donor": f"best single donor by {NO_DATA_DONOR_RULE} (no receiver data)",
            "labels": False,
            "unit": "receivers",
            "at_1": chosen_1,
            "at_s": chosen_s,
        }
    )
    out.append({"donor": "oracle best single donor (uses receiver test labels)", "labels": True,
                "unit": "receivers", "at_1": oracle_1, "at_s": oracle_s})  # fmt: skip
    return out


def _oracle(points: list[dict]) -> dict:
    known = [p for p in points if p["delta"] is not None]
    return max(known, key=lambda p: p["delta"]) if known else {"delta": None, "recovery": None}


def merge_metrics(cells: list[dict], metrics: dict, sm: dict, strategy) -> dict:
    """The merge rows and the single-donor rows beside them (see the module docstring);
    ``sm``: :func:`~qvec_jax.report.strategies.strategy_metrics` of the same cells,
    ``strategy``: the fixed strategy (a ``select.Strategy``)."""
    base = {r: (b.get("ptq_fp") or {}).get("test") for r, b in metrics["baselines"].items()}
    ceil = {r: b.get("ceiling") for r, b in metrics["baselines"].items()}
    sm = sm | {"records": scores_records(cells)}
    rows = _loo_rows(cells, metrics, strategy, base, ceil) + _single_rows(sm, sm["fixed"])
    for row in rows:
        row["stats_1"], row["stats_s"] = stats_of(row["at_1"]), stats_of(row["at_s"])
    out = {"rows": rows, "fixed": sm["fixed"], "rule": NO_DATA_DONOR_RULE}
    if strategy is not None:  # what the fixed strategy's images hold of the receivers'
        loo = list(scores_records(cells, merged=True))
        shared = scores_overlap([c for c in cells if c["kind"] == "scores" and
                                 str(c["donor"]).startswith("loo:")])  # fmt: skip
        single = row_of(sm, sm["fixed"]) or {}
        out |= {"data": strategy.data, "overlap": pair_overlap(strategy.data, loo, shared),
                "single_overlap": single.get("overlap")}  # fmt: skip
    return out


def _overlap_lines(mm: dict) -> list[str]:
    """What the fixed strategy's images hold of the receivers', merges then single donors."""
    label = DATA_LABELS.get(mm.get("data"), mm.get("data"))
    lines = []
    for what, key in (("merge rows", "overlap"), ("single-donor rows", "single_overlap")):
        text = overlap_text(mm.get(key), "they")
        if text:
            lines.append(f"`@ {mm['fixed']}` reads {label} in the {what}: {text}.")
    return lines


def merge_section(mm: dict) -> list[str]:
    """The ``summary.md`` section: a row per merge method, single-donor rows beside."""
    s_name = mm["fixed"]
    header = ["donor", "over", "wins @ lambda=1", "mean delta @ lambda=1",
              "mean recovery @ lambda=1", f"wins @ {s_name}", f"mean delta @ {s_name}",
              f"mean recovery @ {s_name}"]  # fmt: skip
    rows = []
    for row in mm["rows"]:
        a, b = row["stats_1"], row["stats_s"]
        rows.append([
            f"`{row['donor']}`" if row["donor"].startswith("loo:") else row["donor"],
            row["unit"], _rate(a), _pts(a["mean_delta"], True), _ratio(a["mean_recovery"]),
            _rate(b), _pts(b["mean_delta"], True), _ratio(b["mean_recovery"]),
        ])  # fmt: skip
    return [
        "",
        "## Leave-one-out merges (many donors, one vector)",
        "",
        "For each receiver R, the QVs of every donor except R merged into one (`loo:<method>`,"
        " at `qvec_jax.merge` defaults: ties density 0.2, dare p 0.5 seed 0), then patched and "
        f"quantized like a single donor. `@ {s_name}`: lambda chosen by that strategy (fixed "
        "in advance, no receiver data by design). Merge rows are over receivers, the average "
        "single donor over cross-task pairs; the best single donor without receiver data is "
        f"the one with the {NO_DATA_DONOR_RULE}; the oracle reads the receiver's test labels.",
        *([""] + _overlap_lines(mm) if _overlap_lines(mm) else []),
        *(["", mm["note"] + "."] if mm.get("note") else []),
        "",
        table(header, rows),
    ]
