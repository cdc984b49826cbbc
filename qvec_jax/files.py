"""Atomic writes of plain files: the one place the project writes a file a reader may see.

A crash, a full disk or an exception mid-write must never leave a half-written
``summary.md``, ``config.json`` or plot behind: readers either see the old file or the
complete new one. Every writer therefore writes a temporary file in the *same
directory* (so the final ``os.replace`` is a rename on one filesystem, atomic on POSIX),
fsyncs it, renames it onto the target and fsyncs the directory so the rename itself is
durable. On any error the temporary file is removed and the target is left untouched.

Orbax checkpoints are not plain files; orbax renames its own directories atomically.

:func:`workdir_lock` keeps two runs out of one workdir: an OS file lock (``flock``) on a
lock file inside it, released by the kernel when the holder exits or dies.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "WorkdirLocked",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "workdir_lock",
]


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish(tmp: str, path: Path) -> None:
    """Give ``tmp`` the mode of ``path`` (or the umask default), fsync it, rename it there."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
    os.chmod(tmp, mode)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    For writers that want a file name rather than bytes (``fig.savefig(tmp)``,
    ``np.save(tmp, ...)``). The temporary name keeps ``path``'s suffix, so writers that
    infer the format from the extension (matplotlib) still do. If the body raises, or
    leaves no file at the temporary path, ``path`` is not touched and the temporary
    file is removed. The parent directory must exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist; "
            "create it first"
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if not os.path.isfile(tmp):
            raise FileNotFoundError(f"the writer of {str(path)!r} left no file at {tmp!r}")
        _finish(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (old content or new, never a mix); return the path."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (old content or new, never a mix); return the path."""
    return atomic_write_bytes(path, text.encode(encoding))


class WorkdirLocked(ValueError):
    """Another live process holds the workdir's lock; the message says which one."""


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process (it has not written its name yet)"
    who = (
        f"pid {info['pid']} on host {info.get('host', '?')} since {info.get('started', '?')} "
        f"({info.get('command', '?')})"
    )
    return f"shared runs, among them {who}" if info.get("shared") else who


@contextlib.contextmanager
def workdir_lock(
    workdir: str | os.PathLike, name: str, *, command: str | None = None, shared: bool = False
) -> Iterator[Path]:
    """Hold ``<workdir>/<name>.lock`` for the body; refuse at once if another process does.

    The lock is ``flock`` on that file: the kernel drops it when the holder exits, is
    killed or crashes, so a stale lock never blocks a rerun. The holder writes its pid,
    host, command and start time into the file, and :class:`WorkdirLocked` quotes
    them. ``shared=True`` takes a shared lock: any number of shared holders
    coexist (e.g. the shards of one grid), while an exclusive holder excludes them all.
    The lock file is left in place (unlinking it would race with the next locker). The
    workdir is created if needed.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLocked(
                f"{workdir} is in use: {path.name} is held by {_holder(fd)}; wait for that "
                "run to finish (or stop it), or use another workdir"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or " ".join(sys.argv),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "shared": shared,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield path
        if not shared:  # no stale name for the next holder's rivals to read
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock
