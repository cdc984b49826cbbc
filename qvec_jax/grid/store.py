"""The one owner of a transfer-grid workdir: its cell records and its ``grid.json``.

A grid workdir holds ``cells.jsonl`` (one JSON cell record per line, appended as cells
finish) and ``grid.json`` (what the grid was asked for: tasks, lambdas, quantizer,
checkpoints, missing ones). :mod:`qvec_jax.grid.run` writes through a
:class:`GridStore`, :mod:`qvec_jax.report` reads through one; nothing else touches the
files. A cell record::

    {"kind": "fp" | "ptq_fp" | "ptq_qat" | "patch", "receiver": R,
     "donor": D or None, "lam": float or None, "acc": {"val": a, "test": b},
     "n": {"val": n, "test": m}, "sources": {...}, "bits": B, "granularity": G, ...}

A cell is identified by :func:`cell_key`; a later record with the same key replaces an
earlier one. Appends are flushed and fsynced per record, so a killed run loses at most
the cell being written: its torn last line is ignored on read and dropped by
:meth:`GridStore.repair_tail` before the next append.

A grid split over processes or jobs (``qvec grid --shard i/n``, ``jax.distributed``)
writes one record file per shard, ``cells.shard-<i>-of-<n>.jsonl``, each by its own
writer (and repaired only by it); :meth:`GridStore.cells` merges ``cells.jsonl`` and
every shard file. When files disagree on a cell (a cell recomputed after its checkpoints
changed), the record computed from the checkpoints named in ``grid.json`` wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from qvec_jax.files import atomic_write_text, workdir_locks

CELLS_FILE = "cells.jsonl"
#: Record file of shard ``i`` of ``n``.
SHARD_CELLS_FILE = "cells.shard-{i}-of-{n}.jsonl"
GRID_META_FILE = "grid.json"
#: The splits every cell is evaluated on.
SPLITS = ("val", "test")

__all__ = [
    "CELLS_FILE",
    "GRID_META_FILE",
    "SHARD_CELLS_FILE",
    "SPLITS",
    "CellWriter",
    "GridStore",
    "GridStoreError",
    "cell_key",
    "lam_key",
]


class GridStoreError(ValueError):
    """A grid workdir whose files cannot be read; the message names the file and line."""


def lam_key(lam: float | None) -> str:
    """Canonical string for a lambda value (stable across float round trips)."""
    return "" if lam is None else f"{float(lam):.6g}"


def cell_key(cell: dict) -> tuple[str, str, str, str]:
    """Identity of a cell: (kind, donor, receiver, lambda)."""
    return (cell["kind"], cell.get("donor") or "", cell["receiver"], lam_key(cell.get("lam")))


class CellWriter:
    """Appends cell records to one file, each flushed and fsynced before the next."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CellWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GridStore:
    """The files of one grid workdir (which need not exist yet)."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)

    @property
    def cells_path(self) -> Path:
        return self.workdir / CELLS_FILE

    @property
    def meta_path(self) -> Path:
        return self.workdir / GRID_META_FILE

    def shard_path(self, shard: tuple[int, int] | None) -> Path:
        """The record file that ``shard`` (``(i, n)``; None: the whole grid) appends to."""
        if shard is None:
            return self.cells_path
        i, n = shard
        if not 0 <= i < n:
            raise GridStoreError(f"shard {i}/{n}: need 0 <= i < n")
        return self.workdir / SHARD_CELLS_FILE.format(i=i, n=n)

    @contextlib.contextmanager
    def lock(self, shard: tuple[int, int] | None = None, *, command=None) -> Iterator[None]:
        """Keep other grid runs out while the body writes (``files.workdir_locks``).

        The whole grid (``shard=None``) holds ``grid.lock`` exclusively. Shard ``(i, n)``
        holds ``grid.lock`` shared and ``grid.shard-<i>-of-<n>.lock`` exclusively, so the
        shards of one grid (each writing its own record file) run side by side in one
        workdir while a second copy of a shard, or an unsharded run, is refused. Both
        locks are taken before either records its holder, so a refused shard leaves the
        record in ``grid.lock`` as it was.
        """
        if shard is None:
            locks = [("grid", False)]
        else:
            i, n = shard
            if not 0 <= i < n:
                raise GridStoreError(f"shard {i}/{n}: need 0 <= i < n")
            locks = [("grid", True), (f"grid.shard-{i}-of-{n}", False)]
        with workdir_locks(self.workdir, locks, command=command):
            yield

    def exists(self) -> bool:
        """Whether the workdir holds a grid (cell records or a ``grid.json``)."""
        return self.meta_path.exists() or any(p.exists() for p in self.cell_files())

    # ------------------------------------------------------------------ grid.json

    def meta(self) -> dict:
        """The grid's ``grid.json`` (``{}`` when there is none yet)."""
        return self.read_json(self.meta_path.name)

    def read_json(self, name: str) -> dict:
        """A JSON file of the workdir (``{}`` when absent); a corrupt one names its path."""
        path = self.workdir / name
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GridStoreError(f"{path}: not JSON ({e}); delete it and rerun qvec grid") from e

    def write_meta(self, meta: dict) -> Path:
        """Replace ``grid.json`` atomically (readers see the old or the new one)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(self.meta_path, json.dumps(meta, indent=1, default=str) + "\n")

    # ------------------------------------------------------------------ cells

    def cell_files(self) -> list[Path]:
        """The record files merged by :meth:`cells`, in order (later records win):
        ``cells.jsonl``, then the shard files by shard count and index."""
        shards = []
        for path in self.workdir.glob(SHARD_CELLS_FILE.format(i="*", n="*")):
            m = re.fullmatch(r"cells\.shard-(\d+)-of-(\d+)\.jsonl", path.name)
            if m:
                shards.append((int(m[2]), int(m[1]), path))
        return [self.cells_path] + [p for _, _, p in sorted(shards)]

    def cells(self, fingerprints: set[str] | None = None) -> list[dict]:
        """Every stored cell, one per :func:`cell_key`, merged over :meth:`cell_files`.

        Of several records of one cell, one computed from current checkpoints (every
        value of its ``sources`` in ``fingerprints``; default: the fingerprints of the
        checkpoints ``grid.json`` names) wins; among equals, the later one. A truncated
        last line (a run killed mid-write, or a shard still appending) is ignored; any
        other bad line is an error naming the file and line.
        """
        if fingerprints is None:
            named = (self.meta().get("checkpoints") or {}).values()
            fingerprints = {c.get("fingerprint") for c in named if isinstance(c, dict)}
        cells: dict[tuple, dict] = {}
        for path in self.cell_files():
            for cell in _read_records(path):
                key, old = cell_key(cell), cells.get(cell_key(cell))
                if old is None or _current(cell, fingerprints) >= _current(old, fingerprints):
                    cells[key] = cell
        return list(cells.values())

    def repair_tail(self, shard: tuple[int, int] | None = None) -> None:
        """Drop a torn last line (a run killed mid-append) of ``shard``'s record file so
        new records start on a fresh line. Call it before appending, from the one process
        that writes that file (never on another shard's file: it may be appending)."""
        path = self.shard_path(shard)
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            atomic_write_text(path, data[: data.rfind(b"\n") + 1].decode())

    def writer(self, shard: tuple[int, int] | None = None) -> CellWriter:
        """An appending :class:`CellWriter` on ``shard``'s record file (``cells.jsonl``
        for the whole grid); use it as a context manager."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        return CellWriter(self.shard_path(shard))

    def append(self, record: dict) -> None:
        """Append one record (opens the file for it; use :meth:`writer` for many)."""
        with self.writer() as w:
            w.append(record)


def _current(cell: dict, fingerprints: set[str]) -> bool:
    """Whether ``cell`` was computed from checkpoints with these fingerprints."""
    sources = cell.get("sources") or {}
    return bool(sources) and all(v in fingerprints for v in sources.values())


def _read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # interrupted append: the cell will simply be recomputed
                continue
            raise GridStoreError(
                f"{path}:{i}: not a JSON cell record ({e}); fix or delete it"
            ) from e
    return out
