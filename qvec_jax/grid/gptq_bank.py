"""GPTQ on the bank-patched receiver (issue 23): the candidates of ``qvec quantize`` that
no other stage measures.

A *bank* is the merge of every donor QV of one backbone (``qvec qv-bank build``). In a
grid, receiver R's bank is the leave-one-out merge of the other tasks' QVs: what a user
of R would hold, never R's own QAT. With a :class:`BankCells` among ``run_grid``'s
``extras``, for every receiver R, merge method m and calibration source s:

- ``gptq+bank:<s>`` (donor ``"loo:<m>"``, each lam of ``BankCells.lams``; 1: zero-shot):
  ``acc(GPTQ(FP_R + lam * merge_m(QV_D for D != R)))``, calibrated on ``calib_size``
  images of ``s``: ``noise`` (no data) or ``pretext`` (the backbone's pretext task).
  GPTQ already corrects much of what the QV corrects for RTN, so the best lam under GPTQ
  need not be RTN's: a study screens a few (chosen on its dev half).

The other candidates are cells of other stages: RTN(FP_R) is ``ptq_fp``, RTN of the same
patched model the extras' ``merge`` cell at the same lam, GPTQ(FP_R) the ``gptq:<s>``
cells. Calibration sets are :func:`qvec_jax.grid.gptq.calib_spec`'s (the same images as
the ``gptq:<s>`` cell of R, so a difference between the two is the bank's alone), and a
record counts the receiver images they hold, as a GPTQ cell does.

A record keeps ``sources`` (the fingerprints of FP_R and of every merged donor's FP and
QAT), ``setup`` (the merge recipe and its donors) and ``calib``; a rerun computes only
the cells that are missing or whose inputs changed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from qvec_jax import checkpoints, gptq, merge, trees
from qvec_jax.grid.cells import GridRun
from qvec_jax.grid.extras import MIN_MERGE_DONORS, loo_donor, merge_sources
from qvec_jax.grid.gptq import calib_accounting, calib_images, calib_spec
from qvec_jax.grid.inputs import GridError
from qvec_jax.grid.run import shard_of
from qvec_jax.grid.store import GridStore, cell_key
from qvec_jax.sharding import put

__all__ = ["KIND", "SOURCES", "BankCells", "is_bank_cell", "plan_bank_cells"]

KIND = "gptq+bank"
#: The data-free calibration sources of ``qvec quantize`` (receiver images never).
SOURCES = ("noise", "pretext")


def is_bank_cell(cell: dict) -> bool:
    """Whether a stored cell is one of this module's (``gptq+bank:*``)."""
    return str(cell.get("kind", "")).split(":", 1)[0] == KIND


@dataclasses.dataclass(frozen=True)
class BankCells:
    """Which ``gptq+bank`` cells a grid adds (module docstring). ``methods``: the merge
    methods of the leave-one-out banks; ``sources``: calibration sources (``pretext``
    cells only when ``pretext`` names the task); ``lams``: the bank's lambdas;
    ``calib_size``/``seed``/``batch_size``: as :class:`qvec_jax.grid.gptq.GptqCells`."""

    methods: tuple[str, ...] = ("mean", "ties")
    sources: tuple[str, ...] = SOURCES
    lams: tuple[float, ...] = (1.0,)
    calib_size: int = 128
    pretext: str | None = None
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "sources", tuple(self.sources))
        bad = [m for m in self.methods if m not in merge.METHODS]
        if bad or not self.methods:
            raise GridError(f"bank methods {bad or '()'}: use some of {merge.METHODS}")
        bad = [s for s in self.sources if s not in SOURCES]
        if bad or not self.sources:
            raise GridError(f"bank sources {bad or '()'}: use some of {SOURCES} (no receiver data)")
        n = self.calib_size
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise GridError(f"bank calib_size must be a whole number >= 1, got {n!r}")
        lams = tuple(float(trees.check_lam(x)) for x in self.lams)
        if not lams or len(set(lams)) != len(lams):
            raise GridError(f"bank lams {list(self.lams)}: give distinct lambdas, e.g. (0.5, 1.0)")
        object.__setattr__(self, "lams", lams)

    def run(self, tasks, ckpts, store: GridStore, spec, lambdas, **kw) -> int:
        """Compute the missing cells (after the grid's other stages, under its lock);
        ``kw`` as :meth:`qvec_jax.grid.gptq.GptqCells.run`. Returns how many were computed."""
        done = {cell_key(c): c for c in store.cells() if is_bank_cell(c)}
        todo = [c for c in plan_bank_cells(tasks, ckpts, self) if not _same(done, c)]
        shard = kw.get("shard")
        if shard is not None:
            todo = [c for c in todo if shard_of(c, tasks, shard[1]) == shard[0]]
        if todo:
            store.repair_tail(shard)
            run = GridRun(
                ckpts, spec, data_dir=kw.get("data_dir"), eval_n=kw.get("eval_n"),
                compute_dtype=kw.get("compute_dtype", "float32"),
            )  # fmt: skip
            _compute(self, run, todo, store, kw)
        return len(todo)


def _same(done: dict, cell: dict) -> bool:
    old = done.get(cell_key(cell))
    return old is not None and all(old.get(k) == cell[k] for k in ("sources", "setup", "calib"))


def plan_bank_cells(tasks, ckpts: dict, opts: BankCells) -> list[dict]:
    """Every ``gptq+bank`` cell the available checkpoints allow (a bank needs at least
    ``MIN_MERGE_DONORS`` donors besides the receiver)."""
    donors = [t for t in tasks if (t, "fp") in ckpts and (t, "qat") in ckpts]
    out = []
    for r in (t for t in tasks if (t, "fp") in ckpts):
        loo = [d for d in donors if d != r]
        if len(loo) < MIN_MERGE_DONORS:
            continue
        src = merge_sources(ckpts, r, loo)
        for m in opts.methods:
            setup = json.loads(json.dumps({"merge": merge.MergeSpec(m).to_dict(), "donors": loo}))
            for s in opts.sources:
                calib = calib_spec(
                    s, r, tasks, pretext=opts.pretext, n=opts.calib_size, seed=opts.seed
                )
                out += [{"kind": f"{KIND}:{s}", "receiver": r, "donor": loo_donor(m),
                         "lam": lam, "sources": src, "setup": setup, "calib": calib}
                        for lam in (opts.lams if calib is not None else ())]  # fmt: skip
    return out


def _compute(opts: BankCells, run: GridRun, todo: list[dict], store: GridStore, kw) -> None:
    """Receiver by receiver: each bank merged once, each calibration set read once."""
    bar = tqdm(
        total=len(todo), mininterval=0.5 if sys.stderr.isatty() else 30.0, unit="cell",
        desc="grid gptq+bank", disable=not kw.get("progress", True), dynamic_ncols=True,
    )  # fmt: skip
    images: dict = {}
    seen: dict = {}  # calibration accounting per (receiver, set): the same for every lam
    with store.writer(kw.get("shard")) as out:
        for r in dict.fromkeys(c["receiver"] for c in todo):
            cache = kw.get("device_cache_bytes", 1 << 30)
            evals = run.eval_sets(r, kw.get("batch_size", 256), cache)
            fp, meta = run.fp_params(r), run.ckpts[(r, "fp")].meta
            model, eval_model = checkpoints.model_from_meta(meta), run.model(r)
            size = int(meta["image_size"])
            mine = [c for c in todo if c["receiver"] == r]
            for d in dict.fromkeys(c["donor"] for c in mine):
                cells = [c for c in mine if c["donor"] == d]
                setup = cells[0]["setup"]
                qv = merge.merge_qvs([run.qv_of(x) for x in setup["donors"]],
                                     merge.MergeSpec.from_dict(setup["merge"]))  # fmt: skip
                for cell in cells:
                    bar.set_postfix_str(f"R={r} {cell['kind']} {d}")
                    t0, calib = time.perf_counter(), cell["calib"]
                    key = (calib["task"], calib["n"], calib["seed"], size)
                    if key not in images:
                        images[key] = calib_images(calib, size, data_dir=run.data_dir)
                    timings: dict = {}
                    patched = trees.patch(fp, qv, cell["lam"])
                    q = gptq.gptq(patched, model, images[key], run.spec,
                                  batch_size=opts.batch_size, timings=timings)  # fmt: skip
                    q = put(q, run.replicated)
                    rec = dict(cell, acc={s: e.accuracy(eval_model, q) for s, e in evals.items()})
                    out.append(_finish(rec, run, evals, len(images[key]), timings, t0, seen))
                    bar.update(1)
                del qv
            del evals, fp
    bar.close()


def _finish(
    rec: dict, run: GridRun, evals: dict, n: int, timings: dict, t0: float, seen: dict
) -> dict:
    """The record's evaluation sizes, calibration accounting (counted once per receiver and
    calibration set: ``seen``) and timings."""
    calib, r = rec["calib"], rec["receiver"]
    key = (r, calib["task"], calib["n"], calib["seed"], n)
    if key not in seen:
        seen[key] = calib_accounting(calib, r, n, data_dir=run.data_dir)
    rec["n"] = {s: e.n for s, e in evals.items()}
    rec |= seen[key]
    rec["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    rec["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return rec | {"bits": run.spec.bits, "granularity": run.spec.granularity}
