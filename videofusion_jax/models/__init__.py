"""Flax Linen networks: the U-Net that serves as base and as residual generator, and the factory
that builds both from a config."""
from videofusion_jax.models.factory import make_apply_fns, make_networks
from videofusion_jax.models.unet import UNet, attention_heads, check_image_size, timestep_embedding

__all__ = ["UNet", "attention_heads", "check_image_size", "make_apply_fns", "make_networks", "timestep_embedding"]
