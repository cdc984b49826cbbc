"""What verifying a checkpoint adds to a ViT-B/16 params restore.

    python bench/restore_checksum.py [--runs 5] [--dir /tmp]

A ViT-B/16-shaped tree (1000-class head, ~86.6M float32 values, random: the cost does
not depend on the values) is saved once with ``checkpoints.save_params`` into a temporary
directory. Then ``restore_params`` is timed without (``verify_data=False``) and with
verification (CRC-32 of every leaf against the meta, and the NaN/Inf check), interleaved
run by run so both see the same background load and page cache; medians over ``--runs``
after one warm-up restore each. The two parts of the verification are also timed alone on
the restored tree. Ends with one ``headline:`` line.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from qvec_jax import checkpoints as ck
from qvec_jax.models import vit
from qvec_jax.paths import flatten


def vit_b16_tree(seed: int = 0) -> dict:
    """Random float32 params with ViT-B/16's shapes (from ``jax.eval_shape``, no init)."""
    model = vit.create_model("B/16", num_classes=1000, image_size=224)
    shapes = jax.eval_shape(lambda: vit.init_params(model, 0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.random(s.shape, np.float32) - 0.5, shapes)


def median_s(fn, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the temporary checkpoint goes")
    args = ap.parse_args()

    params = vit_b16_tree()
    n = sum(x.size for x in jax.tree.leaves(params))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = ck.save_params(os.path.join(tmp, "vit_b16"), params, {"variant": "B/16"})
        del params
        plain = lambda: ck.restore_params(path, verify_data=False)  # noqa: E731
        checked = lambda: ck.restore_params(path)  # noqa: E731
        plain(), checked()  # warm-up: page cache, orbax imports
        times = {"restore": [], "restore+verify": []}
        for _ in range(args.runs):  # interleaved
            for name, fn in (("restore", plain), ("restore+verify", checked)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        tree, _ = plain()
        flat = flatten(tree)
        crc = median_s(lambda: [ck._crc32(x) for x in flat.values()], args.runs)
        finite = median_s(lambda: [np.isfinite(x).all() for x in flat.values()], args.runs)

    med = {k: statistics.median(v) for k, v in times.items()}
    mb = 4 * n / 1e6
    print(f"ViT-B/16 params: {len(flat)} leaves, {n:,} float32 values ({mb:.0f} MB)")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"median of {args.runs} runs")  # fmt: skip
    print(f"{'':<22}{'seconds':>9}")
    for k, v in med.items():
        print(f"{k:<22}{v:>9.3f}")
    print(f"{'  crc32 of all leaves':<22}{crc:>9.3f}   ({mb / crc:,.0f} MB/s)")
    print(f"{'  NaN/Inf check':<22}{finite:>9.3f}")
    extra = med["restore+verify"] - med["restore"]
    print(
        f"headline: restore_s={med['restore']:.3f} restore_verified_s={med['restore+verify']:.3f} "
        f"verify_adds_s={extra:.3f} verify_adds_pct={100 * extra / med['restore']:.1f} "
        f"crc32_s={crc:.3f} finite_s={finite:.3f} mb={mb:.0f}"
    )


if __name__ == "__main__":
    main()
