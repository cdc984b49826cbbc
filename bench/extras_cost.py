"""Time the grid's extras stage (``qvec_jax.grid.extras``) at the demo's size.

Random ``demo/4`` checkpoints at 16 px (a random backbone, FP = backbone + noise, QAT =
FP + noise: accuracies are meaningless, the cost is real) for the demo's tasks, read
from their real data; then ``run_grid`` without extras (the main cells) and again with
them (the extras only), timed apart, with the number of cells of each kind. With the
demo's 5 tasks: 20 scores cells of pairs + 5 x methods LOO scores cells + 5 x methods x
lambdas merge cells.

    python bench/extras_cost.py                                  # the demo's 5 tasks
    python bench/extras_cost.py --tasks digits,digits_rot90,digits_inv --lambdas 0.5,1

Measured (``--lambdas 0.5,1``, 4 methods, 2 CPU cores shared with other jobs, load ~5):
main 65 cells 234 s, extras 294 s; per cell: patch 3.34 s, merge 4.41 s (1.3x a patch
cell), scores 2.85 s with 3 candidates. At the demo's 11 lambdas (12 candidates) and an
idle machine's 0.59 s per patch cell (README), 4 methods add ~170 s of merge cells and
~80 s of scores cells; 2 methods (the demo's default) ~85 s + ~80 s.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from qvec_jax import checkpoints, data, grid
from qvec_jax.grid.inputs import checkpoint_path
from qvec_jax.models import vit

DEMO_TASKS = "fmnist_a,fmnist_b,fmnist_rot90,digits,digits_rot90"


def make_runs(runs: Path, tasks, variant: str, image_size: int) -> None:
    """FP and QAT checkpoints of every task, laid out as ``qvec finetune`` writes them."""
    model = vit.create_model(variant, num_classes=10, image_size=image_size)
    backbone = jax.tree.map(np.asarray, vit.init_params(model, 0))
    rng = np.random.default_rng(0)
    noise = lambda t, s: jax.tree.map(  # noqa: E731
        lambda x: x + s * rng.standard_normal(x.shape).astype(x.dtype), t
    )
    for t in tasks:
        k = data.get_task(t).num_classes
        head = {"kernel": 0.02 * rng.standard_normal((backbone["head"]["kernel"].shape[0], k)),
                "bias": np.zeros(k)}  # fmt: skip
        params = {**backbone, "head": jax.tree.map(lambda x: x.astype(np.float32), head)}
        fp = noise(params, 0.02)
        for mode, tree in (("fp", fp), ("qat", noise(fp, 0.05))):
            meta = {
                "variant": variant, "num_classes": k, "image_size": image_size, "task": t,
                "mode": mode, "bits": 2, "granularity": "channel",
                "backbone_id": checkpoints.backbone_id(params),
                "config": {"task": t, "mode": mode, "seed": 1},
            }  # fmt: skip
            checkpoints.save_params(checkpoint_path(runs, t, mode), tree, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=DEMO_TASKS)
    ap.add_argument("--pretext", default="fashion_mnist")
    ap.add_argument("--lambdas", default="0.15,0.3,0.45,0.6,0.75,0.9,1,1.05,1.2,1.35,1.5")
    ap.add_argument("--methods", default=",".join(grid.extras.DEFAULT_METHODS))
    ap.add_argument("--variant", default="demo/4")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    lambdas = [float(x) for x in args.lambdas.split(",")]
    ex = grid.extras.Extras(pretext=args.pretext, methods=tuple(args.methods.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        runs, work = Path(tmp) / "runs", Path(tmp) / "grid"
        make_runs(runs, tasks, args.variant, args.image_size)
        kw = dict(bits=2, lambdas=lambdas, batch_size=args.batch_size, progress=False)
        t0 = time.perf_counter()
        grid.run_grid(tasks, runs, work, **kw)
        t1 = time.perf_counter()
        cells = grid.run_grid(tasks, runs, work, extras=ex, **kw)
        t2 = time.perf_counter()
    kinds = collections.Counter(c["kind"] for c in cells)
    secs = collections.defaultdict(float)
    for c in cells:
        secs[c["kind"]] += c.get("seconds", 0.0)
    print(f"{len(tasks)} tasks, {len(lambdas)} lambdas, methods {ex.methods}, {jax.devices()}")
    print(f"main cells: {t1 - t0:.1f} s wall")
    print(f"extras:     {t2 - t1:.1f} s wall")
    for k, n in sorted(kinds.items()):
        print(f"  {k:8s} {n:4d} cells, {secs[k]:7.1f} s in cells ({secs[k] / n:.3f} s/cell)")
    per = " ".join(f"{k}_s_per_cell={secs[k] / n:.3f}" for k, n in sorted(kinds.items()))
    print(f"headline: main_s={t1 - t0:.1f} extras_s={t2 - t1:.1f} {per}")


if __name__ == "__main__":
    main()
