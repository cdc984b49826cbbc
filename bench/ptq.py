"""Time ``q.ptq`` on a ViT-B/16-shaped fp32 tree against a memory-bound floor and NumPy.

    python bench/ptq.py [--bits 3] [--runs 7] [--granularity channel]

Prints, for the 72 quantized kernels (84,934,656 weights, read once and written once):
ms and GB/s of ``q.ptq``; the floor, a jitted per-leaf copy (``-x``) of the same leaves
in the same run; a straightforward NumPy per-leaf quantizer (same formula, METHOD.md);
PyTorch per-row on ``[out, in]`` matrices if torch is installed; and peak RSS.
All in one process: one warm-up call of each, then ``--runs`` runs interleaved (each run
calls every variant once). Times are medians over ``--runs``, with [min, max]; ratios are
taken run by run, then their median. Peak RSS is the whole process's ``ru_maxrss`` (the
JAX tree, the NumPy and torch inputs and every variant's output), not ``q.ptq``'s own.
The last line is ``headline: name=value ...``.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import qvec_jax as q


def vit_b16(seed=0, num_classes=1000) -> dict:
    """Random fp32 params with the shapes of the Google ViT-B/16 (86.6M params)."""
    d, heads, hd, mlp = 768, 12, 64, 3072
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s, np.float32) * np.float32(0.02)
    t = {"posembed_input": {"pos_embedding": r(1, 197, d)}}
    for i in range(12):
        att = {
            n: {"kernel": r(d, heads, hd), "bias": r(heads, hd)} for n in ("query", "key", "value")
        }
        att["out"] = {"kernel": r(heads, hd, d), "bias": r(d)}
        t[f"encoderblock_{i}"] = {
            "LayerNorm_0": {"scale": r(d), "bias": r(d)},
            "MultiHeadDotProductAttention_1": att,
            "LayerNorm_2": {"scale": r(d), "bias": r(d)},
            "MlpBlock_3": {
                "Dense_0": {"kernel": r(d, mlp), "bias": r(mlp)},
                "Dense_1": {"kernel": r(mlp, d), "bias": r(d)},
            },
        }
    t["encoder_norm"] = {"scale": r(d), "bias": r(d)}
    tree = {
        "embedding": {"kernel": r(16, 16, 3, d), "bias": r(d)},
        "cls": r(1, 1, d),
        "Transformer": t,
        "head": {"kernel": r(d, num_classes), "bias": r(num_classes)},
    }
    return jax.tree.map(jnp.asarray, tree)


def timeit(fns: dict, runs: int) -> dict:
    """Seconds per call of each fn, after a warm-up, interleaved run by run so that all
    see the same background load (this machine is shared): ``{name: [t_run0, ...]}``."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    ts = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts[k].append(time.perf_counter() - t0)
    return ts


def numpy_ptq(leaves: dict, axes: dict, bits: int, granularity: str) -> dict:
    """The METHOD.md quantizer, written plainly in NumPy, one leaf at a time."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    out = {}
    for p, w in leaves.items():
        red = q.quant.reduce_axes(w.ndim, granularity, axes[p])
        s = np.maximum(np.abs(w).max(axis=red, keepdims=True), np.float32(1e-8)) / np.float32(qmax)
        out[p] = np.clip(np.round(w / s), qmin, qmax) * s
    return out


def torch_ptq(mats: list, bits: int) -> list:
    """The authors' formula: per-row scales of PyTorch-layout ``[out, in]`` weights."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    out = []
    for w in mats:
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / qmax
        out.append((w / scale).round().clamp(qmin, qmax) * scale)
    return out


def to_torch_layout(w: np.ndarray, axes: tuple) -> np.ndarray:
    """``[out, in]`` matrix of a kernel whose output axes are ``axes`` (trailing)."""
    n_out = math.prod(w.shape[a] for a in axes)
    return np.ascontiguousarray(w.reshape(-1, n_out).T)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--granularity", default="channel", choices=["channel", "tensor"])
    ap.add_argument("--no-numpy", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    params = vit_b16()
    sel = q.VIT_RULE.select(params)
    flat = q.flatten(params)
    leaves = {p: flat[p] for p in sel}
    n = sum(x.size for x in leaves.values())
    nbytes = 2 * 4 * n  # each quantized weight is read once and written once
    print(
        f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), jax {jax.__version__}"
    )
    print(
        f"tree: {sum(x.size for x in flat.values()):,} params; {len(sel)} kernels, {n:,} "
        f"quantized weights; bits={args.bits}, granularity={args.granularity}"
    )

    fns = {"floor (jitted copy -x)": lambda: [neg(x) for x in leaves.values()]}
    fns["q.ptq"] = lambda: q.ptq(params, args.bits, granularity=args.granularity)
    if not args.no_numpy:
        host = {p: np.asarray(x) for p, x in leaves.items()}
        fns["numpy per-leaf"] = lambda: numpy_ptq(host, sel, args.bits, args.granularity)
    if not args.no_torch and args.granularity == "channel":
        try:
            import torch
        except ImportError:
            print("torch not installed: PyTorch per-row comparison skipped")
        else:
            mats = [to_torch_layout(np.asarray(x), sel[p]) for p, x in leaves.items()]
            mats = [torch.from_numpy(m) for m in mats]
            fns[f"torch per-row ({torch.get_num_threads()} threads)"] = lambda: torch_ptq(
                mats, args.bits
            )
    neg = jax.jit(lambda x: -x)
    ts = timeit(fns, args.runs)
    floor = ts["floor (jitted copy -x)"]
    print(f"{args.runs} interleaved runs; median [min, max]; ratios are per run, then median")
    for name, t in ts.items():
        med = statistics.median(t)
        ratio = [a / b for a, b in zip(t, floor)]
        print(
            f"{name:<28} {1e3 * med:8.1f} ms [{1e3 * min(t):.1f}, {1e3 * max(t):.1f}]"
            f"  {nbytes / med / 1e9:6.2f} GB/s  {statistics.median(ratio):5.2f}x floor"
            f" [{min(ratio):.2f}, {max(ratio):.2f}]"
        )
    for name, t in ts.items():
        if name not in ("q.ptq", "floor (jitted copy -x)"):
            r = [a / b for a, b in zip(t, ts["q.ptq"])]
            print(f"q.ptq is {statistics.median(r):.2f}x faster than {name}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    tree_gib = 4 * sum(x.size for x in flat.values()) / 2**30
    print(f"peak RSS {rss:.2f} GiB (the tree itself: {tree_gib:.2f} GiB)")
    ptq_x = statistics.median(a / b for a, b in zip(ts["q.ptq"], floor))
    print(
        f"headline: ptq_ms={1e3 * statistics.median(ts['q.ptq']):.1f} "
        f"floor_ms={1e3 * statistics.median(floor):.1f} ptq_x_floor={ptq_x:.2f} "
        f"peak_rss_gib={rss:.2f}"
    )


if __name__ == "__main__":
    main()
