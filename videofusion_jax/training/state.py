"""Networks, optimizer and train state: everything a step needs, built from the config."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from videofusion_jax.models import UNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
  """Everything that is checkpointed. ``params`` is ``{'base': ..., 'residual': ...}``."""

  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray  # raw uint32 key data, so that Orbax saves it as an array


def make_networks(config: ml_collections.ConfigDict) -> dict[str, UNet]:
  """The base generator (image U-Net) and the residual generator (with frame embedding)."""
  common = dict(
      num_classes=config.data.num_classes, dtype=_DTYPES[config.model.dtype],
      param_dtype=_DTYPES[config.model.param_dtype],
      attention_implementation=config.model.attention_implementation or None)
  def unet(c, num_frames):
    return UNet(base_channels=c.base_channels, channel_mult=tuple(c.channel_mult),
                num_res_blocks=c.num_res_blocks, attention_resolutions=tuple(c.attention_resolutions),
                num_heads=c.num_heads, dropout=c.dropout, num_frames=num_frames, **common)
  return {"base": unet(config.model.base, 0),
          "residual": unet(config.model.residual, config.data.num_frames)}


def init_params(networks: dict[str, UNet], config: ml_collections.ConfigDict, rng: jax.Array):
  """Boxed (logically partitioned) parameters ``{'base': ..., 'residual': ...}``."""
  s = config.data.image_size
  x = jnp.zeros((1, s, s, 3), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  label = jnp.zeros((1,), jnp.int32) if config.data.num_classes else None
  base_rng, residual_rng = jax.random.split(rng)
  return {
      "base": networks["base"].init(base_rng, x, t, label)["params"],
      "residual": networks["residual"].init(residual_rng, x, t, label, jnp.zeros((1,), jnp.int32))["params"],
  }


def learning_rate_schedule(config: ml_collections.ConfigDict, scale: float) -> optax.Schedule:
  """Linear warm-up to ``learning_rate * scale``, then constant (``train.lr_decay='constant'``)
  or a cosine decay to 0 at ``train.num_steps`` (``'cosine'``)."""
  t = config.train
  peak = t.learning_rate * scale
  warmup = max(int(t.warmup_steps), 1)
  if t.lr_decay == "cosine":
    after = optax.cosine_decay_schedule(peak, max(int(t.num_steps) - warmup, 1))
  elif t.lr_decay == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.train.lr_decay={t.lr_decay!r}: use 'constant' or 'cosine'.")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, dict]:
  """Clipping, then AdamW with one learning rate for ``params['base']`` (scaled by
  ``base_lr_scale``, or frozen) and one for ``params['residual']``. Returns the
  transformation and the two schedules (for logging)."""
  t = config.train
  schedules = {"base": learning_rate_schedule(config, t.base_lr_scale),
               "residual": learning_rate_schedule(config, 1.0)}
  def adamw(name):
    return optax.adamw(schedules[name], b1=0.9, b2=0.999, weight_decay=t.weight_decay)
  frozen_base = t.freeze_base and t.stage == "video"
  transforms = {
      "base": optax.set_to_zero() if frozen_base else adamw("base"),
      "residual": optax.set_to_zero() if t.stage == "image" else adamw("residual"),
  }
  labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}  # noqa: E731
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.multi_transform(transforms, labels))
  return tx, schedules


def ema_update(ema, params, decay: float, step: jnp.ndarray):
  """``ema ← d·ema + (1-d)·params`` with ``d = min(decay, (1+step)/(10+step))`` (warm-up)."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def make_apply_fns(networks: dict[str, UNet], params, label: jnp.ndarray | None,
                   train: bool = False, rng: jax.Array | None = None,
                   guidance_scale: float = 1.0, null_label: int = 0) -> tuple[Callable, Callable]:
  """Closures ``base_fn(z_key, t)`` and ``residual_fn(z', t, frame_index)`` for ``diffusion``.

  Both networks get the same conditioning ``label`` ``(B,)`` (None if unconditional). With
  ``guidance_scale != 1`` each network's estimate is classifier-free guided:
  ``ε_null + s (ε_label - ε_null)``.
  """
  rngs = {}
  if train and rng is not None:
    base_rng, residual_rng = jax.random.split(rng)
    rngs = {"base": {"dropout": base_rng}, "residual": {"dropout": residual_rng}}

  def run(name, x, t, lab, frame_index):
    kwargs = {"rngs": rngs[name]} if rngs else {}
    call = lambda lb: networks[name].apply(  # noqa: E731
        {"params": params[name]}, x, t, lb, frame_index, train=train, **kwargs)
    if lab is None or guidance_scale == 1.0:
      return call(lab)
    cond, uncond = call(lab), call(jnp.full_like(lab, null_label))
    return uncond + guidance_scale * (cond - uncond)

  def base_fn(z_key, t):
    return run("base", z_key, t, label, None)

  def residual_fn(z_prime, t, frame_index):
    b, m = z_prime.shape[:2]
    flat = z_prime.reshape((b * m,) + z_prime.shape[2:])
    lab = None if label is None else jnp.repeat(label, m)
    out = run("residual", flat, jnp.repeat(t, m), lab, jnp.tile(frame_index, b))
    return out.reshape(z_prime.shape)

  return base_fn, residual_fn


def boxed_abstract_params(networks, config):
  """Boxed abstract parameters (shapes and logical names), without allocating them."""
  return jax.eval_shape(lambda r: init_params(networks, config, r), jax.random.PRNGKey(0))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))
