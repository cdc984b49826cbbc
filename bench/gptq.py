"""Time GPTQ of a ViT-B/16-shaped model on CPU: Hessians and quantization separately.

    python bench/gptq.py [--variant B/16] [--images 128] [--image-size 224] [--bits 3]
                         [--batch-size 16] [--ref-layers 3]

Random-init params (the shapes are what costs time, not the values) and uniform random
images in [-1, 1]. Runs ``gptq.gptq_quantize`` (sequential by block, the default) once,
with ``timings``: "hessians" is every forward pass and ``X^T X``, "quantize" the GPTQ
solves; both include their one-off jit compiles. Then a plain NumPy GPTQ (float32, the
reference's lazy batches of 128 columns) on the first ``--ref-layers`` kernels of block 0,
with the Hessians this run collected, against ``gptq.gptq_layer`` on the same inputs.
Peak RSS is the process's maximum. The last line is ``headline: name=value ...``.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import qvec_jax as q
from qvec_jax import gptq as G
from qvec_jax.models import create_model
from qvec_jax.paths import flatten


def numpy_gptq(w_in_out, H, bits, block=128, damp=0.01):
    """Plain NumPy GPTQ in float32 on ``W = w^T [out, in]``, lazy batches, RTN scale."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    W = np.array(w_in_out, np.float32).T.copy()
    s = (np.maximum(np.abs(W).max(axis=1), np.float32(1e-8)) / np.float32(qmax))[:, None]
    H = np.array(H, np.float32).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[np.diag_indices_from(H)] += np.float32(damp) * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    n = W.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, E1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1), np.float32)
        for i in range(i2 - i1):
            Q[:, i1 + i] = np.clip(np.round(W1[:, i] / s[:, 0]), qmin, qmax)
            E1[:, i] = (W1[:, i] - Q[:, i1 + i] * s[:, 0]) / U[i1 + i, i1 + i]
            W1[:, i:] -= np.outer(E1[:, i], U[i1 + i, i1 + i : i2])
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q.T.astype(np.int8)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_layers(params, model, images, args) -> list[dict]:
    """NumPy vs JAX GPTQ on the first kernels of block 0 (FP Hessians of this model)."""
    flat, sel = flatten(params), q.VIT_RULE.select(params)
    pre = "Transformer/encoderblock_0/"
    x, mod = G._block_input(model, params, jnp.asarray(images), pre[:-1], args.batch_size)
    wanted = G._wanted(flat, sel, pre)
    hs = G._hessians(mod, G._sub(flat, pre), x, wanted, args.batch_size)
    rows = []
    for rel in list(hs)[: args.ref_layers]:
        w = flat[f"{pre}{rel}/kernel"]
        w2 = np.asarray(w).reshape(hs[rel].shape[0], -1)
        G.gptq_layer(w2, hs[rel], args.bits)  # compile outside the timing
        t = time.perf_counter()
        codes, _ = jax.block_until_ready(G.gptq_layer(w2, hs[rel], args.bits))
        t_jax = time.perf_counter() - t
        t = time.perf_counter()
        ref = numpy_gptq(w2, np.asarray(hs[rel]), args.bits)
        t_np = time.perf_counter() - t
        agree = float(np.mean(np.asarray(codes) == ref))
        rows.append(dict(layer=rel, shape=w2.shape, jax_s=t_jax, numpy_s=t_np, agree=agree))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ref-layers", type=int, default=3)
    args = ap.parse_args()
    full = (args.variant, args.images, args.image_size) == ("B/16", 128, 224)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or '?'}")
    print(
        f"ViT-{args.variant} at {args.image_size}px, {args.images} calibration images, "
        f"{args.bits} bits, batch {args.batch_size}"
        + ("" if full else "  ** REDUCED setting (the issue's is B/16, 128 images, 224px) **")
    )

    model = create_model(args.variant, num_classes=1000, image_size=args.image_size)
    params = model.init_params(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (args.images, args.image_size, args.image_size, 3))
    images = images.astype(np.float32)
    rss0 = peak_rss_mb()

    timings = {}
    t = time.perf_counter()
    qt = jax.block_until_ready(
        G.gptq_quantize(
            params, model, images, args.bits, batch_size=args.batch_size, timings=timings
        )
    )
    total = time.perf_counter() - t
    n_kernels = len(q.VIT_RULE.select(params))
    print(
        f"gptq_quantize: {n_kernels} kernels in {total:.1f} s: hessians "
        f"{timings['hessians']:.1f} s, quantize {timings['quantize']:.1f} s; "
        f"peak RSS {peak_rss_mb():.0f} MB (after init + images: {rss0:.0f} MB)"
    )

    fq, rtn = q.dequantize(qt), q.ptq(params, args.bits)
    sel = q.VIT_RULE.select(params)
    moved = np.mean([float(jnp.mean(flatten(fq)[p] != flatten(rtn)[p])) for p in sel])
    print(f"weights whose code differs from RTN: {100 * moved:.1f}% (mean over kernels)")

    rows = reference_layers(params, model, images, args)
    for r in rows:
        print(
            f"  {r['layer']:<42} {str(r['shape']):<12} jax {r['jax_s'] * 1e3:8.1f} ms  "
            f"numpy {r['numpy_s'] * 1e3:9.1f} ms  codes equal {100 * r['agree']:.2f}%"
        )
    ref_jax, ref_np = sum(r["jax_s"] for r in rows), sum(r["numpy_s"] for r in rows)
    print(
        f"headline: variant={args.variant} images={args.images} image_size={args.image_size} "
        f"bits={args.bits} hessians_s={timings['hessians']:.1f} "
        f"quantize_s={timings['quantize']:.1f} total_s={total:.1f} "
        f"peak_rss_mb={peak_rss_mb():.0f} ref_layers={len(rows)} ref_jax_s={ref_jax:.2f} "
        f"ref_numpy_s={ref_np:.2f} reduced={not full}"
    )


if __name__ == "__main__":
    main()
