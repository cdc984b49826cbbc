"""Atomic plain-file writes (qvec_jax.files): old content or new, never a mix, no debris."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvec_jax.files import atomic_path, atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def _debris(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_write_text_creates_and_replaces(tmp_path):
    p = tmp_path / "summary.md"
    assert atomic_write_text(p, "old\n") == p
    assert p.read_text() == "old\n"
    atomic_write_text(str(p), "new ü\n")
    assert p.read_text(encoding="utf-8") == "new ü\n"
    assert _debris(tmp_path) == []


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=4096))
def test_write_bytes_roundtrips_any_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("b") / "blob.bin"
    atomic_write_bytes(p, data)
    assert p.read_bytes() == data
    assert _debris(p.parent) == []


def test_new_file_gets_umask_mode_and_existing_keeps_its_mode(tmp_path):
    old = os.umask(0o027)
    try:
        p = tmp_path / "a.json"
        atomic_write_text(p, "{}")
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
        os.chmod(p, 0o604)
        atomic_write_text(p, "[]")
        assert stat.S_IMODE(p.stat().st_mode) == 0o604
    finally:
        os.umask(old)


def test_error_in_body_keeps_old_content_and_removes_tmp(tmp_path):
    p = tmp_path / "grid.json"
    atomic_write_text(p, json.dumps({"v": 1}))
    with pytest.raises(RuntimeError, match="boom"), atomic_path(p) as tmp:
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("boom")
    assert json.loads(p.read_text()) == {"v": 1}
    assert _debris(tmp_path) == []


def test_atomic_path_keeps_suffix_for_format_sniffing_writers(tmp_path):
    p = tmp_path / "arr.npy"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npy" and tmp != p
        np.save(tmp, np.arange(5))  # np.save appends ".npy" unless the name already ends with it
    np.testing.assert_array_equal(np.load(p), np.arange(5))
    assert _debris(tmp_path) == []


def test_atomic_path_body_that_removes_the_file_is_an_error(tmp_path):
    p = tmp_path / "fig.png"
    with pytest.raises(FileNotFoundError, match="left no file"), atomic_path(p) as tmp:
        os.unlink(tmp)
    assert not p.exists() and _debris(tmp_path) == []


def test_missing_directory_is_a_one_line_error_naming_it(tmp_path):
    p = tmp_path / "nope" / "x.txt"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist; create it first"):
        atomic_write_text(p, "x")


# ------------------------------------------------------------------ lock holder records

LOCKER = """
import json, sys
from qvec_jax.files import WorkdirLocked, workdir_locks
work, hold, locks = sys.argv[1], sys.argv[2] == "hold", json.loads(sys.argv[3])
try:
    with workdir_locks(work, [tuple(x) for x in locks], command=sys.argv[4]):
        print("locked", flush=True)
        if hold:
            sys.stdin.readline()
except WorkdirLocked as e:
    print(e, flush=True)
    sys.exit(3)
"""


def locker(work, hold: bool, locks, command: str) -> subprocess.Popen:
    """A real process taking ``locks`` of ``work``; it holds them until told to exit
    (``hold``) or leaves at once."""
    args = [str(work), "hold" if hold else "try", json.dumps(locks), command]
    return subprocess.Popen(
        [sys.executable, "-c", LOCKER, *args], cwd=ROOT, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


class Held:
    """A holder process, killed on exit from the ``with``."""

    def __init__(self, work, locks, command):
        self.p = locker(work, True, locks, command)
        assert self.p.stdout.readline().strip() == "locked", self.p.stderr.read()

    def __enter__(self):
        return self.p

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def refused(work, locks, command="rival") -> tuple[int, str]:
    """Run a rival that is refused; its pid (dead by now) and its one-line message."""
    p = locker(work, False, locks, command)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, (out, err)
    assert len(out.strip().splitlines()) == 1
    return p.pid, out.strip()


def _locks(work) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(work).glob("*.lock"))}


SHARD0 = [("grid", True), ("grid.shard-0-of-2", False)]


def test_a_refused_run_leaves_the_holder_record_and_the_next_one_names_the_holder(tmp_path):
    with Held(tmp_path, [("grid", False)], "the holder") as h:
        before = _locks(tmp_path)
        for _ in range(2):
            pid, msg = refused(tmp_path, [("grid", False)])
            assert f"grid.lock is held by pid {h.pid} " in msg and "(the holder)" in msg
            assert f"pid {pid} " not in msg
            assert _locks(tmp_path) == before  # the refused run wrote nothing
    assert os.listdir(tmp_path) == ["grid.lock"]


def test_a_shard_refused_on_its_own_lock_leaves_the_shared_record(tmp_path):
    """The bug: a second copy of a shard took grid.lock (shared), wrote its name there,
    was refused on its shard lock and exited; the next refused run named its dead pid."""
    with Held(tmp_path, SHARD0, "shard 0") as h:
        before = _locks(tmp_path)
        pid, msg = refused(tmp_path, SHARD0, "shard 0 again")
        assert f"grid.shard-0-of-2.lock is held by pid {h.pid} " in msg
        assert _locks(tmp_path) == before
        pid2, msg = refused(tmp_path, [("grid", False)], "whole grid")
        assert f"grid.lock is held by shared runs, among them pid {h.pid} " in msg
        assert f"pid {pid} " not in msg and f"pid {pid2} " not in msg
        assert _locks(tmp_path) == before


def test_a_shared_holder_that_left_is_not_named(tmp_path):
    """Two shards share grid.lock; once one has finished, only the other is named."""
    with Held(tmp_path, SHARD0, "shard 0") as h:
        done = locker(tmp_path, False, [("grid", True), ("grid.shard-1-of-2", False)], "s1")
        assert done.communicate(timeout=60)[0].strip() == "locked" and done.returncode == 0
        assert f'"pid": {done.pid},' in (tmp_path / "grid.lock").read_text()  # it wrote its name
        before = _locks(tmp_path)
        _, msg = refused(tmp_path, [("grid", False)], "whole grid")
        assert f"pid {h.pid} " in msg and "(shard 0)" in msg
        assert f"pid {done.pid} " not in msg and "(s1)" not in msg
        assert _locks(tmp_path) == before
