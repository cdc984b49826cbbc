"""Merge several quantization vectors into one: mean, sum, TIES, DARE, Model Stock.

Notation: ``v_1..v_k`` are the QVs (any same-structure pytrees), ``w_i`` the weights
(default: uniform), ``d`` the number of merged entries. The merge of QVs is a QV, to be
patched with ``trees.patch(receiver, merged, lam)`` as a single donor's would be::

    mean          sum_i w_i v_i / sum_i w_i
    sum           sum_i w_i v_i           (task arithmetic, Ilharco et al. 2023, arXiv:2212.04089)
    ties          trim, elect, disjoint mean (Yadav et al. 2023, arXiv:2306.01708), below
    dare          drop with prob. p, rescale by 1/(1-p), then mean / sum / ties
                  (Yu et al. 2023, arXiv:2311.03099)
    model_stock   t * mean, t = k c / (1 + (k-1) c)  (Jang et al. 2024, arXiv:2403.19522)

Leaves: every float leaf not matched by ``exclude`` (``trees.HEAD_RULE`` by default, as
``trees.quantization_vector``) is merged; integer leaves (step counters, RNG keys) and
excluded leaves are never merged and are left out of the result, which is a plain nested
dict of the merged leaves (at least float32), like a QV. The inputs must agree on the
merged leaves (presence, shape, float kind); the error names the first leaf that does not.

Eager only (the kernels are NumPy on the host: nothing compiles per leaf shape).
Memory: the merge streams leaf by leaf, and within a leaf block by block. It holds the
inputs, the output built so far and a few (k, 2**18) working blocks; never ``k`` stacked
trees, nor ``k`` stacked copies of a large leaf (bench/merge.py measures it). Global
statistics (TIES's global trim threshold, Model Stock's global cosine) take extra
streamed passes.

``MergeSpec`` (:mod:`qvec_jax.merge.spec`) is the recipe (method +
parameters), frozen and JSON-serializable, so a merged checkpoint can record how it was made.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

from qvec_jax.merge import topk
from qvec_jax.merge.spec import MergeSpec
from qvec_jax.paths import PyTree, Rule, check_same_structure, flatten, is_float, unflatten
from qvec_jax.trees import HEAD_RULE

# --- the entry points ---------------------------------------------------------------


def merge_qvs(
    qvs: list[PyTree],
    method: str | MergeSpec = "mean",
    *,
    weights=None,
    density=None,
    p=None,
    seed=None,
    combine=None,
    scope=None,
    exclude: Rule = HEAD_RULE,
) -> dict:
    """Merge ``qvs`` by ``method`` (a name or a ``MergeSpec``); see the module docstring.

    ``merge_qvs(qvs, "ties", density=0.2)`` is ``merge_qvs(qvs, MergeSpec("ties",
    density=0.2))``. Returns a nested dict of the merged leaves (float, not matched by ``exclude``).
    """
    kw = dict(weights=weights, density=density, p=p, seed=seed, combine=combine, scope=scope)
    if isinstance(method, MergeSpec):
        given = [k for k, v in kw.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]}: give it in the MergeSpec, not beside it")
        spec = method
    else:
        spec = MergeSpec(method, **kw)
    flats, paths = _prepare(qvs, exclude)
    w = _resolve_weights(spec, len(qvs))
    merged = _METHODS[spec.method](spec, flats, paths, w)
    return unflatten(merged)


def mean_merge(qvs, weights=None, *, exclude: Rule = HEAD_RULE) -> dict:
    """``sum_i w_i v_i / sum_i w_i``; weights >= 0 with a positive sum (default uniform)."""
    return merge_qvs(qvs, MergeSpec("mean", weights), exclude=exclude)


def sum_merge(qvs, weights=None, *, exclude: Rule = HEAD_RULE) -> dict:
    """Task arithmetic ``sum_i w_i v_i`` (Ilharco et al. 2023); weights any finite (default 1)."""
    return merge_qvs(qvs, MergeSpec("sum", weights), exclude=exclude)


def ties_merge(qvs, density=0.2, weights=None, *, scope="global", exclude=HEAD_RULE) -> dict:
    """TIES-Merging (Yadav et al. 2023, arXiv:2306.01708, Sec. 3), per vector ``v_i``:

    1. trim: keep the ``m = max(1, round(density * n))`` entries of largest ``|v_i|``
       (entries tied with the m-th largest are kept too, as in the reference code's
       ``|v| >= kthvalue``), zero the rest. ``scope="global"`` (default, the paper's
       reference implementation): ``n = d``, one threshold per vector over all merged
       leaves; ``scope="leaf"`` (mergekit): ``n`` = the leaf's size, one per leaf.
       The global threshold is exact, found leaf-streamed by ``topk.kth_largest_abs``.
    2. elect: ``g = sign(sum_i w_i trim(v_i))`` per coordinate (the paper: ``sign`` of
       the summed trimmed values, its "mass" election; weights default uniform).
    3. disjoint mean: ``sum_{i in A} w_i trim(v_i) / sum_{i in A} w_i`` over
       ``A = {i : sign(trim(v_i)) = g}``; 0 where ``A`` is empty or ``g = 0`` (the
       reference code breaks the rare exact ``g = 0`` by a majority sign instead).

    The paper's final scale ``lambda`` is the ``lam`` of ``trees.patch``.
    """
    spec = MergeSpec("ties", weights, density=density, scope=scope)
    return merge_qvs(qvs, spec, exclude=exclude)


def dare_merge(qvs, p=0.5, seed=0, weights=None, *, combine="mean", exclude=HEAD_RULE) -> dict:
    """DARE (Yu et al. 2023, arXiv:2311.03099, Sec. 4.1): ``v_i <- m_i * v_i / (1 - p)``
    with ``m_i ~ Bernoulli(1 - p)`` per entry, then ``combine``: ``"mean"``, ``"sum"``
    (their task arithmetic) or ``"ties"`` (election and disjoint mean without the trim).

    The mask of QV ``i`` at leaf ``P`` is drawn from ``SeedSequence([seed, crc32(P), i])``
    (NumPy's Philox raw stream, stable across NumPy versions and platforms): it depends
    only on (seed, P, i), not on the other leaves or the rule. Not ``jax.random``: that
    compiles once per leaf shape (seconds, cold, on 2 cores) for a one-off host-side draw.
    ``p = 0`` is the identity.
    """
    spec = MergeSpec("dare", weights, p=p, seed=seed, combine=combine)
    return merge_qvs(qvs, spec, exclude=exclude)


def model_stock_merge(qvs, weights=None, *, scope="leaf", exclude=HEAD_RULE) -> dict:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522, Eq. 4):
    ``w_H = t w_avg + (1 - t) w_0`` with ``t = k c / (1 + (k - 1) c)``.

    For QVs the anchor ``w_0`` is the FP model, i.e. the zero vector, so the result is
    ``t * mean(v)``. ``c`` is the mean pairwise cosine ``<v_i, v_j> / (|v_i| |v_j|)``
    over ``i < j`` (the angle of the paper for k = 2; mergekit's estimate for k > 2),
    with 0 for a pair holding a zero vector, clipped to [0, 1] (the derivation assumes
    ``c >= 0``; below it ``t`` would be negative). ``scope="leaf"`` (default, the paper
    works per layer): ``c`` and ``t`` per leaf; ``"global"``: over the flattened vectors.
    Laws: identical vectors give ``c = 1, t = 1``: the vector; pairwise orthogonal ones
    give ``c = 0, t = 0``: zero; one vector (no pair) is returned as is (``t = 1``).
    ``weights`` weight ``w_avg`` only; ``c`` is unweighted.
    """
    spec = MergeSpec("model_stock", weights, scope=scope)
    return merge_qvs(qvs, spec, exclude=exclude)


# --- input checks -------------------------------------------------------------------


def _prepare(qvs, exclude: Rule) -> tuple[list[dict], list[str]]:
    """Flattened QVs and the merged paths (float, not excluded), checked leaf by leaf."""
    if isinstance(qvs, dict) or not isinstance(qvs, (list, tuple)):
        raise ValueError(f"qvs: expected a list of QV pytrees, got {type(qvs).__name__}")
    if not qvs:
        raise ValueError("qvs: empty; give at least one QV to merge")
    flats = [flatten(t) for t in qvs]
    paths = list(
        dict.fromkeys(
            p for f in flats for p, x in f.items() if exclude.match(p) is None and is_float(x)
        )
    )
    if not paths:
        raise ValueError("qvs: no float leaf to merge (are all leaves matched by `exclude`?)")
    for i, t in enumerate(qvs[1:], 1):
        check_same_structure(qvs[0], t, ("qvs[0]", f"qvs[{i}]"), paths=paths)
    for i, f in enumerate(flats):
        for p in paths:  # NumPy, not paths.check_finite: no device dispatch per leaf
            if not np.isfinite(np.asarray(f[p])).all():
                raise ValueError(f"{p}: NaN or Inf in qvs[{i}]")
    return flats, paths


def _resolve_weights(spec: MergeSpec, k: int) -> np.ndarray:
    """Weights as float64; ``mean``-like methods need them >= 0 with a positive sum."""
    w = np.ones(k) if spec.weights is None else np.asarray(spec.weights, np.float64)
    if len(w) != k:
        raise ValueError(f"weights: {k} QVs but {len(w)} weights")
    signed = spec.method == "sum" or spec.combine == "sum"
    if not signed and (np.any(w < 0) or w.sum() <= 0):
        raise ValueError(
            f"weights: method {spec.method!r} needs weights >= 0 with a positive sum, got "
            f"{list(spec.weights)}"
        )
    return w


# --- the kernels: NumPy on the host, on column blocks of the k copies of one leaf ----
# NumPy, not jit: nothing compiles per leaf shape, so a cold merge of small QVs takes
# milliseconds; a merge is memory-bound, and NumPy streams at memory speed. Blocks of
# _BLOCK entries per QV bound the working memory (k x _BLOCK x a few temporaries)
# whatever the leaf size; for host arrays the inputs are read in place, not copied.

_BLOCK = 1 << 18  # even: DARE takes its uint32s in pairs (uint64 draws), block by block


def _blocks(flats, path):
    """``(start, x)`` over the leaf's entries: ``x`` (k, <= _BLOCK), at least float32."""
    xs = [np.asarray(f[path]).reshape(-1) for f in flats]
    dt = _leaf_dtype(flats, path)
    for a in range(0, xs[0].size, _BLOCK):
        block = np.empty((len(xs), min(_BLOCK, xs[0].size - a)), dt)
        for row, x in zip(block, xs):
            row[:] = x[a : a + _BLOCK]
        yield a, block


def _map_blocks(flats, paths, fn, leaf_state=lambda p: None) -> dict:
    """``{path: merged leaf}``: ``fn(x, leaf_state(path))`` -> (b,) for each block ``x``."""
    out = {}
    for p in paths:
        res = np.empty(np.size(flats[0][p]), _leaf_dtype(flats, p))
        state = leaf_state(p) if res.size else None
        for a, x in _blocks(flats, p):
            res[a : a + x.shape[1]] = fn(x, state)
        out[p] = jax.device_put(res.reshape(np.shape(flats[0][p])))  # a jax.Array, like a QV
    return out


def _leaf_dtype(flats, path) -> np.dtype:
    return topk.compute_dtype(tuple(np.dtype(f[path].dtype) for f in flats))


def _weighted_sum(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.tensordot(w.astype(x.dtype), x, axes=1)


def _disjoint_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """TIES steps 2-3 on a stack ``x`` (k, n): elect ``sign(sum w x)``, average agreeing."""
    wc = w.astype(x.dtype)[:, None]
    wx = wc * x
    g = np.sign(wx.sum(axis=0))
    agree = (np.sign(x) == g) & (x != 0)
    num = np.where(agree, wx, 0).sum(axis=0)
    den = np.where(agree, wc, 0).sum(axis=0)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _philox(seed: int, path: str, i: int) -> np.random.Philox:
    """DARE's bit stream for QV ``i`` at leaf ``path``: counter-based, stable across NumPy."""
    return np.random.Philox(np.random.SeedSequence([seed, zlib.crc32(path.encode()), i]))


def _dare_drop(x: np.ndarray, gens: list, p: float) -> np.ndarray:
    """Keep each entry with probability ``1 - p``, scale the kept ones by ``1 / (1 - p)``.

    Row ``i`` keeps the entries whose next uint32 of the raw stream ``gens[i]`` is
    >= ``p * 2**32`` (blocks are even-sized but the last: the masks do not depend on them).
    """
    cut = np.uint32(min(round(p * 2**32), 2**32 - 1))
    out = np.empty_like(x)
    for row, o, gen in zip(x, out, gens):
        bits = gen.random_raw(-(-row.size // 2)).view(np.uint32)[: row.size]
        o[:] = np.where(bits >= cut, row / row.dtype.type(1 - p), 0)
    return out


def _gram(flats, paths) -> np.ndarray:
    """The (k, k) Gram matrix of the QVs restricted to ``paths``, in float64."""
    x64 = (x.astype(np.float64) for p in paths for _, x in _blocks(flats, p))
    return sum(x @ x.T for x in x64)  # float64: tiny vectors' squares do not underflow


# --- the methods: {path: merged leaf} from flats, paths, weights --------------------


def _mean(spec, flats, paths, w):
    return _map_blocks(flats, paths, lambda x, _: _weighted_sum(x, w / w.sum()))


def _sum(spec, flats, paths, w):
    return _map_blocks(flats, paths, lambda x, _: _weighted_sum(x, w))


def _ties(spec, flats, paths, w):
    def thresholds(ps):  # per QV: the m-th largest |v| over the leaves ps
        m = max(1, round(spec.density * sum(np.size(flats[0][p]) for p in ps)))
        return np.stack([_kth_largest_abs([f[p] for p in ps], m) for f in flats])

    glob = thresholds(paths) if spec.scope == "global" else None

    def trim_elect_mean(x, thr):
        return _disjoint_mean(np.where(np.abs(x) >= thr.astype(x.dtype)[:, None], x, 0), w)

    leaf = (lambda p: glob) if spec.scope == "global" else (lambda p: thresholds([p]))
    return _map_blocks(flats, paths, trim_elect_mean, leaf)


def _dare(spec, flats, paths, w):
    def drop_combine(x, gens):
        x = _dare_drop(x, gens, spec.p)
        if spec.combine == "ties":
            return _disjoint_mean(x, w)
        return _weighted_sum(x, w / w.sum() if spec.combine == "mean" else w)

    gens = lambda p: [_philox(spec.seed, p, i) for i in range(len(flats))]
    return _map_blocks(flats, paths, drop_combine, gens)


def _model_stock(spec, flats, paths, w):
    glob = _stock_t(_gram(flats, paths)) if spec.scope == "global" else None
    t = (lambda p: glob) if spec.scope == "global" else (lambda p: _stock_t(_gram(flats, [p])))
    return _map_blocks(flats, paths, lambda x, t: _weighted_sum(x, t * w / w.sum()), t)


_METHODS = {"mean": _mean, "sum": _sum, "ties": _ties, "dare": _dare, "model_stock": _model_stock}


# --- statistics ---------------------------------------------------------------------


def _stock_t(gram: np.ndarray) -> float:
    """Model Stock's ``t = k c / (1 + (k-1) c)`` from the Gram matrix of the k vectors."""
    k = len(gram)
    if k == 1:
        return 1.0
    norms = np.sqrt(np.maximum(np.diag(gram), 0))
    den = np.outer(norms, norms)
    cos = np.divide(gram, den, out=np.zeros_like(gram), where=den > 0)
    c = float(np.clip(cos[np.triu_indices(k, 1)].mean(), 0.0, 1.0))
    return k * c / (1 + (k - 1) * c)


_SMALL = topk.SMALL  # entries up to which a global threshold concatenates (patchable)


def _kth_largest_abs(arrays: list, m: int):
    """The exact m-th largest ``|x|`` over ``arrays``: ``topk.kth_largest_abs``."""
    return topk.kth_largest_abs(arrays, m, small=_SMALL)
