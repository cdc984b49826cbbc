"""Vision Transformer in Flax Linen, with the original Google ``vision_transformer`` layout.

Param tree (exactly the key names of the published ``ViT-B_16.npz`` checkpoints)::

    embedding/{kernel [p,p,3,D], bias}            patch embedding (a strided conv)
    cls [1,1,D]                                   class token
    Transformer/posembed_input/pos_embedding      [1, 1+N, D], slot 0 belongs to cls
    Transformer/encoderblock_{i}/LayerNorm_0      pre-attention LayerNorm
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}
                                                  kernel [D,H,hd], bias [H,hd]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out
                                                  kernel [H,hd,D], bias [D]
    Transformer/encoderblock_{i}/LayerNorm_2      pre-MLP LayerNorm
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}
    Transformer/encoder_norm                      final LayerNorm
    pre_logits/{kernel,bias}                      optional Dense + tanh (in21k checkpoints)
    head/{kernel,bias}                            classifier

Numerics match the checkpoints (and timm's port of them): pre-LN blocks, exact (erf)
GELU, LayerNorm epsilon 1e-6, softmax attention scaled by ``1/sqrt(head_dim)``, the class
token's output goes to the head. The epsilon (``layer_norm_eps``; Hugging Face's ViTs use
1e-12) and the MLP activation (``activation``: ``"gelu"``, or ``"gelu_tanh"``, its tanh
approximation) are fields, set from an imported checkpoint's config.
``tests/test_torch_ref.py`` checks logits against timm and Hugging Face. No dropout: the
paper's fine-tuning recipe uses none, so ``apply`` needs no RNG. Inputs are NHWC images
in [-1, 1].

Attention is flax's ``MultiHeadDotProductAttention`` (so the q/k/v/out Dense params, and
the submodules GPTQ intercepts, are flax's) with
:func:`qvec_jax.models.attention.fused_attention` as its ``attention_fn``:
``jax.nn.dot_product_attention``, cuDNN's fused kernel on a GPU in bfloat16/float16,
XLA's elsewhere.

``dtype=bfloat16`` computes in bfloat16 end to end: every Dense/conv/attention matmul
takes bfloat16 operands and every module returns bfloat16; params stay float32 and are
cast in the layers. Two steps run in float32 inside, on purpose, for accuracy, and hand
bfloat16 on: LayerNorm's mean and variance (flax's ``force_float32_reductions``), and
attention's scores and softmax (``jax.nn.dot_product_attention`` accumulates q.k in
float32, as cuDNN does, and casts the probabilities to bfloat16 for the value matmul).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qvec_jax.models.attention import fused_attention

# Width classes as in big_vision (Table 2 of arXiv 2106.04560), plus two tiny ones for
# tests and the CPU demo. A variant string is "<class>/<patch>", e.g. "B/16".
WIDTHS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "test": dict(width=32, depth=2, mlp_dim=64, num_heads=2),
    "demo": dict(width=96, depth=4, mlp_dim=192, num_heads=4),
}
# timm's init for a fresh classifier (the paper fine-tunes timm models with a new head).
HEAD_INIT = nn.initializers.truncated_normal(0.02)

#: The MLP activations the model implements: exact (erf) GELU and its tanh approximation.
ACTIVATIONS = {"gelu": False, "gelu_tanh": True}  # name -> nn.gelu's ``approximate``
LAYER_NORM_EPS = 1e-6  # the Google and timm checkpoints'

# The variants this project names; any "<class>/<patch>" with a class above also works.
VARIANTS: dict[str, dict[str, int]] = {
    name: dict(WIDTHS[name.split("/")[0]], patch_size=int(name.split("/")[1]))
    for name in ("Ti/16", "S/16", "S/32", "B/16", "B/32", "L/16", "L/32", "H/14")
    + ("test/4", "demo/4")
}


# A ViT outside the width classes spells its dims in the variant: "w192d3m768h3/16" is
# width 192, depth 3, MLP 768, 3 heads, patch 16 (timm/HF hold many such models).
_DIMS_RE = re.compile(r"w(\d+)d(\d+)m(\d+)h(\d+)")


def variant_name(*, width: int, depth: int, mlp_dim: int, num_heads: int, patch_size: int) -> str:
    """The variant string of these dims: the named class when one matches (``"Ti/16"``),
    else the explicit form ``"w192d3m768h3/16"`` that :func:`decode_variant` reads back."""
    dims = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    for name, cfg in WIDTHS.items():
        if cfg == dims:
            return f"{name}/{patch_size}"
    decode_variant(f"w{width}d{depth}m{mlp_dim}h{num_heads}/{patch_size}")  # validates
    return f"w{width}d{depth}m{mlp_dim}h{num_heads}/{patch_size}"


def decode_variant(variant: str) -> dict[str, int]:
    """``"B/16"`` or ``"w192d3m768h3/16"`` -> dict(width, depth, mlp_dim, num_heads, patch_size)."""
    m = re.fullmatch(r"(\w+)/(\d+)", str(variant))
    if m and m.group(1) in WIDTHS:
        return dict(WIDTHS[m.group(1)], patch_size=int(m.group(2)))
    e = _DIMS_RE.fullmatch(m.group(1)) if m else None
    if e is None:
        raise ValueError(
            f"unknown ViT variant {variant!r}: use '<class>/<patch>' with class one of "
            f"{sorted(WIDTHS)}, e.g. 'B/16' (known: {', '.join(VARIANTS)}), or explicit dims "
            "'w<width>d<depth>m<mlp_dim>h<heads>/<patch>', e.g. 'w192d3m768h3/16'"
        )
    width, depth, mlp_dim, heads = map(int, e.groups())
    if min(width, depth, mlp_dim, heads, int(m.group(2))) < 1 or width % heads:
        raise ValueError(
            f"ViT variant {variant!r}: every dim must be positive and the width {width} a "
            f"multiple of the number of heads {heads}"
        )
    return dict(
        width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(m.group(2))
    )


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Any = jnp.float32
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x):
        inits = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
            dtype=self.dtype,
        )
        y = nn.Dense(self.mlp_dim, name="Dense_0", **inits)(x)
        y = nn.gelu(y, approximate=ACTIVATIONS[self.activation])
        return nn.Dense(x.shape[-1], name="Dense_1", **inits)(y)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block; submodule names follow the Google checkpoints."""

    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32
    layer_norm_eps: float = LAYER_NORM_EPS
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x):
        eps = self.layer_norm_eps
        y = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
            deterministic=True,
            attention_fn=fused_attention,
            name="MultiHeadDotProductAttention_1",
        )(y, y)
        x = x + y
        y = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="LayerNorm_2")(x)
        mlp = MlpBlock(self.mlp_dim, self.dtype, self.activation, name="MlpBlock_3")
        return x + mlp(y)


class _PosEmbedInput(nn.Module):
    """Holds ``pos_embedding`` under ``Transformer/posembed_input`` as the checkpoints do."""

    @nn.compact
    def __call__(self, x):
        pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
        return x + pe.astype(x.dtype)


class _Transformer(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32
    layer_norm_eps: float = LAYER_NORM_EPS
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x):
        x = _PosEmbedInput(name="posembed_input")(x)
        arch = dict(layer_norm_eps=self.layer_norm_eps, activation=self.activation)
        for i in range(self.depth):
            block = EncoderBlock(
                self.mlp_dim, self.num_heads, self.dtype, **arch, name=f"encoderblock_{i}"
            )
            x = block(x)
        eps = self.layer_norm_eps
        return nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="encoder_norm")(x)


class ViT(nn.Module):
    """ViT classifier. ``apply({"params": p}, images_nhwc) -> logits``.

    ``num_classes=None`` builds no head: ``apply`` then returns the pooled features
    (after ``pre_logits`` + tanh when ``representation_size`` is set).
    The default head init is timm's (truncated normal, std 0.02; zero bias), because the
    paper fine-tunes timm models with a freshly initialised head.
    """

    num_classes: int | None
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    image_size: int = 224
    representation_size: int | None = None
    dtype: Any = jnp.float32  # computation dtype; params stay float32
    layer_norm_eps: float = LAYER_NORM_EPS  # every LayerNorm's epsilon (HF ViTs: 1e-12)
    activation: str = "gelu"  # the MLP's, one of ACTIVATIONS

    @nn.compact
    def __call__(self, images):
        n, h, w, c = images.shape
        if (h, w) != (self.image_size, self.image_size) or c != 3:
            raise ValueError(
                f"ViT built for NHWC images of {self.image_size}x{self.image_size}x3, got "
                f"shape {images.shape}; resize the images or rebuild the model with "
                "image_size=... (load_pretrained resamples the position embeddings)"
            )
        p = self.patch_size
        x = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
            name="embedding",
        )(jnp.asarray(images, self.dtype))  # fmt: skip
        x = x.reshape(n, -1, self.width)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, self.width)), x], 1)
        x = _Transformer(
            self.depth, self.mlp_dim, self.num_heads, dtype=self.dtype,
            layer_norm_eps=self.layer_norm_eps, activation=self.activation, name="Transformer",
        )(x)  # fmt: skip
        x = x[:, 0]
        if self.representation_size:
            x = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(x))
        if self.num_classes:
            x = nn.Dense(
                self.num_classes,
                kernel_init=HEAD_INIT,
                dtype=self.dtype,
                name="head",
            )(x)
        return x

    @property
    def variant(self) -> str:
        """The variant string that :func:`create_model` rebuilds this model's dims from."""
        return variant_name(
            width=self.width,
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            patch_size=self.patch_size,
        )

    def init_params(self, rng) -> dict:
        """Random params dict (jitted init)."""
        return init_params(self, rng)

    def abstract_params(self) -> dict:
        """Param shapes/dtypes as ``jax.ShapeDtypeStruct`` without allocating anything."""
        x = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
        return jax.eval_shape(lambda r, x: self.init(r, x)["params"], jax.random.key(0), x)


def init_params(model: ViT, rng) -> dict:
    """``model.init`` under jit (compiled once per model config), returning ``params``."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return _jitted_init(model)(rng)


@functools.lru_cache(maxsize=16)
def _jitted_init(model: ViT):
    x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    return jax.jit(lambda r: model.init(r, x)["params"])


def _is_int(n, least: int) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= least


def check_arch(layer_norm_eps, activation) -> None:
    """Refuse a LayerNorm epsilon that is not a positive finite number, and an activation
    this model does not implement (the message names the field)."""
    eps = layer_norm_eps
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float, np.floating))
        or not (0 < eps < float("inf"))
    ):
        raise ValueError(f"layer_norm_eps must be a positive number, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} is not implemented by this ViT; it has "
            f"{', '.join(ACTIVATIONS)}"
        )


def _check_sizes(*, image_size, num_classes, rep) -> None:
    """Refuse sizes no ViT has: a non-positive image size, a negative class count."""
    if not _is_int(image_size, 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    for name, n in (("num_classes", num_classes), ("representation_size", rep)):
        if n is not None and not _is_int(n, 0):
            raise ValueError(f"{name} must be None or an integer >= 0 (0: none), got {n!r}")


def create_model(
    variant: str,
    *,
    num_classes: int | None,
    image_size: int = 224,
    representation_size: int | None = None,
    dtype: Any = jnp.float32,
    layer_norm_eps: float = LAYER_NORM_EPS,
    activation: str = "gelu",
) -> ViT:
    """Build a :class:`ViT` from a variant string such as ``"B/16"`` or ``"test/4"``;
    ``layer_norm_eps`` and ``activation`` as an imported checkpoint's config says."""
    cfg = decode_variant(variant)
    _check_sizes(image_size=image_size, num_classes=num_classes, rep=representation_size)
    check_arch(layer_norm_eps, activation)
    if image_size % cfg["patch_size"]:
        raise ValueError(
            f"image_size {image_size} is not a multiple of the patch size {cfg['patch_size']} "
            f"of variant {variant!r}"
        )
    return ViT(
        num_classes=num_classes or None,
        image_size=int(image_size),
        representation_size=representation_size or None,
        dtype=dtype,
        layer_norm_eps=float(layer_norm_eps),
        activation=activation,
        **cfg,
    )


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
