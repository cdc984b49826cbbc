"""One short check for a lent accelerator (about 5 minutes on one GPU): issue 10's numbers.

Prints, in one run, on the default JAX backend:

1. fake-quant (PTQ) of ViT-B/16 at 3 bits per channel, ms (``grid.ptq_jit``);
2. the QAT/FP train-step ratio at batch 128, in float32 and bfloat16 compute (the
   project's ``train.make_train_step``: AdamW, clipping, donated state; uint8 32-px
   images resized to 224 on device, as training feeds them), medians of interleaved steps;
3. the grid cell split (``bench/grid_cell.py``): host input, patch + PTQ, eval, and
   whether host input + patch + PTQ stay under 10% of the cell;
4. training input images/s: ``data.loader.TrainLoader`` (grain) + ``place_rows`` onto
   the device, uint8 32-px batches of 128, in-process and with worker processes.

    python bench/gpu_check.py                 # on the GPU machine
    python bench/gpu_check.py --cpu-smoke     # tiny sizes on CPU: checks the script runs

Ends with one line ``headline: name=value ...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from grid_cell import measure, random_params, random_split  # noqa: E402
from grid_cell import report as cell_report  # noqa: E402

from qvec_jax import train  # noqa: E402
from qvec_jax.config import load_config  # noqa: E402
from qvec_jax.data.loader import TrainLoader, place_rows  # noqa: E402
from qvec_jax.grid import ptq_jit  # noqa: E402
from qvec_jax.models import vit  # noqa: E402
from qvec_jax.quant import QuantSpec  # noqa: E402
from qvec_jax.sharding import make_mesh, put, replicated, state_shardings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = dict(variant="B/16", image_size=224, batch=128, steps=5, runs=5, cell_n=256,
            cell_batch=256, input_n=8192, input_batches=40, workers=(0, 4))  # fmt: skip
SMOKE = dict(variant="test/4", image_size=28, batch=8, steps=2, runs=2, cell_n=32,
             cell_batch=16, input_n=256, input_batches=6, workers=(0, 2))  # fmt: skip


def _median_ms(fn, runs: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def fake_quant_ms(s: dict, mesh) -> float:
    model = vit.create_model(s["variant"], num_classes=1000, image_size=s["image_size"])
    params = put(random_params(model, 0), replicated(mesh))
    spec = QuantSpec(3, "channel")
    return _median_ms(lambda: ptq_jit(params, spec=spec), s["runs"])


def step_ratio(s: dict, mesh, dtype) -> dict:
    """Median FP and QAT step ms (interleaved) in compute ``dtype``, and QAT/FP."""
    cfg = load_config(os.path.join(ROOT, "configs", "paper_vit_b16.py"), ["optim.warmup_steps=1"])
    model = vit.create_model(s["variant"], num_classes=100, image_size=s["image_size"],
                             dtype=dtype)  # fmt: skip
    params = random_params(model, 0)
    tx, _ = train.make_optimizer(cfg.optim, total_steps=1000)
    abstract = train.abstract_state(params, tx)
    sh = state_shardings(abstract, mesh)
    split = random_split(4 * s["batch"], 32, s["image_size"], seed=3)
    x, y = place_rows(split.get(np.arange(s["batch"])), mesh, s["batch"])
    steps, states, ms = {}, {}, {"fp": [], "qat": []}
    for mode in ms:
        steps[mode] = train.make_train_step(model, tx, mesh, sh, mode=mode, spec=QuantSpec(3),
                                            preprocess=split.preprocessor)  # fmt: skip
        states[mode] = train.create_state(params, tx, sh)
        states[mode], m = steps[mode](states[mode], x, y)  # compile
        jax.block_until_ready(m)
    for _ in range(s["steps"]):
        for mode in ms:
            t = time.perf_counter()
            states[mode], m = steps[mode](states[mode], x, y)
            jax.block_until_ready(m)
            ms[mode].append(1e3 * (time.perf_counter() - t))
    fp, qat = statistics.median(ms["fp"]), statistics.median(ms["qat"])
    return {"fp_ms": fp, "qat_ms": qat, "ratio": qat / fp}


def input_rate(s: dict, mesh, workers: int) -> float:
    """Images/s of the training input onto the device (uint8, 32 px, after one batch)."""
    split = random_split(s["input_n"], 32, s["image_size"], seed=4)
    with TrainLoader(split, s["batch"], seed=0, mesh=mesh, workers=workers, prefetch=4) as it:
        jax.block_until_ready(place_rows(next(it), mesh, s["batch"]))  # workers started
        t = time.perf_counter()
        for _ in range(s["input_batches"]):
            jax.block_until_ready(place_rows(next(it), mesh, s["batch"]))
        return s["input_batches"] * s["batch"] / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU backend")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        jax.config.update("jax_platforms", "cpu")
    s = SMOKE if a.cpu_smoke else FULL
    mesh = make_mesh(jax.local_devices()[:1])
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}; sizes: {s}")
    t0 = time.perf_counter()
    head = {"fq_ms": fake_quant_ms(s, mesh)}
    print(f"1. fake-quant of ViT {s['variant']} (3-bit channel): {head['fq_ms']:.2f} ms")
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        r = step_ratio(s, mesh, dtype)
        head[f"qat_fp_{name}"] = r["ratio"]
        print(f"2. train step, batch {s['batch']}, {name}: FP {r['fp_ms']:.1f} ms, "
              f"QAT {r['qat_ms']:.1f} ms, QAT/FP {r['ratio']:.3f}")  # fmt: skip
    cell = measure(s["variant"], s["image_size"], s["cell_n"], 32, s["cell_batch"], s["runs"],
                   mesh=mesh)  # fmt: skip
    print("3. " + cell_report(cell))
    head.update(cell_ms=cell["cell_s"] * 1e3, cell_overhead_pct=100 * cell["overhead_frac"])
    for w in s["workers"]:
        head[f"input_w{w}_img_s"] = input_rate(s, mesh, w)
        print(f"4. training input, {w} grain workers: {head[f'input_w{w}_img_s']:.0f} images/s")
    print(f"total {time.perf_counter() - t0:.0f} s")
    print("headline: " + " ".join(f"{k}={v:.3g}" for k, v in head.items()))


if __name__ == "__main__":
    main()
