"""The predictors of "when does QV transfer help?" (issue 21): per donor -> receiver
pair, the relation of the two views (same source, class overlap, shared rotation, flip,
inversion), the receiver's ceiling and the cosine between the two tasks' QVs.
"""

from __future__ import annotations

import jax
import numpy as np

from qvec_jax import checkpoints, trees
from qvec_jax.data import get_task

__all__ = ["cosines", "pair_features"]


def _qv_vector(meta: dict, task: str) -> np.ndarray:
    ck = meta["checkpoints"]
    fp, _ = checkpoints.restore_params(ck[f"{task}/fp"]["path"])
    qat, _ = checkpoints.restore_params(ck[f"{task}/qat"]["path"])
    qv = trees.quantization_vector(qat, fp)
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(qv)])


def cosines(meta: dict, tasks: list[str]) -> dict[tuple, float]:
    vecs = {t: _qv_vector(meta, t) for t in tasks}
    unit = {t: v / (np.linalg.norm(v) or 1.0) for t, v in vecs.items()}
    return {(r, d): float(unit[r] @ unit[d]) for r in tasks for d in tasks if r != d}


def _tertile(x: float, cuts) -> str:
    lo, hi = cuts
    return f"low (< {lo:.3g})" if x < lo else f"high (>= {hi:.3g})" if x >= hi else "middle"


def pair_features(tasks: list[str], ceilings: dict[str, float], cos: dict) -> dict[tuple, dict]:
    """``{(receiver, donor): {predictor: group}}``: the donor-receiver relation, the
    receiver's ceiling (PTQ(QAT_R) - PTQ(FP_R), in tertiles) and the QV cosine (tertiles)."""
    c_cuts = np.quantile(list(ceilings.values()), [1 / 3, 2 / 3]) if ceilings else (0, 0)
    q_cuts = np.quantile(list(cos.values()), [1 / 3, 2 / 3]) if cos else (0, 0)
    out = {}
    for r in tasks:
        vr, sr = get_task(r).view, get_task(r).sources
        for d in (d for d in tasks if d != r):
            vd, same = get_task(d).view, get_task(d).sources == sr
            cls_r, cls_d = set(vr.classes or range(10)), set(vd.classes or range(10))
            classes = (
                "other source"
                if not same
                else "identical"
                if cls_r == cls_d
                else "partial"
                if cls_r & cls_d
                else "disjoint"
            )
            f = {
                "same source": "yes" if same else "no",
                "class overlap": classes,
                "shared rotation": "yes" if vr.rot90 == vd.rot90 else "no",
                "shared flip": "yes" if vr.hflip == vd.hflip else "no",
                "shared inversion": "yes" if vr.invert == vd.invert else "no",
            }
            if r in ceilings:
                f["receiver ceiling"] = _tertile(ceilings[r], c_cuts)
            if (r, d) in cos:
                f["QV cosine"] = _tertile(cos[(r, d)], q_cuts)
            out[(r, d)] = f
    return out
