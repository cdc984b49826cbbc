"""qvec_jax: zero-shot quantization via weight-space arithmetic (arXiv 2604.03420).

The method is two short modules: ``qvec_jax.quant`` (the quantizer, METHOD.md) and
``qvec_jax.trees`` (QV = QAT - FP, patched = FP + lam * QV). Everything else is plumbing;
``quantize_model`` (:mod:`qvec_jax.recipe`) is the data-free quantizer a user deploys.
"""

from .export import export_packed, load_packed
from .merge import MergeSpec, merge_qvs
from .packing import QTensor, dequantize, quantize, size_report
from .paths import (
    Rule,
    add,
    check_same_structure,
    cosine,
    flatten,
    global_norm,
    leaf_norms,
    path_str,
    scale,
    sub,
    unflatten,
    weighted_sum,
)
from .quant import VIT_RULE, QuantSpec, codes_and_scale, fake_quant, fake_quant_tree, ptq
from .recipe import Recipe, quantize_model
from .select import select_lambda
from .trees import HEAD_RULE, patch, quantization_vector

__version__ = "0.1.0"
__all__ = [
    "HEAD_RULE",
    "MergeSpec",
    "VIT_RULE",
    "QTensor",
    "QuantSpec",
    "Recipe",
    "Rule",
    "add",
    "check_same_structure",
    "codes_and_scale",
    "cosine",
    "dequantize",
    "export_packed",
    "fake_quant",
    "fake_quant_tree",
    "flatten",
    "global_norm",
    "leaf_norms",
    "load_packed",
    "merge_qvs",
    "patch",
    "path_str",
    "ptq",
    "quantization_vector",
    "quantize",
    "quantize_model",
    "scale",
    "select_lambda",
    "size_report",
    "sub",
    "unflatten",
    "weighted_sum",
]
