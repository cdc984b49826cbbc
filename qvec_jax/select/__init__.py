"""Choosing lambda without the receiver's labels (issue 13).

The paper is zero-shot only at ``lam = 1``; its better ``lam_best`` is picked on the
receiver's labelled val split (METHOD.md). A *strategy* picks ``lam`` from
``CANDIDATES`` (the paper's 11 values plus 0, "do not patch") and declares the one kind
of data it uses (``DATA_KINDS``); it is handed a :class:`Context` that gives it that
data only, and refuses, in one line, any other kind it asks for.

- ``Fixed(1.0)`` (data "none"): the paper's zero-shot choice.
- Weight-only (data "none"), on the quantized kernels, with ``R = PTQ(FP_R) - FP_R``:
  ``NormRatio`` (``lam ||QV|| = c ||R||``), ``Alignment`` (``lam = c <QV, R> / ||QV||^2``),
  ``ModelStock`` (Model Stock's ratio ``k cos / (1 + (k-1) cos)`` of ``cos(QV, R)``), and
  the baseline ``RtnError`` (min RTN error of ``FP_R + lam QV``; known to pick ~0).
- ``Proxy`` (data "donor", "pretext", "noise" or "unlabelled receiver"): how close
  ``PTQ(FP_R + lam QV_D)`` stays to ``FP_R`` itself on those inputs: logit KL,
  top-1 agreement, or cosine of the pre-logit features. No labels anywhere.
- ``ValBest`` (data "labelled receiver"): the paper's ``lam_best``; not zero-shot.

Each strategy is ``collect`` (the measurement, JSON-able, stored under ``key``) plus
``decide`` (a pure function of that record), so a grid stores the measurements once
(:func:`candidate_scores`) and a report re-decides any strategy, with any constants,
from them (:func:`choose`). Constants are dataclass fields: their defaults are not
tuned, and tuning uses the DEV task set only. Scores are "higher is better"; ties go
to the smaller ``|lam - 1|``, then the smaller ``lam``; a NaN score never wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from qvec_jax import quant
from qvec_jax.select.base import (
    CANDIDATES,
    DATA_KINDS,
    MEASURES,
    PAPER_LAMBDAS,
    PROXY_KINDS,
    Choice,
    Context,
    Fixed,
    SelectError,
    Strategy,
    UndeclaredDataError,
    pick,
    split_name,
)
from qvec_jax.select.images import images_overlap, train_images
from qvec_jax.select.proxy import Proxy, ValBest, noise_images, subsample
from qvec_jax.select.weights import Alignment, ModelStock, NormRatio, RtnError, weight_stats

__all__ = [
    "CANDIDATES",
    "DATA_KINDS",
    "MEASURES",
    "PAPER_LAMBDAS",
    "PROXY_KINDS",
    "Alignment",
    "Choice",
    "Context",
    "Fixed",
    "ModelStock",
    "NormRatio",
    "Proxy",
    "RtnError",
    "SelectError",
    "Strategy",
    "UndeclaredDataError",
    "ValBest",
    "candidate_scores",
    "choose",
    "default_strategies",
    "get_strategy",
    "images_overlap",
    "noise_images",
    "pick",
    "select_lambda",
    "split_name",
    "subsample",
    "train_images",
    "weight_stats",
]


def default_strategies(rx_shots: Sequence[int] = (32, 128)) -> list[Strategy]:
    """Every strategy of issue 13 at its default constants: ``lam=1``, the four
    weight-only ones, ``Proxy`` on donor/pretext/noise x each measure, ``Proxy`` on
    ``rx_shots`` unlabelled receiver images x each measure, and ``val-best``."""
    out: list[Strategy] = [Fixed(1.0), NormRatio(), Alignment(), ModelStock(), RtnError()]
    out += [Proxy(d, m) for d in ("donor", "pretext", "noise") for m in MEASURES]
    out += [Proxy("unlabelled receiver", m, n=k) for k in rx_shots for m in MEASURES]
    return out + [ValBest()]


def get_strategy(name: str | Strategy, among: Sequence[Strategy] | None = None) -> Strategy:
    """A strategy by name (a ``Strategy`` passes through): a family of ``among`` (default
    :func:`default_strategies`, plus a proxy on another number of images such as
    ``proxy-donor64-kl``), then any tunable constants, ``:name=value`` each
    (``proxy-pretext-kl:margin=0.2``, ``norm-ratio:multiple=0.5``)."""
    if isinstance(name, Strategy):
        return name
    family, constants = split_name(name)
    by_family = {s.family: s for s in (default_strategies() if among is None else among)}
    m = re.fullmatch(r"proxy-(donor|pretext|noise)(\d+)-(kl|agree|cos)", family)
    if family not in by_family and m:  # an explicit size: "proxy-donor256-kl" is its family
        explicit = Proxy(m[1], m[3], n=int(m[2]))
        if among is None:
            by_family[family] = explicit
        family = explicit.family
    if family not in by_family:
        raise SelectError(f"unknown lambda strategy {name!r}; use one of {sorted(by_family)}")
    return by_family[family].with_constants(constants) if constants else by_family[family]


def _check_candidates(candidates) -> tuple[float, ...]:
    c = tuple(float(x) for x in candidates)
    if not c or len(set(c)) != len(c) or any(x != x or abs(x) == float("inf") for x in c):
        raise SelectError(f"candidates must be distinct finite numbers, got {candidates!r}")
    return c


def _check_inputs(inputs) -> dict:
    inputs = dict(inputs or {})
    bad = [k for k in inputs if k not in DATA_KINDS or k == "none"]
    if bad:
        raise SelectError(f"unknown input kinds {bad}; use keys from {DATA_KINDS[1:]}")
    return inputs


def _context(s: Strategy, fp_r, qv, spec, model, cands, inputs) -> Context:
    """The context of ``s``: only the kind of data it declared travels in it."""
    return Context.of(
        inputs, declared=s.data, fp_r=fp_r, qv=qv, spec=spec, model=model, candidates=cands,
        strategy=s.name,
    )  # fmt: skip


def select_lambda(
    fp_r,
    qv,
    spec,
    model=None,
    *,
    strategy: str | Strategy = "lam=1",
    inputs=None,
    candidates=CANDIDATES,
) -> Choice:
    """Choose ``lam`` for ``PTQ(fp_r + lam * qv)`` with ``strategy`` (a name of
    :func:`default_strategies` or a ``Strategy``). ``spec``: a ``QuantSpec`` or the bit
    width. ``inputs``: ``{kind: data}`` (kinds of ``DATA_KINDS``), or the data itself
    for the strategy's declared kind; the strategy sees only its declared kind.
    The default stays the paper's zero-shot ``lam=1`` until the DEV task set picks one.
    """
    s = get_strategy(strategy)
    if inputs is not None and not isinstance(inputs, Mapping):
        inputs = {s.data: inputs}
    cands = _check_candidates(candidates)
    ctx = _context(s, fp_r, qv, quant.as_spec(spec), model, cands, _check_inputs(inputs))
    return s.select(ctx)


def candidate_scores(
    fp_r, qv, spec, model=None, *, inputs=None, strategies=None, candidates=CANDIDATES
) -> dict:
    """Measure once what every strategy needs for one (receiver, donor) pair; JSON-able.

    ``strategies=None``: every default strategy whose data is in ``inputs`` ("none" and
    "noise" always; with ``model=None`` the weight-only ones only); the others are
    listed under ``not_measured`` with the reason, never dropped silently. Returns
    ``{"candidates", "bits", "granularity", <measurement key>: {...}, "choices": {name:
    Choice.to_dict()}, "not_measured": {name: reason}}``; :func:`choose` re-decides any
    strategy (any constants) from it without recomputing.
    """
    spec, cands, inputs = quant.as_spec(spec), _check_candidates(candidates), _check_inputs(inputs)
    record: dict = {"candidates": list(cands), "bits": spec.bits, "granularity": spec.granularity}
    skipped: dict[str, str] = {}
    if strategies is None:
        strategies = []
        for s in default_strategies():
            if s.data not in ("none", "noise") and s.data not in inputs:
                skipped[s.name] = f"no {s.data!r} inputs given"
            elif model is None and s.data != "none":
                skipped[s.name] = "no model given"
            else:
                strategies.append(s)
    choices = {}
    for s in map(get_strategy, strategies):
        if s.key is not None and s.key not in record:
            record[s.key] = s.collect(_context(s, fp_r, qv, spec, model, cands, inputs))
        choices[s.name] = s.decide(record).to_dict()
    return record | {"choices": choices, "not_measured": skipped}


def choose(strategy: str | Strategy, record: Mapping) -> Choice:
    """``strategy``'s choice from a :func:`candidate_scores` record (no recomputation);
    refuses a record that lacks the strategy's measurement, naming it."""
    s = get_strategy(strategy)
    if s.key is not None and s.key not in record:
        raise SelectError(
            f"strategy {s.name!r}: the record has no {s.key!r} measurement; "
            "measure it with candidate_scores(strategies=[...])"
        )
    return s.decide(record)
