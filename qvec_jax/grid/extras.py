"""The grid's extras: lambda-strategy measurements and leave-one-out QV merges
(issues 13 and 14), computed after the main cells of :func:`qvec_jax.grid.run.run_grid`.

Two more cell kinds go to the same record files (keyed by ``grid.store.cell_key``):

- ``scores`` (receiver R, donor D, lam None): :func:`qvec_jax.select.candidate_scores`
  of ``(FP_R, QV_D)`` over the candidates ``0`` + the grid's lambdas, so a report
  re-decides any strategy (``select.choose``) without recomputing; for every cross-task
  pair and every leave-one-out merge (donor ``"loo:<method>"``). Its proxy inputs:
  ``proxy_n`` train images of the donor (of every merged donor, for a merge), of the
  pretext task (absent -> those strategies are listed as not measured), noise, and
  ``max(rx_shots)`` unlabelled TRAIN images of R (never val/test; labels never read).
- ``merge`` (receiver R, donor ``"loo:<method>"``, lam): ``acc(PTQ(FP_R + lam *
  merge(QV_D for D != R)))`` on val and test, patched and quantized exactly as a
  single donor's ``patch`` cell. ``lam = 0`` is the ``ptq_fp`` cell (not recomputed).
  Only with at least ``MIN_MERGE_DONORS`` donors: one QV is no merge (a 2-task grid has
  no merge cells).

A ``scores`` cell also records ``overlap``: per proxy kind (donor, pretext), how many of
R's train, val and test images its proxy images are (``select.images_overlap``, the
package's one overlap rule), so the report says when "no receiver data" is not so.

A cell records ``sources`` (the checkpoint fingerprints it was computed from) and
``setup`` (the proxy settings or the merge recipe); a cell whose sources or setup
changed is recomputed, so a killed run resumes with only the missing extras.
Device work is jitted with params as arguments (``grid.patch_and_quantize``,
``select``'s jitted passes); a receiver's FP params and proxy inputs go to the
device once per receiver, each donor's images once per run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from qvec_jax import data, merge, select
from qvec_jax.files import atomic_write_text
from qvec_jax.grid.cells import GridRun, patch_and_quantize
from qvec_jax.grid.run import shard_of
from qvec_jax.grid.store import GridStore, cell_key
from qvec_jax.sharding import put

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_STRATEGY",
    "EXTRAS_FILE",
    "EXTRA_KINDS",
    "MIN_MERGE_DONORS",
    "Extras",
    "loo_donor",
    "merge_sources",
    "measured_strategies",
    "plan_extras",
    "read_extras_settings",
    "sized",
]

EXTRA_KINDS = ("scores", "merge")
#: A leave-one-out merge needs this many donors (a 2-task grid has 1 per receiver: none).
MIN_MERGE_DONORS = 2
#: The merge methods of the leave-one-out rows (``merge.METHODS`` adds "sum").
DEFAULT_METHODS = ("mean", "ties", "dare", "model_stock")
#: The no-receiver-data strategy of the report's heatmap: the winner of ``qvec tune`` on
#: the demo's DEV task set (docs/results.md); never chosen on a test task set.
DEFAULT_STRATEGY = "proxy-pretext-kl:margin=0.05"
#: The default when no pretext task is named: the best variant of the same dev ranking
#: that reads no pretext images (``qvec tune``'s ``tune.md`` on the dev demo grid).
NO_PRETEXT_STRATEGY = "proxy-donor-kl:margin=0.2"


def default_strategy(pretext: str | None) -> str:
    """:data:`DEFAULT_STRATEGY`, or :data:`NO_PRETEXT_STRATEGY` without a pretext task."""
    return DEFAULT_STRATEGY if pretext is not None else NO_PRETEXT_STRATEGY


def sized(name: str, proxy_n: int | None) -> str:
    """``name`` with a proxy's size made explicit: a donor, pretext or noise proxy named
    without a size (``proxy-donor-kl``, 256 images) reads the grid's ``proxy_n`` images
    (``proxy-donor64-kl``); other names, and every name when ``proxy_n`` is None, as given."""
    family, sep, rest = str(name).partition(":")
    m = re.fullmatch(r"proxy-(donor|pretext|noise)-(kl|agree|cos)", family)
    if proxy_n is None or m is None or int(proxy_n) == 256:
        return name
    return f"proxy-{m[1]}{int(proxy_n)}-{m[2]}{sep}{rest}"


def fixed_strategy(name: str, pretext: str | None, who: str, among=None, error=None, proxy_n=None):
    """The no-receiver-data strategy a grid stage (``who``) fixes in advance: ``name``
    ("auto": :func:`default_strategy`; a proxy without a size: ``proxy_n`` images, see
    :func:`sized`) among ``among`` (``select.get_strategy``). Refuses, in one line
    (``error``, default ``SelectError``), one that uses receiver data or reads pretext
    images without a ``pretext`` task."""
    error = error or select.SelectError
    name = sized(default_strategy(pretext) if name == "auto" else name, proxy_n)
    s = select.get_strategy(name, among)
    if s.data in ("unlabelled receiver", "labelled receiver"):
        raise error(
            f"{who} strategy {s.name!r} uses {s.data} data; name one that uses no receiver "
            "data (e.g. lam=1, norm-ratio, proxy-donor-kl)"
        )
    if s.data == "pretext" and pretext is None:
        raise error(
            f"{who} strategy {s.name!r} reads pretext images: name the pretext task "
            "(pretext=, --pretext TASK) or another strategy (e.g. proxy-donor-kl)"
        )
    return s


#: The extras' settings of the last grid run (the report reads the strategy there).
EXTRAS_FILE = "extras.json"


def loo_donor(method: str) -> str:
    """The donor name of a leave-one-out merge by ``method``: ``"loo:<method>"``."""
    return f"loo:{method}"


@dataclasses.dataclass(frozen=True)
class Extras:
    """What the extras stage computes; every setting is checked here, before any work.

    ``strategy``: the no-receiver-data strategy the report's heatmap and merge rows use
    (a measured family, with tunable constants: ``select.get_strategy``; "auto":
    :func:`default_strategy` of ``pretext``); stored in its canonical spelling. ``methods``: the
    merge methods (``merge.METHODS``), each at its ``MergeSpec`` defaults (ties density
    0.2, dare p 0.5 seed 0). ``pretext``: the pretext task or None. ``proxy_n`` donor /
    pretext / noise images, ``rx_shots`` unlabelled receiver images, ``seed`` for both.
    """

    strategy: str = "auto"
    methods: tuple[str, ...] = DEFAULT_METHODS
    pretext: str | None = None
    proxy_n: int = 256
    rx_shots: tuple[int, ...] = (32, 128)
    seed: int = 0

    def __post_init__(self):
        measured = measured_strategies(self.proxy_n, self.rx_shots)
        s = fixed_strategy(self.strategy, self.pretext, "extras", measured, None, self.proxy_n)
        object.__setattr__(self, "strategy", s.name)  # one spelling per strategy
        bad = [m for m in self.methods if m not in merge.METHODS]
        if bad or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"merge methods {list(self.methods)}: use distinct {merge.METHODS}")
        if self.pretext is not None:
            data.get_task(self.pretext)  # a typo fails here, with did-you-mean
        if self.proxy_n < 1 or not self.rx_shots or min(self.rx_shots) < 1:
            raise ValueError(
                f"proxy_n={self.proxy_n}, rx_shots={self.rx_shots}: need positive sizes"
            )
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "rx_shots", tuple(int(k) for k in self.rx_shots))

    def to_dict(self) -> dict:
        """The settings as JSON reads them back (lists, not tuples)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def scores_setup(self, candidates) -> dict:
        """What a ``scores`` cell's numbers depend on besides its checkpoints."""
        keep = ("pretext", "proxy_n", "rx_shots", "seed")
        return {k: v for k, v in self.to_dict().items() if k in keep} | {
            "candidates": list(candidates)
        }

    def run(self, tasks, ckpts, store: GridStore, spec, lambdas, **kw) -> int:
        """Compute the missing extras cells of the grid over ``tasks`` (after its main
        cells); ``kw``: ``batch_size, data_dir, progress, device_cache_bytes, shard``.
        Returns how many cells were computed."""
        cands = (0.0, *[float(x) for x in lambdas if float(x) != 0.0])
        done = {cell_key(c): c for c in store.cells() if c["kind"] in EXTRA_KINDS}
        todo = plan_extras(self, tasks, ckpts, lambdas, cands, done)
        shard = kw.get("shard")
        if shard is not None:
            todo = [c for c in todo if shard_of(c, tasks, shard[1]) == shard[0]]
        if jax.process_index() == 0:
            text = json.dumps(self.to_dict(), indent=1) + "\n"
            atomic_write_text(Path(store.workdir) / EXTRAS_FILE, text)
        if todo:
            store.repair_tail(shard)
            _ExtrasRun(self, ckpts, spec, cands, kw).compute(todo, store, shard)
        return len(todo)


def read_extras_settings(workdir) -> dict:
    """The ``extras.json`` of a grid workdir (``{}`` if none)."""
    return GridStore(workdir).read_json(EXTRAS_FILE)


def _src(ckpts, r: str, donors: list[str], merged: bool) -> dict[str, str]:
    """The fingerprints a cell of R is computed from: FP_R and each donor's FP and QAT
    (keys tagged with the donor's name for a merge)."""
    src = {"fp_R": ckpts[(r, "fp")].fingerprint}
    for d in donors:
        tag = f":{d}" if merged else ""
        src[f"fp_D{tag}"] = ckpts[(d, "fp")].fingerprint
        src[f"qat_D{tag}"] = ckpts[(d, "qat")].fingerprint
    return src


def merge_sources(ckpts, r: str, donors: list[str]) -> dict[str, str]:
    """The ``sources`` of a cell of R computed from the merge of ``donors``' QVs."""
    return _src(ckpts, r, donors, True)


def plan_extras(ex: Extras, tasks, ckpts, lambdas, cands, done: dict) -> list[dict]:
    """The extras cells the available checkpoints allow that are absent from ``done``
    or were computed from other sources or another setup."""
    receivers = [t for t in tasks if (t, "fp") in ckpts]
    donors = [t for t in tasks if (t, "fp") in ckpts and (t, "qat") in ckpts]
    setup = ex.scores_setup(cands)
    cells = []
    for r in receivers:
        for d in donors:
            if d != r:
                cells.append(("scores", r, d, None, _src(ckpts, r, [d], False), setup))
        loo = [d for d in donors if d != r]
        for m in ex.methods if len(loo) >= MIN_MERGE_DONORS else ():  # one QV is no merge
            recipe = json.loads(json.dumps({"merge": merge.MergeSpec(m).to_dict(), "donors": loo}))
            src = _src(ckpts, r, loo, True)
            cells.append(("scores", r, loo_donor(m), None, src, setup | recipe))
            cells += [("merge", r, loo_donor(m), float(lam), src, recipe) for lam in lambdas]
    todo = []
    for kind, r, d, lam, src, stp in cells:
        cell = {"kind": kind, "receiver": r, "donor": d, "lam": lam, "sources": src, "setup": stp}
        old = done.get(cell_key(cell))
        if old is None or old.get("sources") != src or old.get("setup") != stp:
            todo.append(cell)
    return todo


class _ExtrasRun(GridRun):
    """The grid's loader (checkpoints, host QVs, eval sets) plus proxy inputs and merges."""

    def __init__(self, ex: Extras, ckpts, spec, cands, kw):
        dtype = kw.get("compute_dtype", "float32")
        super().__init__(
            ckpts, spec, data_dir=kw.get("data_dir"), compute_dtype=dtype, eval_n=kw.get("eval_n")
        )
        self.ex, self.cands = ex, cands
        self.batch_size = kw.get("batch_size", 256)
        self.cache_bytes = kw.get("device_cache_bytes", 1 << 30)
        self.progress = kw.get("progress", True)
        self.images: dict = {}  # (task, n) -> device images, for the whole run

    def train_images(self, task: str, n: int, image_size: int):
        """``n`` train images of ``task`` on device (read and placed once per run)."""
        if (task, n) not in self.images:
            x = select.train_images(
                task, n, image_size=image_size, seed=self.ex.seed, data_dir=self.data_dir
            )
            self.images[(task, n)] = put(x, self.replicated)
        return self.images[(task, n)]

    def merged_qv(self, cell: dict):
        """``merge.merge_qvs`` of the cell's donors' QVs by its recipe (on the host)."""
        qvs = [self.qv_of(d) for d in cell["setup"]["donors"]]
        return merge.merge_qvs(qvs, merge.MergeSpec.from_dict(cell["setup"]["merge"]))

    def compute(self, todo: list[dict], store: GridStore, shard) -> None:
        by_receiver: dict[str, list[dict]] = {}
        for cell in todo:
            by_receiver.setdefault(cell["receiver"], []).append(cell)
        bar = tqdm(
            total=len(todo), mininterval=0.5 if sys.stderr.isatty() else 30.0, unit="cell",
            desc="grid extras", disable=not self.progress, dynamic_ncols=True,
        )  # fmt: skip
        with store.writer(shard) as out:
            for r, cells in by_receiver.items():
                for rec in self.receiver(r, cells):
                    out.append(rec)
                    bar.update(1)
        bar.close()

    def receiver(self, r: str, cells: list[dict]):
        """Yield the records of receiver ``r``'s cells, donor by donor: its FP params,
        eval sets and proxy inputs placed once, each (merged) QV placed once."""
        # the grid's compute dtype for the proxies' forward passes and the merges' evals
        model, size = self.model(r), int(self.ckpts[(r, "fp")].meta["image_size"])
        fp_dev = put(self.fp_params(r), self.replicated)
        inputs = self.receiver_inputs(r, size) if any(c["kind"] == "scores" for c in cells) else {}
        needs_eval = any(c["kind"] == "merge" for c in cells)
        evals = self.eval_sets(r, self.batch_size, self.cache_bytes) if needs_eval else {}
        by_donor: dict[str, list[dict]] = {}
        for c in cells:
            by_donor.setdefault(c["donor"], []).append(c)
        for d, dcells in by_donor.items():
            t0 = time.perf_counter()
            merged = d.startswith("loo:")
            qv = self.merged_qv(dcells[0]) if merged else self.qv_of(d)
            qv_dev = put(qv, self.replicated)
            donors = dcells[0]["setup"]["donors"] if merged else [d]
            for c in dcells:
                if c["kind"] == "merge":
                    yield self.merge_record(c, model, fp_dev, qv_dev, evals)
                else:
                    x = jnp.concatenate(
                        [self.train_images(t, self.ex.proxy_n, size) for t in donors]
                    )
                    rec = self.scores_record(c, model, fp_dev, qv_dev, inputs | {"donor": x}, t0)
                    yield rec | {"overlap": self.overlap(r, donors)}
                t0 = time.perf_counter()
            del qv_dev

    def receiver_inputs(self, r: str, size: int) -> dict:
        """The proxy inputs every donor of ``r`` shares: pretext and unlabelled receiver."""
        out = {"unlabelled receiver": self.train_images(r, max(self.ex.rx_shots), size)}
        if self.ex.pretext is not None:
            out["pretext"] = self.train_images(self.ex.pretext, self.ex.proxy_n, size)
        return out

    def overlap(self, r: str, donors: list[str]) -> dict:
        """Per proxy kind, how many of R's train/val/test images its proxy images hold
        (``select.images_overlap``; the unlabelled receiver's are R's own train images)."""
        ex, kw = self.ex, {"seed": self.ex.seed, "data_dir": self.data_dir}
        out = {"donor": select.images_overlap(donors, ex.proxy_n, r, measured=ex.proxy_n, **kw)}
        if ex.pretext is not None:
            out["pretext"] = select.images_overlap(ex.pretext, ex.proxy_n, r, **kw)
        return out

    def _common(self, cell: dict, t0: float) -> dict:
        return {
            **cell,
            "bits": self.spec.bits,
            "granularity": self.spec.granularity,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def scores_record(self, cell, model, fp_dev, qv_dev, inputs: dict, t0: float) -> dict:
        """``select.candidate_scores`` of the pair over :func:`measured_strategies` whose
        data is given; the others are listed under ``not_measured`` with the reason."""
        ex, given = self.ex, {"none", "noise", *inputs}
        strategies = measured_strategies(ex.proxy_n, ex.rx_shots)
        rec = select.candidate_scores(
            fp_dev, qv_dev, self.spec, model, inputs=inputs, candidates=self.cands,
            strategies=[s for s in strategies if s.data in given],
        )  # fmt: skip
        skipped = {s.name: f"no {s.data} inputs given" for s in strategies if s.data not in given}
        rec["not_measured"] = skipped | {"val-best": "lambda_best is read from the patch cells"}
        used = {k: int(v.shape[0]) for k, v in inputs.items()}
        return self._common(cell, t0) | {"scores": rec, "inputs": used}

    def merge_record(self, cell, model, fp_dev, qv_dev, evals: dict) -> dict:
        """One ``merge`` cell: ``PTQ(FP_R + lam * QV_merged)`` on val and test."""
        t0 = time.perf_counter()
        params = patch_and_quantize(fp_dev, qv_dev, jnp.float32(cell["lam"]), spec=self.spec)
        acc = {s: e.accuracy(model, params) for s, e in evals.items()}
        del params
        return self._common(cell, t0) | {"acc": acc, "n": {s: e.n for s, e in evals.items()}}


def measured_strategies(proxy_n: int = 256, rx_shots=(32, 128)) -> list:
    """The strategies a ``scores`` cell measures: ``select.default_strategies(rx_shots)``
    without ``val-best`` (lambda_best comes from the patch cells), the donor / pretext /
    noise proxies on ``proxy_n`` inputs. A report re-decides them by these objects."""
    out = []
    for s in select.default_strategies(tuple(rx_shots)):
        if s.data == "labelled receiver":
            continue
        if isinstance(s, select.Proxy) and s.data != "unlabelled receiver":
            s = dataclasses.replace(s, n=int(proxy_n))
        out.append(s)
    return out
