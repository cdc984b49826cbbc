"""The transfer grid split over real processes: ``qvec grid --shard i/n`` jobs and a
``jax.distributed`` run on loopback each compute their own cells into their own record
file, and the merged report's ``grid.csv`` equals a one-process run's byte for byte."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_grid_run import LAMBDAS, TASKS, make_runs

from qvec_jax import grid
from qvec_jax.files import WorkdirLocked
from qvec_jax.grid.store import GridStore, cell_key

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--tasks", ",".join(TASKS), "--bits", "2", "--lambdas", ",".join(map(str, LAMBDAS)),
        "--batch-size", "64", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def one_process(runs, tmp_path_factory):
    """The reference: the whole grid in this process, then the report."""
    from qvec_jax import report

    work = tmp_path_factory.mktemp("one")
    cells = grid.run_grid(list(TASKS), runs, work, bits=2, lambdas=LAMBDAS, batch_size=64,
                              progress=False)  # fmt: skip
    report.write_report(work, cells=cells)
    return work


def qvec(*args) -> subprocess.Popen:
    pipe = subprocess.PIPE
    cmd = [sys.executable, "-m", "qvec_jax.cli", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=pipe, stderr=pipe, text=True)


def finish(procs) -> list[str]:
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    return [so for so, _ in outs]


def all_cells(workdir) -> list[tuple]:
    return sorted(cell_key(c) for c in GridStore(workdir).cells())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_every_cell_has_exactly_one_shard_and_receivers_stay_together(n):
    cells = grid.plan_cells(TASKS, LAMBDAS, _all_ckpts(), {}).expected
    owners = [grid.shard_of(c, TASKS, n) for c in cells]
    assert all(0 <= o < n for o in owners)
    by_receiver = {}
    for c, o in zip(cells, owners):
        by_receiver.setdefault(c["receiver"], set()).add(o)
    if n <= len(TASKS):  # one shard per receiver
        assert all(len(s) == 1 for s in by_receiver.values())
    used = set(owners)
    assert used == set(range(min(n, len(cells))))  # no shard idle, none out of range


def _all_ckpts():
    from types import SimpleNamespace

    return {(t, m): SimpleNamespace(fingerprint=f"{t}/{m}") for t in TASKS for m in ("fp", "qat")}


@pytest.mark.slow
def test_shard_jobs_merge_to_the_one_process_grid(runs, one_process, tmp_path):
    """Two `qvec grid --shard i/2` jobs side by side, then `qvec report`."""
    work = tmp_path / "sharded"
    outs = finish([qvec("grid", *GRID, "--runs", str(runs), "--workdir", str(work), "--shard",
                        f"{i}/2") for i in range(2)])  # fmt: skip
    assert all("qvec report" in o for o in outs)
    files = sorted(p.name for p in work.glob("cells*.jsonl"))
    assert files == ["cells.shard-0-of-2.jsonl", "cells.shard-1-of-2.jsonl"]
    assert not (work / "grid.csv").exists()  # a shard writes no report
    finish([qvec("report", str(work))])
    assert (work / "grid.csv").read_bytes() == (one_process / "grid.csv").read_bytes()
    # a rerun of a shard finds its cells done; an unsharded rerun computes nothing new
    sizes = {p.name: p.stat().st_size for p in work.glob("cells*.jsonl")}
    cells = grid.run_grid(list(TASKS), runs, work, bits=2, lambdas=LAMBDAS, batch_size=64,
                              progress=False)  # fmt: skip
    assert {p.name: p.stat().st_size for p in work.glob("cells*.jsonl")} == sizes
    assert sorted(cell_key(c) for c in cells) == all_cells(one_process)


_DISTRIBUTED = """
import sys, jax
pid, port, runs, work = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
from qvec_jax import grid, report
cells = grid.run_grid(sys.argv[5].split(","), runs, work, bits=2,
                          lambdas=[float(x) for x in sys.argv[6].split(",")], batch_size=64,
                          progress=False)
if pid == 0:
    report.write_report(work, cells=cells)
print("cells", pid, len(cells), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_distributed_processes_split_the_cells_and_merge(runs, one_process, tmp_path):
    """A 2-process jax.distributed run on loopback: each process its own cells and file."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "grid2.py"
    script.write_text(_DISTRIBUTED)
    work = tmp_path / "dist"
    args = [port, str(runs), str(work), ",".join(TASKS), ",".join(map(str, LAMBDAS))]
    procs = [subprocess.Popen([sys.executable, str(script), str(i), *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]  # fmt: skip
    outs = finish(procs)
    n = len(all_cells(one_process))
    assert [f"cells {i} {n}" in o for i, o in enumerate(outs)] == [True, True]
    per_file = {p.name: len(p.read_text().splitlines()) for p in work.glob("cells*.jsonl")}
    assert set(per_file) == {"cells.shard-0-of-2.jsonl", "cells.shard-1-of-2.jsonl"}
    assert sum(per_file.values()) == n and min(per_file.values()) > 0
    assert (work / "grid.csv").read_bytes() == (one_process / "grid.csv").read_bytes()


def test_a_current_record_beats_a_stale_one_in_any_file(tmp_path):
    store = GridStore(tmp_path)
    cell = {"kind": "fp", "receiver": "r", "donor": None, "lam": None}
    new = {**cell, "acc": {"val": 0.9}, "sources": {"fp_R": "new"}}
    old = {**cell, "acc": {"val": 0.1}, "sources": {"fp_R": "old"}}
    with store.writer() as w:  # cells.jsonl: the current record
        w.append(new)
    with store.writer((1, 2)) as w:  # a later file: a stale one
        w.append(old)
    store.write_meta({"checkpoints": {"r/fp": {"path": "x", "fingerprint": "new"}}})
    assert store.cells() == [new]
    assert store.cells({"old"}) == [old]
    assert store.cells(set()) == [old]  # neither current: the later record


def test_a_shard_is_held_once_and_excludes_the_whole_grid(runs, tmp_path):
    store = GridStore(tmp_path)
    with store.lock((0, 2), command="test"):
        with pytest.raises(WorkdirLocked):
            grid.run_grid(list(TASKS[:1]), runs, tmp_path, bits=2, lambdas=LAMBDAS,
                              shard=(0, 2), progress=False)  # fmt: skip
        with pytest.raises(WorkdirLocked):
            grid.run_grid(list(TASKS[:1]), runs, tmp_path, bits=2, lambdas=LAMBDAS,
                              progress=False)  # fmt: skip


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_bad_shard_is_a_one_line_error(bad, capsys, tmp_path):
    from qvec_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["grid", "--tasks", "digits", "--bits", "2", "--workdir", str(tmp_path),
              f"--shard={bad}"])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--shard" in err and repr(bad) in err and "I/N" in err


def _files(workdir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(workdir).iterdir())}


def test_a_shard_with_another_request_is_refused_and_leaves_grid_json(runs, tmp_path, capsys):
    """A shard must not rewrite the grid.json the other shards share: one with other
    lambdas or tasks is refused, one line naming what differs; the same request is taken
    in any order, and a new one once the grid in grid.json is complete."""
    from qvec_jax.cli import main

    two, kw = list(TASKS[:2]), {"bits": 2, "batch_size": 64, "progress": False}
    work = tmp_path / "w"
    grid.run_grid(two, runs, work, lambdas=LAMBDAS, shard=(1, 2), **kw)
    before = _files(work)
    refusal = (r"shard 0/2 .*grid\.json.* not complete \(lambdas \[0\.5, 1\.0\] there, "
               r"\[0\.25, 1\.0\] here\); run every shard")  # fmt: skip
    with pytest.raises(grid.GridError, match=refusal):
        grid.run_grid(two, runs, work, lambdas=(0.25, 1.0), shard=(0, 2), **kw)
    assert _files(work) == before
    other = re.escape(f"(tasks {two} there, ['digits', 'digits_a'] here)")
    with pytest.raises(grid.GridError, match=other):
        grid.run_grid(["digits", "digits_a"], runs, work, lambdas=LAMBDAS, shard=(0, 2), **kw)
    assert _files(work) == before
    assert main(["grid", "--tasks", ",".join(two), "--bits", "2", "--lambdas", "0.25,1",
                 "--runs", str(runs), "--workdir", str(work), "--shard", "0/2"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard 0/2" in err and "lambdas" in err
    assert _files(work) == before

    grid.run_grid(two, runs, work, lambdas=LAMBDAS, shard=(0, 2), **kw)  # the same request
    assert GridStore(work).meta()["lambdas"] == [0.5, 1.0]
    # the grid in grid.json is complete: a new request may start, and is then the shared one
    grid.run_grid(two, runs, work, lambdas=(0.25, 1.0), shard=(0, 2), **kw)
    assert "replaces the complete grid's request" in capsys.readouterr().out
    assert GridStore(work).meta()["lambdas"] == [0.25, 1.0]
    before = _files(work)
    with pytest.raises(grid.GridError, match=r"\(lambdas \[0\.25, 1\.0\] there, \[0\.5, 1\.0\]"):
        grid.run_grid(two, runs, work, lambdas=LAMBDAS, shard=(1, 2), **kw)
    assert _files(work) == before
