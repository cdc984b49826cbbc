"""Atomic writes of plain files: the one place the project writes a file a reader may see.

A crash, a full disk or an exception mid-write must never leave a half-written
``summary.md``, ``config.json`` or plot behind: readers either see the old file or the
complete new one. Every writer therefore writes a temporary file in the *same
directory* (so the final ``os.replace`` is a rename on one filesystem, atomic on POSIX),
fsyncs it, renames it onto the target and fsyncs the directory so the rename itself is
durable. On any error the temporary file is removed and the target is left untouched.

Orbax checkpoints are not plain files; orbax renames its own directories atomically.

:func:`workdir_lock` keeps two runs out of one workdir: an OS file lock (``flock``) on a
lock file inside it, released by the kernel when the holder exits or dies
(:func:`workdir_locks` takes several at once). :func:`directory_lock` is a short mutex
on a directory, for a read-check-replace of a file that several lock holders share.
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
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "WorkdirLocked",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "directory_lock",
    "workdir_lock",
    "workdir_locks",
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


#: How much of a lock file is read for its holder records.
_RECORDS_MAX = 1 << 20


def _gone(info: dict) -> bool:
    """Whether the process a holder record names has exited (only known on this host)."""
    if info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError, OverflowError):
        return False  # alive but not ours (EPERM), or a pid we cannot check
    return False


def _records(fd: int) -> list[dict]:
    """The holder records of a lock file (one JSON object a line), those of exited
    processes dropped: a shared lock's file keeps the records of holders that left."""
    try:
        text = os.pread(fd, _RECORDS_MAX, 0).decode(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            info = json.loads(line)
        except ValueError:
            continue  # a record still being written
        if isinstance(info, dict) and info.get("pid") and not _gone(info):
            out.append(info)
    return out


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holders wrote into the lock file."""
    infos = _records(fd)
    if not infos:
        return "another process (it has not written its name yet)"
    who = [
        f"pid {i['pid']} on host {i.get('host', '?')} since {i.get('started', '?')} "
        f"({i.get('command', '?')})"
        for i in infos[-3:]
    ]
    if not any(i.get("shared") for i in infos):
        return who[-1]
    more = f" and {len(infos) - 3} more" if len(infos) > 3 else ""
    return "shared runs, among them " + "; ".join(who) + more


class _Flock:
    """One ``flock`` on ``<workdir>/<name>.lock``: taken (or refused) first, its holder
    record written later (:meth:`record`), so a process refused on a later lock of the
    same call leaves no record behind."""

    def __init__(self, workdir: Path, name: str, shared: bool):
        self.workdir, self.path, self.shared = workdir, workdir / f"{name}.lock", shared
        self.fd, self.recorded = -1, False

    def __enter__(self) -> _Flock:
        # O_APPEND: shared holders add their records side by side, never over each other
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(self.fd)
            os.close(self.fd)
            raise WorkdirLocked(
                f"{self.workdir} is in use: {self.path.name} is held by {who}; wait for that "
                "run to finish (or stop it), or use another workdir"
            ) from None
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def record(self, info: dict) -> None:
        """Write this holder's record: the only one of an exclusive lock, one more line of
        a shared one (whose exited holders' lines readers skip)."""
        if not self.shared:
            os.ftruncate(self.fd, 0)
        os.write(self.fd, (json.dumps({**info, "shared": self.shared}) + "\n").encode())
        self.recorded = True

    def __exit__(self, *exc) -> None:
        try:
            if self.recorded and not self.shared:  # no stale name for the next holder's rivals
                os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def workdir_locks(
    workdir: str | os.PathLike, locks: Sequence[tuple[str, bool]], *, command: str | None = None
) -> Iterator[list[Path]]:
    """Hold every lock ``(name, shared)`` of ``locks`` (see :func:`workdir_lock`), taken in
    order, for the body; refuse at once if another process holds one.

    The holder records are written only once every lock is held: a process refused on
    any of them has changed none of the lock files, so the next refused process still
    names the live holder. Yields the lock files' paths.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or " ".join(sys.argv),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(_Flock(workdir, name, shared)) for name, shared in locks]
        for lock in held:
            lock.record(info)
        yield [lock.path for lock in held]


@contextlib.contextmanager
def workdir_lock(
    workdir: str | os.PathLike, name: str, *, command: str | None = None, shared: bool = False
) -> Iterator[Path]:
    """Hold ``<workdir>/<name>.lock`` for the body; refuse at once if another process does.

    The lock is ``flock`` on that file: the kernel drops it when the holder exits, is
    killed or crashes, so a stale lock never blocks a rerun. The holder writes its pid,
    host, command and start time into the file, and :class:`WorkdirLocked` quotes
    them. ``shared=True`` takes a shared lock: any number of shared holders
    coexist (e.g. the shards of one grid), each adding its record, while an exclusive
    holder excludes them all. A refused process writes nothing into the file, and the
    records of holders that have exited are not quoted. The lock file is left in place
    (unlinking it would race with the next locker). The workdir is created if needed.
    """
    with workdir_locks(workdir, [(name, shared)], command=command) as (path,):
        yield path


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` itself for the body, waiting for the
    current holder: a mutex for a short read-check-replace of a file in it among
    processes that share the directory (the shards of a grid and ``grid.json``). Nothing
    is created. Where directories cannot be locked (some network file systems) the body
    runs unlocked."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock
