"""The evaluation of a grid's cells (``grid.run_grid``'s engine).

:class:`GridRun` loads the checkpoints of one grid call on demand (each checked against
the first one's backbone), keeps one receiver's FP params and one donor's QV on device
at a time, and evaluates cells receiver by receiver, appending each record to the
shard's record file as it finishes. :mod:`qvec_jax.grid.extras` and
:mod:`qvec_jax.grid.gptq` subclass or reuse it for their rows.

Params are jit *arguments*: ``PTQ(FP_R + lam * QV_D)`` is built by one jitted function
of ``(fp, qv, lam)`` (:func:`patch_and_quantize`), so the grid compiles once per
receiver model shape, not per cell.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qvec_jax import checkpoints, quant, trees
from qvec_jax import data as qdata
from qvec_jax.evaluate import EvalSet
from qvec_jax.grid.inputs import backbone_signature, check_same_backbone
from qvec_jax.grid.store import SPLITS, GridStore
from qvec_jax.sharding import make_mesh, put, replicated

__all__ = ["GridRun", "patch_and_quantize", "ptq_jit"]


@functools.partial(jax.jit, static_argnames=("spec",))
def patch_and_quantize(fp_params, qv, lam, *, spec: quant.QuantSpec):
    """``PTQ(FP_R + lam * QV_D)``; params, QV and lam are arguments (one compile per shape)."""
    return quant.fake_quant_tree(trees.patch(fp_params, qv, lam), spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def ptq_jit(params, *, spec: quant.QuantSpec):
    """``PTQ(params)``: the same rule and numbers as ``quant.ptq``."""
    return quant.fake_quant_tree(params, spec)


class GridRun:
    """The cells of one grid call: checkpoints loaded (and checked) on demand, one
    receiver's FP params and one donor's QV on device at a time."""

    def __init__(
        self, ckpts: dict, spec: quant.QuantSpec, *, data_dir, compute_dtype="float32", eval_n=None
    ):
        self.ckpts, self.spec, self.data_dir = ckpts, spec, data_dir
        self.eval_n = eval_n  # evaluate on a fixed sample of this many per split (None: all)
        self.dtype = compute_dtype  # of the model; params stay float32
        self.mesh = make_mesh(jax.local_devices())  # this process's cells, its devices
        self.replicated = replicated(self.mesh)
        self.host: dict[str, dict] = {}  # host copies of FP params, by task
        self.qvs: dict[str, dict] = {}  # host QVs, by donor (kept for the whole run)
        self.ref: dict = {}  # backbone signature of the first checkpoint loaded
        self.qv_dev, self.qv_donor = None, None

    def load(self, task: str, mode: str):
        c = self.ckpts[(task, mode)]
        params, _ = checkpoints.restore_params(c.path)
        sig = backbone_signature(params)
        if not self.ref:
            self.ref.update(sig=sig, name=c.name)
        check_same_backbone(sig, self.ref["sig"], c.name, self.ref["name"])
        return params

    def model(self, r: str):
        """Receiver ``r``'s model, computing in the grid's dtype."""
        model = checkpoints.model_from_meta(self.ckpts[(r, "fp")].meta)
        return model if self.dtype == "float32" else model.clone(dtype=jnp.dtype(self.dtype))

    def fp_params(self, task):  # cached only for the receiver being evaluated
        return self.host[task] if task in self.host else self.load(task, "fp")

    def qv_of(self, donor):
        if donor not in self.qvs:
            qv = trees.quantization_vector(self.load(donor, "qat"), self.fp_params(donor))
            self.qvs[donor] = jax.tree.map(np.asarray, qv)
        return self.qvs[donor]

    def params_for(self, cell: dict, fp_dev):
        """The (device) params a cell evaluates: FP_R, PTQ(FP_R), PTQ(QAT_R) or the patch."""
        kind, d = cell["kind"], cell["donor"]
        if kind == "fp":
            return fp_dev
        if kind == "ptq_fp":
            return ptq_jit(fp_dev, spec=self.spec)
        if kind == "ptq_qat":
            return ptq_jit(put(self.load(cell["receiver"], "qat"), self.replicated), spec=self.spec)
        if self.qv_donor != d:
            self.qv_dev = None  # drop the previous donor's QV before placing the next
            self.qv_dev, self.qv_donor = put(self.qv_of(d), self.replicated), d
        lam = jnp.float32(cell["lam"])
        return patch_and_quantize(fp_dev, self.qv_dev, lam, spec=self.spec)

    def eval_sets(self, r: str, batch_size: int, cache_bytes: int) -> dict[str, EvalSet]:
        image_size = int(self.ckpts[(r, "fp")].meta["image_size"])
        splits = {
            s: qdata.load_split(r, s, image_size=image_size, data_dir=self.data_dir) for s in SPLITS
        }
        if self.eval_n:
            splits = {s: split.subset(int(self.eval_n)) for s, split in splits.items()}
        return {
            s: EvalSet(
                splits[s],
                batch_size,
                self.mesh,
                cache_bytes,
            )
            for s in SPLITS
        }

    def compute(self, todo, store: GridStore, batch_size, cache_bytes, progress, shard):
        """Evaluate ``todo`` receiver by receiver, appending each record to ``shard``'s
        record file as it finishes."""
        by_receiver: dict[str, list[dict]] = {}
        for cell in todo:
            by_receiver.setdefault(cell["receiver"], []).append(cell)
        bar = tqdm(
            total=len(todo),
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            unit="cell",
            desc="grid",
            disable=not progress,
            dynamic_ncols=True,
        )
        with store.writer(shard) as out:
            for r, cells in by_receiver.items():
                model = self.model(r)
                evals = self.eval_sets(r, batch_size, cache_bytes)
                self.host[r] = self.fp_params(r)
                fp_dev = put(self.host[r], self.replicated)
                for cell in cells:
                    out.append(self.evaluate(cell, model, fp_dev, evals, bar))
                    bar.update(1)
                self.qv_dev = self.qv_donor = fp_dev = None
                self.host.pop(r, None)  # still reloadable if r is a later donor
                del evals
        bar.close()

    def evaluate(self, cell: dict, model, fp_dev, evals: dict[str, EvalSet], bar) -> dict:
        """One cell's record: its accuracy on every split, and how long it took."""
        d = cell["donor"]
        bar.set_postfix_str(
            f"R={cell['receiver']} {cell['kind']}" + (f" D={d} lam={cell['lam']:g}" if d else "")
        )
        t0 = time.perf_counter()
        params = self.params_for(cell, fp_dev)
        acc = {s: e.accuracy(model, params) for s, e in evals.items()}
        del params  # the patched, quantized tree is freed right after evaluation
        return {
            **cell,
            "acc": acc,
            "n": {s: e.n for s, e in evals.items()},
            "bits": self.spec.bits,
            "granularity": self.spec.granularity,
            "seconds": round(time.perf_counter() - t0, 3),
        }
