"""Atomic plain-file writes (qvec_jax.files): old content or new, never a mix, no debris."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvec_jax.files import atomic_path, atomic_write_bytes, atomic_write_text


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
