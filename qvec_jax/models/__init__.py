"""Models: a Flax Linen ViT with the original Google checkpoint layout."""

from qvec_jax.models.vit import VARIANTS, ViT, create_model, decode_variant, init_params

__all__ = ["VARIANTS", "ViT", "create_model", "decode_variant", "init_params"]
