"""The architecture fields of an imported checkpoint's config, or a refusal naming the field.

A ViT's weights do not say everything about it: the LayerNorm epsilon, the MLP's
activation and some switches (a qkv bias, the pooling) live in the config next to the
weights. :func:`read_arch` reads them from

- a Hugging Face ``config.json`` (``ViTConfig``): ``layer_norm_eps`` (HF's default is
  1e-12, the Google checkpoints' 1e-6), ``hidden_act``, ``qkv_bias``, ``num_channels``,
  ``pooler_act``;
- a timm ``config.json`` (``architecture``, ``global_pool``, ``model_args``, as
  ``timm.models.push_to_hf_hub`` / ``save_for_hf`` write it): ``act_layer``, ``qkv_bias``,
  ``global_pool``, ``class_token``, ``no_embed_class``, ``pre_norm``, ``fc_norm``,
  ``init_values``, ``qk_norm``, ``reg_tokens``, ``norm_layer``, ``in_chans`` (timm's ViT
  LayerNorm epsilon is 1e-6);
- a qvec checkpoint's meta (``checkpoints.ARCH_KEYS``).

It returns the keyword arguments of ``models.vit.create_model`` (``layer_norm_eps``,
``activation``) and refuses, in one line naming the field and its value, what the model
cannot represent: an activation it does not implement, no qkv bias, another pooling.
"""

from __future__ import annotations

import math
from pathlib import Path

from qvec_jax.checkpoints import ARCH_KEYS, CheckpointError
from qvec_jax.models.vit import ACTIVATIONS, LAYER_NORM_EPS, check_arch

#: Hugging Face ``hidden_act`` names -> ours (``transformers.activations.ACT2FN``): the
#: exact GELU, and the formulas that are its tanh approximation.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
}
#: timm ``act_layer`` names -> ours (``timm.layers.get_act_layer``).
TIMM_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh"}

#: timm ``model_args`` this ViT has only at these values (the timm defaults).
_TIMM_SWITCHES = {
    "class_token": (True,),
    "no_embed_class": (False,),
    "pre_norm": (False,),
    "fc_norm": (None, False),
    "init_values": (None,),
    "qk_norm": (False,),
    "reg_tokens": (0,),
    "norm_layer": (None,),
    "in_chans": (3,),
}


def _refuse(path: Path, field: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: config {field}={value!r}: {why}")


def _eps(path: Path, field: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0 < value < math.inf):
        raise _refuse(path, field, value, "a LayerNorm epsilon must be a positive number")
    return float(value)


def _activation(path: Path, field: str, value, names: dict) -> str:
    if value is None:
        return "gelu"
    if value not in names:
        raise _refuse(
            path, field, value,
            f"this ViT implements the activations {', '.join(ACTIVATIONS)} (read from "
            f"{', '.join(repr(n) for n in names)}); convert a model that uses one of them",
        )  # fmt: skip
    return names[value]


def _hf(cfg: dict, path: Path, has_pooler: bool) -> dict:
    if cfg.get("qkv_bias", True) is not True:
        raise _refuse(path, "qkv_bias", cfg["qkv_bias"], "this ViT always has query/key/value "
                      "biases; convert a model with qkv_bias=True")  # fmt: skip
    if cfg.get("num_channels", 3) != 3:
        raise _refuse(path, "num_channels", cfg["num_channels"], "this ViT reads RGB images (3)")
    if has_pooler and cfg.get("pooler_act", "tanh") != "tanh":
        raise _refuse(path, "pooler_act", cfg["pooler_act"], "this ViT's pre_logits use tanh")
    return dict(
        layer_norm_eps=_eps(path, "layer_norm_eps", cfg.get("layer_norm_eps", 1e-12)),
        activation=_activation(path, "hidden_act", cfg.get("hidden_act"), HF_ACTIVATIONS),
    )


def _timm(cfg: dict, path: Path) -> dict:
    args = cfg.get("model_args") or {}
    if not isinstance(args, dict):
        raise _refuse(path, "model_args", args, "expected a JSON object")
    arch = str(cfg.get("architecture", ""))
    if "quickgelu" in arch:
        raise _refuse(path, "architecture", arch, "QuickGELU is not an activation this ViT "
                      f"implements ({', '.join(ACTIVATIONS)})")  # fmt: skip
    if args.get("qkv_bias", True) is not True:
        raise _refuse(path, "model_args.qkv_bias", args["qkv_bias"], "this ViT always has "
                      "query/key/value biases")  # fmt: skip
    for where, d in (("global_pool", cfg), ("model_args.global_pool", args)):
        if d.get("global_pool", "token") != "token":
            raise _refuse(path, where, d["global_pool"], "this ViT pools the class token "
                          "(global_pool='token')")  # fmt: skip
    for key, allowed in _TIMM_SWITCHES.items():
        if key in args and args[key] not in allowed:
            raise _refuse(path, f"model_args.{key}", args[key], "this ViT has only "
                          f"{key}={allowed[0]!r} (timm's default)")  # fmt: skip
    act = _activation(path, "model_args.act_layer", args.get("act_layer"), TIMM_ACTIVATIONS)
    return dict(layer_norm_eps=LAYER_NORM_EPS, activation=act)


def read_arch(extra: dict, layout: str, path: Path, flat: dict) -> dict:
    """``create_model`` keyword arguments (``layer_norm_eps``, ``activation``) of a
    checkpoint of ``layout`` whose config (or qvec meta) is ``extra`` ({} when it has
    none: the defaults, Google's; an HF file without its config.json gets HF's default
    epsilon 1e-12); a value the model cannot represent raises a CheckpointError."""
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: its config is not a JSON object")
    if layout == "qvec":
        arch = {k: extra[k] for k in ARCH_KEYS if extra.get(k) is not None}
        try:
            check_arch(arch.get("layer_norm_eps", LAYER_NORM_EPS), arch.get("activation", "gelu"))
        except ValueError as e:
            raise CheckpointError(f"{path}: checkpoint meta: {e}") from None
        return arch
    if layout == "hf":
        return _hf(extra, path, has_pooler="pre_logits/kernel" in flat)
    if layout == "timm" and extra:
        return _timm(extra, path)
    return {}
