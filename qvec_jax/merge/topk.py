"""The exact k-th largest magnitude over several host arrays, without concatenating them.

TIES-Merging trims each vector to its ``m`` largest entries over all merged leaves
(``merge.ties_merge``, ``scope="global"``), so it needs the m-th largest ``|x|`` over a
whole tree. ``kth_largest_abs`` finds it exactly by a radix select over the IEEE-754 bit
patterns of ``|x|`` (for non-negative floats the unsigned pattern orders like the value),
streaming the arrays: memory stays a 65536-bin histogram plus one array's bit patterns,
never a concatenated copy of the tree. Small inputs take one ``np.partition`` instead.

NumPy on the host: nothing compiles per leaf shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SMALL = 1 << 20  # entries up to which kth_largest_abs concatenates (4 MiB at fp32)
_DIGIT = 16  # bits per radix pass: 2 passes for float32, 4 for float64


def compute_dtype(dtypes) -> np.dtype:
    """The dtype to compute in for inputs of ``dtypes``: their promotion, at least float32.

    float64 only under ``jax_enable_x64`` (JAX's canonical dtype), so host results match
    what the same computation would give as ``jax.Array`` values.
    """
    return _compute_dtype(tuple(dtypes), bool(jax.config.jax_enable_x64))


@functools.lru_cache(maxsize=64)
def _compute_dtype(dtypes: tuple, x64: bool) -> np.dtype:  # x64: the cache key's mode
    dt = functools.reduce(jnp.promote_types, dtypes, np.dtype(np.float32))
    return np.dtype(jax.dtypes.canonicalize_dtype(dt))


def kth_largest_abs(arrays: list, m: int, *, small: int = SMALL):
    """The exact m-th largest ``|x|`` over the entries of ``arrays`` (1 <= m <= total).

    Radix select, ``_DIGIT`` bits per pass, most significant first: each pass histograms
    the next digit of the entries whose higher bits equal the prefix found so far, and
    picks the bucket holding the m-th largest. Up to ``small`` entries in all, one
    ``np.partition`` of their concatenation instead (faster there). Returned as a NumPy
    scalar of ``compute_dtype`` of the arrays' dtypes.
    """
    dt = compute_dtype(tuple(np.dtype(a.dtype) for a in arrays))
    if sum(np.size(a) for a in arrays) <= small:
        flat = np.concatenate([np.abs(np.asarray(a, dt)).ravel() for a in arrays])
        return -np.partition(-flat, m - 1)[m - 1]
    nbits = dt.itemsize * 8
    udt = np.dtype(f"uint{nbits}")
    prefix = 0
    for shift in range(nbits - _DIGIT, -1, -_DIGIT):
        hist = _digit_histogram(arrays, dt, udt, shift, prefix)
        above = np.cumsum(hist[::-1])  # above[j]: entries whose digit is >= top - j
        j = int(np.searchsorted(above, m))
        m -= int(above[j - 1]) if j else 0
        prefix = (prefix << _DIGIT) | (len(hist) - 1 - j)
    return np.asarray(prefix, udt).view(dt)


def _digit_histogram(arrays, dt, udt, shift: int, prefix: int) -> np.ndarray:
    """Counts of the digit at ``shift`` among the entries whose higher bits are ``prefix``."""
    hist = np.zeros(1 << _DIGIT, np.int64)
    has_higher = shift + _DIGIT < dt.itemsize * 8
    for key in _abs_bits(arrays, dt, udt):
        if has_higher:
            key = key[(key >> (shift + _DIGIT)) == prefix]
        digit = ((key >> shift) & ((1 << _DIGIT) - 1)).astype(np.intp)
        hist += np.bincount(digit, minlength=1 << _DIGIT)
    return hist


def _abs_bits(arrays, dt, udt, batch: int = 1 << 20):
    """The bit patterns of ``|x|``, array by array, small arrays joined up to ``batch``."""
    pending, size = [], 0
    for a in arrays:
        pending.append(np.abs(np.asarray(a, dt)).view(udt).ravel())
        size += pending[-1].size
        if size >= batch:
            yield np.concatenate(pending)
            pending, size = [], 0
    if pending:
        yield np.concatenate(pending)
