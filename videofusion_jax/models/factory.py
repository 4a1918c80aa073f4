"""Config -> modules: the two generators, their parameters, and the closures ``diffusion`` calls.

The only place that reads the config for the networks; the modules themselves get plain fields.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from videofusion_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make_networks(config: ml_collections.ConfigDict) -> dict[str, UNet]:
  """The base generator (image U-Net) and the residual generator (with frame embedding)."""
  common = dict(
      num_classes=config.data.num_classes, dtype=DTYPES[config.model.dtype],
      param_dtype=DTYPES[config.model.param_dtype],
      attention_implementation=config.model.attention_implementation or None)

  def unet(c, num_frames):
    return UNet(base_channels=c.base_channels, channel_mult=tuple(c.channel_mult),
                num_res_blocks=c.num_res_blocks, attention_resolutions=tuple(c.attention_resolutions),
                head_dim=c.head_dim, dropout=c.dropout, num_frames=num_frames, **common)
  return {"base": unet(config.model.base, 0),
          "residual": unet(config.model.residual, config.data.num_frames)}


def init_params(networks: dict[str, UNet], config: ml_collections.ConfigDict, rng: jax.Array):
  """Boxed (logically partitioned) parameters ``{'base': ..., 'residual': ...}``."""
  s = config.data.image_size
  x = jnp.zeros((1, s, s, 3), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  label = jnp.zeros((1,), jnp.int32) if config.data.num_classes else None
  base_rng, residual_rng = jax.random.split(rng)
  # With model.key_frame_input the residual generator reads x̂^k as 3 more input channels.
  x_residual = jnp.concatenate([x, x], axis=-1) if config.model.key_frame_input else x
  return {
      "base": networks["base"].init(base_rng, x, t, label)["params"],
      "residual": networks["residual"].init(residual_rng, x_residual, t, label, jnp.zeros((1,), jnp.int32))["params"],
  }


def boxed_abstract_params(networks: dict[str, UNet], config: ml_collections.ConfigDict):
  """Boxed abstract parameters (shapes and logical names), without allocating them."""
  return jax.eval_shape(lambda r: init_params(networks, config, r), jax.random.PRNGKey(0))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))


def make_apply_fns(networks: dict[str, UNet], params, label: jnp.ndarray | None,
                   train: bool = False, rng: jax.Array | None = None) -> tuple[Callable, Callable]:
  """Closures ``base_fn(z_key, t)`` and ``residual_fn(z', t, frame_index[, key_x0])`` for ``diffusion``.

  Both networks get the same conditioning ``label`` ``(B,)`` (None if unconditional; the null
  label of classifier-free guidance is ``num_classes``). Guidance is not done here: it mixes
  whole decomposed estimates (``diffusion.guided_decomposed_eps``).
  """
  rngs = {}
  if train and rng is not None:
    base_rng, residual_rng = jax.random.split(rng)
    rngs = {"base": {"dropout": base_rng}, "residual": {"dropout": residual_rng}}

  def run(name, x, t, lab, frame_index):
    kwargs = {"rngs": rngs[name]} if rngs else {}
    return networks[name].apply({"params": params[name]}, x, t, lab, frame_index, train=train, **kwargs)

  def base_fn(z_key, t):
    return run("base", z_key, t, label, None)

  def residual_fn(z_prime, t, frame_index, key_x0=None):
    b, m = z_prime.shape[:2]
    if key_x0 is not None:  # model.key_frame_input: x̂^k beside each frame's z', as input channels
      z_prime = jnp.concatenate([z_prime, jnp.broadcast_to(key_x0[:, None], z_prime.shape)], axis=-1)
    flat = z_prime.reshape((b * m,) + z_prime.shape[2:])
    lab = None if label is None else jnp.repeat(label, m)
    out = run("residual", flat, jnp.repeat(t, m), lab, jnp.tile(frame_index, b))
    return out.reshape(z_prime.shape[:-1] + out.shape[-1:])

  return base_fn, residual_fn
