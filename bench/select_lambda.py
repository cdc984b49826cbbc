"""Cost of choosing lambda on one receiver: each strategy vs a full labelled val sweep.

    python bench/select_lambda.py [--task fmnist_a] [--bits 2] [--runs 3]

On the demo model ("demo/4" at 16x16, random init: the cost does not depend on the
weights' values), one receiver, one QV. The reference is what the grid does to get
``lam_best``: the repo's evaluator (``evaluate.EvalSet``, batches cached on device) on
the receiver's whole val split at the paper's 11 lambdas. Each strategy runs through
``q.select_lambda`` as a user would (patch, PTQ, forward, all per candidate, 12 with
lam = 0). Times are medians over ``--runs`` after a warm-up (the first call, which
compiles, is shown apart), interleaved run by run so all see the same background load.
Inputs: donor = digits train images, pretext = fashion_mnist train images (digits when
Fashion-MNIST is absent), unlabelled/labelled receiver = the task's val split.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax

import qvec_jax as q
from qvec_jax import data, evaluate
from qvec_jax import select as sel
from qvec_jax.models import vit

SWEEP = "val sweep (evaluate, 11 lam)"


def first_available(*tasks: str) -> str:
    for t in tasks:
        if data.availability(t)[0]:
            return t
    raise SystemExit(f"none of {tasks} is available")


def timed(fns: dict, runs: int) -> tuple[dict, dict]:
    """``(first-call seconds, [seconds per later call])`` of each fn, interleaved."""
    first, ts = {}, {k: [] for k in fns}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first[k] = time.perf_counter() - t0
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts[k].append(time.perf_counter() - t0)
    return first, ts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="fmnist_a")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)

    task = first_available(args.task, "digits")
    model = vit.create_model("demo/4", num_classes=10, image_size=16)
    spec = q.QuantSpec(args.bits)
    fp = model.init_params(0)
    noise = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), fp)
    qv = q.quantization_vector(noise, fp)
    val = data.load_split(task, "val", image_size=16)
    pretext = first_available("fashion_mnist", "digits")
    inputs = {
        "donor": data.load_split("digits", "train", image_size=16).images[:256],
        "pretext": data.load_split(pretext, "train", image_size=16).images[:256],
        "unlabelled receiver": val.images,
        "labelled receiver": val,
    }
    es = evaluate.EvalSet(val, 256, cache_bytes=2**31)

    def sweep():
        return [es.accuracy(model, q.patch(fp, qv, lam), spec) for lam in sel.PAPER_LAMBDAS]

    fns = {SWEEP: sweep}
    strategies = sel.default_strategies()
    for s in strategies:
        fns[s.name] = lambda s=s: sel.select_lambda(fp, qv, spec, model, strategy=s, inputs=inputs)
    print(
        f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), jax {jax.__version__}; model demo/4 at 16x16, "
        f"{args.bits}-bit; receiver {task} val ({len(val)} examples); runs={args.runs}"
    )
    first, ts = timed(fns, args.runs)
    ref = statistics.median(ts[SWEEP])

    def forwards(s) -> int:  # image forward passes: the reference and each candidate
        if s is None:
            return 11 * len(val)
        if s.data == "none":
            return 0
        if s.data == "labelled receiver":
            return len(sel.CANDIDATES) * len(val)
        have = s.n if s.data == "noise" else len(inputs[s.data])
        return (1 + len(sel.CANDIDATES)) * min(s.n, have)

    head = f"{'strategy':30s} {'data':20s} {'first s':>8s} {'median ms':>10s} {'x sweep':>8s}"
    print(head + f" {'img fwd':>8s}")
    for k in fns:
        s = next((s for s in strategies if s.name == k), None)
        kind = s.data if s else "labelled receiver"
        med = statistics.median(ts[k])
        row = f"{k:30s} {kind:20s} {first[k]:8.2f} {1e3 * med:10.1f} {med / ref:8.3f}"
        print(row + f" {forwards(s):8d}")
    pick = lambda name: statistics.median(ts[name]) / ref
    print(
        f"headline: sweep_ms={1e3 * ref:.0f} val_n={len(val)} "
        f"noise_kl_x={pick('proxy-noise-kl'):.3f} "
        f"donor_kl_x={pick('proxy-donor-kl'):.3f} rx32_kl_x={pick('proxy-rx32-kl'):.3f} "
        f"rx128_kl_x={pick('proxy-rx128-kl'):.3f} norm_ratio_x={pick('norm-ratio'):.3f} "
        f"val_best_x={pick('val-best'):.3f}"
    )


if __name__ == "__main__":
    main()
