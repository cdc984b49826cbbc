"""What the QV bank adds to the cost of quantizing: ``recipe.quantize_model`` with a bank
against the plain quantizer it wraps, side by side in one process.

    python bench/quantize.py [--variant B/16] [--blocks K] [--images 128] [--image-size 224]
                             [--bits 3] [--repeats 2] [--cpu-smoke] [--rtn-only]

Pairs, on random-init params of the ViT (the shapes are what costs time) and a bank built
by ``bank.build_bank`` from one synthetic donor (QAT = FP + small noise, so its QV is a
random tree of small values, head excluded):

- ``gptq``: ``gptq.gptq_quantize(params, model, noise)`` on ``--images`` noise images
  made beforehand, against ``gptq+bank:noise``: ``quantize_model(params, bank=b,
  calib="noise", lam=1)``, which also makes its noise images and patches ``FP + QV``;
- ``rtn``: ``packing.quantize(params)`` against ``rtn+bank``: ``quantize_model(params,
  bank=b, calib="none", lam=1)``.

``--blocks K`` keeps K encoder blocks of the variant (same widths: ``w768d{K}m3072h12/16``
for B/16), for machines where the full model takes too long; the ratio is per block alike.
How it times: one untimed warm-up call of each (the compiles), then ``--repeats`` rounds,
each calling every variant once in turn (interleaved: all see the same background load);
medians and [min, max]; a ratio is taken round by round, then its median. Peak RSS is the
whole process's. ``--cpu-smoke``: the tiny ``test/4`` model, 8 images at 16 px, to check
the script runs; ``--rtn-only``: the RTN pair only (the full ViT-B/16 in under a minute).
The last line is ``headline: name=value ...``.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import jax
import numpy as np

from qvec_jax import bank, gptq, packing, recipe, select
from qvec_jax.models import create_model
from qvec_jax.models.vit import decode_variant, variant_name


def variant_of(name: str, blocks: int | None) -> str:
    """``name`` with only ``blocks`` encoder blocks (same widths), or ``name`` itself."""
    if blocks is None:
        return name
    c = decode_variant(name) | {"depth": blocks}
    return variant_name(**c)


def synthetic_bank(params, meta: dict, bits: int) -> bank.Bank:
    """A one-donor bank whose QV is ``0.01 * N(0, 1)`` per backbone leaf (built from the
    donor pair ``(FP + QV, FP)`` by ``bank.build_bank``)."""
    rng = np.random.default_rng(1)
    fp = jax.tree.map(np.asarray, params)
    qat = jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape, np.float32), fp)
    m = {**meta, "bits": bits, "granularity": "channel", "task": "donor"}
    pair = bank.DonorPair(qat=(qat, m | {"mode": "qat"}), fp=(fp, m | {"mode": "fp"}),
                          qat_path="synthetic-qat", fp_path="synthetic-fp")  # fmt: skip
    return bank.build_bank([pair])


def timeit(fns: dict, repeats: int) -> dict:
    """``{name: [seconds per round]}`` after one warm-up call each, rounds interleaved."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            ts[k].append(time.perf_counter() - t)
    return ts


def ratio(ts: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(ts[a], ts[b]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--blocks", type=int, default=None, help="keep K encoder blocks")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpu-smoke", action="store_true", help="test/4, 8 images at 16 px")
    ap.add_argument("--rtn-only", action="store_true", help="time the RTN pair only")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.variant, args.blocks, args.images, args.image_size = "test/4", None, 8, 16
    variant = variant_of(args.variant, args.blocks)
    full = (variant, args.images, args.image_size) == ("B/16", 128, 224)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or '?'}")
    print(f"ViT {variant} at {args.image_size}px, {args.images} noise images, {args.bits} bits, "
          f"{args.repeats} interleaved rounds" + ("" if full else "  ** REDUCED setting (the "
          "issue's is B/16, 128 images, 224 px) **"))  # fmt: skip

    model = create_model(variant, num_classes=1000, image_size=args.image_size)
    params = jax.tree.map(np.asarray, model.init_params(0))
    meta = {"variant": variant, "image_size": args.image_size, "num_classes": 1000}
    b = synthetic_bank(params, meta, args.bits)
    images = np.asarray(select.noise_images(args.images, args.image_size))
    bits, n = args.bits, args.images

    records = {}  # the last record of each quantize_model variant: its seconds, by step

    def with_bank(calib: str):
        kw = dict(bits=bits, bank=b, calib=calib, lam=1.0, model=model, calib_size=n)

        def run():
            tree, records[calib] = recipe.quantize_model(params, **kw)
            return tree

        return run

    fns = {
        "gptq": lambda: gptq.gptq_quantize(params, model, images, bits),
        "gptq+bank:noise": with_bank("noise"),
        "rtn": lambda: packing.quantize(params, bits),
        "rtn+bank": with_bank("none"),
    }
    if args.rtn_only:
        fns = {k: v for k, v in fns.items() if k.startswith("rtn")}
    ts = timeit(fns, args.repeats)
    for k, t in ts.items():
        print(f"{k:<16} median {statistics.median(t):9.3f} s  [{min(t):.3f}, {max(t):.3f}]")
    for rec in records.values():
        steps = ", ".join(f"{k} {v:.3f}" for k, v in rec["seconds"].items())
        print(f"  {rec['recipe']} last call, seconds by step: {steps}")
    nan = float("nan")
    g = nan if args.rtn_only else ratio(ts, "gptq+bank:noise", "gptq")
    r = ratio(ts, "rtn+bank", "rtn")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    said = "" if args.rtn_only else f"gptq+bank:noise / gptq = {g:.3f}x (target <= 1.5x); "
    print(f"{said}rtn+bank / rtn = {r:.2f}x; peak RSS {rss:.2f} GiB")
    med = {"gptq": nan, "gptq+bank:noise": nan}
    med |= {k: statistics.median(t) for k, t in ts.items()}
    print(
        f"headline: variant={variant} images={n} image_size={args.image_size} bits={bits} "
        f"repeats={args.repeats} gptq_s={med['gptq']:.2f} "
        f"gptq_bank_s={med['gptq+bank:noise']:.2f} gptq_ratio={g:.3f} "
        f"rtn_s={med['rtn']:.3f} rtn_bank_s={med['rtn+bank']:.3f} rtn_ratio={r:.2f} "
        f"peak_rss_gib={rss:.2f} reduced={not full} rtn_only={args.rtn_only}"
    )


if __name__ == "__main__":
    main()
