"""Quantization-vector arithmetic on pytrees (METHOD.md, "The idea in one line").

    QV_D    = QAT_D - FP_D              over the backbone; the head is excluded
    patched = FP_R + lam * QV_D         lam = 1 is zero-shot

Works on any pytree: Flax Linen ``params`` dicts, ``nnx.State``, plain nested dicts,
with float and integer leaves mixed. Leaves are addressed by "/"-joined key paths,
e.g. ``Transformer/encoderblock_3/LayerNorm_0/scale``; one small ``Rule`` type over
those paths (``qvec_jax.paths``) selects what QAT and PTQ quantize, what a QV leaves
out, and what counts in the model size. A QV is a plain nested dict holding only the
leaves it covers, so it can be added to a receiver whose head has a different shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .paths import (  # noqa: F401  (re-exported: the rule type belongs to the method)
    PyTree,
    Rule,
    check_finite,
    check_lam,
    check_lambdas,
    check_same_structure,
    flatten,
    is_float,
    path_str,
    unflatten,
)

HEAD_RULE = Rule([r"^head/", r"^pre_logits/"])  # what a QV leaves out (METHOD.md)


@jax.jit
def _sub(a, b):
    dt = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    return a.astype(dt) - b.astype(dt)


@jax.jit
def _axpy(r, v, lam):
    return (r.astype(jnp.float32) + lam * v.astype(jnp.float32)).astype(r.dtype)


def quantization_vector(
    qat_params: PyTree,
    fp_params: PyTree,
    *,
    exclude: Rule = HEAD_RULE,
    require_nonzero: bool = False,
) -> dict:
    """``QV = QAT - FP`` (METHOD.md) over every float leaf not matched by ``exclude``.

    Returns a nested dict of the covered leaves only (at least float32, so a bf16
    fine-tune loses nothing). Biases and norms are included, the head is not; integer
    leaves (step counters, RNG keys) never are. A tree with no such leaf is refused (the
    QV would be empty). Eager calls check structure and NaN/Inf; under ``jit`` the
    NaN/Inf check is skipped. ``require_nonzero``: refuse an all-zero QV (QAT and FP
    equal on every covered leaf: the same run passed twice); eager calls only.
    """
    fq, ff = flatten(qat_params), flatten(fp_params)
    paths = [p for p in fq if exclude.match(p) is None and is_float(fq[p])]
    check_same_structure(qat_params, fp_params, ("qat_params", "fp_params"))
    if not paths:
        raise ValueError(
            f"qat_params has no float leaf outside the excluded ones ({exclude!r}); "
            "the QV would be empty: pass the models' params trees"
        )
    check_finite(qat_params, "qat_params")
    check_finite(fp_params, "fp_params")
    qv = {p: _sub(fq[p], ff[p]) for p in paths}
    traced = any(isinstance(v, jax.core.Tracer) for v in qv.values())
    if require_nonzero and not traced and not any(bool(jnp.any(v != 0)) for v in qv.values()):
        raise ValueError(
            "qat_params and fp_params are equal on every QV leaf, so the QV is all zeros: "
            "the two checkpoints are the same run; pass the QAT and the FP fine-tune"
        )
    return unflatten(qv)


def patch(receiver_params: PyTree, qv: PyTree, lam: float = 1.0) -> PyTree:
    """``receiver + lam * qv`` on the QV's leaves (METHOD.md); every other leaf is untouched.

    Each patched leaf keeps the receiver's dtype (and sharding). Every QV path must
    exist in the receiver with the same shape. ``lam`` must be a finite real number
    (float32 too; not a string or bool). Eager calls check NaN/Inf in the inputs; under
    ``jit`` (a traced ``lam`` or tree) those value checks are skipped.
    """
    fr, fv = flatten(receiver_params), flatten(qv)
    check_same_structure(receiver_params, qv, ("receiver_params", "qv"), paths=list(fv))
    for p, v in fv.items():
        if not is_float(fr[p]) or not is_float(v):
            raise ValueError(f"{p}: can only patch float leaves, got {fr[p].dtype} + {v.dtype}")
    check_finite(qv, "qv")
    check_finite({p: fr[p] for p in fv}, "receiver_params")
    lam = jnp.float32(check_lam(lam))
    new = {p: _axpy(fr[p], fv[p], lam) if p in fv else x for p, x in fr.items()}
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(receiver_params), list(new.values())
    )
