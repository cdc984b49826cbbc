"""Which of the receivers' own images the report's rows read (issue 20).

A row whose data is called "donor" or "pretext" can still read images of the receiver:
the demo's pretext sample, 256 Fashion-MNIST train images, holds 124 train and 14 val
images of ``fmnist_a``. Every such number says so, with the count per split.

The counts come from the package's one overlap rule (:mod:`qvec_jax.data.overlap`,
through ``select.images_overlap``): stored in the cells that carry them (a ``scores``
cell's ``overlap``, a GPTQ cell's ``calib_overlap``), else computed here from the task
names, sizes and seeds the cells record (a grid made before the cells carried them).
A count that needs data which is not here is ``None``: the text then says the images may
be the receiver's, uncounted. Per row, :func:`summarize` adds them up over its receivers
or pairs, and :func:`overlap_text` writes the one line the tables show.
"""

from __future__ import annotations

import functools

from qvec_jax import select
from qvec_jax.data import overlap as ov

__all__ = [
    "calib_counts",
    "counts_of",
    "overlap_text",
    "scores_overlap",
    "summarize",
]


@functools.lru_cache(maxsize=4096)
def _cached(tasks: tuple, n: int, receiver: str, seed: int, measured) -> tuple | None:
    try:
        c = select.images_overlap(list(tasks), n, receiver, seed=seed, measured=measured)
    except (OSError, ValueError, KeyError):
        return None
    return tuple(c[s] for s in ov.SPLITS)


def counts_of(tasks, n: int, receiver: str, seed: int = 0, measured=None) -> dict | None:
    """``select.images_overlap`` of a sample named by its tasks, size and seed (None when
    the data to count is not here)."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    got = _cached(tasks, int(n), str(receiver), int(seed), measured)
    return None if got is None else dict(zip(ov.SPLITS, got))


def calib_counts(cell: dict) -> dict | None:
    """How many of its receiver's images a GPTQ cell's calibration set holds."""
    if "calib_overlap" in cell:
        return cell["calib_overlap"]
    calib = cell.get("calib") or {}
    if not calib.get("task"):
        return ov.zero_counts()
    return counts_of(calib["task"], calib.get("n", 128), cell["receiver"], calib.get("seed", 0))


def scores_overlap(cells: list[dict]) -> dict[tuple[str, str], dict]:
    """``{(donor, receiver): {"donor": counts, "pretext": counts}}`` of the ``scores``
    cells (a leave-one-out merge's donor is ``"loo:<method>"``, its images its donors')."""
    out = {}
    for c in cells:
        if c["kind"] != "scores":
            continue
        if isinstance(c.get("overlap"), dict):
            out[(c["donor"], c["receiver"])] = c["overlap"]
            continue
        setup, r = c.get("setup") or {}, c["receiver"]
        n, seed = int(setup.get("proxy_n", 256)), int(setup.get("seed", 0))
        donors = setup.get("donors") if c["donor"].startswith("loo:") else [c["donor"]]
        got = {"donor": counts_of(tuple(donors or ()), n, r, seed, measured=n)}
        if setup.get("pretext"):
            got["pretext"] = counts_of(setup["pretext"], n, r, seed)
        out[(c["donor"], r)] = got
    return out


def summarize(by_key: dict, unit: str = "receivers") -> dict:
    """``{"of", "hit", "unknown", "counts", "by", "unit"}`` of ``{key: counts or None}``:
    how many keys (``unit``: receivers, or (donor, receiver) pairs) read receiver images,
    how many could not be counted, the per-split sum and the keys that hit (``by``, keys
    as text)."""
    hit = {k: c for k, c in by_key.items() if c is not None and ov.has_overlap(c)}
    unknown = sum(c is None for c in by_key.values())
    by = {(k if isinstance(k, str) else f"{k[0]}->{k[1]}"): dict(c) for k, c in hit.items()}
    return {
        "of": len(by_key),
        "hit": len(hit),
        "unknown": unknown,
        "counts": ov.add_counts(hit.values()),
        "by": by,
        "unit": unit,
    }


def overlap_text(s: dict | None, what: str = "these images") -> str:
    """The table's words for a :func:`summarize` (``""`` when nothing is shared):
    ``"these images hold receiver images for 2/5 receivers: 229 train, 27 val, 0 test
    (NOT receiver-free)"``."""
    if not s or (not s["hit"] and not s["unknown"]):
        return ""
    unit, parts = s.get("unit", "receivers"), []
    if s["hit"]:
        parts.append(
            f"{what} hold receiver images for {s['hit']}/{s['of']} {unit}: "
            f"{ov.describe(s['counts'])} (NOT receiver-free)"
        )
    if s["unknown"]:
        parts.append(f"for {s['unknown']}/{s['of']} {unit} they may, uncounted (data not here)")
    return "; ".join(parts)
