"""``qvec quantize``'s candidates in a study (issue 23): each data-free recipe's mean test
accuracy with a 95% task-bootstrap interval, and its paired difference from GPTQ
calibrated on pretext images alone, the strongest single quantizer that reads no
receiver data.

A recipe's unit is the receiver: its bank is the leave-one-out merge of the other
views' QVs (what a user of that receiver would hold), its calibration set is the same
for every recipe of one source. Differences are paired on receivers, and the interval
resamples receivers (:func:`qvec_jax.study.stats.bootstrap`). ``best`` is the candidate
with the highest mean accuracy: on the dev half that is the choice (``qvec_jax.recipe``
holds it), on the test half it is only reported.
"""

from __future__ import annotations

from qvec_jax.report.markdown import table
from qvec_jax.study import stats

__all__ = ["CANDIDATES", "REFERENCE", "quantize_lines", "quantize_markdown", "quantize_section"]

#: ``(approach key, recipe as qvec quantize names it, data it uses)``; "rtn" is the
#: baseline. GPTQ of a bank (``gptq_bank_<method>_<source>@<lam>``) adds a row per key.
CANDIDATES = (
    ("rtn", "rtn", "none"),
    ("loo_mean", "rtn+bank (mean, lam 1)", "donor QAT weights"),
    ("loo_ties", "rtn+bank (ties, lam 1)", "donor QAT weights"),
    ("gptq_noise", "gptq:noise", "none"),
    ("gptq_pretext", "gptq:pretext", "pretext images"),
)
#: Not candidates (they read data a data-free user lacks), shown for scale.
REFERENCES = (
    ("gptq_donor", "gptq, another task's images", "donor images"),
    ("gptq_receiver", "gptq, 128 receiver images", "unlabelled receiver images"),
    ("ptq_qat", "RTN of QAT on the receiver (ceiling)", "labelled receiver"),
)
REFERENCE = "gptq_pretext"
#: The best single quantizer that reads no image at all: the reference without a pretext task.
NO_DATA_REFERENCE = "gptq_noise"


def _bank_candidates(keys) -> list[tuple[str, str, str]]:
    """The rows of GPTQ on a bank, by source, method and lam."""
    out = []
    for key in keys:
        if key.startswith("gptq_bank_"):
            rest, lam = key[len("gptq_bank_") :].rsplit("@", 1)
            method, source = rest.split("_", 1)
            data = "donor QAT weights" + (" + pretext images" if source == "pretext" else "")
            name = f"gptq+bank ({method}, lam {lam}):{source}"
            out.append(((source, method, float(lam)), key, name, data))
    return [row for _, *row in sorted(out)]


def _per_receiver(by_key: dict, base: dict) -> dict[str, dict[str, float]]:
    """``{key: {receiver: test accuracy}}`` of every per-receiver approach and the baseline."""
    out = {"rtn": dict(base)}
    for key, a in by_key.items():
        if a.get("unit") == "receiver":
            out[key] = {r: v for (r, d), v in a["acc"].items() if d is None}
    return out


def quantize_section(by_key: dict, base: dict, tasks: list[str]) -> dict | None:
    """The candidates' rows (mean accuracy, difference from :data:`REFERENCE` and from
    :data:`NO_DATA_REFERENCE`, share of receivers above the first, each with its
    interval) and the best candidate; None when the study has no GPTQ(pretext) cells."""
    acc = _per_receiver(by_key, base)
    ref = acc.get(REFERENCE)
    if not ref:
        return None
    rows = []
    recipes = [*CANDIDATES, *_bank_candidates(acc)]
    for group, entries in (("candidate", recipes), ("reference", REFERENCES)):
        for key, recipe, data in entries:
            vals = acc.get(key)
            if not vals:
                continue
            diff = {(r, None): v - ref[r] for r, v in vals.items() if r in ref}
            nod = acc.get(NO_DATA_REFERENCE) or {}
            diff0 = {(r, None): v - nod[r] for r, v in vals.items() if r in nod}
            rows.append({
                "key": key, "recipe": recipe, "data": data, "group": group, "n": len(vals),
                "overlap": (by_key.get(key) or {}).get("overlap"),
                "mean_acc": stats.bootstrap({(r, None): v for r, v in vals.items()}, tasks),
                "vs_reference": stats.bootstrap(diff, tasks),
                "vs_no_data": stats.bootstrap(diff0, tasks),
                "above_reference": stats.bootstrap({k: float(v > 0) for k, v in diff.items()},
                                                   tasks),
            })  # fmt: skip
    cands = [r for r in rows if r["group"] == "candidate"]
    best = max(cands, key=lambda r: r["mean_acc"]["point"])
    lo = best["vs_reference"]["lo"]
    return {
        "reference": REFERENCE,
        "names": {k: name for k, name, _ in recipes},
        "rows": rows,
        "best": best["key"],
        "best_beats_reference": best["key"] != REFERENCE and lo is not None and lo > 0,
    }


def _f(iv: dict, sign: bool = False, pct: bool = False) -> str:
    if not iv or iv.get("point") is None:
        return "n/a"
    fmt = "+.1f" if sign else ".0f" if pct else ".1f"
    tail = "%" if pct else ""
    if iv.get("lo") is None:
        return f"{format(100 * iv['point'], fmt)}{tail}"
    lo, hi = (format(100 * iv[k], fmt) for k in ("lo", "hi"))
    return f"{format(100 * iv['point'], fmt)}{tail} [{lo}, {hi}]"


def quantize_markdown(a: dict) -> list[str]:
    """The ``qvec quantize`` section of ``study.md`` (nothing when there is no section)."""
    q = a.get("quantize")
    if not q:
        return []
    head = ["recipe", "data used", "its images that are the receiver's", "receivers",
            "mean test acc % [lo, hi]",
            "minus gptq:pretext pts [lo, hi]", "receivers above it [lo, hi]",
            "minus gptq:noise pts [lo, hi]"]  # fmt: skip
    rows = []
    for r in q["rows"]:
        mark = " **(best here)**" if r["key"] == q["best"] else ""
        ref = " (reference, not data-free)" if r["group"] != "candidate" else ""
        rows.append([r["recipe"] + mark + ref, r["data"],
                     (r.get("overlap") or "-").replace("|", "/"), str(r["n"]), _f(r["mean_acc"]),
                     _f(r["vs_reference"], sign=True),
                     _f(r["above_reference"], pct=True),
                     _f(r["vs_no_data"], sign=True)])  # fmt: skip
    role = (
        "the choice of `qvec quantize`'s default (`qvec_jax.recipe`)"
        if a["half"] == "dev"
        else "reported only: the default was chosen on the dev half"
    )
    verdict = (
        "beats gptq:pretext with the whole interval above 0"
        if q["best_beats_reference"]
        else "does **not** beat gptq:pretext with an interval above 0"
    )
    return [
        "", "## `qvec quantize`: data-free recipes", "",
        "Every recipe on the same receivers; a bank is the leave-one-out merge of the other "
        "views' QVs (never the receiver's own QAT), at a fixed lambda. Differences are paired on "
        "receivers; intervals resample receivers (95%).", "",
        table(head, rows), "",
        f"Best mean accuracy here: `{q['names'][q['best']]}` ({role}); it {verdict}.",
    ]  # fmt: skip


def quantize_lines(a: dict) -> list[str]:
    """What ``qvec study`` prints about the candidates: one line each."""
    q = a.get("quantize")
    if not q:
        return []
    out = ["  qvec quantize candidates (mean test acc; minus gptq:pretext), per receiver:"]
    for r in q["rows"]:
        mark = "  <- best" if r["key"] == q["best"] else ""
        out.append(f"    {r['recipe']}: {_f(r['mean_acc'])}; {_f(r['vs_reference'], sign=True)} "
                   f"pts  [data: {r['data']}]{mark}")  # fmt: skip
    return out
