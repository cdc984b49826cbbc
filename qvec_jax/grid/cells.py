"""The evaluation of a grid's cells (``grid.run_grid``'s engine).

:class:`GridRun` loads the checkpoints of one grid call on demand (each checked against
the first one's backbone), keeps one receiver's FP params and one donor's QV on device
at a time, and evaluates cells receiver by receiver, appending the records to the
shard's record file as they finish. :mod:`qvec_jax.grid.extras` and
:mod:`qvec_jax.grid.gptq` subclass or reuse it for their rows.

Params are jit *arguments*: ``PTQ(FP_R + lam * QV_D)`` is built by one jitted function
of ``(fp, qv, lam)`` (:func:`patch_and_quantize`), so the grid compiles once per
receiver model shape, not per cell.

Batched cells: consecutive patch cells of one receiver and donor (its lambdas) form
groups of at most ``L`` cells (:func:`cell_groups`, balanced). A group's params are
built in one call, stacked ``[L, ...]`` (:func:`patch_and_quantize_stack`), and each
eval batch is preprocessed once and run through the ``L`` models in one call
(``evaluate.count_correct_stack``). Both go through ``jax.lax.map``: the ``L`` models
run one after the other, each the same computation as a single cell's, so params and
logits are bit-identical to the per-cell path (``jax.vmap`` is not: it rounds the
batched matmuls differently, logits off by ~1e-9) and so is every record. What it saves
is the per-call dispatch and the preprocessing of each batch for every cell. A group's
records are appended together when it finishes, in cell order (a kill loses at most
that group; its ``seconds`` is the group's time divided among its cells).

``L`` (:meth:`GridRun.group_size`): ``cell_group`` if given, else the default rule,
:func:`default_group`, then capped so the stacked params fit the budget
(:func:`group_budget`: a quarter of an accelerator's memory, 1 GiB on CPU); ``L = 1``
is the per-cell path. The rule, from ``bench/grid_batch.py`` on 2 shared CPU cores
(per-cell time / batched time at ``L`` = 4 and 8; val + test splits cached on device):

- the demo's ``demo/4`` at 16 px (0.31M params, 28-px grey images, batch 1000): 1.10
  and 1.11, so small models (``CPU_SMALL_PARAMS``, 1M) batch 8 cells by default on CPU;
- ``Ti/16`` at 64 px (5.5M): 0.98 and 1.01, and ``B/16`` at 32 px (86M): 0.89 and 0.94
  (their compute dwarfs what batching saves; the loss is probably ``lax.map`` copying
  each model's params out of the stack for every batch): one cell at a time;
- GPU and TPU: not measured yet, one cell at a time until ``bench/grid_batch.py`` (and
  ``tests/test_grid_batched.py``, the identity) has run there.

A split streamed from the host (not cached) is also read once per group, not per cell.
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

__all__ = [
    "GridRun", "cell_groups", "default_group", "group_budget", "patch_and_quantize",
    "patch_and_quantize_stack", "ptq_jit",
]  # fmt: skip

#: The share of an accelerator's memory that one group's stacked params may take.
GROUP_MEMORY_FRACTION = 0.25
#: The bytes one group's stacked params may take on CPU (host memory is everyone's).
CPU_GROUP_BYTES = 1 << 30
#: Models of at most this many params batch this many cells by default on CPU (measured).
CPU_SMALL_PARAMS, CPU_SMALL_GROUP = 1_000_000, 8


@functools.partial(jax.jit, static_argnames=("spec",))
def patch_and_quantize(fp_params, qv, lam, *, spec: quant.QuantSpec):
    """``PTQ(FP_R + lam * QV_D)``; params, QV and lam are arguments (one compile per shape)."""
    return quant.fake_quant_tree(trees.patch(fp_params, qv, lam), spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def patch_and_quantize_stack(fp_params, qv, lams, *, spec: quant.QuantSpec):
    """:func:`patch_and_quantize` for each ``lam`` of ``lams`` (float32 ``[L]``), stacked
    on a new leading axis of every leaf; bit-identical to it (``jax.lax.map``)."""
    return jax.lax.map(
        lambda lam: quant.fake_quant_tree(trees.patch(fp_params, qv, lam), spec), lams
    )


def ptq_jit(params, *, spec: quant.QuantSpec):
    """``PTQ(params)``: the same rule and numbers as ``quant.ptq``, in one jitted program
    (:func:`ptq_selected`) that writes only the quantized leaves; the others are the
    input's own arrays. Returning the whole tree from the program cost one copy kernel
    per unquantized leaf (128 for ViT-B/16, compiled for an H200)."""
    q = ptq_selected(params, spec=spec)
    return jax.tree_util.tree_map_with_path(lambda kp, x: q.get(trees.path_str(kp), x), params)


@functools.partial(jax.jit, static_argnames=("spec",))
def ptq_selected(params, *, spec: quant.QuantSpec) -> dict:
    """``{path: PTQ leaf}`` of the leaves ``spec.rule`` quantizes (:func:`ptq_jit`)."""
    out = trees.flatten(quant.fake_quant_tree(params, spec))
    return {p: out[p] for p in spec.rule.select(params)}


def default_group(n_params: int, platform: str) -> int:
    """Cells per group where batching measured faster (module docstring), else 1."""
    return CPU_SMALL_GROUP if platform == "cpu" and n_params <= CPU_SMALL_PARAMS else 1


def group_budget(device=None) -> int:
    """Bytes one group's stacked params may take on ``device`` (default: the first local
    one): ``GROUP_MEMORY_FRACTION`` of its memory, ``CPU_GROUP_BYTES`` on CPU or where
    the device does not say."""
    device = jax.local_devices()[0] if device is None else device
    limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else 0
    return int(GROUP_MEMORY_FRACTION * limit) if limit else CPU_GROUP_BYTES


def cell_groups(cells: list[dict], size: int) -> list[list[dict]]:
    """``cells`` (one receiver's, in order) as consecutive groups: each run of patch cells
    with one donor split into ``ceil(n / size)`` groups of balanced sizes (a full grid
    compiles two group sizes at most per model shape); every other cell alone."""
    groups: list[list[dict]] = []
    run: list[dict] = []

    def flush():
        k = -(-len(run) // size)
        groups.extend(run[i * len(run) // k : (i + 1) * len(run) // k] for i in range(k))
        run.clear()

    for cell in cells:
        if run and (cell["kind"] != "patch" or cell["donor"] != run[0]["donor"]):
            flush()
        if cell["kind"] == "patch":
            run.append(cell)
        else:
            groups.append([cell])
    flush()
    return groups


class GridRun:
    """The cells of one grid call: checkpoints loaded (and checked) on demand, one
    receiver's FP params and one donor's QV on device at a time."""

    def __init__(
        self, ckpts: dict, spec: quant.QuantSpec, *, data_dir, compute_dtype="float32",
        eval_n=None, cell_group: int | None = None, group_bytes: int | None = None,
    ):  # fmt: skip
        self.ckpts, self.spec, self.data_dir = ckpts, spec, data_dir
        self.cell_group = cell_group  # at most this many cells per group (None: default_group)
        self.group_bytes = group_budget() if group_bytes is None else int(group_bytes)
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
        lam = jnp.float32(cell["lam"])
        return patch_and_quantize(fp_dev, self.donor_qv(d), lam, spec=self.spec)

    def donor_qv(self, d: str):
        """Donor ``d``'s QV on device (placed once for all its cells of a receiver)."""
        if self.qv_donor != d:
            self.qv_dev = None  # drop the previous donor's QV before placing the next
            self.qv_dev, self.qv_donor = put(self.qv_of(d), self.replicated), d
        return self.qv_dev

    def group_size(self, fp_host) -> int:
        """Cells per group for a receiver with params ``fp_host``: ``cell_group`` or
        :func:`default_group`, capped so that the stack fits ``group_bytes`` (at least 1)."""
        leaves = [np.asarray(x) for x in jax.tree.leaves(fp_host)]
        n_params, nbytes = sum(x.size for x in leaves), sum(x.nbytes for x in leaves)
        platform = self.mesh.devices.flat[0].platform
        cap = default_group(n_params, platform) if self.cell_group is None else self.cell_group
        return max(1, min(int(cap), self.group_bytes // max(nbytes, 1)))

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
        """Evaluate ``todo`` receiver by receiver, group by group (:func:`cell_groups`),
        appending each group's records to ``shard``'s record file as it finishes."""
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
                for group in cell_groups(cells, self.group_size(self.host[r])):
                    for record in self.evaluate_group(group, model, fp_dev, evals, bar):
                        out.append(record)
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
        return self.record(cell, acc, evals, time.perf_counter() - t0)

    def evaluate_group(self, cells: list[dict], model, fp_dev, evals, bar) -> list[dict]:
        """The records of a group of patch cells of one receiver and donor (one cell: the
        per-cell path), in order: their params built and evaluated as one stack."""
        if len(cells) == 1:
            return [self.evaluate(cells[0], model, fp_dev, evals, bar)]
        c, lams = cells[0], [cell["lam"] for cell in cells]
        bar.set_postfix_str(f"R={c['receiver']} patch D={c['donor']} lam={lams[0]:g}..{lams[-1]:g}")
        t0 = time.perf_counter()
        qv = self.donor_qv(c["donor"])
        stack = patch_and_quantize_stack(fp_dev, qv, jnp.asarray(lams, jnp.float32), spec=self.spec)
        accs = {s: e.accuracies(model, stack) for s, e in evals.items()}
        del stack  # the group's patched, quantized trees are freed right after evaluation
        seconds = (time.perf_counter() - t0) / len(cells)
        return [
            self.record(cell, {s: a[i] for s, a in accs.items()}, evals, seconds)
            for i, cell in enumerate(cells)
        ]

    def record(self, cell: dict, acc: dict, evals: dict[str, EvalSet], seconds: float) -> dict:
        """A cell's record: the cell, its accuracy and size of every split, the quantizer,
        and the seconds it took."""
        return {
            **cell,
            "acc": acc,
            "n": {s: e.n for s, e in evals.items()},
            "bits": self.spec.bits,
            "granularity": self.spec.granularity,
            "seconds": round(seconds, 3),
        }
