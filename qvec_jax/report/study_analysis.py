"""A study's analysis (issue 21): the approaches of its grids (one per seed,
:mod:`qvec_jax.report.evidence`) combined over seeds, with 95% intervals from the
two-way task bootstrap (:mod:`qvec_jax.study.stats`); the paired differences that
matter; what a 5-task demo run would show; the spread over seeds; "when does it help?"
(:mod:`qvec_jax.report.predictors`). :func:`study_report` writes it
(:mod:`qvec_jax.report.study`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from qvec_jax.grid.store import GridStore
from qvec_jax.report.checks import grid_checks
from qvec_jax.report.evidence import BEST, RTN1, TIES, approaches_of_grid
from qvec_jax.report.metrics import compute_metrics
from qvec_jax.report.predictors import cosines, pair_features
from qvec_jax.report.quantize import quantize_lines, quantize_section
from qvec_jax.report.study import write_study_report
from qvec_jax.study import stats
from qvec_jax.study.run import REQUEST_FILE

__all__ = ["analyze", "headline", "load_study", "study_report"]


def _merge_seeds(per_seed: list[tuple[dict, list[dict]]]):
    """Average each unit's accuracy and win over the seeds: ``(base, approaches)`` with
    ``values`` (accuracy), ``deltas`` and ``wins`` per unit."""
    base_acc: dict[str, list] = defaultdict(list)
    for base, _ in per_seed:
        for r, a in base.items():
            base_acc[r].append(a)
    merged: dict[str, dict] = {}
    for base, rows in per_seed:
        for a in rows:
            m = merged.setdefault(
                a["key"],
                {k: v for k, v in a.items() if k != "values"}
                | {"acc": defaultdict(list), "delta": defaultdict(list)},
            )
            for (r, d), acc in a["values"].items():
                m["acc"][(r, d)].append(acc)
                m["delta"][(r, d)].append(acc - base[r])
    base_mean = {r: float(np.mean(v)) for r, v in base_acc.items()}
    for m in merged.values():
        m["wins"] = {k: float(np.mean(np.array(v) > 0)) for k, v in m["delta"].items()}
        m["delta"] = {k: float(np.mean(v)) for k, v in m.pop("delta").items()}
        m["acc"] = {k: float(np.mean(v)) for k, v in m["acc"].items()}
    return base_mean, list(merged.values())


def _summary(a: dict, tasks: list[str]) -> dict:
    out = {k: v for k, v in a.items() if k not in ("acc", "delta", "wins")}
    out["n"] = len(a["acc"])
    out["win_rate"] = stats.bootstrap(a["wins"], tasks)
    out["mean_delta"] = stats.bootstrap(a["delta"], tasks)
    out["mean_acc"] = stats.bootstrap(a["acc"], tasks)
    return out


def _diff(a: dict, b: dict) -> dict[tuple, float]:
    """Per-unit ``a - b`` accuracy on the finer approach's units (pairs over receivers): a
    per-receiver number meets a pair at the pair's receiver."""
    per_receiver = all(d is None for _, d in a["acc"])
    fine, coarse, sign = (b, a, -1.0) if per_receiver else (a, b, 1.0)
    out = {}
    for (r, d), x in fine["acc"].items():
        y = coarse["acc"].get((r, d), coarse["acc"].get((r, None)))
        if y is not None:
            out[(r, d)] = sign * (x - y)
    return out


PAIRED = (
    (BEST, RTN1, "lambda_best (receiver val) vs lambda = 1"),
    (TIES, RTN1, "leave-one-out TIES merge vs lambda = 1"),
    ("gptq_noise", RTN1, "GPTQ(FP_R), noise calibration vs RTN + QV, lambda = 1"),
    ("gptq_pretext", RTN1, "GPTQ(FP_R), pretext calibration vs RTN + QV, lambda = 1"),
    ("gptq_qv", "gptq_donor", "GPTQ + QV (donor images) vs GPTQ (another task's images)"),
    ("gptq_qv", RTN1, "GPTQ + QV (donor images) vs RTN + QV, lambda = 1"),
)


def _paired(by_key: dict, tasks: list[str], chosen: str | None) -> list[dict]:
    specs = list(PAIRED) + ([(chosen, RTN1, "the chosen strategy vs lambda = 1")] if chosen else [])
    out = []
    for a, b, name in specs:
        if a in by_key and b in by_key and (d := _diff(by_key[a], by_key[b])):
            out.append(
                {
                    "name": name,
                    "a": a,
                    "b": b,
                    "n": len(d),
                    "mean_diff": stats.bootstrap(d, tasks),
                    "a_wins": stats.bootstrap({k: float(v > 0) for k, v in d.items()}, tasks),
                }
            )
    return out


def _draws(rtn1: dict, tasks: list[str], k: int = 5) -> dict | None:
    rates = stats.k_task_draws(rtn1["wins"], tasks, k)
    if not len(rates):
        return None
    return {
        "k": k,
        "approach": RTN1,
        "n_draws": int(len(rates)),
        "rates": [float(x) for x in rates],
        "frac_ge_75": float(np.mean(rates >= 0.75 - 1e-12)),
        "median": float(np.median(rates)),
        "p05": float(np.quantile(rates, 0.05)),
        "p95": float(np.quantile(rates, 0.95)),
    }


def _seed_spread(per_seed: list[tuple[int, dict, list[dict]]]) -> dict | None:
    if len(per_seed) < 2:
        return None
    rows = []
    for seed, base, approaches in per_seed:
        a = next(x for x in approaches if x["key"] == RTN1)
        deltas = [acc - base[r] for (r, _), acc in a["values"].items()]
        rows.append(
            {
                "seed": seed,
                "win_rate": float(np.mean(np.array(deltas) > 0)),
                "mean_delta": float(np.mean(deltas)),
                "n": len(deltas),
            }
        )
    sd = lambda k: float(np.std([r[k] for r in rows], ddof=1))  # noqa: E731
    return {
        "approach": RTN1,
        "per_seed": rows,
        "sd_win_rate": sd("win_rate"),
        "sd_mean_delta": sd("mean_delta"),
    }


def _conditions(rtn1: dict, tasks, features: dict) -> list[dict]:
    groups: dict[tuple, list] = defaultdict(list)
    for key in rtn1["delta"]:
        for pred, g in features.get(key, {}).items():
            groups[(pred, g)].append(key)
    out = []
    for (pred, g), keys in sorted(groups.items()):
        out.append(
            {
                "predictor": pred,
                "group": g,
                "n": len(keys),
                "win_rate": stats.bootstrap({k: rtn1["wins"][k] for k in keys}, tasks),
                "mean_delta": stats.bootstrap({k: rtn1["delta"][k] for k in keys}, tasks),
            }
        )
    return out


def analyze(study: dict, grids: dict[int, Path], *, strategy=None, strategy_source="") -> dict:
    """The analysis of a study (``study``: its ``request.json``; ``grids``: seed -> grid
    workdir) with ``strategy`` as the reported choice (default: the grids' own)."""
    tasks, spec = study["tasks"], study["spec"]
    per_seed = [(s, *approaches_of_grid(g, strategy)) for s, g in sorted(grids.items())]
    base, approaches = _merge_seeds([(b, rows) for _, b, rows, _ in per_seed])
    by_key = {a["key"]: a for a in approaches}
    meta = per_seed[0][3]
    ceilings = (
        {r: v - base[r] for (r, _), v in by_key["ptq_qat"]["acc"].items()}
        if "ptq_qat" in by_key
        else {}
    )
    features = pair_features(tasks, ceilings, cosines(meta, tasks))
    chosen = next((a["key"] for a in approaches if a.get("chosen")), None)
    eval_n = spec.get("eval_n")
    return {
        "half": spec["half"],
        "tasks": tasks,
        "seeds": sorted(grids),
        "per_seed": len(grids) > 1,
        "n_pairs": len(tasks) * (len(tasks) - 1),
        "eval_n": eval_n,
        "eval_note": _eval_note(eval_n),
        "lambdas": spec["lambdas"],
        "strategy": strategy or meta.get("strategy") or "",
        "strategy_source": strategy_source,
        "baseline": {
            "name": "RTN(FP_R)",
            "data": "none",
            "mean_acc": stats.bootstrap({(r, None): a for r, a in base.items()}, tasks),
        },
        "approaches": [_summary(a, tasks) for a in approaches],
        "paired": _paired(by_key, tasks, chosen),
        "quantize": quantize_section(by_key, base, tasks),
        "draws": _draws(by_key[RTN1], tasks) if RTN1 in by_key else None,
        "seed_spread": _seed_spread([(s, b, rows) for s, b, rows, _ in per_seed]),
        "by_condition": _conditions(by_key[RTN1], tasks, features) if RTN1 in by_key else [],
        "conditions_approach": RTN1,
        "warnings": [],
        "seconds": None,
    }


def _eval_note(eval_n) -> str:
    if not eval_n:
        return "Every cell is evaluated on the whole val and test splits."
    se = 100 * np.sqrt(0.25 / eval_n)
    return (
        f"The same images for every approach: an accuracy on {eval_n} images carries at "
        f"most {se:.1f} points of binomial standard error, a difference on the same images "
        "less; the task bootstrap's intervals include this noise."
    )


def load_study(workdir) -> tuple[dict, dict[int, Path]]:
    """``(request.json, {seed: grid workdir})`` of a study workdir."""
    workdir = Path(workdir)
    study = json.loads((workdir / REQUEST_FILE).read_text())
    seeds = study.get("seeds") or []
    grids = {int(s): workdir / f"seed-{s}" / "grid" for s in seeds}
    return study, {s: g for s, g in grids.items() if GridStore(g).exists()}


def study_report(workdir, *, strategy=None, strategy_source="", seconds=None) -> dict:
    """Analyze the study in ``workdir`` and write ``study.md``, ``study.json`` and its
    plots there (:mod:`qvec_jax.report.study`); ``{"analysis", "paths"}``."""
    study, grids = load_study(workdir)
    if not grids:
        raise FileNotFoundError(f"{workdir}: no study grid here; run `qvec study` first")
    a = analyze(study, grids, strategy=strategy, strategy_source=strategy_source)
    if a["half"] == "test":
        a["warnings"].append(
            "TEST HALF: these numbers are the held-out report; never choose a recipe, strategy "
            "or constant on them (`qvec tune` refuses this study)"
        )
    for seed, g in grids.items():
        store = GridStore(g)
        main = [c for c in store.cells() if c["kind"] in ("fp", "ptq_fp", "ptq_qat", "patch")]
        m = compute_metrics(
            main, tasks=store.meta().get("tasks"), lambdas=store.meta().get("lambdas")
        )
        if grid_checks(store.meta(), m)["incomplete"]:
            a["warnings"].append(
                f"INCOMPLETE: the grid of seed {seed} misses cells; rerun `qvec study`"
            )
    missing = sorted(set(study.get("seeds") or []) - set(grids))
    if missing:
        a["warnings"].append(f"INCOMPLETE: no grid yet for seeds {missing}; rerun `qvec study`")
    a["seconds"] = seconds
    return {"analysis": a, "paths": write_study_report(a, workdir)}


def _iv(i: dict, pts: bool) -> str:
    if i["point"] is None:
        return "n/a"
    f = (lambda x: f"{100 * x:+.1f}") if pts else (lambda x: f"{100 * x:.0f}%")
    rng = "" if i["lo"] is None else f" [{f(i['lo'])}, {f(i['hi'])}]"
    return f(i["point"]) + rng


def headline(a: dict) -> str:
    """What ``qvec study`` prints: the half, then each approach's win rate and mean delta."""
    lines = [
        f"study, {a['half']} half: {len(a['tasks'])} views, {a['n_pairs']} pairs, seeds "
        f"{a['seeds']} (95% intervals, bootstrap over tasks)"
    ]
    for x in a["approaches"]:
        lines.append(
            f"  {x['name']}: wins {_iv(x['win_rate'], False)}, mean delta "
            f"{_iv(x['mean_delta'], True)} pts  [data: {x['data']}]"
        )
    lines += quantize_lines(a)
    if a.get("draws"):
        d = a["draws"]
        lines.append(
            f"  one {d['k']}-task demo run would show lambda=1 winning {100 * d['p05']:.0f}"
            f"-{100 * d['p95']:.0f}% (5-95%); >= 75% in {100 * d['frac_ge_75']:.0f}% of draws"
        )
    return "\n".join(lines)
