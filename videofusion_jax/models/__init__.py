"""Flax Linen networks: the U-Net that serves as base and as residual generator."""
from videofusion_jax.models.unet import UNet, check_image_size, timestep_embedding

__all__ = ["UNet", "check_image_size", "timestep_embedding"]
