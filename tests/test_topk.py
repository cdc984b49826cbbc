"""topk.kth_largest_abs against its definition (sort the magnitudes, take the m-th), on
both of its paths (one np.partition for small inputs, the streamed radix select above),
in float32 and, under jax_enable_x64, float64 (four 16-bit passes)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qvec_jax.merge import topk


def kth_ref(arrays, m) -> float:
    """The m-th largest |x| by definition: all magnitudes sorted descending."""
    allv = np.concatenate([np.abs(np.asarray(a, np.float64)).ravel() for a in arrays])
    return np.sort(allv)[::-1][m - 1]


arrays_of = st.lists(
    hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
        elements=st.one_of(st.just(0.0), st.floats(-1e4, 1e4, width=16)),  # zeros, ties
    ),
    min_size=1,
    max_size=4,
).filter(lambda xs: sum(x.size for x in xs) > 0)


@pytest.mark.parametrize("x64", [False, True])
@settings(max_examples=30, deadline=None)
@given(arrays=arrays_of, frac=st.floats(0, 1))
def test_both_paths_give_the_exact_kth_largest(x64, arrays, frac):
    m = 1 + int(frac * (sum(a.size for a in arrays) - 1))
    with jax.enable_x64(x64):
        dt = topk.compute_dtype(a.dtype for a in arrays)
        for small in (topk.SMALL, 0):  # np.partition; the radix select
            got = topk.kth_largest_abs(arrays, m, small=small)
            assert got.dtype == dt
            assert float(got) == kth_ref(arrays, m)


def test_the_radix_select_streams_large_inputs_in_batches():
    # over 2**20 entries in all: the default path is the radix select, and its bit
    # patterns come in several batches (one large array, then small ones joined)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(1 << 20).astype(np.float32)]
    arrays += [rng.standard_normal((7, 300)).astype(np.float32) for _ in range(5)]
    arrays[-1][0, :50] = arrays[0][:50]  # repeated magnitudes across arrays
    total = sum(a.size for a in arrays)
    for m in (1, 2, 1000, total // 2, total):
        assert float(topk.kth_largest_abs(arrays, m)) == kth_ref(arrays, m)


def test_compute_dtype_is_at_least_float32_and_follows_x64():
    f16, f32, f64 = (np.dtype(t) for t in ("float16", "float32", "float64"))
    assert topk.compute_dtype([f16]) == f32
    assert topk.compute_dtype([jax.numpy.bfloat16]) == f32
    with jax.enable_x64(False):
        assert topk.compute_dtype([f16, f64]) == f32
    with jax.enable_x64(True):  # the same inputs, not a stale cached answer
        assert topk.compute_dtype([f16, f64]) == f64
