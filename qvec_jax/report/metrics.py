"""Metrics of a transfer grid: pure functions of its cell records (METHOD.md).

Accuracies are post-PTQ on the receiver:

- ``delta(D, R, lam) = acc(PTQ(FP_R + lam * QV_D)) - acc(PTQ(FP_R))``;
- ``ceiling(R)`` is the self pair at ``lam = 1`` (``D == R``);
- ``recovery = delta / ceiling``, undefined (None) when ``ceiling <= 0``;
- a win is ``delta > 0``; win rate, mean and median are over cross-task pairs.

Three lambda modes, always labelled: ``lambda=1`` (zero-shot, no receiver data),
``lambda_best`` (argmax of the receiver's *val* accuracy, read on test: uses receiver
data; ties go to the lambda closest to 1, then the smaller one) and the full curve.
Everything here is a fraction (not percentage points).
"""

from __future__ import annotations

import statistics

from qvec_jax.grid.store import SPLITS, cell_key

ZERO_SHOT = "lambda=1 (zero-shot)"
LAMBDA_BEST = "lambda_best (chosen on receiver val: uses receiver data)"
CURVE = "full lambda curve"
BASELINE_KINDS = ("fp", "ptq_fp", "ptq_qat")


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


# ----------------------------------------------------------------------------- compute_metrics


class _Grid:
    """The cells sorted into baselines and patch curves, with the delta rule."""

    def __init__(self, cells: list[dict]):
        self.base: dict[str, dict[str, dict[str, float]]] = {}
        self.patch: dict[tuple[str, str], dict[float, dict[str, float]]] = {}
        for c in cells:
            if c["kind"] in BASELINE_KINDS:
                self.base.setdefault(c["receiver"], {})[c["kind"]] = dict(c["acc"])
            elif c["kind"] == "patch":
                curve = self.patch.setdefault((c["donor"], c["receiver"]), {})
                curve[float(c["lam"])] = dict(c["acc"])
            else:
                raise ValueError(f"unknown cell kind {c['kind']!r} in {c}")

    def delta(self, receiver: str, acc: dict, split: str) -> float | None:
        b = self.base.get(receiver, {}).get("ptq_fp", {}).get(split)
        a = acc.get(split)
        return None if a is None or b is None else a - b

    def baselines(self, tasks: list[str]) -> dict[str, dict]:
        out = {}
        for r in tasks:
            b = self.base.get(r, {})
            self1 = self.patch.get((r, r), {}).get(1.0, {})
            out[r] = {
                **{k: b.get(k) for k in BASELINE_KINDS},
                "ceiling": self.delta(r, self1, "test"),
                "ceiling_val": self.delta(r, self1, "val"),
            }
        return out

    def pair(self, d: str, r: str, ceiling: float | None, lambdas: list[float]) -> dict:
        points = {
            lam: {
                "val": acc.get("val"),
                "test": acc.get("test"),
                "delta": self.delta(r, acc, "test"),
                "delta_val": self.delta(r, acc, "val"),
            }
            for lam, acc in sorted(self.patch[(d, r)].items())
        }
        lam_best = choose_lambda_best(
            {lam: p["val"] for lam, p in points.items() if p["val"] is not None}
        )
        d1 = points.get(1.0, {}).get("delta")
        dbest = points[lam_best]["delta"] if lam_best is not None else None
        return {
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


def _mode_stats(cross: list[dict], get_delta, get_rec) -> dict:
    ds = [get_delta(p) for p in cross]
    keep = [(dd, get_rec(p)) for p, dd in zip(cross, ds) if dd is not None]
    return _stats([dd for dd, _ in keep], [rr for _, rr in keep if rr is not None])


def _modes(cross: list[dict], baselines: dict, lambdas: list[float]) -> dict:
    """Cross-task statistics per lambda mode (the curve mode keyed by lambda)."""
    zero = _mode_stats(cross, lambda p: p["delta_1"], lambda p: p["recovery_1"])
    best = _mode_stats(cross, lambda p: p["delta_best"], lambda p: p["recovery_best"])
    lbs = [p["lambda_best"] for p in cross if p["lambda_best"] is not None]
    best["median_lambda_best"] = statistics.median(lbs) if lbs else None
    curve_stats = {}
    for lam in lambdas:

        def at(p, lam=lam):
            return p["curve"].get(lam, {}).get("delta")

        curve_stats[lam] = _mode_stats(
            cross,
            at,
            lambda p, at=at: recovery(at(p), baselines.get(p["receiver"], {}).get("ceiling")),
        )
    return {ZERO_SHOT: zero, LAMBDA_BEST: best, CURVE: curve_stats}


def _group(cross: list[dict], tasks: list[str], key: str) -> dict[str, dict]:
    """Zero-shot statistics of the cross-task pairs per donor or per receiver."""
    out = {}
    for t in tasks:
        ps = [p for p in cross if p[key] == t and p["delta_1"] is not None]
        out[t] = _stats([p["delta_1"] for p in ps], [])
    return out


def _n_in_grid(cells: list[dict], tasks: set, lambdas: set) -> int:
    """Cells that belong to the requested grid (its tasks and lambdas)."""
    return sum(
        c["receiver"] in tasks
        and (c["kind"] != "patch" or (c["donor"] in tasks and float(c["lam"]) in lambdas))
        for c in cells
    )


def compute_metrics(
    cells: list[dict], *, tasks: list[str] | None = None, lambdas: list[float] | None = None
) -> dict:
    """All derived numbers of a grid, as plain dicts (fractions, not points).

    Returns ``{"tasks", "lambdas", "baselines", "pairs", "modes", "donors",
    "receivers", "n_cells", "n_cells_in_grid"}``. ``pairs[(D, R)]`` holds the curve (per
    lambda: val/test acc and delta), ``lambda_best`` and the deltas/recoveries at
    lambda=1 and at lambda_best (all on test). ``modes`` holds the cross-task summary
    statistics per lambda mode (the curve mode is keyed by lambda).
    """
    g = _Grid(cells)
    seen = sorted({r for r in g.base} | {t for pair in g.patch for t in pair})
    tasks = list(tasks) if tasks else seen
    asked_tasks, asked_lams = set(tasks), set(lambdas or [])
    tasks += [t for t in seen if t not in tasks]
    lam_seen = sorted({lam for curve in g.patch.values() for lam in curve})
    lambdas = sorted(set(lambdas or []) | set(lam_seen))
    asked_lams = asked_lams or set(lambdas)

    baselines = g.baselines(tasks)
    pairs = {(d, r): g.pair(d, r, baselines.get(r, {}).get("ceiling"), lambdas) for d, r in g.patch}
    cross = [p for p in pairs.values() if not p["self"]]
    return {
        "tasks": tasks,
        "lambdas": lambdas,
        "baselines": baselines,
        "pairs": pairs,
        "modes": _modes(cross, baselines, lambdas),
        "donors": _group(cross, tasks, "donor"),
        "receivers": _group(cross, tasks, "receiver"),
        "n_cells": len(cells),
        "n_cells_in_grid": _n_in_grid(cells, asked_tasks, asked_lams),
    }


# ----------------------------------------------------------------------------- tidy rows


def _blank(x):
    return "" if x is None else x


def _tidy_row(c: dict, split: str, metrics: dict, meta: dict) -> dict | None:
    r = c["receiver"]
    b = metrics["baselines"].get(r, {})
    pair = metrics["pairs"].get((c.get("donor"), r)) if c["kind"] == "patch" else None
    acc = c["acc"].get(split)
    if acc is None:
        return None
    base_acc = (b.get("ptq_fp") or {}).get(split)
    ceiling = b.get("ceiling") if split == "test" else b.get("ceiling_val")
    d = acc - base_acc if (pair is not None and base_acc is not None) else None
    return {
        "kind": c["kind"],
        "donor": c.get("donor") or "",
        "receiver": r,
        "lam": "" if c.get("lam") is None else float(c["lam"]),
        "self": "" if pair is None else pair["self"],
        "split": split,
        "acc": acc,
        "n": c.get("n", {}).get(split, ""),
        "base_acc": _blank(base_acc),
        "delta": _blank(d),
        "ceiling": "" if pair is None or ceiling is None else ceiling,
        "recovery": _blank(recovery(d, ceiling)) if pair is not None else "",
        "is_lambda_best": "" if pair is None else float(c["lam"]) == pair["lambda_best"],
        "bits": c.get("bits", meta.get("bits", "")),
        "granularity": c.get("granularity", meta.get("granularity", "")),
    }


def tidy_rows(cells: list[dict], metrics: dict, meta: dict | None = None) -> list[dict]:
    """One row per cell and split, with base accuracy, delta, ceiling and recovery."""
    meta = meta or {}
    order = {k: i for i, k in enumerate(BASELINE_KINDS + ("patch",))}
    rows = []
    for c in sorted(cells, key=lambda c: (c["receiver"], order[c["kind"]], cell_key(c))):
        rows += [row for s in SPLITS if (row := _tidy_row(c, s, metrics, meta)) is not None]
    return rows


def jsonable(metrics: dict, meta: dict) -> dict:
    """The metrics as JSON-ready data (``summary.json``): pairs and curves as lists."""
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
