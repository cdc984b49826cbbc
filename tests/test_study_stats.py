"""The study's foundations (issue 21): the dev/test halves of the task views are fixed by
their seed and respect what was already looked at, and the task bootstrap agrees with
closed forms on toy studies whose answer is known."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest

from qvec_jax.data import View, get_task
from qvec_jax.data import task_sets as ts
from qvec_jax.study import stats

# ----------------------------------------------------------------------------- halves

#: The split, frozen. A change here means the split moved: every study run on the old
#: halves is void and must be rerun (and the test half may have been peeked at).
HALF_COUNTS = {
    "dev": {"fashion_mnist": 39, "digits": 40},
    "test": {"fashion_mnist": 40, "digits": 40},
}
HALF_SHA256 = {"dev": "e8ae7763449a70be", "test": "dfc375a8ca40a21e"}  # first 16 hex digits


def source_of(name: str) -> str:
    return next(s for s in ts.SOURCES if get_task(name).sources == get_task(s).sources)


def universe() -> list[str]:
    """Every view of the two sources but the pretext, in product order (rebuilt here)."""
    out = []
    for src, classes, rot, flip, inv in itertools.product(
        ts.SOURCES, ts.CLASS_SETS, range(4), (False, True), (False, True)
    ):
        name = ts.view_name(src, View(classes=classes, rot90=rot, hflip=flip, invert=inv))
        if name != ts.PRETEXT:
            out.append(name)
    return out


def inspected() -> list[str]:
    return [*ts.DEV, *ts.SKEPTIC, *ts.draw_dev_extra(), *ts.FALLBACK_DEV]


def test_halves_are_frozen():
    h = ts.halves()
    assert set(h) == set(ts.HALF_NAMES)
    for half, names in h.items():
        by_src = {s: sum(source_of(n) == s for n in names) for s in ts.SOURCES}
        assert by_src == HALF_COUNTS[half], half
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        assert digest == HALF_SHA256[half], f"the {half} half moved: rerun every study"


def test_halves_follow_the_documented_rule():
    """The docstring's rule, recomputed: forced views first, the rest of each source
    shuffled by default_rng(HALF_SEED) (one generator, sources in order), dev takes floor."""
    dev_keys = {ts.view_key(n) for n in inspected()}
    test_keys = {ts.view_key(n) for n in (*ts.draw_test(), *ts.draw_fallback_test())}
    rng, side = np.random.default_rng(ts.HALF_SEED), {}
    for src in ts.SOURCES:
        own = [n for n in universe() if source_of(n) == src]
        free = [n for n in own if ts.view_key(n) not in dev_keys | test_keys]
        room = len(own) // 2 - sum(ts.view_key(n) in dev_keys for n in own)
        for i, j in enumerate(rng.permutation(len(free))):
            side[free[j]] = "dev" if i < room else "test"
        side |= {n: "dev" for n in own if ts.view_key(n) in dev_keys}
        side |= {n: "test" for n in own if ts.view_key(n) in test_keys}
    expected = {h: tuple(n for n in universe() if side[n] == h) for h in ts.HALF_NAMES}
    assert ts.halves() == expected


def test_halves_partition_every_view_but_the_pretext():
    dev, test = ts.halves()["dev"], ts.halves()["test"]
    assert len(set(dev)) == len(dev) and len(set(test)) == len(test)
    assert not {ts.view_key(n) for n in dev} & {ts.view_key(n) for n in test}
    assert sorted(dev + test) == sorted(universe())
    assert len(dev) + len(test) == 2 * 5 * 4 * 2 * 2 - 1 == 159
    assert ts.PRETEXT not in dev + test and ts.half_of(ts.PRETEXT) is None
    for src in ts.SOURCES:  # each half holds half of each source, dev the smaller half
        n_src = sum(source_of(n) == src for n in universe())
        assert sum(source_of(n) == src for n in dev) == n_src // 2
        assert sum(source_of(n) == src for n in test) == n_src - n_src // 2


@pytest.mark.parametrize(
    "names, half",
    [
        (ts.DEV, "dev"),
        (ts.SKEPTIC, "dev"),
        (ts.FALLBACK_DEV, "dev"),
        (ts.draw_dev_extra(), "dev"),
        (ts.draw_test(), "test"),
        (ts.draw_fallback_test(), "test"),
    ],
)
def test_inspected_views_are_dev_and_test_sets_are_test(names, half):
    assert [ts.half_of(n) for n in names] == [half] * len(names)


def test_half_of_ignores_spelling_and_refuses_strangers():
    assert ts.half_of("fmnist_a") == ts.half_of("fashion_mnist@classes=0,1,2,3,4") == "dev"
    assert ts.half_of("digits_a@rot90=1") == ts.half_of("digits@classes=0,1,2,3,4,rot90=1")
    assert ts.half_of("digits_rot90") == ts.half_of("digits@rot90=1")
    assert ts.half_of(get_task("fmnist_b")) == ts.half_of("fashion_mnist@classes=5,6,7,8,9")
    for name in ts.halves()["test"][:5]:  # the canonical spelling maps to its own half
        assert ts.half_of(name) == "test"
    for stranger in ("no_such_task", "mnist", "mnist@rot90=1", "fashion_mnist@classes=0,1",
                     "digits@bogus", ts.PRETEXT):  # fmt: skip
        assert ts.half_of(stranger) is None, stranger


@pytest.mark.parametrize("half", ts.HALF_NAMES)
def test_study_views_sample_prefixes_balanced(half):
    names = ts.halves()[half]
    full = ts.study_views(half, len(names), seed=3)
    assert sorted(full) == sorted(names)
    assert ts.study_views(half, len(names), seed=3) == full  # deterministic
    for k in range(2, len(names) + 1):
        sample = ts.study_views(half, k, seed=3)
        assert sample == full[:k]
        n_fashion = sum(source_of(n) == "fashion_mnist" for n in sample)
        assert abs(n_fashion - (k - n_fashion)) <= 1, k
    assert ts.study_views(half, 10, seed=0) != ts.study_views(half, 10, seed=1)
    assert ts.study_views(half) == list(names)


@pytest.mark.parametrize("k", [0, 1, 81, 1000, -3, True])
def test_study_views_refuses_bad_k(k):  # the test half holds 80 views
    with pytest.raises(ValueError, match="views="):
        ts.study_views("test", k)


def test_study_views_refuses_bad_half():
    with pytest.raises(ValueError, match="half"):
        ts.study_views("train", 4)


# ----------------------------------------------------------------------------- bootstrap

Z95 = 1.96


def tasks_of(t: int) -> list[str]:
    return [f"t{i}" for i in range(t)]


def per_receiver(a) -> dict:
    return {(f"t{i}", None): float(x) for i, x in enumerate(a)}


def pairwise(f, t: int) -> dict:
    """``{(r, d): f(i, j)}`` over every ordered pair of distinct tasks."""
    return {(f"t{i}", f"t{j}"): float(f(i, j)) for i in range(t) for j in range(t) if i != j}


def closed_width(a) -> float:
    """Width of the normal 95% interval of the mean of ``a`` under a one-way bootstrap."""
    return 2 * Z95 * math.sqrt(np.var(a) / len(a))


def test_per_receiver_interval_matches_closed_form():
    a = np.random.default_rng(7).normal(0.5, 0.2, size=30)
    iv = stats.bootstrap(per_receiver(a), tasks_of(30), b=20000)
    assert iv["point"] == pytest.approx(a.mean())
    assert (iv["n"], iv["tasks"], iv["b"]) == (30, 30, 20000)
    assert iv["hi"] - iv["lo"] == pytest.approx(closed_width(a), rel=0.15)
    assert iv["lo"] < iv["point"] < iv["hi"]


def test_constant_values_collapse_the_interval():
    iv = stats.bootstrap(per_receiver([0.25] * 8), tasks_of(8), b=500)
    assert iv["lo"] == pytest.approx(0.25) and iv["hi"] == pytest.approx(0.25)
    iv = stats.bootstrap(pairwise(lambda i, j: 0.75, 8), tasks_of(8), b=500)
    assert (iv["point"], iv["lo"], iv["hi"]) == pytest.approx((0.75, 0.75, 0.75))


@pytest.mark.parametrize("side", ["receiver", "donor"])
def test_one_sided_pair_values_behave_like_the_one_way_bootstrap(side):
    """V[r, d] = a_r (or b_d): resampling the other side only reweights equal values
    (almost: the diagonal is excluded), so the width is the one-way width of ``a``."""
    t = 24
    a = np.random.default_rng(11).uniform(0, 1, size=t)
    f = (lambda i, j: a[i]) if side == "receiver" else (lambda i, j: a[j])
    iv = stats.bootstrap(pairwise(f, t), tasks_of(t), b=20000)
    assert iv["point"] == pytest.approx(a.mean())
    assert (iv["n"], iv["tasks"]) == (t * (t - 1), t)
    one_way = stats.bootstrap(per_receiver(a), tasks_of(t), b=20000)
    assert iv["hi"] - iv["lo"] == pytest.approx(one_way["hi"] - one_way["lo"], rel=0.15)
    assert iv["hi"] - iv["lo"] == pytest.approx(closed_width(a), rel=0.15)


def test_win_rate_interval_stays_in_the_unit_interval():
    t = 10
    wins = np.random.default_rng(3).integers(0, 2, size=(t, t))
    iv = stats.bootstrap(pairwise(lambda i, j: wins[i, j], t), tasks_of(t), b=2000)
    assert 0.0 <= iv["lo"] <= iv["point"] <= iv["hi"] <= 1.0
    assert iv["lo"] < iv["hi"]


def test_too_few_tasks_give_no_interval():
    one = stats.bootstrap({("t0", None): 0.4}, tasks_of(3))
    assert (one["point"], one["lo"], one["hi"], one["n"], one["tasks"]) == (0.4, None, None, 1, 1)
    one_receiver = stats.bootstrap({("t0", "t1"): 0.2, ("t0", "t2"): 0.6}, tasks_of(3))
    assert one_receiver["point"] == pytest.approx(0.4) and one_receiver["lo"] is None
    for empty in ({}, {("t0", None): None, ("t1", None): float("nan")}):
        iv = stats.bootstrap(empty, tasks_of(3))
        assert (iv["point"], iv["lo"], iv["hi"], iv["n"]) == (None, None, None, 0)


def test_mixed_keys_are_refused():
    mixed = {("t0", "t1"): 0.1, ("t1", None): 0.2}
    with pytest.raises(ValueError, match="mix"):
        stats.bootstrap(mixed, tasks_of(2))
    with pytest.raises(ValueError, match="mix"):
        stats.matrix(mixed, tasks_of(2))


def test_matrix_leaves_unmeasured_cells_nan():
    v, is_pairwise = stats.matrix({("t0", "t1"): 0.5, ("t1", "t0"): None}, tasks_of(2))
    assert is_pairwise and v[0, 1] == 0.5 and np.isnan(v).sum() == 3
    v, is_pairwise = stats.matrix(per_receiver([0.1, 0.2]), tasks_of(2))
    assert not is_pairwise and v.shape == (2, 1)


def test_bootstrap_is_deterministic_in_its_seed():
    a = np.random.default_rng(5).uniform(size=12)
    vals = pairwise(lambda i, j: a[i] * a[j], 12)
    first = stats.bootstrap(vals, tasks_of(12), b=500, seed=4)
    assert stats.bootstrap(vals, tasks_of(12), b=500, seed=4) == first
    assert stats.bootstrap(vals, tasks_of(12), b=500, seed=5)["lo"] != first["lo"]


def test_counts_rows_sum_to_the_task_count():
    c = stats.counts(7, 300, np.random.default_rng(0))
    assert c.shape == (300, 7)
    assert np.all(c.sum(axis=1) == 7) and np.all(c >= 0) and np.all(c == np.round(c))


# ----------------------------------------------------------------------------- k-task draws


def test_k_task_draws_enumerate_every_subset():
    """Value 1 on pairs within tasks {0, 1, 2}, 0 elsewhere: a 5-subset holding all three
    has 3*2 ones among 5*4 pairs (0.3); dropping one of them leaves 2*1 (0.1)."""
    inside = {0, 1, 2}
    vals = pairwise(lambda i, j: float(i in inside and j in inside), 6)
    draws = stats.k_task_draws(vals, tasks_of(6), k=5)
    assert len(draws) == math.comb(6, 5) == 6
    # itertools.combinations order: the subsets drop task 5, 4, 3, 2, 1, 0 in turn
    assert draws[0] == pytest.approx(6 / 20)
    assert draws == pytest.approx([0.3, 0.3, 0.3, 0.1, 0.1, 0.1])


def test_k_task_draws_sample_when_there_are_too_many_subsets():
    a = np.random.default_rng(2).uniform(size=10)
    vals = pairwise(lambda i, j: a[i] - a[j], 10)
    draws = stats.k_task_draws(vals, tasks_of(10), k=5, limit=50)
    assert len(draws) == 50 < math.comb(10, 5)
    assert np.array_equal(draws, stats.k_task_draws(vals, tasks_of(10), k=5, limit=50))
    assert len(stats.k_task_draws(vals, tasks_of(10), k=11)) == 0


def test_k_task_draws_need_pair_values():
    with pytest.raises(ValueError, match="per-pair"):
        stats.k_task_draws(per_receiver([0.1, 0.2, 0.3]), tasks_of(3), k=2)
