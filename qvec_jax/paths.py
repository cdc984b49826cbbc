"""Leaf paths of a pytree, the ``Rule`` type over them, input checks, and tree algebra.

A leaf is addressed by its "/"-joined key path, e.g.
``Transformer/encoderblock_3/LayerNorm_0/scale``, for Flax Linen dicts, ``nnx.State``
(the trailing ``.value`` is dropped) and plain nested containers alike. One ``Rule``
type (ordered regexes over these paths) selects what QAT and PTQ quantize, what a QV
leaves out, and what counts in the model size. The plain vector algebra on
same-structure trees (add, sub, scale, weighted sum, norms, cosine) serves QVs and
task vectors alike; the method itself (``QV = QAT - FP``, ``patch``) is ``trees``.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def path_str(keypath) -> str:
    """ "/"-joined key path. The ``.value`` of an nnx Variable is dropped."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:  # FlattenedIndexKey and custom keys
            parts.append(str(getattr(k, "key", k)))
    if parts and parts[-1] == "value" and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
        parts.pop()
    return "/".join(parts)


def flatten(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` in tree order."""
    return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Nested plain dict from ``{path: leaf}``."""
    out: dict = {}
    for path, leaf in flat.items():
        *parents, last = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


class Rule:
    """Ordered regex rules over leaf paths; the first ``re.search`` match gives the value.

    ``Rule([r"^head/", r"^pre_logits/"])`` selects (value ``True``);
    ``Rule({r"Dense_\\d/kernel$": (1,)})`` attaches a value (here: channel axes; a list
    value is stored as a tuple). Rules with the same patterns and values are equal and
    hash alike, so a rule can be part of a static ``jit`` argument.
    One rule decides what QAT and PTQ quantize and what counts in the size (``VIT_RULE``),
    another what a QV leaves out (``HEAD_RULE``), as METHOD.md specifies.
    """

    def __init__(self, patterns: Mapping[str, Any] | Iterable[str | tuple[str, Any]]):
        items = patterns.items() if isinstance(patterns, Mapping) else patterns
        pairs = [(p, True) if isinstance(p, str) else tuple(p) for p in items]
        pairs = [(p, tuple(v) if isinstance(v, list) else v) for p, v in pairs]
        self.patterns = tuple((re.compile(p), v) for p, v in pairs)
        self._key = tuple((rx.pattern, rx.flags, v) for rx, v in self.patterns)

    def match(self, path: str) -> Any:
        for rx, value in self.patterns:
            if rx.search(path):
                return value
        return None

    def select(self, tree: PyTree) -> dict[str, Any]:
        """``{path: value}`` for every leaf the rule selects."""
        return {p: v for p in flatten(tree) if (v := self.match(p)) is not None}

    def unmatched(self, tree: PyTree) -> list[str]:
        """Patterns that select no leaf of ``tree`` (usually a typo or a layout mismatch)."""
        paths = list(flatten(tree))
        return [rx.pattern for rx, _ in self.patterns if not any(rx.search(p) for p in paths)]

    def __eq__(self, other) -> bool:
        return isinstance(other, Rule) and self._key == other._key

    def __hash__(self) -> int:  # equal rules hash alike: a QuantSpec is a static jit argument
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Rule({[(rx.pattern, v) for rx, v in self.patterns]!r})"


def is_float(x) -> bool:
    return jnp.issubdtype(
        jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, jnp.floating
    )


def check_same_structure(a: PyTree, b: PyTree, names=("a", "b"), *, paths=None) -> None:
    """Raise ``ValueError`` naming the first path where ``a`` and ``b`` differ.

    Compares the leaves at ``paths`` (default: every path of either tree): presence,
    shape, and dtype kind (float vs integer).
    """
    fa, fb = flatten(a), flatten(b)
    for p in paths if paths is not None else list(fa) + [p for p in fb if p not in fa]:
        if p not in fa or p not in fb:
            raise ValueError(f"{p}: missing in {names[0] if p not in fa else names[1]}")
        x, y = fa[p], fb[p]
        if np.shape(x) != np.shape(y):
            raise ValueError(
                f"{p}: shape {np.shape(x)} in {names[0]} vs {np.shape(y)} in {names[1]}"
            )
        if is_float(x) != is_float(y):
            raise ValueError(f"{p}: dtype {x.dtype} in {names[0]} vs {y.dtype} in {names[1]}")


def check_finite(tree: PyTree, name: str) -> None:
    """Raise ``ValueError`` naming the first float leaf holding NaN or Inf.

    Skipped for traced leaves (inside ``jit`` the values are not known). NumPy leaves
    are checked on the host, device leaves one at a time (a sharded leaf's reduction is
    a collective; several in flight at once can stall a CPU mesh).
    """
    for p, x in flatten(tree).items():
        if isinstance(x, jax.core.Tracer) or not is_float(x):
            continue
        ok = np.isfinite(x).all() if isinstance(x, np.ndarray) else jnp.isfinite(x).all()
        if not bool(ok):
            raise ValueError(f"{p}: NaN or Inf in {name}")


def check_lam(lam, name: str = "lam") -> float:
    """``lam`` as a Python float: a finite real number, also in float32 (where it is used).

    Refuses strings and bools (``TypeError``) and NaN, Inf or values like 1e39 that
    overflow float32 (``ValueError``). A traced ``lam`` (inside ``jit``) is returned as
    it is: its value is not known there.
    """
    if isinstance(lam, jax.core.Tracer):
        return lam
    if isinstance(lam, (jax.Array, np.ndarray, np.generic)) and np.ndim(lam) == 0:
        lam = lam.item()
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(lam).__name__} {lam!r}")
    with np.errstate(over="ignore"):
        finite = bool(np.isfinite(np.float32(lam)))
    if not finite:
        raise ValueError(f"{name}={lam!r} is not a finite float32 number; pass a finite {name}")
    return float(lam)


def check_lambdas(lambdas, name: str = "lambdas") -> list[float]:
    """A non-empty list of finite lambdas (each as :func:`check_lam`)."""
    if isinstance(lambdas, (str, bytes)) or not isinstance(lambdas, Iterable):
        raise TypeError(f"{name} must be a list of numbers, got {lambdas!r}")
    out = [check_lam(lam, f"{name}[{i}]") for i, lam in enumerate(lambdas)]
    if not out:
        raise ValueError(f"{name} is empty; pass at least one lambda")
    return out


# --- plain vector algebra on same-structure trees (QVs, task vectors) ---------------


def add(a: PyTree, b: PyTree) -> PyTree:
    check_same_structure(a, b)
    return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    check_same_structure(a, b)
    return jax.tree.map(jnp.subtract, a, b)


def scale(a: PyTree, c: float) -> PyTree:
    return jax.tree.map(lambda x: (x * c).astype(x.dtype), a)


def weighted_sum(trees: list[PyTree], weights: list[float] | None = None) -> PyTree:
    """``sum_i w_i * tree_i``; with ``weights=None`` the mean (merging several QVs)."""
    if not trees:
        raise ValueError("weighted_sum needs at least one tree")
    weights = [1.0 / len(trees)] * len(trees) if weights is None else list(weights)
    if len(weights) != len(trees):
        raise ValueError(f"{len(trees)} trees but {len(weights)} weights")
    for t in trees[1:]:
        check_same_structure(trees[0], t, ("trees[0]", "trees[i]"))
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *trees)


def leaf_norms(a: PyTree) -> dict[str, float]:
    """Per-leaf L2 norm, keyed by path."""
    return {
        p: float(jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32))) for p, x in flatten(a).items()
    }


def global_norm(a: PyTree) -> float:
    return float(
        jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(a)))
    )


def cosine(a: PyTree, b: PyTree) -> float:
    """Cosine similarity of two trees seen as flat vectors."""
    check_same_structure(a, b)
    dot = sum(
        jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    return float(dot / (global_norm(a) * global_norm(b) + 1e-30))
