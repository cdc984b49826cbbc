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


# ------------------------------------------------------------------ task names as file names

#: A 100-class view of CIFAR-100 (classes in reverse order): 306 characters.
LONG_VIEW = "cifar100@classes=" + ",".join(map(str, range(99, -1, -1)))


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(root.rglob("*"))}  # fmt: skip


def test_a_task_name_too_long_for_a_directory_is_refused_before_the_workdir_exists(tmp_path):
    from qvec_jax import grid

    (tmp_path / "runs").mkdir()
    work = tmp_path / "grid"
    assert len(LONG_VIEW) > 255
    with pytest.raises(grid.GridError) as e:
        grid.run_grid(["digits", LONG_VIEW], tmp_path / "runs", work, bits=2, progress=False)
    msg = str(e.value)
    assert f"task {LONG_VIEW!r} is 306 bytes long" in msg and "limit of 255 bytes" in msg
    assert "\n" not in msg
    assert not work.exists() and _tree(tmp_path) == {"runs": b"<dir>"}


def test_a_bad_task_name_leaves_an_existing_workdir_unchanged(tmp_path):
    from qvec_jax import grid

    work = tmp_path / "grid"
    GridStore(work).write_meta({"tasks": ["digits"], "lambdas": [1.0], "bits": 2})
    (work / CELLS_FILE).write_text(json.dumps(cell()) + "\n")
    before = _tree(tmp_path)
    for bad in (LONG_VIEW, "..", "a/b", ""):
        with pytest.raises(grid.GridError, match=f"task {bad!r} is"):
            grid.run_grid([bad], tmp_path, work, bits=2, shard=(0, 2), progress=False)
        assert _tree(tmp_path) == before


def test_the_cli_refuses_a_long_view_in_one_line_and_creates_nothing(tmp_path, capsys):
    from qvec_jax.cli import main

    work = tmp_path / "grid"
    assert main(["grid", "--tasks", f"digits,{LONG_VIEW}", "--bits", "2", "--workdir",
                 str(work)]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and LONG_VIEW in err and "255 bytes" in err
    assert not work.exists() and list(tmp_path.iterdir()) == []
