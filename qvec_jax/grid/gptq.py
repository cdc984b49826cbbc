"""GPTQ rows of the transfer grid (issue 15): where the zero-shot QV stands against the
quantizer that a user with a few unlabelled images would deploy.

:func:`qvec_jax.grid.run.run_grid` with a :class:`GptqCells` among its ``extras`` adds,
for every receiver R, after its RTN cells and in the same record files:

- ``gptq:<source>``: acc(GPTQ(FP_R)), calibrated on ``calib_size`` images of a source:

  - ``receiver``: R's own **train** split, unlabelled (uses receiver data);
  - ``donor``: another task's train images, by a fixed rule: the next task after R in the
    grid's task list (cyclically) whose images do not overlap R's (:func:`overlaps`);
  - ``pretext``: the train images of the pretext task (``GptqCells.pretext``, the task
    the backbone was trained on); no cell when none is given;
  - ``noise``: ``select.noise_images`` (no data).

- ``gptq+qv:<qv_source>``: acc(GPTQ(FP_R + QV_D)) at lam = 1, every cross-task donor D;
- ``gptq+qv:<qv_source>@<strategy>``: the same at the lam that the no-receiver-data
  lambda ``strategy`` picks for (D, R) under the grid's RTN quantizer; the record holds
  the strategy's ``choice``. ``qv_source`` is ``donor`` by default: the QV donor D's own
  train images (data the donor's owner has); ``pretext`` or ``noise`` may be chosen.

Images of task T *overlap* R's when they can be the same model inputs: one source, the
same rotation/flip/inversion, a class in common (``fashion_mnist`` overlaps ``fmnist_a``;
``digits_rot90`` does not overlap ``digits``): :mod:`qvec_jax.data.overlap`, the
package's one rule. A record counts the receiver's train, val and test images its
calibration set holds (``calib_overlap``; ``calib_used.receiver_images`` when any), and
the report says so, with the counts.

Each record keeps its checkpoints' fingerprints and its calibration spec (source, task,
n, seed); a rerun computes only the cells that are missing or whose inputs changed.
GPTQ gives the RTN grid's codes (:mod:`qvec_jax.gptq`); they are evaluated dequantized
on R's val and test splits with the grid's ``EvalSet``.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from qvec_jax import checkpoints, gptq, select, trees
from qvec_jax import data as qdata
from qvec_jax.data import overlap
from qvec_jax.grid.cells import GridRun
from qvec_jax.grid.extras import DEFAULT_STRATEGY, fixed_strategy
from qvec_jax.grid.inputs import GridError
from qvec_jax.grid.run import shard_of
from qvec_jax.grid.store import GridStore, cell_key
from qvec_jax.sharding import put

__all__ = [
    "DEFAULT_STRATEGY",
    "KIND",
    "QV_KIND",
    "QV_SOURCES",
    "SOURCES",
    "GptqCells",
    "calib_accounting",
    "calib_images",
    "calib_spec",
    "is_gptq_cell",
    "overlaps",
    "plan_cells",
    "stored_choices",
    "todo_cells",
]

KIND = "gptq"
QV_KIND = "gptq+qv"
SOURCES = ("receiver", "donor", "pretext", "noise")
QV_SOURCES = ("donor", "pretext", "noise")


def is_gptq_cell(cell: dict) -> bool:
    """Whether a stored cell is one of this module's (``gptq:*`` or ``gptq+qv:*``)."""
    return str(cell.get("kind", "")).split(":", 1)[0] in (KIND, QV_KIND)


@dataclasses.dataclass(frozen=True)
class GptqCells:
    """Which GPTQ cells a grid adds (module docstring), passed as (one of) ``run_grid``'s
    ``extras``. ``calib_size``: images per calibration set; ``strategy``: a
    no-receiver-data strategy name, tunable constants allowed (None: no strategy cells;
    "auto": ``grid.extras.default_strategy`` of ``pretext``), stored canonically;
    ``qv_at_one``: the lam = 1 GPTQ+QV cells (False halves their cost); ``pretext``: the
    pretext task (None: no ``pretext`` cells); ``seed``: which images are sampled, and
    the noise; ``batch_size``: images per calibration forward pass; ``qv_donors``: GPTQ+QV
    cells for only the ``qv_donors`` donors that follow each receiver in the task list
    (cyclically; None: every donor), a fixed subset of pairs where a GPTQ per pair costs
    too much (``qvec study``)."""

    calib_size: int = 128
    sources: tuple[str, ...] = SOURCES
    qv_source: str = "donor"
    strategy: str | None = "auto"
    qv_at_one: bool = True
    pretext: str | None = None
    seed: int = 0
    batch_size: int = 32
    qv_donors: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        n = self.calib_size
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise GridError(f"gptq calib_size must be a whole number >= 1, got {self.calib_size}")
        bad = [s for s in self.sources if s not in SOURCES]
        if bad or not self.sources:
            raise GridError(f"gptq sources {bad or '()'}: use some of {SOURCES}")
        if self.qv_source not in QV_SOURCES:
            raise GridError(
                f"gptq qv_source {self.qv_source!r}: use one of {QV_SOURCES} (GPTQ+QV is the "
                "zero-shot competitor: never receiver data)"
            )
        if self.pretext is not None:
            qdata.get_task(self.pretext)  # a typo fails here, with did-you-mean
        elif self.qv_source == "pretext":
            raise GridError("gptq qv_source 'pretext' needs the pretext task: pass pretext=")
        k = self.qv_donors
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise GridError(f"gptq qv_donors must be a whole number >= 1 or None, got {k!r}")
        if self.strategy is not None:  # one spelling per strategy: one cell kind
            s = fixed_strategy(self.strategy, self.pretext, "gptq", error=GridError)
            object.__setattr__(self, "strategy", s.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"sources": list(self.sources)}

    def run(self, tasks, ckpts, store: GridStore, spec, lambdas, **kw) -> int:
        """Compute the missing GPTQ cells of the grid over ``tasks`` (after its main cells,
        under its lock); ``kw``: ``batch_size, data_dir, progress, device_cache_bytes,
        shard``. A strategy picks lam among 0 and ``lambdas`` (so RTN+QV at that lam is a
        grid cell). Returns how many cells were computed."""
        stored, shard = store.cells(), kw.get("shard")
        choices = stored_choices(stored, self.strategy)
        todo = todo_cells(plan_cells(tasks, ckpts, self), stored, choices)
        if shard is not None:
            todo = [c for c in todo if shard_of(c, tasks, shard[1]) == shard[0]]
        if todo:
            store.repair_tail(shard)
            dtype = kw.get("compute_dtype", "float32")
            run = GridRun(
                ckpts, spec, data_dir=kw.get("data_dir"), compute_dtype=dtype,
                eval_n=kw.get("eval_n"),
            )  # fmt: skip
            cands = (0.0, *[float(x) for x in lambdas if float(x) != 0.0])
            _Job(self, run, stored, cands, kw).compute(todo, store, shard)
        return len(todo)


# ----------------------------------------------------------------------------- data


def overlaps(a: str | None, b: str | None) -> bool:
    """Whether tasks ``a`` and ``b`` can show the same model inputs: the package's one
    rule, :func:`qvec_jax.data.overlap.may_overlap` (module docstring)."""
    return overlap.may_overlap(a, b)


def calib_spec(
    source: str, receiver: str, tasks, *, donor=None, pretext=None, n, seed
) -> dict | None:
    """``{"source", "task", "n", "seed"}`` of one calibration set of ``receiver``, or None
    when the source has no task here (no pretext known; no non-overlapping other task).
    ``donor``: the QV's donor (the ``donor`` source of GPTQ+QV cells)."""
    if source == "receiver":
        task = receiver
    elif source == "pretext":
        task = pretext
    elif source == "donor" and donor is not None:
        task = donor
    elif source == "donor":
        k = list(tasks).index(receiver)
        others = [tasks[(k + i) % len(tasks)] for i in range(1, len(tasks))]
        task = next((t for t in others if not overlaps(t, receiver)), None)
    else:
        task = "noise"
    if task is None:
        return None
    return {
        "source": source,
        "task": None if source == "noise" else task,
        "n": int(n),
        "seed": seed,
    }


def calib_accounting(spec: dict, receiver: str, n: int, *, data_dir=None) -> dict:
    """``{"calib_used", "calib_overlap"}`` of a record calibrated on ``n`` images of
    ``spec``: how many of the receiver's train/val/test images they hold (none for noise),
    by the package's one overlap rule."""
    task = spec["task"]
    counts = (
        overlap.zero_counts()
        if task is None
        else select.images_overlap(task, spec["n"], receiver, seed=spec["seed"], data_dir=data_dir)
    )
    used = {"n": n, "split": None if task is None else "train",
            "receiver_images": overlap.has_overlap(counts)}  # fmt: skip
    return {"calib_used": used, "calib_overlap": counts}


def calib_images(spec: dict, image_size: int, *, data_dir=None) -> np.ndarray:
    """The images (NHWC model inputs) of a :func:`calib_spec`: ``select.train_images``
    (a seeded sample of the task's **train** split; labels never read) or, for noise,
    ``select.noise_images``."""
    n, seed = spec["n"], spec["seed"]
    if spec["task"] is None:
        return np.asarray(select.noise_images(n, image_size, seed=seed))
    return select.train_images(spec["task"], n, image_size=image_size, seed=seed, data_dir=data_dir)


# ----------------------------------------------------------------------------- plan


def _ident(cell: dict) -> tuple:
    """A cell's identity for resuming: its key, without lam for strategy cells (their lam
    is the strategy's pick, known once computed)."""
    key = cell_key(cell)
    return key[:3] if "@" in cell["kind"] else key


def plan_cells(tasks, ckpts: dict, opts: GptqCells) -> list[dict]:
    """Every GPTQ cell the available checkpoints allow (lam None: the strategy's, later)."""
    out = []
    donors = [t for t in tasks if (t, "fp") in ckpts and (t, "qat") in ckpts]
    kinds = [(f"{QV_KIND}:{opts.qv_source}", 1.0)] if opts.qv_at_one else []
    if opts.strategy is not None:
        kinds.append((f"{QV_KIND}:{opts.qv_source}@{opts.strategy}", None))
    common = {"n": opts.calib_size, "seed": opts.seed, "pretext": opts.pretext}
    for r in (t for t in tasks if (t, "fp") in ckpts):
        fp_r = {"fp_R": ckpts[(r, "fp")].fingerprint}
        for src in opts.sources:
            calib = calib_spec(src, r, tasks, **common)
            if calib is not None:
                out.append(_cell(f"{KIND}:{src}", r, None, None, fp_r, calib))
        for d in _qv_donors(tasks, donors, r, opts.qv_donors):
            calib = calib_spec(opts.qv_source, r, tasks, donor=d, **common)
            qv = {"fp_D": ckpts[(d, "fp")].fingerprint, "qat_D": ckpts[(d, "qat")].fingerprint}
            out += [_cell(k, r, d, lam, fp_r | qv, calib) for k, lam in kinds if calib]
    return out


def _qv_donors(tasks, donors: list[str], r: str, k: int | None) -> list[str]:
    """The donors of receiver ``r``'s GPTQ+QV cells: every other donor, or the ``k`` that
    follow ``r`` in ``tasks`` (cyclically)."""
    if k is None:
        return [d for d in donors if d != r]
    i = list(tasks).index(r)
    ring = [tasks[(i + j) % len(tasks)] for j in range(1, len(tasks))]
    return [d for d in ring if d in donors][:k]


def _cell(kind, r, d, lam, sources, calib) -> dict:
    return {"kind": kind, "receiver": r, "donor": d, "lam": lam, "sources": sources, "calib": calib}


def stored_choices(stored: list[dict], strategy: str | None) -> dict[tuple, dict]:
    """``{(receiver, donor): Choice dict}`` of ``strategy`` re-decided from the grid's
    ``scores`` cells (:mod:`qvec_jax.grid.extras`) that hold its measurement (so a
    strategy with tuned constants reuses them too)."""
    if strategy is None:
        return {}
    s, out = select.get_strategy(strategy), {}
    for c in stored:
        rec = c.get("scores") or {}
        if c.get("kind") == "scores" and (s.key is None or s.key in rec):
            choice = select.choose(s, rec).to_dict()
            out[(c["receiver"], c["donor"])] = choice | {"from": "the grid's scores cell"}
    return out


def todo_cells(planned: list[dict], stored: list[dict], choices: dict) -> list[dict]:
    """The planned cells with no stored record from the same checkpoints, calibration and
    (strategy cells) lam; a strategy cell's lam is set where ``choices`` knows it."""
    done = {_ident(c): c for c in stored if is_gptq_cell(c)}
    out = []
    for cell in planned:
        choice = choices.get((cell["receiver"], cell["donor"])) if "@" in cell["kind"] else None
        if choice is not None:
            cell = cell | {"lam": choice["lam"], "choice": choice}
        old = done.get(_ident(cell))
        same = old is not None and all(old.get(k) == cell[k] for k in ("sources", "calib"))
        if not same or (choice is not None and old.get("lam") != choice["lam"]):
            out.append(cell)
    return out


# ----------------------------------------------------------------------------- compute


class _Job:
    """One grid call's GPTQ cells: the grid's loader (checked checkpoint loads, host QVs,
    eval sets, mesh), the receiver's FP params, a few calibration sets, the records made
    so far (a strategy cell at lam = 1 reuses the lam = 1 cell's numbers)."""

    def __init__(self, opts: GptqCells, run, stored: list[dict], cands, kw: dict):
        self.opts, self.run, self.cands, self.kw = opts, run, cands, kw
        self.spec = run.spec
        self.images: dict = {}
        self.made = {_ident(c): c for c in stored if is_gptq_cell(c)}

    def compute(self, todo: list[dict], store: GridStore, shard) -> None:
        """Receiver by receiver, each record appended to ``shard``'s file as it finishes."""
        bar = tqdm(
            total=len(todo), mininterval=0.5 if sys.stderr.isatty() else 30.0, unit="cell",
            desc="grid gptq", disable=not self.kw.get("progress", True), dynamic_ncols=True,
        )  # fmt: skip
        with store.writer(shard) as out:
            for r in dict.fromkeys(c["receiver"] for c in todo):
                evals = self.run.eval_sets(
                    r, self.kw.get("batch_size", 256), self.kw.get("device_cache_bytes", 1 << 30)
                )
                fp, meta = self.run.fp_params(r), self.run.ckpts[(r, "fp")].meta
                # GPTQ's Hessians in float32 (it is a PTQ); its evals in the grid's dtype
                models = (checkpoints.model_from_meta(meta), self.run.model(r))
                size = int(meta["image_size"])
                for cell in (c for c in todo if c["receiver"] == r):
                    d = f" D={cell['donor']}" if cell["donor"] else ""
                    bar.set_postfix_str(f"R={r} {cell['kind']}{d}")
                    out.append(self.record(cell, fp, models, size, evals))
                    bar.update(1)
                del evals, fp
        bar.close()

    def calib(self, spec: dict, size: int) -> np.ndarray:
        key = (spec["task"], spec["n"], spec["seed"], size)
        if key not in self.images:
            if len(self.images) >= 4:  # a few sets: the donors' images recur per receiver
                self.images.pop(next(iter(self.images)))
            self.images[key] = calib_images(spec, size, data_dir=self.run.data_dir)
        return self.images[key]

    def record(self, cell: dict, fp, models: tuple, size: int, evals: dict) -> dict:
        """The cell's record: GPTQ of its params on its calibration set (with ``models[0]``,
        float32), evaluated (with ``models[1]``, the grid's compute dtype)."""
        r, d, t0 = cell["receiver"], cell["donor"], time.perf_counter()
        model, eval_model = models
        rec = dict(cell)
        if "@" in cell["kind"]:
            rec["choice"] = cell.get("choice") or self.choose(fp, d, eval_model, size)
            rec["lam"] = rec["choice"]["lam"]
            twin = self.made.get(cell_key(rec | {"kind": cell["kind"].split("@")[0]}))
            if twin is not None and all(twin.get(k) == cell[k] for k in ("sources", "calib")):
                rec |= {k: twin[k] for k in ("acc", "n", "calib_used", "seconds")}
                rec["calib_overlap"] = (
                    twin.get("calib_overlap")
                    or calib_accounting(
                        cell["calib"], r, cell["calib"]["n"], data_dir=self.run.data_dir
                    )["calib_overlap"]
                )
                rec["same_as"] = list(cell_key(twin))  # one GPTQ, not two
                return self._finish(rec)
        images = self.calib(cell["calib"], size)
        tree = fp if d is None else trees.patch(fp, self.run.qv_of(d), rec["lam"])
        timings: dict = {}
        q = gptq.gptq(
            tree, model, images, self.spec, batch_size=self.opts.batch_size, timings=timings
        )
        q = put(q, self.run.replicated)
        rec["acc"] = {s: e.accuracy(eval_model, q) for s, e in evals.items()}
        rec["n"] = {s: e.n for s, e in evals.items()}
        rec |= calib_accounting(cell["calib"], r, len(images), data_dir=self.run.data_dir)
        rec["seconds"] = {k: round(v, 3) for k, v in timings.items()}
        rec["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        return self._finish(rec)

    def _finish(self, rec: dict) -> dict:
        rec |= {"bits": self.spec.bits, "granularity": self.spec.granularity}
        self.made[_ident(rec)] = rec
        return rec

    def choose(self, fp, d: str, model, size: int) -> dict:
        """The strategy's pick of lam for (d, R) under the RTN spec, over 0 and the grid's
        lambdas, measured here (no ``scores`` cell holds it)."""
        s = select.get_strategy(self.opts.strategy)
        inputs = {}
        if s.data in ("donor", "pretext"):
            task = d if s.data == "donor" else self.opts.pretext
            if task is None:
                raise GridError(f"gptq strategy {s.name}: no pretext task given; pick another")
            spec = {"task": task, "n": s.n, "seed": self.opts.seed}
            inputs[s.data] = self.calib(spec, size)
        choice = select.select_lambda(
            fp, self.run.qv_of(d), self.spec, model, strategy=s, inputs=inputs,
            candidates=self.cands,
        )  # fmt: skip
        return choice.to_dict() | {"from": "measured by the gptq stage"}
