"""GridStore: the one owner of a grid workdir (keys, appends, torn tails, grid.json)."""

from __future__ import annotations

import json

import pytest

from qvec_jax.grid.store import CELLS_FILE, GRID_META_FILE, GridStore, GridStoreError, cell_key


def cell(kind="patch", d="a", r="b", lam=0.5, test=0.7):
    return {"kind": kind, "donor": d, "receiver": r, "lam": lam, "acc": {"val": 0.6, "test": test}}


def test_keys_are_canonical_across_float_round_trips():
    assert cell_key(cell(lam=0.1 + 0.2)) == cell_key(cell(lam=0.3)) == ("patch", "a", "b", "0.3")
    assert cell_key(cell(kind="fp", d=None, lam=None)) == ("fp", "", "b", "")


def test_empty_workdir_reads_as_no_grid(tmp_path):
    store = GridStore(tmp_path / "none")
    assert not store.exists() and store.meta() == {} and store.cells() == []
    store.repair_tail()  # nothing to repair, nothing created
    assert not (tmp_path / "none").exists()


def test_appends_are_whole_lines_and_later_records_win(tmp_path):
    store = GridStore(tmp_path / "g")
    with store.writer() as w:
        w.append(cell(test=0.1))
        w.append(cell(lam=1.0))
    store.append(cell(test=0.9))  # the same key as the first: replaces it
    lines = store.cells_path.read_text().splitlines()
    assert [json.loads(x)["acc"]["test"] for x in lines] == [0.1, 0.7, 0.9]
    got = {cell_key(c): c["acc"]["test"] for c in store.cells()}
    assert got == {("patch", "a", "b", "0.5"): 0.9, ("patch", "a", "b", "1"): 0.7}
    assert store.exists() and store.cell_files() == [tmp_path / "g" / CELLS_FILE]


def test_torn_tail_is_ignored_on_read_and_repaired_before_appending(tmp_path):
    store = GridStore(tmp_path)
    whole = json.dumps(cell()) + "\n" + json.dumps(cell(lam=1.0)) + "\n"
    store.cells_path.write_text(whole + '{"kind": "pat')  # a run killed mid-append
    assert [c["lam"] for c in store.cells()] == [0.5, 1.0]
    store.repair_tail()
    assert store.cells_path.read_text() == whole
    store.append(cell(lam=1.5))
    assert [c["lam"] for c in store.cells()] == [0.5, 1.0, 1.5]
    # a file that is one torn line only is emptied, not deleted
    store.cells_path.write_text('{"kind"')
    store.repair_tail()
    assert store.cells_path.read_text() == "" and store.cells() == []


def test_a_bad_line_before_the_tail_names_file_and_line(tmp_path):
    store = GridStore(tmp_path)
    store.cells_path.write_text(json.dumps(cell()) + "\ngarbage\n" + json.dumps(cell()) + "\n")
    with pytest.raises(GridStoreError, match=rf"{CELLS_FILE}:2: not a JSON cell record"):
        store.cells()


def test_meta_round_trip_is_atomic_json(tmp_path):
    store = GridStore(tmp_path / "new")
    meta = {"tasks": ["a", "b"], "lambdas": [0.5, 1.0], "bits": 2, "path": tmp_path}
    assert store.write_meta(meta) == tmp_path / "new" / GRID_META_FILE
    assert store.meta() == {**meta, "path": str(tmp_path)}  # default=str for paths
    assert store.exists()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [GRID_META_FILE]  # no tmp
    store.meta_path.write_text("{not json")
    with pytest.raises(GridStoreError, match=f"{GRID_META_FILE}: not JSON"):
        store.meta()
