"""Batched grid cells vs one cell at a time (issue 22): seconds per cell at group sizes 1, 4, 8.

A patch cell is ``acc(PTQ(FP_R + lam * QV_D))`` on the receiver's val and test splits.
Group size 1 is the per-cell path (``grid.patch_and_quantize``, then
``EvalSet.accuracy`` per split); size L builds L cells' params as one stack
(``grid.cells.patch_and_quantize_stack``) and evaluates them on each batch in one call
(``EvalSet.accuracies``), as ``grid.cells.GridRun`` does. Random params of each model's
shapes and random uint8 images at their stored size, cached on device as the grid does:

- ``demo``: the demo's model (configs/demo_tiny.py: ``demo/4`` at 16 px, eval batch
  1000), 28-px grey images as its Fashion-MNIST/digits tasks;
- ``ti``: ``Ti/16`` at 64 px on 32-px RGB images (5.5M params);
- ``b16``: ``B/16`` at 32 px on 32-px RGB images (86M params, few tokens: params-heavy).

Each size evaluates the same 8 cells (lambdas 0.15..1.5) per run, after one warm-up run
(compiles); the runs of the sizes alternate and each size's time is its best run of
``--runs`` (on a shared machine, the run least slowed by others' work). The accuracies
of every size are checked identical to size 1's. The ratios are per-cell time / batched
time (> 1: batching wins).

    python bench/grid_batch.py                     # all three, ~10 minutes on 2 CPU cores
    python bench/grid_batch.py --models demo --runs 5
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from grid_cell import random_params, random_split

from qvec_jax.evaluate import EvalSet
from qvec_jax.grid.cells import (
    default_group,
    group_budget,
    patch_and_quantize,
    patch_and_quantize_stack,
)
from qvec_jax.models import vit
from qvec_jax.quant import QuantSpec
from qvec_jax.sharding import make_mesh, put, replicated

MODELS = {
    "demo": dict(variant="demo/4", image_size=16, n=2000, stored=28, grey=True, batch=1000),
    "ti": dict(variant="Ti/16", image_size=64, n=256, stored=32, grey=False, batch=256),
    "b16": dict(variant="B/16", image_size=32, n=64, stored=32, grey=False, batch=64),
}
SIZES = (1, 4, 8)
LAMS = tuple(float(x) for x in np.linspace(0.15, 1.5, 8).round(4))


def setup(variant, image_size, n, stored, grey, batch, bits=2) -> dict:
    """One receiver: model, FP params and a donor QV on device, its two cached splits."""
    mesh = make_mesh(jax.local_devices())
    model = vit.create_model(variant, num_classes=10, image_size=image_size)
    rep = replicated(mesh)
    fp = random_params(model, 0)
    qv = jax.tree.map(lambda x: 0.5 * x, random_params(model, 1))
    task = "fashion_mnist" if grey else "cifar10"
    splits = [random_split(n, stored, image_size, seed=s, task=task, grey=grey) for s in (7, 8)]
    return {
        "model": model, "fp": put(fp, rep), "qv": put(qv, rep), "spec": QuantSpec(bits),
        "evals": [EvalSet(s, batch, mesh, cache_bytes=1 << 40) for s in splits],
        "n_params": sum(x.size for x in jax.tree.leaves(fp)),
        "param_bytes": sum(x.nbytes for x in jax.tree.leaves(fp)),
    }  # fmt: skip


def cells(s: dict, size: int) -> list[list[float]]:
    """The accuracies (val, test) of the 8 cells, evaluated in groups of ``size``."""
    model, fp, qv, spec, evals = s["model"], s["fp"], s["qv"], s["spec"], s["evals"]
    out = []
    for i in range(0, len(LAMS), size):
        lams = LAMS[i : i + size]
        if size == 1:
            params = patch_and_quantize(fp, qv, jnp.float32(lams[0]), spec=spec)
            out.append([e.accuracy(model, params) for e in evals])
        else:
            stack = patch_and_quantize_stack(fp, qv, jnp.asarray(lams, jnp.float32), spec=spec)
            accs = [e.accuracies(model, stack) for e in evals]
            out += [[a[j] for a in accs] for j in range(len(lams))]
    return out


def measure(name: str, runs: int) -> dict:
    """Seconds per cell at each group size (best runs), and whether the accuracies agree."""
    s = setup(**MODELS[name])
    ref = {size: cells(s, size) for size in SIZES}  # warm-up: compiles every size
    times: dict[int, list[float]] = {size: [] for size in SIZES}
    for _ in range(runs):
        for size in SIZES:
            t0 = time.perf_counter()
            cells(s, size)
            times[size].append((time.perf_counter() - t0) / len(LAMS))
    return {
        "name": name, **MODELS[name], "n_params": s["n_params"], "param_bytes": s["param_bytes"],
        "cell_s": {size: min(t) for size, t in times.items()},
        "identical": all(ref[size] == ref[1] for size in SIZES),
        "default": default_group(s["n_params"], jax.devices()[0].platform),
        "fits": int(group_budget() // s["param_bytes"]),
    }  # fmt: skip


def report(rows: list[dict]) -> str:
    """One line per model: ms per cell at each size, the ratios, the default group."""
    head = f"{'model':26} {'params':>7}" + "".join(f" {f'L={k} ms':>10}" for k in SIZES)
    head += "".join(f" {f'x L={k}':>7}" for k in SIZES[1:]) + "  identical  default  fits"
    lines = [
        f"batched grid cells, {jax.devices()[0].platform} x{jax.device_count()}, "
        f"{len(LAMS)} cells a run, val + test splits; ms per cell (best run), "
        f"x = per-cell / batched",
        head,
    ]
    for r in rows:
        c = r["cell_s"]
        label = f"{r['name']} {r['variant']}@{r['image_size']} n={r['n']}"
        line = f"{label:26} {r['n_params'] / 1e6:6.2f}M"
        line += "".join(f" {c[k] * 1e3:10.1f}" for k in SIZES)
        line += "".join(f" {c[1] / c[k]:7.2f}" for k in SIZES[1:])
        line += f"  {str(r['identical']):9}  {r['default']:7}  {r['fits']}"
        lines.append(line)
    return "\n".join(lines)


def headline(rows: list[dict]) -> str:
    parts = [f"{r['name']}_x{k}={r['cell_s'][1] / r['cell_s'][k]:.2f}" for r in rows
             for k in SIZES[1:]]  # fmt: skip
    parts += [f"{r['name']}_ms1={r['cell_s'][1] * 1e3:.1f}" for r in rows]
    parts.append(f"identical={all(r['identical'] for r in rows)}")
    return "headline: " + " ".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"of {','.join(MODELS)}")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    names = [m for m in a.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
    rows = []
    for name in names:
        rows.append(measure(name, a.runs))
        print(report(rows[-1:]).splitlines()[-1], flush=True)
    print(report(rows))
    print(headline(rows))


if __name__ == "__main__":
    main()
