"""What every ``qvec`` subcommand shares: the user-facing error, option types, output checks
and checkpoint I/O.

Inputs and outputs of the checkpoint commands are directories written by
``checkpoints.save_params`` (params + meta). Every command that writes checks its
outputs before it reads or computes anything: an output that equals, contains or lies
inside an input is refused (:func:`check_output`, :func:`check_folder`), and so is one
that cannot be written (:func:`check_writable`: under a regular file, read-only, no
permission), so an input is never harmed and a refused command leaves nothing behind.
A command holds its output (:func:`claim`, an OS lock) from those checks to its write, so
a second ``qvec`` writing the same output at the same time stops at once, in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import numpy as np

import qvec_jax as q
from qvec_jax import checkpoints, data

_FMT = argparse.RawDescriptionHelpFormatter


class QvecError(Exception):
    """An error whose message tells the user what to do next (printed without a traceback)."""


def add_parser(sub, name: str, help: str, example: str, description: str = ""):
    """A subcommand parser whose help ends with a runnable example."""
    return sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog="example:\n  " + example,
        formatter_class=_FMT,
    )


# ----------------------------------------------------------------------------- option types
# argparse reports a bad value as "qvec CMD: error: argument --opt: <message>" (exit 2).


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, steps, counts)."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a class count where 0 means none)."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {n}")
    return n


def bit_width(text: str) -> int:
    """A bit width in 2..8 (what the quantizer supports)."""
    n = _int(text)
    if not 2 <= n <= 8:
        raise argparse.ArgumentTypeError(f"bit width must be in 2..8, got {n}")
    return n


def finite_float(text: str) -> float:
    """A finite number (a NaN or infinite scale would write a NaN model)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return x


def finite_floats(text: str) -> list[float]:
    """A non-empty comma-separated list of finite numbers, e.g. ``0.5,1,1.5``."""
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError("give at least one number, e.g. 0.5,1,1.5")
    out = []
    for t in items:
        try:
            out.append(finite_float(t))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"in {text!r}: {e}") from None
    return out


# ----------------------------------------------------------------------------- output checks


def check_output(out: str, inputs: Iterable[str], overwrite: bool, what: str = "output") -> Path:
    """Refuse an OUT that equals/contains/lies inside an input, exists (unless overwrite),
    or cannot be written. For outputs that replace a whole directory (checkpoints) or file."""
    o = Path(out).resolve()
    for i in inputs:
        p = Path(i).resolve()
        if o == p or p in o.parents or o in p.parents:
            raise QvecError(
                f"{what} {out} would overwrite input {i} (equal, inside it, or containing it); "
                f"choose another {what} path"
            )
    if o.exists() and not overwrite:
        raise QvecError(f"{what} {out} already exists; choose another path or pass --overwrite")
    _CHECKED[o] = o.exists()  # for claim: an OUT that appears later was another's write
    check_writable(o, what, into=False)
    return o


def check_folder(out: str, inputs: Iterable[str], what: str, writes: Iterable[str] = ()) -> Path:
    """Refuse a folder OUT that a command writes files into when it equals or lies inside an
    input, or when one of the names it ``writes`` (or removes) there is an input or holds one.
    Unlike :func:`check_output`, OUT may contain inputs elsewhere (a grid workdir holds the
    fine-tunes it reads). Also refuses an OUT that cannot be written."""
    o = Path(out).resolve()
    for i in inputs:
        p = Path(i).resolve()
        if o == p or p in o.parents:
            raise QvecError(f"{what} {out} is inside input {i}; choose a {what} outside it")
        hit = [n for n in writes if o / n == p or o / n in p.parents]
        if hit:
            raise QvecError(
                f"{what} {out} would overwrite input {i} (the command writes {o / hit[0]}); "
                f"choose another {what}"
            )
    check_writable(o, what, into=True)
    return o


def check_writable(path: str | os.PathLike, what: str, *, into: bool) -> None:
    """Refuse an output that cannot be written: one under a regular file, or in a directory
    this process cannot create files in. ``into``: files are written into ``path`` (a
    workdir), else ``path`` itself is created or replaced in its parent (a file, a checkpoint).

    The test is a real one (a temporary file created and removed in the nearest existing
    directory), so read-only mounts, missing permissions and root's rights all count."""
    path = Path(path).resolve()
    near = path if into else path.parent
    while not near.exists():
        near = near.parent
    if not near.is_dir():
        raise QvecError(f"{what} {path}: {near} is a file, not a directory; choose another {what}")
    try:
        fd, tmp = tempfile.mkstemp(dir=near, prefix=".qvec-write-test-")
    except OSError as e:
        raise QvecError(
            f"cannot write {path}: {e.strerror or e}; choose a writable {what}"
        ) from None
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def writing(out: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn an OSError writing a file under ``out`` (a full disk, a permission lost mid-run)
    into a QvecError naming the file and ``what`` to change; other errors pass through (a
    missing file is no write error)."""
    root = Path(out).resolve()
    try:
        yield
    except OSError as e:
        f = Path(e.filename).resolve() if isinstance(e.filename, (str, os.PathLike)) else None
        if isinstance(e, FileNotFoundError) or f is None or not (f == root or root in f.parents):
            raise
        raise QvecError(f"cannot write {f}: {e.strerror or e}; choose a writable {what}") from e


@contextlib.contextmanager
def claim(
    out: str | os.PathLike, overwrite: bool | None = None, what: str = "output"
) -> Iterator[None]:
    """Hold OUT for this process while the body writes it: an exclusive ``flock`` on the
    lock file ``.<name>.qvec-lock`` next to it (the kernel drops it if the process dies).
    Another process holding it is refused at once, naming OUT and its pid. Under the lock
    an OUT that exists is refused if ``overwrite`` is False, or (None) if it did not exist
    when :func:`check_output` looked: another command wrote it meanwhile. The
    lock file is removed on exit, and so are parent folders made for it that the body left
    empty. Re-entrant within a process (``save`` claims what its command already holds)."""
    out = Path(out).resolve()
    if out in _HELD:
        yield
        return
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.qvec-lock"
    try:
        fd = _lock(lock, out, what)
    except BaseException:
        _rmdirs(made)
        raise
    _HELD.add(out)
    try:
        if overwrite is None:
            overwrite = _CHECKED.get(out, True)
        if out.exists() and not overwrite:
            raise QvecError(f"{what} {out} was written by another command while this one ran; "
                            "choose another path or pass --overwrite")  # fmt: skip
        yield
    finally:
        _HELD.discard(out)
        lock.unlink(missing_ok=True)  # before the descriptor is closed: still ours
        os.close(fd)
        _rmdirs(made)


_HELD: set[Path] = set()
_CHECKED: dict[Path, bool] = {}  # {output: whether it existed when check_output looked}


def _lock(lock: Path, out: Path, what: str) -> int:
    """An open descriptor of ``lock`` holding its exclusive flock, its pid written in it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise QvecError(
                f"{what} {out} is being written by another qvec process (pid {pid}); wait for "
                f"it to finish or choose another {what}"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # its last holder removed it after we opened it
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _rmdirs(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


# ----------------------------------------------------------------------------- checkpoints


def restore(path: str):
    """``(params, meta)`` of the checkpoint directory (or packed ``.safetensors`` export)
    ``path``, or a QvecError saying why not."""
    if not Path(path).exists():
        raise QvecError(f"{path}: no such checkpoint directory or packed export file")
    try:
        return checkpoints.restore_params(path)
    except checkpoints.CheckpointError as e:
        raise QvecError(str(e)) from None


def restore_qv(path: str):
    """``(qv, meta)`` of a quantization vector checkpoint (``qvec extract`` / ``merge``),
    or a QvecError when ``path`` holds something else (a model)."""
    qv, meta = restore(path)
    if meta.get("kind") != "qv":
        raise QvecError(
            f"{path} is not a quantization vector (kind={meta.get('kind')!r}); make one with "
            "`qvec extract QAT FP OUT`"
        )
    return qv, meta


def restore_model(path: str):
    """``(params, meta)`` of a model checkpoint, or a QvecError when ``path`` holds a
    quantization vector (a difference of weights, not a model one can run or quantize)."""
    params, meta = restore(path)
    if meta.get("kind") == "qv":
        raise QvecError(
            f"{path} is a quantization vector, not a model; patch it into one first "
            "(`qvec patch FP QV OUT`)"
        )
    return params, meta


def refuse_quantized(path: str, meta: dict, command: str) -> None:
    """Refuse an input that is already quantized (a `qvec ptq` output, a packed export):
    quantizing it again re-rounds its values and loses its codes (GPTQ's above all)."""
    done = checkpoints.quantized(meta, path)
    if done:
        raise QvecError(
            f"{path} is {done}, already quantized; `qvec {command}` would quantize it again "
            f"and lose its codes: run it on the fp checkpoint that {path} was made from"
        )


def same_backbone(meta_a: dict, meta_b: dict, a: str, b: str) -> None:
    """Refuse to combine checkpoints fine-tuned from different pretrained backbones."""
    ia, ib = meta_a.get("backbone_id"), meta_b.get("backbone_id")
    if ia and ib and ia != ib:
        raise QvecError(
            f"{a} (backbone_id {ia}) and {b} (backbone_id {ib}) were fine-tuned from different "
            "pretrained backbones; a quantization vector only transfers within one backbone"
        )


def save(out: Path, params, meta: dict) -> None:
    """Write ``params`` (brought to the host) and ``meta`` to ``out`` and say so, holding
    ``out`` (:func:`claim`) unless the command already does."""
    with claim(out), writing(out, "output"):
        checkpoints.save_params(out, jax.tree.map(np.asarray, params), meta)
    print(f"wrote {out}")


def say_packed(out, disk: int, params, spec) -> dict:
    """Print that the packed export ``out`` (``disk`` bytes) was written, against the fp32
    model and ``size_report``'s count; return the size report."""
    size = q.size_report(params, spec)
    fp32, total = size["fp32_bytes"], size["total_bytes"]
    print(f"wrote {out}")
    print(
        f"{out}: {disk:,} bytes on disk; fp32 {fp32:,} bytes ({fp32 / disk:.2f}x smaller); "
        f"size_report {total:,} bytes (the file is {100 * (disk / total - 1):+.2f}% over it)"
    )
    return size


def task_names(text: str, option: str, *, one: bool = False) -> list[str]:
    """The task names of ``option``, each checked against the registry (with did-you-mean)
    before anything looks for checkpoints or data."""
    names = data.split_task_names(text)
    if not names or (one and len(names) > 1):
        raise QvecError(
            f"{option} {text!r}: name {'one task' if one else 'tasks, comma-separated'}"
        )
    for name in names:
        try:
            data.get_task(name)
        except ValueError as e:
            raise QvecError(f"{option}: {e}") from None
    return names
