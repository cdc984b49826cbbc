"""The training loop's ``metrics.jsonl`` records (``train.loop``): per-step metrics come
back from the device stacked by chunk; a record holds a window of them (mean loss, the
last step's learning rate and gradient norm, throughput, the data fingerprint), and its
NaN/Inf check stops the run."""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from qvec_jax.train.step import check_metrics

__all__ = ["Records", "per_step", "record"]


class Records:
    """The loop's ``metrics.jsonl``: chunk metrics gathered into a window per record; a
    closed window is written by :meth:`write_pending`, when the loop has dispatched the
    next chunk (or must check the steps before a checkpoint)."""

    def __init__(self, run, mfile, bar, ends):
        self.run, self.mfile, self.bar = run, mfile, bar
        # the learning rate of each record's last step, computed before the loop starts:
        # an eager call of the schedule during the loop would queue on the device behind
        # the chunk in flight and hold the host (and the next chunk's input) until it ends
        self.lrs = {done: float(run.schedule(done - 1)) for done in ends}
        self.window, self.t, self.n = [], time.perf_counter(), 0
        self.pending = None  # (done, window, steps timed, start time, crc) to write

    def add(self, m, steps: int, first: bool) -> None:
        if first:  # keep compilation out of the throughput numbers
            jax.block_until_ready(m)
            self.t = time.perf_counter()
        else:
            self.n += steps
        self.window.append(m)

    def close(self, done: int, crc: int) -> None:
        self.pending = (done, self.window, self.n, self.t, crc)
        self.window, self.n = [], 0

    def write_pending(self) -> None:
        if self.pending is None:
            return
        rec = record(self.run, *self.pending, lr=self.lrs[self.pending[0]])
        self.pending, self.t = None, time.perf_counter()
        if self.mfile is not None:
            self.mfile.write(json.dumps(rec) + "\n")
            self.mfile.flush()
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")


def per_step(window: list) -> list[dict]:
    """Host metrics, one dict a step, of the chunks in ``window`` (each ``[k]`` arrays)."""
    out = []
    for m in jax.device_get(window):
        out += [{key: v[j] for key, v in m.items()} for j in range(len(m["loss"]))]
    return out


def record(run, done: int, window: list, n_log: int, t_log: float, crc: int, *, lr: float) -> dict:
    """One metrics.jsonl record for the steps in ``window`` (the last one is ``done``);
    a NaN/Inf loss or gradient norm among them stops the run."""
    ms = per_step(window)  # waits for the steps, so the time below includes them
    dt = max(time.perf_counter() - t_log, 1e-9)
    check_metrics(ms, done - len(ms) + 1, run.cfg.optim.lr, run.workdir,
                  run.mngr.latest_step())  # fmt: skip
    return {
        "step": done,
        "loss": float(np.mean([w["loss"] for w in ms])),
        "lr": lr,
        "grad_norm": float(ms[-1]["grad_norm"]),
        "steps_per_s": n_log / dt if n_log else None,  # None: compile only
        "examples_per_s": n_log * run.cfg.batch_size / dt if n_log else None,
        "data_crc": crc,
    }
