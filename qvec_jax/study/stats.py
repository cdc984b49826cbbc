"""Intervals that respect a transfer study's design (pure numpy).

Pairs share tasks: the 240 pairs of 16 views are not 240 independent draws. The
bootstrap here resamples *tasks*: each replicate draws the receivers with replacement
from the study's views and, independently, the donors, and weights the pair ``(r, d)``
(``r != d``, where measured) by ``count_R(r) * count_D(d)``. A statistic measured per
receiver (``donor`` None: PTQ(FP_R), GPTQ(FP_R), a merge of the other donors) resamples
the receivers only. The 95% interval is the 2.5 and 97.5 percentiles of the replicates.

Vectorized: a replicate is two count vectors, and every statistic is a ratio of two
``einsum`` contractions of the ``B x T`` count matrices with the ``T x T`` value matrix,
so 2,000 replicates of a 22-task study cost milliseconds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["Interval", "bootstrap", "counts", "k_task_draws", "matrix"]

#: Replicates per interval, and the seed of their draws (fixed: a rerun gives the same study).
DEFAULT_B = 2000
SEED = 0

Key = tuple  # (receiver, donor or None)


def matrix(values: Mapping[Key, float], tasks: Sequence[str]) -> tuple[np.ndarray, bool]:
    """``(V, pairwise)``: ``V[r, d]`` for pair values (NaN where unmeasured), or ``V[r, 0]``
    for per-receiver values (``pairwise`` False). Mixing the two kinds is an error."""
    index = {t: i for i, t in enumerate(tasks)}
    pairwise = {d is not None for _, d in values}
    if len(pairwise) > 1:
        raise ValueError("values mix per-pair and per-receiver keys")
    pairwise = bool(pairwise and pairwise.pop())
    v = np.full((len(tasks), len(tasks) if pairwise else 1), np.nan)
    for (r, d), x in values.items():
        if x is not None and np.isfinite(x):
            v[index[r], index[d] if pairwise else 0] = float(x)
    return v, pairwise


def counts(n_tasks: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """``b`` bootstrap count vectors over ``n_tasks`` tasks (each sums to ``n_tasks``)."""
    return rng.multinomial(n_tasks, np.full(n_tasks, 1.0 / n_tasks), size=b).astype(float)


def _weighted_means(v: np.ndarray, pairwise: bool, cr: np.ndarray, cd: np.ndarray) -> np.ndarray:
    """The replicates' means of ``v`` (rows: receivers; columns: donors or one)."""
    m = np.isfinite(v).astype(float)
    x = np.where(m > 0, v, 0.0)
    if pairwise:
        num = np.einsum("br,rd,bd->b", cr, x, cd)
        den = np.einsum("br,rd,bd->b", cr, m, cd)
    else:
        num, den = cr @ x[:, 0], cr @ m[:, 0]
    out = np.full(len(cr), np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


class Interval(dict):
    """``{"point", "lo", "hi", "n", "tasks", "b"}``: a statistic, its 95% interval, the
    number of units behind it and the number of tasks resampled."""


def bootstrap(
    values: Mapping[Key, float], tasks: Sequence[str], *, b: int = DEFAULT_B, seed: int = SEED
) -> Interval:
    """The mean of ``values`` (``{(receiver, donor or None): value}``; a win rate is the
    mean of 0/1 values) with its 95% two-way (pairs) or one-way (receivers) task
    bootstrap interval. Replicates in which no unit is drawn are dropped; ``lo``/``hi``
    are None when fewer than 2 tasks carry values."""
    v, pairwise = matrix(values, tasks)
    n = int(np.isfinite(v).sum())
    point = float(np.nanmean(v)) if n else None
    rows = np.isfinite(v).any(axis=1).sum()
    out = Interval(point=point, lo=None, hi=None, n=n, tasks=int(rows), b=int(b))
    if n == 0 or rows < 2:
        return out
    rng = np.random.default_rng(seed)
    cr = counts(len(tasks), b, rng)
    cd = counts(len(tasks), b, rng) if pairwise else None
    reps = _weighted_means(v, pairwise, cr, cd)
    reps = reps[np.isfinite(reps)]
    out["lo"], out["hi"] = (float(q) for q in np.percentile(reps, [2.5, 97.5]))
    return out


def k_task_draws(
    values: Mapping[Key, float], tasks: Sequence[str], k: int = 5, *, limit: int = 5000,
    seed: int = SEED,
) -> np.ndarray:  # fmt: skip
    """The mean of the pair ``values`` within each ``k``-task subset of ``tasks`` (every
    subset when there are at most ``limit``, else ``limit`` drawn uniformly): what one
    run of a ``k``-task demo would have shown. NaN-free: subsets with no value are dropped."""
    v, pairwise = matrix(values, tasks)
    if not pairwise:
        raise ValueError("k_task_draws needs per-pair values")
    t = len(tasks)
    if k > t:
        return np.zeros(0)
    if math.comb(t, k) <= limit:
        subsets = np.array(list(itertools.combinations(range(t), k)))
    else:
        rng = np.random.default_rng(seed)
        subsets = np.array([np.sort(rng.choice(t, k, replace=False)) for _ in range(limit)])
    sel = np.zeros((len(subsets), t))
    np.put_along_axis(sel, subsets, 1.0, axis=1)
    out = _weighted_means(v, True, sel, sel)
    return out[np.isfinite(out)]
