"""Which part of a quantization vector transfers? An ablation on a finished demo run.

For every cross-task pair (D, R) of ``qvec demo``'s fine-tunes, patch the receiver at
lambda = 1 with only one part of QV_D, selected by a ``q.Rule`` over param paths, then
PTQ and evaluate on R's test split. Prints the win rate and mean delta per part.

    python examples/qv_parts.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import qvec_jax as q
from qvec_jax import checkpoints, data
from qvec_jax.evaluate import accuracy

PARTS = {
    "whole QV": q.Rule([r".*"]),
    "quantized kernels (VIT_RULE)": q.VIT_RULE,
    "everything else (biases, norms, embeddings)": None,  # the complement of VIT_RULE
    "attention kernels": q.Rule([r"MultiHeadDotProductAttention_1/\w+/kernel$"]),
    "MLP kernels": q.Rule([r"MlpBlock_3/Dense_\d/kernel$"]),
    "first half of the blocks": q.Rule([r"encoderblock_[01]/"]),
    "second half of the blocks": q.Rule([r"encoderblock_[23]/"]),
}


def part_of(qv: dict, rule) -> dict:
    """The leaves of ``qv`` that ``rule`` selects (``None``: those VIT_RULE does not)."""
    flat = q.flatten(qv)
    if rule is None:
        return q.unflatten({p: x for p, x in flat.items() if q.VIT_RULE.match(p) is None})
    return q.unflatten({p: x for p, x in flat.items() if rule.match(p) is not None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir", help="a `qvec demo` workdir (holds runs/ and demo.json)")
    args = ap.parse_args()
    root = Path(args.demo_dir)
    tasks = json.loads((root / "demo.json").read_text())["tasks"]
    ck = {
        (t, m): checkpoints.restore_params(root / "runs" / t / m / "params")
        for t in tasks
        for m in ("fp", "qat")
    }
    qvs = {t: q.quantization_vector(ck[t, "qat"][0], ck[t, "fp"][0]) for t in tasks}
    deltas = {name: [] for name in PARTS}
    for r in tasks:
        fp, meta = ck[r, "fp"]
        bits, model = meta["bits"], checkpoints.model_from_meta(meta)
        test = data.load_split(r, "test", image_size=meta["image_size"])
        base = accuracy(model, fp, test, bits=bits, batch_size=1000)
        for d in tasks:
            if d == r:
                continue
            for name, rule in PARTS.items():
                acc = accuracy(
                    model, q.patch(fp, part_of(qvs[d], rule), 1.0), test, bits=bits, batch_size=1000
                )
                deltas[name].append(acc - base)
        print(f"receiver {r} done", flush=True)
    print("\n| part of QV_D added at lambda=1 | wins | mean delta (pts) |")
    print("|---|---|---|")
    for name, ds in deltas.items():
        wins = sum(x > 0 for x in ds)
        print(f"| {name} | {wins}/{len(ds)} | {100 * statistics.mean(ds):+.1f} |")


if __name__ == "__main__":
    main()
