"""``summary.md``'s GPTQ rows: "What each approach needs and what it gives" (issue 15).

One row per approach, from the grid's cells (:mod:`qvec_jax.grid.gptq` adds the GPTQ
ones): RTN(FP_R); RTN+QV at lambda = 1 and at the configured no-receiver-data strategy's
lambda; GPTQ(FP_R) with each calibration source; GPTQ+QV at lambda = 1 and at the
strategy's lambda. Columns: whether it reads the receiver's labels, how many of the
receiver's images, whether it needs a donor's QAT run, the mean test accuracy after
quantization (over receivers; over cross-task pairs for the QV rows) and its wins
against RTN(FP_R) (test accuracy above RTN(FP_R)'s, per receiver or per pair).

A calibration set that holds images of the receiver (``calib_used.receiver_images``,
e.g. a pretext set that contains the receiver's classes) is said so in the receiver
images column, with the count per split (``report.overlap``: the package's one overlap
rule): the row then uses receiver images for those receivers, whatever its source is
called. So are the images a strategy row's lambda choice read (donor or pretext images
that hold receiver images). Everything is computed from stored cells; nothing is re-run.
"""

from __future__ import annotations

import statistics

from qvec_jax import select
from qvec_jax.grid.gptq import KIND, QV_KIND, SOURCES, is_gptq_cell
from qvec_jax.report.markdown import table
from qvec_jax.report.overlap import calib_counts, counts_of, overlap_text, scores_overlap, summarize
from qvec_jax.report.strategies import SAMPLED_DATA

__all__ = ["HEADER", "TITLE", "gptq_sections", "needs_gives"]

TITLE = "What each approach needs and what it gives"
HEADER = [
    "approach",
    "receiver labels",
    "receiver images",
    "donor QAT",
    "mean test acc after quantization",
    "wins vs RTN(FP_R)",
]
_SOURCE_TEXT = {
    "receiver": "the receiver's own train images, unlabelled",
    "donor": "another task's train images: the next task in the task list",
    "pretext": "the pretext task's train images",
    "noise": "synthetic noise images",
}


def _row(approach, images, qat: bool, accs: list[tuple], over: str) -> dict:
    """A table row from ``[(test acc, RTN(FP_R) test acc or None), ...]``."""
    vals = [a for a, _ in accs]
    wins = [a > b for a, b in accs if b is not None]
    return {
        "approach": approach,
        "receiver_labels": "no",
        "receiver_images": images,
        "donor_qat": "yes" if qat else "no",
        "over": over,
        "n": len(vals),
        "mean_test_acc": statistics.fmean(vals) if vals else None,
        "wins": sum(wins) if wins else None,
        "compared": len(wins),
    }


def _images_text(cells: list[dict], source: str) -> str:
    """What a set of GPTQ cells read of the receivers' images."""
    used = [c.get("calib_used") or {} for c in cells]
    ns = sorted({u.get("n") for u in used if u.get("n") is not None})
    k = "/".join(str(n) for n in ns) or "?"
    if source == "receiver":
        return f"{k} unlabelled (train split)"
    hit = sum(bool(u.get("receiver_images")) for u in used)
    if not hit:
        return "none"
    return f"none by design, but {hit}/{len(used)} calibration sets hold receiver images"


def _rtn(metrics: dict) -> dict[str, float]:
    out = {}
    for r, b in metrics["baselines"].items():
        acc = (b.get("ptq_fp") or {}).get("test")
        if acc is not None:
            out[r] = acc
    return out


def _cross(metrics: dict):
    return [p for p in metrics["pairs"].values() if not p["self"]]


def _rtn_qv_rows(metrics: dict, rtn: dict, by_strategy: dict[str, dict], cells) -> list[dict]:
    """RTN+QV at lambda = 1, and at each strategy's lambda (``{strategy: {(receiver,
    donor): choice}}``, from its GPTQ cells), read from the grid's patch cells."""
    at1 = [(p["curve"][1.0]["test"], rtn.get(p["receiver"])) for p in _cross(metrics)
           if p["curve"].get(1.0, {}).get("test") is not None]  # fmt: skip
    rows = [_row("RTN(FP_R + QV_D), lambda = 1 (zero-shot)", "none", True, at1, "pairs")]
    return rows + [
        _rtn_at(metrics, rtn, c, s) | {"lambda_overlap": choice_overlap(cells, c)}
        for s, c in sorted(by_strategy.items())
    ]


def _pretext_of(cells: list[dict]) -> str | None:
    """The grid's pretext task, as its GPTQ pretext cells or its scores cells record it."""
    for c in cells:
        if c["kind"] == f"{KIND}:pretext" and (c.get("calib") or {}).get("task"):
            return c["calib"]["task"]
    setups = [c.get("setup") or {} for c in cells if c["kind"] == "scores"]
    return next((s["pretext"] for s in setups if s.get("pretext")), None)


def choice_overlap(cells: list[dict], choices: dict) -> dict | None:
    """``report.overlap.summarize`` of the receiver images that the strategy's lambda
    choices (``{(receiver, donor): choice}``) read: a scores cell's count when the choice
    came from one, else counted from the sample the GPTQ stage drew (the donor's or the
    pretext's train images, the strategy's number of them, the calibration seed)."""
    data = next(iter(choices.values()), {}).get("data")
    if data not in SAMPLED_DATA:
        return None
    shared = scores_overlap([c for c in cells if c["kind"] == "scores"])
    pretext = _pretext_of(cells)
    seed = next(((c.get("calib") or {}).get("seed", 0) for c in cells if is_gptq_cell(c)), 0)
    counts = {}
    for (r, d), ch in choices.items():
        got = (shared.get((d, r)) or {}).get(data)
        if got is None or ch.get("from") != "the grid's scores cell":
            task = d if data == "donor" else pretext
            n = getattr(select.get_strategy(ch["strategy"]), "n", 256)
            got = counts_of(task, n, r, seed) if task else None
        counts[r if data == "pretext" else (d, r)] = got
    return summarize(counts, "receivers" if data == "pretext" else "pairs")


def _rtn_at(metrics: dict, rtn: dict, choices: dict, strategy: str) -> dict:
    picked, lacking = [], 0
    for p in _cross(metrics):
        choice = choices.get((p["receiver"], p["donor"]))
        if choice is None:
            continue
        lam, r = float(choice["lam"]), p["receiver"]
        acc = rtn.get(r) if lam == 0 else p["curve"].get(lam, {}).get("test")
        if acc is None:
            lacking += 1
        else:
            picked.append((acc, rtn.get(r)))
    data = next(iter(choices.values()), {}).get("data", "?")
    name = f"RTN(FP_R + lambda QV_D), lambda by `{strategy}` (data: {data})"
    row = _row(name, "none", True, picked, "pairs")
    if lacking:
        row["note"] = f"{lacking} pairs' lambda is not in the grid's lambda list"
    return row


def _gptq_rows(by_kind: dict, rtn: dict, all_cells: list[dict]) -> list[dict]:
    rows = []
    for src in SOURCES:
        cells = by_kind.get(f"{KIND}:{src}", [])
        if cells:
            accs = [(c["acc"]["test"], rtn.get(c["receiver"])) for c in cells]
            name = f"GPTQ(FP_R), calibration: {src} ({_SOURCE_TEXT[src]})"
            row = _row(name, _images_text(cells, src), False, accs, "receivers")
            if src != "receiver":  # the receiver's own images say so already
                row["overlap"] = summarize({c["receiver"]: calib_counts(c) for c in cells})
            rows.append(row)
    for kind in sorted(k for k in by_kind if k.startswith(QV_KIND + ":")):
        cells = by_kind[kind]
        src, _, strategy = kind.split(":", 1)[1].partition("@")
        accs = [(c["acc"]["test"], rtn.get(c["receiver"])) for c in cells]
        lam = f"lambda QV_D), lambda by `{strategy}`" if strategy else "QV_D), lambda = 1"
        what = {"donor": "the QV donor's train images"}.get(src, _SOURCE_TEXT[src])
        name = f"GPTQ(FP_R + {lam}, calibration: {src} ({what})"
        row = _row(name, _images_text(cells, src), True, accs, "pairs")
        calib = {(c["donor"], c["receiver"]): calib_counts(c) for c in cells}
        row["overlap"] = summarize(calib, "pairs")
        if strategy:
            choices = {(c["receiver"], c["donor"]): c["choice"] for c in cells if "choice" in c}
            row["lambda_overlap"] = choice_overlap(all_cells, choices)
        rows.append(row)
    return rows


def needs_gives(cells: list[dict], metrics: dict) -> list[dict]:
    """The table's rows (fractions; ``wins`` of ``compared``), or ``[]`` when the grid
    holds no GPTQ cells. ``metrics``: ``report.compute_metrics`` of the RTN cells."""
    mine = [c for c in cells if is_gptq_cell(c) and (c.get("acc") or {}).get("test") is not None]
    if not mine:
        return []
    by_kind: dict[str, list[dict]] = {}
    for c in mine:
        by_kind.setdefault(c["kind"], []).append(c)
    by_strategy: dict[str, dict] = {}  # a grid resumed with another strategy holds both
    for c in mine:
        if "@" in c["kind"] and "choice" in c:
            strategy = c["kind"].split("@", 1)[1]
            by_strategy.setdefault(strategy, {})[(c["receiver"], c["donor"])] = c["choice"]
    rtn = _rtn(metrics)
    rows = [_row("RTN(FP_R)", "none", False, [(a, None) for a in rtn.values()], "receivers")]
    rows += _rtn_qv_rows(metrics, rtn, by_strategy, cells)
    return rows + _gptq_rows(by_kind, rtn, cells)


def _images_cell(r: dict) -> str:
    """The receiver images column: the row's text, then what its calibration images and
    its lambda choice's images hold of the receivers' (``report.overlap``), if anything."""
    parts = [r["receiver_images"]]
    calib = overlap_text(r.get("overlap"), "calibration images")
    choice = overlap_text(r.get("lambda_overlap"), "lambda-choice images")
    return "; ".join(parts + [t for t in (calib, choice) if t])


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _per_receiver(cells: list[dict], metrics: dict) -> list[str]:
    """Per receiver: RTN(FP_R), GPTQ(FP_R) per source, GPTQ+QV means over donors (test)."""
    rtn, mine = _rtn(metrics), [c for c in cells if is_gptq_cell(c)]
    kinds = [f"{KIND}:{s}" for s in SOURCES if any(c["kind"] == f"{KIND}:{s}" for c in mine)]
    kinds += sorted({c["kind"] for c in mine if c["kind"].startswith(QV_KIND + ":")})
    rows = []
    for r in metrics["tasks"]:
        row = [f"`{r}`", _pct(rtn.get(r))]
        for k in kinds:
            accs = [c["acc"]["test"] for c in mine if c["kind"] == k and c["receiver"] == r]
            row.append(_pct(statistics.fmean(accs)) if accs else "-")
        rows.append(row)
    return ["", "Per receiver (test accuracy, %):", "", table(_column_names(kinds), rows)]


def _column_names(kinds: list[str]) -> list[str]:
    """``gptq:donor`` -> ``GPTQ, donor``; ``gptq+qv:donor@s`` -> ``GPTQ+QV mean over D,
    donor, lambda by s``."""
    out = ["receiver", "RTN(FP_R)"]
    for k in kinds:
        kind, _, rest = k.partition(":")
        name = "GPTQ" if kind == KIND else "GPTQ+QV mean over D"
        out.append(f"{name}, {rest.replace('@', ', lambda by ')}")
    return out


def gptq_sections(cells: list[dict], metrics: dict, rows: list[dict] | None = None) -> list[str]:
    """The markdown lines of the section (``[]`` without GPTQ cells)."""
    rows = needs_gives(cells, metrics) if rows is None else rows
    if not rows:
        return []
    body = []
    for r in rows:
        wins = "n/a (reference)" if r["wins"] is None else f"{r['wins']}/{r['compared']}"
        mean = f"{_pct(r['mean_test_acc'])} (over {r['n']} {r['over']})"
        note = f" ({r['note']})" if r.get("note") else ""
        body.append([r["approach"] + note, r["receiver_labels"], _images_cell(r),
                     r["donor_qat"], mean, wins])  # fmt: skip
    return [
        "",
        f"## {TITLE}",
        "",
        "Same quantizer grid for every row (symmetric absmax per output channel); GPTQ picks "
        "other integer codes on it. Test accuracy in %; a win is a test accuracy above "
        "RTN(FP_R)'s on the same receiver. GPTQ+QV and the strategy rows use no receiver "
        "data by design; where their calibration or lambda-choice images hold images of the "
        "receiver (the same example in the same view), the receiver images column says so, "
        "with the count per split. The strategy picks lambda under RTN.",
        "For context, the paper's authors report on ViT-B/16 at 3 bits that GPTQ(FP) beats "
        "RTN(FP) on 22/22 tasks (+57.2 points) and that QV + GPTQ is 3.2 points below "
        "GPTQ(FP) (METHOD.md); the numbers below are ours, as measured.",
        "",
        table(HEADER, body),
        *_per_receiver(cells, metrics),
    ]
