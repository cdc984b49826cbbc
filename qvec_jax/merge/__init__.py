"""Merging quantization vectors: several donors' QVs into one (layer 2).

- :mod:`~qvec_jax.merge.methods`: mean, sum, TIES, DARE and Model Stock, streamed leaf by
  leaf and block by block on the host; :func:`merge_qvs` runs a :class:`MergeSpec`.
- :mod:`~qvec_jax.merge.spec`: :class:`MergeSpec`, a recipe (method + parameters),
  validated once, frozen, JSON round-trip.
- :mod:`~qvec_jax.merge.topk`: the exact k-th largest magnitude over many arrays
  (TIES's global trim threshold), without sorting or concatenating them.
"""

from qvec_jax.merge.methods import (
    dare_merge,
    mean_merge,
    merge_qvs,
    model_stock_merge,
    sum_merge,
    ties_merge,
)
from qvec_jax.merge.spec import COMBINES, METHODS, SCOPES, MergeSpec

__all__ = [
    "COMBINES",
    "METHODS",
    "SCOPES",
    "MergeSpec",
    "dare_merge",
    "mean_merge",
    "merge_qvs",
    "model_stock_merge",
    "sum_merge",
    "ties_merge",
]
