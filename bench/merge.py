"""Time and peak memory of ``q.merge_qvs``: N ViT-B/16-shaped QVs, and the 5 demo QVs.

    python bench/merge.py [--n 2 4 8] [--runs 1] [--demo-runs 7] [--no-reference]

ViT-B/16 part: N random fp32 QVs with the backbone shapes of ``create_model("B/16")``
(``jax.eval_shape``, head left out as ``quantization_vector`` does: 85.8M entries,
0.32 GiB each). For each N and method it prints the wall time, the input bytes read per
second, and the extra peak memory during the call in units of one QV: RSS (a thread
samples /proc/self/statm every 2 ms; baseline: the RSS just before the call) and the
NumPy heap (tracemalloc). Streaming leaf by leaf should keep RSS near 1 (the output)
whatever N. Side by side, in the same process: ``trees.weighted_sum`` (the plain
``jax.tree.map`` mean, the floor) and, for N where it fits in ``--budget-gib``, TIES as
the paper's code does it (all N vectors flattened into one (N, d) matrix, a
``kthvalue`` threshold per row), whose extra memory grows with N. Each (N, method) is
called ``--runs`` times in a row (default 1), one method after another (not
interleaved), with no warm-up call: at the default the time is one call that includes any
compile, and the sampler thread and tracemalloc run during it. Time: the median of the
runs ("x floor": that median over the floor's); memory: the maximum.

Demo part: 5 QVs of the demo model ("demo/4", 16x16 inputs, 0.3M entries); each method's
first call in this process (cold: includes any compile) and the median warm call, wall
and process CPU time (the CPU time is the work; wall also shows the machine's load).
Ends with one ``headline:`` line.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import threading
import time
import tracemalloc

import jax
import numpy as np

import qvec_jax as q
from qvec_jax.models import create_model

METHODS = {
    "mean": q.MergeSpec("mean"),
    "sum": q.MergeSpec("sum"),
    "ties(global)": q.MergeSpec("ties", density=0.2),
    "ties(leaf)": q.MergeSpec("ties", density=0.2, scope="leaf"),
    "dare(mean)": q.MergeSpec("dare", p=0.5),
    "dare(ties)": q.MergeSpec("dare", p=0.5, combine="ties"),
    "model_stock": q.MergeSpec("model_stock"),
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def qv_shapes(variant: str, image_size: int) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of a QV of ``variant``: the param shapes, the head left out."""
    abstract = create_model(variant, num_classes=1000, image_size=image_size).abstract_params()
    return {p: x.shape for p, x in q.flatten(abstract).items() if q.HEAD_RULE.match(p) is None}


def random_qvs(shapes: dict, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        q.unflatten(
            {p: jax.device_put(rng.standard_normal(s, np.float32)) for p, s in shapes.items()}
        )
        for _ in range(n)
    ]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def seconds(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call: CPU time shows the work when the shared
    machine is loaded (it counts every thread of this process, so it can exceed wall)."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def measure(fn) -> tuple[float, int, int]:
    """(seconds, extra peak RSS, extra peak NumPy heap) of one call of ``fn``, in bytes.

    RSS: a thread samples /proc/self/statm every 2 ms, minus the RSS at the start (counts
    XLA buffers too). NumPy heap: tracemalloc's exact peak of what NumPy allocated during
    the call (NumPy reports its buffers to tracemalloc; XLA's are not seen).
    """
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    t.start()
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    dt = time.perf_counter() - t0
    done.set()
    t.join()
    heap = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak[0] = max(peak[0], rss())
    del out
    return dt, peak[0] - base, heap


def paper_style_ties(qvs: list[dict], density: float) -> np.ndarray:
    """TIES as the reference code does it: one (N, d) matrix of flattened vectors."""
    V = np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in qvs])
    m = max(1, round(density * V.shape[1]))
    thr = -np.partition(-np.abs(V), m - 1, axis=1)[:, m - 1 : m]
    T = np.where(np.abs(V) >= thr, V, 0)
    g = np.sign(T.sum(0))
    agree = (np.sign(T) == g) & (T != 0)
    return np.where(agree, T, 0).sum(0) / np.maximum(agree.sum(0), 1)


def bench_vit(ns, runs: int, reference: bool, budget_gib: float) -> dict:
    shapes = qv_shapes("B/16", 224)
    d = sum(int(np.prod(s)) for s in shapes.values())
    print(f"ViT-B/16 QV: {len(shapes)} leaves, {d:,} entries, {4 * d / 2**30:.2f} GiB fp32")
    print(
        "extra peak memory during the call, in QVs: RSS (all of it, the output included), "
        "and the NumPy heap (the working buffers; tracemalloc)"
    )
    head = ("N", "method", "s", "GB/s in", "x floor", "RSS/QV", "heap/QV")
    print("{:>2} {:<26} {:>7} {:>8} {:>8} {:>7} {:>8}".format(*head))
    res = {}
    for n in ns:
        ref = reference and 6 * n * 4 * d / 2**30 < budget_gib  # it holds ~5.5 N QVs
        res |= bench_vit_n(shapes, n, runs, ref, 4 * d)
    return res


def bench_vit_n(shapes: dict, n: int, runs: int, reference: bool, qv_bytes: int) -> dict:
    """``{(n, name): (seconds, RSS / QV, heap / QV)}`` for the N QVs, printed as rows."""
    qvs = random_qvs(shapes, n, seed=n)
    fns = {"floor: trees.weighted_sum": lambda: q.weighted_sum(qvs)}
    fns |= {name: lambda s=spec: q.merge_qvs(qvs, s) for name, spec in METHODS.items()}
    if reference:
        fns["paper-style ties (N, d)"] = lambda: paper_style_ties(qvs, 0.2)
    res = {}
    for name, fn in fns.items():
        ts, mems, heaps = zip(*(measure(fn) for _ in range(runs)))
        res[n, name] = (statistics.median(ts), max(mems) / qv_bytes, max(heaps) / qv_bytes)
    floor = res[n, "floor: trees.weighted_sum"][0]
    for name in fns:
        t, mem, heap = res[n, name]
        print(
            f"{n:>2} {name:<26} {t:7.2f} {n * qv_bytes / t / 1e9:8.2f} {t / floor:8.2f}"
            f" {mem:7.2f} {heap:8.2f}"
        )
    return res


def bench_demo(runs: int) -> dict:
    shapes = qv_shapes("demo/4", 16)
    qvs = random_qvs(shapes, 5)
    print(
        f"\n5 demo QVs ('demo/4', 16x16): {len(shapes)} leaves, "
        f"{sum(int(np.prod(s)) for s in shapes.values()):,} entries each"
    )
    out = {}
    for name, spec in METHODS.items():  # plain wall time: no sampler thread, no tracemalloc
        (cold, cold_cpu), *warm = [
            seconds(lambda s=spec: q.merge_qvs(qvs, s)) for _ in range(1 + runs)
        ]
        wall, cpu = (1e3 * statistics.median(t) for t in zip(*warm))
        out[name] = (cold, statistics.median(t for t, _ in warm))
        print(
            f"   {name:<14} cold {1e3 * cold:7.1f} ms (cpu {1e3 * cold_cpu:6.1f})   warm "
            f"{wall:6.1f} ms (cpu {cpu:6.1f}) [{1e3 * min(t for t, _ in warm):.1f}, "
            f"{1e3 * max(t for t, _ in warm):.1f}]"
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--runs", type=int, default=1, help="ViT-B/16 runs per (N, method)")
    ap.add_argument("--demo-runs", type=int, default=7)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--budget-gib", type=float, default=6.0, help="skip the (N, d) reference above")
    args = ap.parse_args(argv)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed buffers leave RSS: a fair baseline
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}, {jax.default_backend()}, jax {jax.__version__}"
    )
    demo = bench_demo(args.demo_runs)
    print()
    res, n = bench_vit(args.n, args.runs, not args.no_reference, args.budget_gib), max(args.n)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS of the whole run {rss_gib:.2f} GiB; load {os.getloadavg()[0]:.1f}")
    refs = [k for k in res if k[1].startswith("paper-style")]
    head = [
        f"demo5_warm_ms_max={1e3 * max(w for _, w in demo.values()):.1f}",
        f"demo5_cold_ms_max={1e3 * max(c for c, _ in demo.values()):.1f}",
        f"vitb16_n{n}_ties_s={res[n, 'ties(global)'][0]:.2f}",
        f"vitb16_n{n}_rss_peak_per_qv_max={max(res[n, m][1] for m in METHODS):.2f}",
    ]
    if refs:
        k = max(refs)
        head.append(f"paper_style_ties_n{k[0]}_rss_peak_per_qv={res[k][1]:.2f}")
        head.append(f"merge_ties_n{k[0]}_rss_peak_per_qv={res[k[0], 'ties(global)'][1]:.2f}")
    print("headline: " + " ".join(head))


if __name__ == "__main__":
    main()
