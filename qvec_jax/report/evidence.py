"""The analysis of a ``qvec study`` (issue 21): every approach's win rate, mean delta and
mean accuracy over the study's pairs, each with a 95% interval from the two-way task
bootstrap (:mod:`qvec_jax.study.stats`), the paired differences that matter, what a
5-task demo run would show, the spread over seeds, and "when does it help?".

Units. A pair ``(receiver, donor)`` for RTN+QV, the lambda strategies and GPTQ+QV; a
receiver for PTQ(QAT_R), the leave-one-out merges and GPTQ(FP_R). Every delta is taken
against the receiver's RTN(FP_R) on its test split (the study's evaluation sample). With
several seeds, each unit's value is its mean over the seeds (a win counts as the
fraction of seeds won), and the spread over seeds is reported beside it.

:func:`approaches_of_grid` reads one grid; :mod:`qvec_jax.report.study_analysis`
combines the seeds and computes the intervals; :mod:`qvec_jax.report.study` renders.
"""

from __future__ import annotations

from collections import defaultdict

from qvec_jax.grid.store import GridStore
from qvec_jax.report.extras import extras_metrics
from qvec_jax.report.metrics import compute_metrics
from qvec_jax.report.overlap import calib_counts, overlap_text, summarize

__all__ = ["BEST", "RTN1", "TIES", "approaches_of_grid", "bank_key"]

RTN1, BEST, TIES = "rtn_qv_1", "rtn_qv_best", "loo_ties"
GPTQ_DATA = {
    "receiver": "unlabelled receiver",
    "donor": "donor",
    "pretext": "pretext",
    "noise": "none",
}


def _approach(key, name, data, unit, zero_shot, overlap=None) -> dict:
    return {
        "key": key,
        "name": name,
        "data": data,
        "unit": unit,
        "zero_shot": zero_shot,
        "overlap": overlap or None,
        "values": {},
    }


def _base(metrics: dict) -> dict[str, float]:
    return {r: b["ptq_fp"]["test"] for r, b in metrics["baselines"].items() if b.get("ptq_fp")}


def _rtn_rows(metrics: dict, base: dict) -> list[dict]:
    """PTQ(QAT_R), RTN+QV at lambda=1 and at lambda_best (chosen on receiver val)."""
    qat = _approach(
        "ptq_qat",
        "PTQ(QAT_R): QAT on the receiver (the ceiling)",
        "labelled receiver",
        "receiver",
        False,
    )
    one = _approach(RTN1, "RTN(FP_R + QV_D), lambda = 1", "donor QAT", "pair", True)
    best = _approach(
        BEST,
        "RTN(FP_R + lambda QV_D), lambda_best on receiver val",
        "donor QAT + labelled receiver val",
        "pair",
        False,
    )
    for r, b in metrics["baselines"].items():
        if b.get("ptq_qat") and r in base:
            qat["values"][(r, None)] = b["ptq_qat"]["test"]
    for (d, r), p in metrics["pairs"].items():
        if d == r or r not in base:
            continue
        if p.get("delta_1") is not None:
            one["values"][(r, d)] = base[r] + p["delta_1"]
        if p.get("delta_best") is not None:
            best["values"][(r, d)] = base[r] + p["delta_best"]
    return [one, best, qat]


def _shown(name: str, fixed: str) -> bool:
    """The strategies a study's table shows: the choice, the weight-only ones and each
    proxy source's KL (``qvec tune`` compares every variant)."""
    return (
        name == fixed
        or name in ("rtn-error", "model-stock")
        or (name.startswith("proxy-") and name.endswith("-kl") and "-rx32-" not in name)
    )


def _strategy_rows(em: dict | None) -> list[dict]:
    """One approach per shown lambda strategy (its accuracy at the lambda it picks)."""
    if not em:
        return []
    out, fixed = [], em["strategies"]["fixed"]
    for row in em["strategies"]["rows"]:
        if (
            not row["measured"]
            or row["data"] == "labelled receiver"
            or not _shown(row["name"], fixed)
        ):
            continue
        mark = " (the study's choice)" if row["name"] == fixed else ""
        a = _approach(
            f"strategy:{row['name']}",
            f"RTN(FP_R + lambda QV_D), lambda by `{row['name']}`{mark}",
            "donor QAT" + (f" + {row['data']}" if row["data"] != "none" else ""),
            "pair",
            row["data"] not in ("unlabelled receiver",),
            overlap_text(row.get("overlap")),
        )
        a["chosen"] = bool(mark)
        for (d, r), p in row["pairs"].items():
            if p.get("acc") is not None:
                a["values"][(r, d)] = p["acc"]
        out.append(a)
    return out


def _cell_approach(c: dict) -> tuple[dict, tuple] | None:
    """The approach a leave-one-out merge (lambda=1), GPTQ(FP_R), GPTQ+QV (lambda=1) or
    GPTQ of a leave-one-out bank (lambda=1) cell belongs to, and its unit key; None for
    other cells."""
    kind, r, d = c["kind"], c["receiver"], c.get("donor")
    if kind == "merge" and c.get("lam") == 1.0 and str(d).startswith("loo:"):
        m = d.split(":", 1)[1]
        name = f"RTN(FP_R + merge_{m}(other QVs)), lambda = 1 (leave-one-out)"
        return _approach(f"loo_{m}", name, "donor QAT", "receiver", True), (r, None)
    if kind.startswith("gptq:"):
        src = kind.split(":", 1)[1]
        name = f"GPTQ(FP_R), calibration: {src}"
        a = _approach(f"gptq_{src}", name, GPTQ_DATA[src], "receiver", src != "receiver")
        return a, (r, None)
    if kind.startswith("gptq+bank:") and str(d).startswith("loo:"):
        src, m, lam = kind.split(":", 1)[1], d.split(":", 1)[1], float(c["lam"])
        name = f"GPTQ(FP_R + {lam:g} merge_{m}(other QVs)), calibration: {src}"
        data = "donor QAT" + ("" if src == "noise" else f" + {GPTQ_DATA[src]}")
        key = bank_key(m, src, lam)
        return _approach(key, name, data, "receiver", True), (r, None)  # a fixed lam
    if kind == "gptq+qv:donor" and c.get("lam") == 1.0:
        name = "GPTQ(FP_R + QV_D), lambda = 1, calibration: the donor's images"
        return _approach("gptq_qv", name, "donor QAT + donor", "pair", True), (r, d)
    return None


def bank_key(method: str, source: str, lam: float) -> str:
    """The approach key of GPTQ of a leave-one-out bank: ``gptq_bank_ties_pretext@0.5``."""
    return f"gptq_bank_{method}_{source}@{float(lam):g}"


CELL_ORDER = ("loo_mean", "loo_ties", "gptq_noise", "gptq_pretext", "gptq_donor",
              "gptq_receiver", "gptq_qv")  # fmt: skip


def _cell_rows(cells: list[dict]) -> list[dict]:
    """Leave-one-out merges at lambda=1, GPTQ(FP_R) per calibration source, GPTQ+QV; the
    GPTQ rows with the receiver images their calibration sets hold."""
    rows: dict[str, dict] = {}
    hits: dict[str, dict] = defaultdict(dict)
    for c in cells:
        acc, found = (c.get("acc") or {}).get("test"), _cell_approach(c)
        if acc is None or found is None:
            continue
        a, (r, d) = found
        rows.setdefault(a["key"], a)["values"][(r, d)] = acc
        if a["key"].startswith("gptq"):
            hits[a["key"]][r if d is None else f"{d}->{r}"] = calib_counts(c)
    for key, by in hits.items():
        unit = "pairs" if rows[key]["unit"] == "pair" else "receivers"
        rows[key]["overlap"] = overlap_text(summarize(by, unit)) or "0 images"
    ordered = [rows[k] for k in CELL_ORDER if k in rows]
    return ordered + [rows[k] for k in sorted(rows) if k not in CELL_ORDER]


def approaches_of_grid(workdir, strategy: str | None = None) -> tuple[dict, list[dict], dict]:
    """``(baseline accuracies by receiver, approaches with their unit accuracies, meta)``
    of one study grid (``strategy``: the fixed one, default the grid's)."""
    store = GridStore(workdir)
    meta, every = store.meta(), store.cells()
    main = [c for c in every if c["kind"] in ("fp", "ptq_fp", "ptq_qat", "patch")]
    metrics = compute_metrics(main, tasks=meta.get("tasks"), lambdas=meta.get("lambdas"))
    base = _base(metrics)
    em = extras_metrics(every, metrics, store.workdir, strategy)
    rows = [*_rtn_rows(metrics, base), *_strategy_rows(em), *_cell_rows(every)]
    return base, rows, meta | {"strategy": em["strategies"]["fixed"] if em else None}
