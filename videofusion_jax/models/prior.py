"""The prior over key-frame embeddings: a diffusion model on ``c`` (DALL-E 2's diffusion prior).

At generation time it samples the embedding that both generators are conditioned on, from the
class label, from a caption's CLIP text embedding (``text_dim > 0``; DALL-E 2's prior on text), or
from nothing.
The network is a residual MLP that predicts the noise of a noisy embedding.
"""
from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from videofusion_jax.models.unet import BIAS, DENSE, TABLE, _init, timestep_embedding

Dtype = Any


class EmbeddingPrior(nn.Module):
  """ε-prediction MLP: ``num_layers`` pre-norm residual blocks of width ``width``, each modulated
  (scale and shift) by the embedding of ``t`` plus that of the label (index ``num_classes`` is
  the null label of classifier-free guidance) or of the text embedding (zeros: the null text)."""

  embed_dim: int
  width: int = 256
  num_layers: int = 4
  num_classes: int = 0
  text_dim: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jnp.ndarray, t: jnp.ndarray, label: jnp.ndarray | None = None,
               text: jnp.ndarray | None = None) -> jnp.ndarray:
    """z: ``(B, embed_dim)`` noisy embeddings; t: ``(B,)``; label: ``(B,)`` int; text: ``(B, text_dim)``.
    Returns ``(B, embed_dim)``."""
    chex.assert_shape(z, (None, self.embed_dim))
    b = z.shape[0]
    chex.assert_shape(t, (b,))

    def dense(f, name, zero=False):
      return nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                      kernel_init=_init(nn.initializers.zeros if zero else nn.initializers.lecun_normal(), DENSE),
                      bias_init=_init(nn.initializers.zeros, BIAS))

    def layer_norm(name):
      return nn.LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    emb = dense(self.width, "time_dense1")(timestep_embedding(t, self.width).astype(self.dtype))
    emb = dense(self.width, "time_dense2")(nn.silu(emb))
    if self.num_classes > 0:
      if label is None:
        raise ValueError("this prior is class-conditional: pass a label (num_classes = null).")
      chex.assert_shape(label, (b,))
      emb = emb + nn.Embed(self.num_classes + 1, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="label_embed", embedding_init=_init(nn.initializers.normal(1.0), TABLE))(label)
    if self.text_dim > 0:
      if text is None:
        raise ValueError("this prior is conditioned on text: pass a text embedding (zeros = null).")
      chex.assert_shape(text, (b, self.text_dim))
      emb = emb + dense(self.width, "text_embed")(text.astype(self.dtype))
    emb = nn.silu(emb)
    h = dense(self.width, "dense_in")(z.astype(self.dtype))
    for i in range(self.num_layers):
      scale, shift = jnp.split(dense(2 * self.width, f"block{i}_emb")(emb), 2, axis=-1)
      y = layer_norm(f"block{i}_norm")(h) * (1 + scale) + shift
      y = dense(2 * self.width, f"block{i}_dense1")(y)
      h = h + dense(self.width, f"block{i}_dense2", zero=True)(nn.silu(y))
    out = dense(self.embed_dim, "dense_out", zero=True)(nn.silu(layer_norm("norm_out")(h)))
    return out.astype(jnp.float32)
