"""Time ``q.ptq`` on a ViT-B/16-shaped fp32 tree against memory-bound floors and NumPy.

    python bench/ptq.py [--bits 3] [--runs 7] [--granularity channel] [--small]

For the 72 quantized kernels (84,934,656 weights, read once and written once) it prints
ms, GB/s and the ratios to two floors of:

- the floor, a jitted per-leaf copy (``-x``) of the same leaves, one call per leaf;
- ``copy, one jit``: the same copies as one jitted call;
- the byte floor, one jitted in-place (donated) ``-x`` of one array of as many weights:
  one read and one write, no per-leaf cost and no allocation (on CPU the page faults of
  fresh output buffers can cost more than the bytes);
- ``q.ptq``: one jitted call, the NaN/Inf check folded in, this backend's default path;
- the fake-quant as one jitted program (as ``grid.ptq_jit`` runs it), leaf by leaf and
  grouped (same-shaped leaves stacked: ``quant.fake_quant_leaves``), and the whole tree
  under jit, which also copies the leaves it does not quantize to the outputs;
- the previous ``q.ptq``: a NaN/Inf check per leaf, then a jitted call per leaf;
- a straightforward NumPy per-leaf quantizer (same formula, METHOD.md), and PyTorch
  per-row on ``[out, in]`` matrices if torch is installed;

and peak RSS. It first checks that the per-leaf, grouped and ``q.ptq`` outputs are
bit-identical. ``--small``: a ViT-S/16-shaped tree, 3 runs, no NumPy or torch.
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
from qvec_jax import quant
from qvec_jax.paths import check_finite


def vit_b16(seed=0, num_classes=1000, d=768, heads=12, mlp=3072) -> dict:
    """Random fp32 params with the shapes of the Google ViT-B/16 (86.6M params); other
    widths give the other sizes (ViT-S/16: ``d=384, heads=6, mlp=1536``)."""
    hd = d // heads
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


def jax_variants(params, sel, leaves, args) -> dict:
    """The JAX variants and floors: ``{name: fn}``, floors first."""
    bits, gran = args.bits, args.granularity
    xs, axes = list(leaves.values()), [sel[p] for p in leaves]
    n = sum(x.size for x in xs)
    neg = jax.jit(lambda x: -x)
    neg_all = jax.jit(lambda xs: [-x for x in xs])
    neg_in_place = jax.jit(lambda x: -x, donate_argnums=0)
    flat = [jnp.asarray(np.random.default_rng(1).standard_normal(n, np.float32))]

    def byte_floor():  # the output takes the input's buffer: no allocation, no page faults
        flat[0] = neg_in_place(flat[0])
        return flat[0]

    fq = {
        g: jax.jit(
            lambda xs, g=g: quant.fake_quant_leaves(xs, axes, bits, granularity=gran, grouped=g)
        )
        for g in (False, True)
    }

    tree_jit = jax.jit(lambda t: q.fake_quant_tree(t, q.QuantSpec(bits, gran)))

    def previous_ptq():  # the q.ptq before grouping: a NaN/Inf check and a call per leaf
        check_finite(params, "params")
        return [q.fake_quant(x, bits, granularity=gran, channel_axes=a) for x, a in zip(xs, axes)]

    return {
        "floor (jitted copy -x)": lambda: [neg(x) for x in xs],
        "copy, one jit": lambda: neg_all(xs),
        "byte floor (one array -x)": byte_floor,
        "q.ptq": lambda: q.ptq(params, bits, granularity=gran),
        "fake-quant per-leaf, jit": lambda: fq[False](xs),
        "fake-quant grouped, jit": lambda: fq[True](xs),
        "whole tree, jit (ptq_jit)": lambda: tree_jit(params),
        "previous q.ptq (per leaf)": previous_ptq,
    }


def other_variants(sel, leaves, args) -> dict:
    """NumPy and (if installed, per channel) PyTorch: ``{name: fn}``."""
    fns = {}
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
    return fns


def identical(fns: dict, leaves) -> bool:
    """Whether per-leaf, grouped and ``q.ptq`` give the same bits."""
    ref = [np.asarray(x) for x in fns["fake-quant per-leaf, jit"]()]
    grouped = [np.asarray(x) for x in fns["fake-quant grouped, jit"]()]
    out = q.flatten(fns["q.ptq"]())
    via_ptq = [np.asarray(out[p]) for p in leaves]
    return all(
        np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(ref, grouped, via_ptq)
    )


def report(ts: dict, nbytes: int, runs: int) -> dict:
    """Print each variant's time, GB/s and ratio to the floor; return the median ratios
    ``{name: x}`` to the per-leaf copy floor and to the byte floor."""
    floor, byte = ts["floor (jitted copy -x)"], ts["byte floor (one array -x)"]
    print(f"{runs} interleaved runs; median [min, max]; ratios are per run, then median")
    print(f"{'':<31} {'ms':>8} {'[min, max]':>16} {'GB/s':>7} {'x floor':>8} {'x bytes':>8}")
    xs = {}
    for name, t in ts.items():
        med = statistics.median(t)
        r = [a / b for a, b in zip(t, floor)]
        xs[name] = statistics.median(r), statistics.median(a / b for a, b in zip(t, byte))
        span = f"[{1e3 * min(t):.1f}, {1e3 * max(t):.1f}]"
        print(
            f"{name:<31} {1e3 * med:8.2f} {span:>16} {nbytes / med / 1e9:7.2f} "
            f"{xs[name][0]:8.2f} {xs[name][1]:8.2f}"
        )
    for name, t in ts.items():
        if name in ("numpy per-leaf", "previous q.ptq (per leaf)") or name.startswith("torch"):
            r = [a / b for a, b in zip(t, ts["q.ptq"])]
            print(f"q.ptq is {statistics.median(r):.2f}x faster than {name}")
    return xs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--runs", type=int, default=None, help="default 7, or 3 with --small")
    ap.add_argument("--granularity", default="channel", choices=["channel", "tensor"])
    ap.add_argument("--no-numpy", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--small", action="store_true", help="ViT-S/16 shapes, 3 runs, JAX only")
    args = ap.parse_args(argv)
    if args.small:
        args.no_numpy = args.no_torch = True
    runs = args.runs or (3 if args.small else 7)

    params = vit_b16(d=384, heads=6, mlp=1536) if args.small else vit_b16()
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
        f"quantized weights; bits={args.bits}, granularity={args.granularity}; "
        f"q.ptq {'grouped' if quant.grouped_default() else 'per-leaf'} on this backend"
    )
    fns = {**jax_variants(params, sel, leaves, args), **other_variants(sel, leaves, args)}
    same = identical(fns, leaves)
    print(f"per-leaf, grouped and q.ptq outputs bit-identical: {same}")
    ts = timeit(fns, runs)
    xs = report(ts, nbytes, runs)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    tree_gib = 4 * sum(x.size for x in flat.values()) / 2**30
    print(f"peak RSS {rss:.2f} GiB (the tree itself: {tree_gib:.2f} GiB)")
    ms = {k: 1e3 * statistics.median(t) for k, t in ts.items()}
    print(
        f"headline: ptq_ms={ms['q.ptq']:.2f} floor_ms={ms['floor (jitted copy -x)']:.2f} "
        f"ptq_x_floor={xs['q.ptq'][0]:.2f} peak_rss_gib={rss:.2f} "
        f"perleaf_ms={ms['fake-quant per-leaf, jit']:.2f} "
        f"grouped_ms={ms['fake-quant grouped, jit']:.2f} copy_jit_ms={ms['copy, one jit']:.2f} "
        f"byte_floor_ms={ms['byte floor (one array -x)']:.2f} "
        f"perleaf_x_bytes={xs['fake-quant per-leaf, jit'][1]:.2f} "
        f"grouped_x_bytes={xs['fake-quant grouped, jit'][1]:.2f} "
        f"ptq_x_bytes={xs['q.ptq'][1]:.2f} "
        f"previous_ptq_ms={ms['previous q.ptq (per leaf)']:.2f} "
        f"tree_jit_ms={ms['whole tree, jit (ptq_jit)']:.2f} "
        f"grouped_default={int(quant.grouped_default())} identical={int(same)} "
        f"backend={jax.default_backend()}"
    )


if __name__ == "__main__":
    main()
