"""An ADM-style 2D U-Net (Dhariwal & Nichol 2021) used as base and as residual generator.

Images are ``(B, H, W, C)``, channels last. Weights carry logical axis names
(``nn.with_logical_partitioning``) that ``training.sharding`` maps to mesh axes. The module
knows nothing of λ or schedules: it maps a noisy image, a timestep and optional
conditioning (class label, frame index) to an ε estimate of the same shape.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

# Logical names of weight axes; rules in the config map them to mesh axes.
CONV = (None, None, "channels_in", "channels_out")
DENSE = ("channels_in", "channels_out")
BIAS = ("channels_out",)
NORM = ("norm",)
TABLE = ("vocab", "channels_out")
TO_RGB = (None, None, "channels_in", None)
# Logical names of activation axes: the rule table splits the batch over the mesh (a sharding
# constraint inside jit, so that XLA keeps FSDP's layout: weights gathered, activations split by
# example). Outside a ``nn.logical_axis_rules`` context this is a no-op.
ACTIVATION = ("activation_batch", "activation_height", "activation_width", "activation_channels")
# Every logical name the networks use, and the input batch's ('batch', training.sharding): what
# config.sharding_rules may map (a rule for another name shards nothing).
LOGICAL_AXES = (*dict.fromkeys(n for names in (CONV, DENSE, BIAS, NORM, TABLE, TO_RGB, ACTIVATION) for n in names if n),
                "batch")
# Rematerialisation (``train.remat``): each res block and attention block is wrapped in
# ``nn.remat``, so that the backward pass recomputes the block's activations from its input
# instead of keeping them. 'block' keeps nothing inside a block; 'block_dots' keeps the outputs of
# its convolutions and matrix products (recomputing norms, activations and softmax: less memory
# saved, less recomputed). '' / 'none': off. Parameter names are the same in every mode.
REMAT_POLICIES = {"": None, "none": None, "block": jax.checkpoint_policies.nothing_saveable,
                  "block_dots": jax.checkpoint_policies.dots_saveable}


def _constrain(x: jnp.ndarray) -> jnp.ndarray:
  return nn.with_logical_constraint(x, ACTIVATION)


def _init(init, names):
  return nn.with_logical_partitioning(init, names)


def check_image_size(image_size: int, channel_mult: Sequence[int]) -> None:
  """Raises ValueError unless the U-Net can halve ``image_size`` ``len(channel_mult) - 1`` times."""
  factor = 2 ** (len(channel_mult) - 1)
  if image_size <= 0 or image_size % factor:
    ok = [factor * m for m in range(1, 5)]
    raise ValueError(
        f"image size {image_size} cannot be downsampled by the U-Net: with channel_mult="
        f"{tuple(channel_mult)} it halves the size {len(channel_mult) - 1} times, so the size "
        f"must be a multiple of {factor} (e.g. {ok}). Change the image size or channel_mult.")


def attention_heads(channels: int, head_dim: int) -> int:
  """Heads of ``head_dim`` channels each (ADM's ``num_head_channels``); one head if ``channels <= head_dim``."""
  if channels <= head_dim:
    return 1
  if channels % head_dim:
    raise ValueError(f"attention over {channels} channels cannot be split into heads of head_dim={head_dim}; "
                     f"use a head_dim that divides {channels} (e.g. {math.gcd(channels, head_dim)}).")
  return channels // head_dim


def attention_channels(image_size: int, base_channels: int, channel_mult: Sequence[int],
                       attention_resolutions: Sequence[int]) -> list[int]:
  """The channel counts of the U-Net's attention layers (each level's, and the middle one)."""
  out = [base_channels * m for level, m in enumerate(channel_mult)
         if image_size // 2 ** level in attention_resolutions]
  return out + [base_channels * channel_mult[-1]]


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding ``(B,) -> (B, dim)`` as in ADM: ``[cos(t·f), sin(t·f)]``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _groups(channels: int) -> int:
  return math.gcd(32, channels)


@functools.partial(jax.jit, static_argnames=("groups", "epsilon", "dtype"))
def group_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, *, groups: int, epsilon: float,
               dtype: Dtype) -> jnp.ndarray:
  """GroupNorm of ``x`` ``(B, ..., C)`` with ``scale`` and ``bias`` ``(C,)``, in ``dtype``: each
  example's channels in ``groups`` groups, each normalised over its channels and every axis between
  the batch and the channels. Statistics in float32 as ``E[x²] - E[x]²`` clipped at 0, as
  ``flax.linen.GroupNorm`` computes them (tests check the two agree).

  Jitted, and in lax rather than jnp (each jnp operation is itself a jitted call): the train step's
  trace then holds one call per norm, traced once per distinct shape, instead of some forty jnp
  operations each traced on its own. Tracing is host time that no compilation cache saves."""
  f32 = jnp.float32
  b, c = x.shape[0], x.shape[-1]
  # Converted twice (grouped for the statistics, then as is): one float32 copy shared by both
  # stays alive from the statistics to the normalisation, two separate ones fuse away.
  grouped = lax.convert_element_type(lax.reshape(x, (b, math.prod(x.shape[1:-1]), groups, c // groups)), f32)
  count = lax.full((), grouped.shape[1] * grouped.shape[3], f32)
  mean = lax.div(lax.reduce_sum(grouped, (1, 3)), count)  # (B, G)
  mean2 = lax.div(lax.reduce_sum(lax.mul(grouped, grouped), (1, 3)), count)
  var = lax.max(lax.full((), 0, f32), lax.sub(mean2, lax.mul(mean, mean)))
  # Statistics, scale and bias as (B or 1, 1, ..., 1, C): lax broadcasts dimensions of size 1, and
  # what the backward pass keeps of them stays that small (broadcast first, it kept full copies).
  ones = (1,) * (x.ndim - 2)
  per_channel = lambda v: lax.reshape(  # noqa: E731  (B, G) -> (B, 1, ..., 1, C)
      lax.broadcast_in_dim(v, (b, groups, c // groups), (0, 1)), (b, *ones, c))
  param = lambda p: lax.reshape(lax.convert_element_type(p, f32), (1, *ones, c))  # noqa: E731
  mul = lax.mul(lax.rsqrt(lax.add(per_channel(var), lax.full((), epsilon, f32))), param(scale))
  y = lax.add(lax.mul(lax.sub(lax.convert_element_type(x, f32), per_channel(mean)), mul), param(bias))
  return lax.convert_element_type(y, dtype)


class GroupNorm(nn.Module):
  """``flax.linen.GroupNorm``'s parameters (``scale``, ``bias``: ``(C,)``) and output, computed by
  ``group_norm``. ``(B, ..., C) -> (B, ..., C)``."""

  groups: int
  dtype: Dtype
  param_dtype: Dtype
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    if c % self.groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into {self.groups} groups.")
    scale = self.param("scale", _init(nn.initializers.ones, NORM), (c,), self.param_dtype)
    bias = self.param("bias", _init(nn.initializers.zeros, NORM), (c,), self.param_dtype)
    return group_norm(x, scale, bias, groups=self.groups, epsilon=self.epsilon, dtype=jnp.dtype(self.dtype))


def remat_block(cls: type[nn.Module], remat: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """``cls`` itself, or wrapped in ``nn.remat`` with ``REMAT_POLICIES[remat]`` (an instance made with
  ``name=`` keeps that name, so the parameter tree does not change). ``static_argnums`` counts ``self``."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: use one of {tuple(REMAT_POLICIES)}.")
  policy = REMAT_POLICIES[remat]
  return cls if policy is None else nn.remat(cls, static_argnums=static_argnums, policy=policy)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv, scale-shift conditioning on the embedding, dropout, conv."""

  out_channels: int
  dropout: float
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x, emb, train: bool):
    conv = lambda c, k, zero=False, name=None: nn.Conv(  # noqa: E731
        c, (k, k), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=_init(nn.initializers.zeros if zero else nn.initializers.lecun_normal(), CONV),
        bias_init=_init(nn.initializers.zeros, BIAS))
    norm = lambda name: GroupNorm(  # noqa: E731
        _groups(x.shape[-1] if name == "norm1" else self.out_channels), self.dtype, self.param_dtype, name=name)
    h = conv(self.out_channels, 3, name="conv1")(nn.silu(norm("norm1")(x)))
    scale_shift = nn.Dense(
        2 * self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="emb",
        kernel_init=_init(nn.initializers.lecun_normal(), DENSE),
        bias_init=_init(nn.initializers.zeros, BIAS))(nn.silu(emb))
    scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
    h = norm("norm2")(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.out_channels, 3, zero=True, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="skip")(x)
    return x + h


def _attention_dense(features: int, zero: bool, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
  """An attention block's q/k/v or output projection (``zero``: starts at zero, the block the identity)."""
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=_init(nn.initializers.zeros if zero else nn.initializers.lecun_normal(), DENSE),
                  bias_init=_init(nn.initializers.zeros, BIAS))


def _attention_norm(channels: int, dtype: Dtype, param_dtype: Dtype) -> GroupNorm:
  """The GroupNorm ahead of an attention block's projections."""
  return GroupNorm(_groups(channels), dtype, param_dtype, name="norm")


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, bias: jnp.ndarray | None = None,
              implementation: str | None = None) -> jnp.ndarray:
  """``jax.nn.dot_product_attention`` of ``q``, ``k``, ``v`` ``(B, T, heads, head_dim)`` (``bias``
  broadcast to ``(B, heads, T, T)``). In float16 through XLA it is computed here, as JAX's XLA path
  computes it: JAX asks for the F16_F16_F32 dot algorithm there, which CPUs refuse when the step is
  lowered (after JAX's own fallback could catch it); the default algorithm with float32 results does
  the same products, on every platform."""
  if q.dtype != jnp.float16 or implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("BNTS,BSNH->BTNH", weights, v)


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the ``H·W`` positions, with a residual connection.

  Heads have a fixed width ``head_dim`` (64 as in ADM), so wide layers get more heads rather
  than wider ones (cuDNN's fused attention takes heads of at most 128 on A100-class GPUs)."""

  head_dim: int
  dtype: Dtype
  param_dtype: Dtype
  implementation: str | None = None  # None lets XLA pick; 'cudnn' on GPUs.

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    heads = attention_heads(c, self.head_dim)
    dense = functools.partial(_attention_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    y = _attention_norm(c, self.dtype, self.param_dtype)(x)
    qkv = dense(3 * c, False, "qkv")(y).reshape(b, h * w, 3, heads, c // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention(q, k, v, implementation=self.implementation)
    out = dense(c, True, "proj")(out.reshape(b, h, w, c))
    return x + out


class TemporalAttentionBlock(nn.Module):
  """VDM's temporal attention: multi-head self-attention over the ``N`` frames at each spatial
  position, with a learned relative position bias (one per head and frame offset), and a
  residual connection. Input ``(B·N, H, W, C)``, frames of a video in consecutive rows.

  The output projection starts at zero, so a fresh block is the identity (a pretrained image
  U-Net keeps its output when the temporal layers are added)."""

  num_frames: int
  head_dim: int
  dtype: Dtype
  param_dtype: Dtype
  implementation: str | None = None

  @nn.compact
  def __call__(self, x):
    bn, h, w, c = x.shape
    n = self.num_frames
    chex.assert_equal(bn % n, 0)
    heads = attention_heads(c, self.head_dim)
    dense = functools.partial(_attention_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    y = _attention_norm(c, self.dtype, self.param_dtype)(x)
    # (B, N, H, W, C) -> (B·H·W, N, C): each spatial position is a sequence over the frames.
    y = y.reshape(bn // n, n, h * w, c).transpose(0, 2, 1, 3).reshape(-1, n, c)
    qkv = dense(3 * c, False, "qkv")(y).reshape(-1, n, 3, heads, c // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # bias[h, i, j] = table[i - j + N - 1, h]: the same for every position and video.
    table = self.param("relative_bias", _init(nn.initializers.zeros, (None, None)), (2 * n - 1, heads),
                       self.param_dtype)
    offsets = jnp.arange(n)[:, None] - jnp.arange(n)[None, :] + n - 1
    bias = table[offsets].transpose(2, 0, 1)[None].astype(q.dtype)
    out = attention(q, k, v, bias=bias, implementation=self.implementation)
    out = dense(c, True, "proj")(out.reshape(-1, n, c))
    out = out.reshape(bn // n, h * w, n, c).transpose(0, 2, 1, 3).reshape(bn, h, w, c)
    return x + out


class UNet(nn.Module):
  """ε-prediction U-Net. ``num_classes > 0`` adds a class embedding whose index
  ``num_classes`` is the null label; ``num_frames > 0`` adds a frame-index embedding (the
  residual generator's ``i``); ``condition_dim > 0`` adds the projection of a conditioning
  vector ``c`` (the key-frame embedding; zeros are the null condition).

  Every condition is added to the time embedding, which drives the scale and shift of every
  res block (ADM's class conditioning; DALL-E 2's decoder takes its CLIP embedding this way).

  ``temporal_frames > 0`` makes it VDM's space-time U-Net (VDM*): the input holds videos of that
  many frames in consecutive rows, ``(B·N, H, W, C)``, every layer above works per frame, and a
  ``TemporalAttentionBlock`` over the frames follows each block at the feature-map sizes in
  ``temporal_resolutions`` and the middle attention. Its weights are named apart (``*_temporal*``),
  so the rest is exactly the image U-Net's tree.

  ``remat`` (``REMAT_POLICIES``) rematerialises every res block and attention block in the
  backward pass; it changes memory and compute, not the outputs or the parameter tree."""

  base_channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (8,)  # feature-map sizes that get attention
  head_dim: int = 64
  dropout: float = 0.0
  num_classes: int = 0
  num_frames: int = 0
  condition_dim: int = 0
  out_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  temporal_frames: int = 0
  temporal_resolutions: Sequence[int] = ()
  remat: str = ""  # a key of REMAT_POLICIES

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, label: jnp.ndarray | None = None,
               frame_index: jnp.ndarray | None = None, train: bool = False,
               condition: jnp.ndarray | None = None) -> jnp.ndarray:
    """x: ``(B, H, W, C)``; t: ``(B,)``; label, frame_index: ``(B,)`` int; condition:
    ``(B, condition_dim)``. Returns ``(B, H, W, out)``."""
    chex.assert_rank(x, 4)
    b, height, width, _ = x.shape
    chex.assert_shape(t, (b,))
    check_image_size(height, self.channel_mult)
    check_image_size(width, self.channel_mult)
    emb_dim = 4 * self.base_channels
    dense = lambda f, name: nn.Dense(  # noqa: E731
        f, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=_init(nn.initializers.lecun_normal(), DENSE),
        bias_init=_init(nn.initializers.zeros, BIAS))
    emb = timestep_embedding(t, self.base_channels)
    emb = dense(emb_dim, "time_dense1")(emb.astype(self.dtype))
    emb = dense(emb_dim, "time_dense2")(nn.silu(emb))
    if self.num_classes > 0:
      if label is None:
        raise ValueError("this U-Net is class-conditional: pass a label (num_classes = null).")
      chex.assert_shape(label, (b,))  # a (1,) label would broadcast over the batch unseen
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="label_embed",
                           embedding_init=_init(nn.initializers.normal(1.0), TABLE))(label)
    if self.num_frames > 0:
      if frame_index is None:
        raise ValueError("this U-Net conditions on the frame index: pass frame_index.")
      chex.assert_shape(frame_index, (b,))
      emb = emb + nn.Embed(self.num_frames, emb_dim, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="frame_embed",
                           embedding_init=_init(nn.initializers.normal(1.0), TABLE))(frame_index)
    if self.condition_dim > 0:
      if condition is None:
        raise ValueError("this U-Net is conditioned on an embedding: pass condition (zeros = null).")
      chex.assert_shape(condition, (b, self.condition_dim))
      emb = emb + dense(emb_dim, "condition_dense")(condition.astype(self.dtype))

    # `train` (argument 3, counting self) picks dropout on or off: static under remat.
    res_block, attention_block = remat_block(ResBlock, self.remat, (3,)), remat_block(AttentionBlock, self.remat)
    temporal_block = remat_block(TemporalAttentionBlock, self.remat)
    block = lambda c, name: res_block(c, self.dropout, self.dtype, self.param_dtype, name=name)  # noqa: E731
    attn = lambda name: attention_block(self.head_dim, self.dtype, self.param_dtype,  # noqa: E731
                                        self.attention_implementation, name=name)
    conv = lambda c, k, s, names, name, zero=False: nn.Conv(  # noqa: E731
        c, (k, k), strides=(s, s), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=_init(nn.initializers.zeros if zero else nn.initializers.lecun_normal(), names),
        bias_init=_init(nn.initializers.zeros, BIAS if names is CONV else (None,)))

    def temporal(h, name):
      if self.temporal_frames and (h.shape[1] in self.temporal_resolutions or name == "mid_temporal"):
        h = temporal_block(self.temporal_frames, self.head_dim, self.dtype, self.param_dtype,
                           self.attention_implementation, name=name)(h)
      return h

    h = _constrain(conv(self.base_channels, 3, 1, CONV, "conv_in")(x.astype(self.dtype)))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = block(self.base_channels * mult, f"down{level}_block{i}")(h, emb, train)
        if h.shape[1] in self.attention_resolutions:
          h = attn(f"down{level}_attn{i}")(h)
        h = temporal(h, f"down{level}_temporal{i}")
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        h = _constrain(conv(h.shape[-1], 3, 2, CONV, f"down{level}_downsample")(h))
        skips.append(h)

    h = block(h.shape[-1], "mid_block1")(h, emb, train)
    h = temporal(attn("mid_attn")(h), "mid_temporal")
    h = _constrain(block(h.shape[-1], "mid_block2")(h, emb, train))

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = block(self.base_channels * mult, f"up{level}_block{i}")(h, emb, train)
        if h.shape[1] in self.attention_resolutions:
          h = attn(f"up{level}_attn{i}")(h)
        h = temporal(h, f"up{level}_temporal{i}")
      if level != 0:
        bb, hh, ww, cc = h.shape
        h = jax.image.resize(h, (bb, 2 * hh, 2 * ww, cc), "nearest")
        h = _constrain(conv(cc, 3, 1, CONV, f"up{level}_upsample")(h))

    h = nn.silu(GroupNorm(_groups(h.shape[-1]), self.dtype, self.param_dtype, name="norm_out")(h))
    out = conv(self.out_channels, 3, 1, TO_RGB, "conv_out", zero=True)(h)
    return _constrain(out.astype(jnp.float32))
