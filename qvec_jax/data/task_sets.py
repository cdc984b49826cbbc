"""The demo's task-set protocol (issue 12): a DEV set where choices are made, a TEST set
drawn once from a pool of task views and never used for choices.

The POOL is every view of ``fashion_mnist`` and ``digits`` built from a class set in
{all, 0-4, 5-9, even, odd} x ``rot90`` in {0, 1, 2, 3} x ``hflip`` x ``invert``
(2 x 5 x 16 = 160), minus the plain sources, the DEV views and the views of issue 12's
skeptic table (which stay unused): 149 views, in ``itertools.product`` order.

TEST is :func:`draw` of the pool with ``numpy.random.default_rng(TEST_SEED)``: uniform
over the 5-subsets holding at least 2 views of each source (rejection sampling).
DEV_EXTRA, a second set for choices, is the same draw from the pool minus TEST.
Without Fashion-MNIST the demo runs on digits only: FALLBACK_DEV (the tasks that fallback
always used) for choices, and FALLBACK_TEST, drawn the same way (same seed) from the
digits part of the pool minus FALLBACK_DEV and DEV_EXTRA.

This module computes the sets; ``configs/demo_tiny.py`` spells them out
(``demo.test_tasks`` and friends) and ``tests/test_task_sets.py`` checks that the two agree,
so nobody edits the test set by hand. The test sets' names appear nowhere else in code.

The study's HALVES (issue 21, ``qvec study``): every view of the two sources except the
pretext itself (plain ``fashion_mnist``): 159 views, split once by :func:`halves`. The
views the project has already looked at (DEV, SKEPTIC, DEV_EXTRA, FALLBACK_DEV) go to the
dev half, the demo's test sets to the test half; the rest of each source is shuffled by
``numpy.random.default_rng(HALF_SEED)`` and dealt so that each half holds half of that
source's views (dev takes the smaller half). Nothing is ever chosen on the test half.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from qvec_jax.data.registry import Task, View, get_task

SOURCES = ("fashion_mnist", "digits")
CLASS_SETS = (None, (0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (0, 2, 4, 6, 8), (1, 3, 5, 7, 9))
TEST_SEED = 12  # issue 12's number, fixed before the draw ever ran
DEV_EXTRA_SEED = 1
SET_SIZE = 5
HALF_SEED = 21  # issue 21's number, fixed before any study ran
#: The pretext task of the demo and the studies: no half holds it.
PRETEXT = "fashion_mnist"
HALF_NAMES = ("dev", "test")

#: The demo's five tasks before issue 12; its recipe was chosen on them, so they are DEV.
DEV = ("fmnist_a", "fmnist_b", "fmnist_rot90", "digits", "digits_rot90")
#: Issue 12's "fresh tasks" table: already looked at, so neither DEV nor TEST.
SKEPTIC = (
    "fashion_mnist@classes=0,2,4,6,8",
    "fashion_mnist@classes=1,3,5,7,9",
    "fashion_mnist@rot90=2",
    "digits@classes=5,6,7,8,9,invert",
    "digits@rot90=3",
)
#: The digits-only demo's tasks (no Fashion-MNIST files): its DEV set.
FALLBACK_DEV = ("digits_rot90", "digits_inv", "digits_flip", "digits_a")
FALLBACK_MIN = {"digits": len(FALLBACK_DEV)}
TEST_MIN = {"fashion_mnist": 2, "digits": 2}

#: A pool entry: (source task name, view of it).
Entry = tuple[str, View]


def view_name(source: str, view: View) -> str:
    """``source`` and ``view`` in the CLI's view syntax (``registry.parse_view``'s one
    spelling), e.g. ``digits@classes=1,3,5,7,9,rot90=1,hflip,invert``."""
    parts = ["classes=" + ",".join(map(str, view.classes))] if view.classes is not None else []
    parts += [f"rot90={view.rot90}"] * bool(view.rot90)
    parts += [flag for flag in ("hflip", "invert") if getattr(view, flag)]
    return f"{source}@{','.join(parts)}" if parts else source


def view_key(task: Task | str) -> tuple:
    """What makes two task names the same task: their sources and view
    (``digits_a@hflip`` and ``digits@classes=0,1,2,3,4,hflip`` share one key)."""
    t = get_task(task)
    return t.sources, t.view


def pool(exclude: Iterable[str] = (*DEV, *SKEPTIC)) -> list[Entry]:
    """The candidate views, in ``itertools.product`` order, minus the plain sources and
    any view that a name in ``exclude`` denotes."""
    out, excluded = [], {view_key(n) for n in exclude}
    for src, classes, rot, flip, inv in itertools.product(
        SOURCES, CLASS_SETS, range(4), (False, True), (False, True)
    ):
        view = View(classes=classes, rot90=rot, hflip=flip, invert=inv)
        if not view.is_identity and (get_task(src).sources, view) not in excluded:
            out.append((src, view))
    return out


def draw(
    entries: Sequence[Entry], seed: int, k: int = SET_SIZE, min_each: Mapping[str, int] = TEST_MIN
) -> list[str]:
    """``k`` names drawn from ``entries`` by ``numpy.random.default_rng(seed)``: uniform over
    the k-subsets with at least ``min_each[source]`` views of each source (rejection
    sampling), returned in pool order."""
    for src, n in min_each.items():
        if sum(e[0] == src for e in entries) < n or n > k:
            raise ValueError(f"draw: cannot hold {n} {src} views in {k} of {len(entries)} views")
    rng = np.random.default_rng(seed)
    while True:
        idx = sorted(rng.choice(len(entries), size=k, replace=False).tolist())
        chosen = [entries[i] for i in idx]
        if all(sum(e[0] == src for e in chosen) >= n for src, n in min_each.items()):
            return [view_name(*e) for e in chosen]


def draw_test() -> list[str]:
    """The TEST set: ``draw(pool(), TEST_SEED)``."""
    return draw(pool(), TEST_SEED)


def draw_dev_extra() -> list[str]:
    """The second DEV set (does a choice carry over?): the same draw from the pool minus
    TEST, with ``DEV_EXTRA_SEED``."""
    return draw(pool((*DEV, *SKEPTIC, *draw_test())), DEV_EXTRA_SEED)


def draw_fallback_test() -> list[str]:
    """The digits-only TEST set: ``len(FALLBACK_DEV)`` digits views drawn with TEST_SEED
    from the pool minus FALLBACK_DEV and DEV_EXTRA (both used for choices)."""
    rest = pool((*DEV, *SKEPTIC, *FALLBACK_DEV, *draw_dev_extra()))
    digits = [e for e in rest if e[0] == "digits"]
    return draw(digits, TEST_SEED, k=len(FALLBACK_DEV), min_each=FALLBACK_MIN)


@functools.cache
def _test_keys() -> dict[tuple, str]:
    return {view_key(n): n for n in (*draw_test(), *draw_fallback_test())}


def in_test_sets(tasks: Iterable[str]) -> list[str]:
    """The names among ``tasks`` that denote a view of a TEST set (the main one or the
    digits-only one), matched by :func:`view_key` whatever their spelling or label
    (``digits_a@hflip`` is ``digits@classes=0,1,2,3,4,hflip``); a name this registry does
    not know is no test view. ``qvec tune`` refuses a grid holding one, the report marks it."""
    keys, out = _test_keys(), []
    for name in tasks:
        try:
            key = view_key(name)
        except (KeyError, ValueError):
            continue
        if key in keys:
            out.append(name)
    return out


# ----------------------------------------------------------------------------- halves


def _universe() -> list[Entry]:
    """Every view of the two sources, in ``itertools.product`` order, but the pretext."""
    out = []
    for src, classes, rot, flip, inv in itertools.product(
        SOURCES, CLASS_SETS, range(4), (False, True), (False, True)
    ):
        view = View(classes=classes, rot90=rot, hflip=flip, invert=inv)
        if view_name(src, view) != PRETEXT:
            out.append((src, view))
    return out


@functools.cache
def halves() -> dict[str, tuple[str, ...]]:
    """``{"dev": names, "test": names}``: the study's split of every view (module
    docstring), each half in pool order. Fixed by ``HALF_SEED``; disjoint; together every
    view of :func:`_universe`."""
    forced_dev = {view_key(n) for n in (*DEV, *SKEPTIC, *draw_dev_extra(), *FALLBACK_DEV)}
    forced_test = {view_key(n) for n in (*draw_test(), *draw_fallback_test())}
    assert not forced_dev & forced_test, "a view is both inspected and a test view"
    rng = np.random.default_rng(HALF_SEED)
    side: dict[tuple, str] = {}
    for src in SOURCES:
        entries = [e for e in _universe() if e[0] == src]
        keys = [(get_task(src).sources, v) for _, v in entries]
        n_dev = len(entries) // 2
        free = [k for k in keys if k not in forced_dev and k not in forced_test]
        order = [free[i] for i in rng.permutation(len(free))]
        room = n_dev - sum(k in forced_dev for k in keys)
        for i, k in enumerate(order):
            side[k] = "dev" if i < room else "test"
        side |= {k: "dev" for k in keys if k in forced_dev}
        side |= {k: "test" for k in keys if k in forced_test}
    out: dict[str, list[str]] = {"dev": [], "test": []}
    for src, view in _universe():
        out[side[(get_task(src).sources, view)]].append(view_name(src, view))
    return {k: tuple(v) for k, v in out.items()}


def half_of(task: Task | str) -> str | None:
    """``"dev"`` or ``"test"``: the half holding ``task``'s view (by :func:`view_key`,
    whatever its spelling); None for a view outside the two sources' pool."""
    try:
        key = view_key(task)
    except (KeyError, ValueError):
        return None
    for name in HALF_NAMES:
        if key in {view_key(n) for n in halves()[name]}:
            return name
    return None


def study_views(half: str, k: int | None = None, seed: int = 0) -> list[str]:
    """``k`` views of ``half`` (all of them for None), sampled by ``seed`` so that a
    smaller sample is a prefix of a larger one: each source's views are shuffled by
    ``numpy.random.default_rng(seed)`` and dealt alternately (fashion_mnist, digits, ...),
    so the sources stay balanced and a 3-seed study on 6 views reuses the first 6 views
    of a 16-view study."""
    if half not in HALF_NAMES:
        raise ValueError(f"half {half!r}: use one of {HALF_NAMES}")
    names = halves()[half]
    if k is None:
        return list(names)
    if isinstance(k, bool) or not 2 <= int(k) <= len(names):
        raise ValueError(
            f"views={k!r}: the {half} half holds {len(names)} views; use 2..{len(names)}"
        )
    rng = np.random.default_rng(seed)
    by_src = []
    for src in SOURCES:
        own = [n for n in names if get_task(n).sources == get_task(src).sources]
        by_src.append([own[i] for i in rng.permutation(len(own))])
    dealt = [n for group in itertools.zip_longest(*by_src) for n in group if n is not None]
    return dealt[: int(k)]
