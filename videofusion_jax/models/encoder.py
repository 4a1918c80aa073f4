"""Key-frame encoders: the clean key frame ``(B, H, W, 3)`` in [-1, 1] -> its embedding ``c (B, D)``.

``c`` is what both generators are conditioned on, and what the prior learns to sample. Two kinds:

- ``learned`` (the default): a small convolutional encoder trained jointly by the diffusion loss,
  the semantic encoder of Diffusion Autoencoders (Preechakul et al., CVPR 2022). Works offline.
- ``frozen``: any fixed function with the same interface, registered by name in
  ``FROZEN_ENCODERS`` (the paper's CLIP image tower plugs in here). Its output is not trained.

Every embedding is scaled to norm ``√D`` (about unit variance per coordinate; a frozen encoder's
output is scaled too), so that the prior diffuses data of the scale its noise schedule assumes,
the null condition (zeros) is far from every real embedding, and the prior's samples can be put
back on the sphere that every training embedding lies on (as DALL-E 2's prior renormalises its
CLIP embeddings).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from videofusion_jax.models.unet import BIAS, CONV, DENSE, GroupNorm, _groups, _init

Dtype = Any


def to_sphere(v: jnp.ndarray) -> jnp.ndarray:
  """``√D v / |v|`` for each row of ``v (B, D)``."""
  norm = jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=-1, keepdims=True))
  return jnp.sqrt(v.shape[-1]) * v / jnp.maximum(norm, 1e-6)


class KeyFrameEncoder(nn.Module):
  """The ``learned`` encoder: conv blocks that halve the size per level, mean pooling, a dense
  layer to ``embed_dim``, scaled to norm ``√embed_dim``."""

  embed_dim: int
  base_channels: int = 32
  channel_mult: Sequence[int] = (1, 2, 2)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: ``(B, H, W, 3)`` in [-1, 1]. Returns ``(B, embed_dim)`` float32."""
    chex.assert_rank(x, 4)
    conv = lambda c, s, name: nn.Conv(  # noqa: E731
        c, (3, 3), strides=(s, s), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=_init(nn.initializers.lecun_normal(), CONV), bias_init=_init(nn.initializers.zeros, BIAS))
    norm = lambda c, name: GroupNorm(_groups(c), self.dtype, self.param_dtype, name=name)  # noqa: E731
    h = conv(self.base_channels, 1, "conv_in")(x.astype(self.dtype))
    for level, mult in enumerate(self.channel_mult):
      c = self.base_channels * mult
      h = conv(c, 1, f"level{level}_conv")(nn.silu(norm(h.shape[-1], f"level{level}_norm")(h)))
      h = conv(c, 2, f"level{level}_down")(nn.silu(h))
    h = nn.silu(norm(h.shape[-1], "norm_out")(h)).mean(axis=(1, 2))
    v = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="dense_out",
                 kernel_init=_init(nn.initializers.lecun_normal(), DENSE),
                 bias_init=_init(nn.initializers.zeros, BIAS))(h)
    return to_sphere(v.astype(jnp.float32))


EncodeFn = Callable[[jnp.ndarray], jnp.ndarray]


def pixels_encoder(image_size: int, grid: int = 4) -> tuple[EncodeFn, int]:
  """A parameter-free frozen encoder: the frame average-pooled to ``grid x grid`` (``3 grid²``
  numbers) and a constant 1 (``frozen_encoder`` scales it to the sphere; the constant keeps the
  brightness there, so that a uniform frame of every grey has its own embedding and none is the
  null condition's zeros). A baseline, and the frozen slot's reference user."""
  if image_size % grid:
    raise ValueError(f"the 'pixels' encoder pools {image_size}x{image_size} frames to {grid}x{grid}; "
                     f"the image size must be a multiple of {grid}.")

  def encode(x):
    b, h, w, c = x.shape
    pooled = x.reshape(b, grid, h // grid, grid, w // grid, c).mean(axis=(2, 4)).reshape(b, -1)
    return jnp.concatenate([pooled, jnp.ones((b, 1), pooled.dtype)], axis=-1)

  return encode, 3 * grid * grid + 1


# name -> factory(image_size) -> (encode, embedding width). Register more (CLIP) with
# ``register_frozen_encoder``; ``model.encoder.frozen_name`` picks one.
FROZEN_ENCODERS: dict[str, Callable[[int], tuple[EncodeFn, int]]] = {"pixels": pixels_encoder}
_PACKAGED = dict(FROZEN_ENCODERS)


def register_frozen_encoder(name: str, factory: Callable[[int], tuple[EncodeFn, int]]) -> None:
  """Makes ``factory(image_size) -> (encode, width)`` available as ``model.encoder.frozen_name=name``.
  ``encode`` maps ``(B, H, W, 3)`` in [-1, 1] to ``(B, width)`` and must be jit-compatible."""
  FROZEN_ENCODERS[name] = factory


def frozen_encoder_in_package(name: str) -> bool:
  """Whether frozen encoder ``name`` is this package's own code (not one registered from outside,
  whose code and weights a stored program's key cannot see: ``training.program_store``)."""
  return name in _PACKAGED and FROZEN_ENCODERS.get(name) is _PACKAGED[name]


def frozen_encoder(name: str, image_size: int) -> tuple[EncodeFn, int]:
  if name not in FROZEN_ENCODERS:
    raise ValueError(f"unknown frozen encoder {name!r}; registered: {sorted(FROZEN_ENCODERS)} "
                     "(add one with videofusion_jax.models.encoder.register_frozen_encoder).")
  encode, width = FROZEN_ENCODERS[name](image_size)
  return (lambda x: to_sphere(jax.lax.stop_gradient(encode(x)).astype(jnp.float32))), width
