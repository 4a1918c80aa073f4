"""Config -> modules: the two generators, their parameters, and the closures ``diffusion`` calls.

The only place that reads the config for the networks; the modules themselves get plain fields.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from videofusion_jax.models.encoder import KeyFrameEncoder, frozen_encoder
from videofusion_jax.models.prior import EmbeddingPrior
from videofusion_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def generator_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The denoising networks: VideoFusion's two generators, or VDM*'s one space-time U-Net."""
  return ("video",) if config.model.kind == "vdm" else ("base", "residual")


def network_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The parameter subtrees of the state: the generators, and with ``model.condition =
  'embedding'`` the learned key-frame encoder (when ``model.encoder.kind = 'learned'``) and the prior."""
  names = generator_names(config)
  if config.model.condition == "embedding":
    names += ("encoder",) * (config.model.encoder.kind == "learned") + ("prior",)
  return names


def make_networks(config: ml_collections.ConfigDict) -> dict[str, nn.Module]:
  """The base generator (image U-Net), the residual generator (with frame embedding) and, for
  the embedding condition, the learned encoder and the prior. With ``model.kind = 'vdm'`` the
  generators are one network, ``video``: the base generator's U-Net made space-time (VDM*)."""
  embedding = config.model.condition == "embedding"
  dtypes = dict(dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype])
  # The paper's generators see c alone; the label reaches them only through the prior.
  common = dict(num_classes=0 if embedding else config.data.num_classes,
                condition_dim=config.model.encoder.embed_dim if embedding else 0,
                attention_implementation=config.model.attention_implementation or None,
                remat=config.train.remat, **dtypes)

  def unet(c, num_frames, **temporal):
    return UNet(base_channels=c.base_channels, channel_mult=tuple(c.channel_mult),
                num_res_blocks=c.num_res_blocks, attention_resolutions=tuple(c.attention_resolutions),
                head_dim=c.head_dim, dropout=c.dropout, num_frames=num_frames, **temporal, **common)
  if config.model.kind == "vdm":
    networks = {"video": unet(config.model.base, 0, temporal_frames=config.data.num_frames,
                              temporal_resolutions=temporal_resolutions(config))}
  else:
    networks = {"base": unet(config.model.base, 0), "residual": unet(config.model.residual, config.data.num_frames)}
  if embedding:
    e, p = config.model.encoder, config.model.prior
    if e.kind == "learned":
      networks["encoder"] = KeyFrameEncoder(e.embed_dim, e.base_channels, tuple(e.channel_mult), **dtypes)
    # The prior stays in float32: it is small, and its targets are compared to 1e-3.
    on_text = p.condition == "text"
    networks["prior"] = EmbeddingPrior(e.embed_dim, p.width, p.num_layers, 0 if on_text else config.data.num_classes,
                                       text_dim=e.embed_dim if on_text else 0)
  return networks


def temporal_resolutions(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Where VDM*'s temporal attention goes: ``model.vdm.temporal_resolutions``, or by default after
  every spatial attention (VDM's placement: the base's ``attention_resolutions``)."""
  return tuple(config.model.vdm.temporal_resolutions or config.model.base.attention_resolutions)


def init_params(networks: dict[str, nn.Module], config: ml_collections.ConfigDict, rng: jax.Array):
  """Boxed (logically partitioned) parameters ``{name: ...}`` for ``network_names(config)``."""
  s = config.data.image_size
  x = jnp.zeros((1, s, s, 3), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  label = jnp.zeros((1,), jnp.int32) if config.data.num_classes else None
  rngs = dict(zip(("base", "residual", "encoder", "prior"), jax.random.split(rng, 4)))
  cond = None
  if config.model.condition == "embedding":
    cond = jnp.zeros((1, config.model.encoder.embed_dim), jnp.float32)
  # With model.key_frame_input the residual generator reads x̂^k as 3 more input channels.
  x_residual = jnp.concatenate([x, x], axis=-1) if config.model.key_frame_input else x
  if "video" in networks:  # one video of N frames, in rows
    n = config.data.num_frames
    rep = lambda a: None if a is None else jnp.repeat(a, n, axis=0)  # noqa: E731
    params = {"video": networks["video"].init(rngs["base"], rep(x), rep(t), rep(label), condition=rep(cond))["params"]}
  else:
    params = {
        "base": networks["base"].init(rngs["base"], x, t, label, condition=cond)["params"],
        "residual": networks["residual"].init(rngs["residual"], x_residual, t, label, jnp.zeros((1,), jnp.int32),
                                              condition=cond)["params"],
    }
  if "encoder" in networks:
    params["encoder"] = networks["encoder"].init(rngs["encoder"], x)["params"]
  if "prior" in networks:
    text = cond if networks["prior"].text_dim else None
    params["prior"] = networks["prior"].init(rngs["prior"], cond, t, None if text is not None else label,
                                             text)["params"]
  return params


def make_encode_fn(networks: dict[str, nn.Module], config: ml_collections.ConfigDict):
  """``encode(params, key_frames (B, H, W, 3)) -> c (B, D)``: the learned encoder's output
  (differentiable in ``params['encoder']``) or the frozen one's (stop-gradient); None for CLIP,
  whose embeddings come with the batch."""
  if "encoder" in networks:
    return lambda params, x: networks["encoder"].apply({"params": params["encoder"]}, x)
  if config.model.encoder.kind == "clip":
    return None  # the batches carry the stored CLIP embeddings (data/embeddings.py)
  encode, _ = frozen_encoder(config.model.encoder.frozen_name, config.data.image_size)
  return lambda params, x: encode(x)


def make_prior_fn(networks: dict[str, nn.Module], params, label: jnp.ndarray | None,
                  text: jnp.ndarray | None = None) -> Callable:
  """``prior_fn(z (B, D), t (B,)) -> ε̂ (B, D)``, conditioned on ``label`` ``(B,)``, on a text
  embedding ``text`` ``(B, D)`` (zeros: the null text), or on nothing."""
  return lambda z, t: networks["prior"].apply({"params": params["prior"]}, z, t, label, text)


def boxed_abstract_params(networks: dict[str, UNet], config: ml_collections.ConfigDict):
  """Boxed abstract parameters (shapes and logical names), without allocating them."""
  return jax.eval_shape(lambda r: init_params(networks, config, r), jax.random.PRNGKey(0))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))


def make_apply_fns(networks: dict[str, nn.Module], params, label: jnp.ndarray | None,
                   train: bool = False, rng: jax.Array | None = None,
                   condition: jnp.ndarray | None = None, frozen: tuple[str, ...] = ()) -> tuple[Callable, Callable]:
  """Closures ``base_fn(z_key, t)`` and ``residual_fn(z', t, frame_index[, key_x0])`` for ``diffusion``.

  Both networks get the same conditioning: ``label`` ``(B,)`` (None if unconditional; the null
  label of classifier-free guidance is ``num_classes``) for ``model.condition='label'``, or
  ``condition`` ``(B, D)``, the key-frame embedding c (zeros: the null condition), repeated for
  every frame of the residual generator. Guidance is not done here: it mixes whole decomposed
  estimates (``diffusion.guided_decomposed_eps``). ``frozen``: networks that run as in sampling even when
  ``train`` (``train.freeze_base``: the fixed base the residual generator learns beside, without dropout).
  """
  rngs = {}
  if train and rng is not None:
    base_rng, residual_rng = jax.random.split(rng)
    rngs = {"base": {"dropout": base_rng}, "residual": {"dropout": residual_rng}}

  def run(name, x, t, lab, frame_index, cond):
    training = train and name not in frozen
    kwargs = {"rngs": rngs[name]} if rngs and training else {}
    return networks[name].apply({"params": params[name]}, x, t, lab, frame_index, train=training,
                                condition=cond, **kwargs)

  def base_fn(z_key, t):
    return run("base", z_key, t, label, None, condition)

  def residual_fn(z_prime, t, frame_index, key_x0=None):
    b, m = z_prime.shape[:2]
    if key_x0 is not None:  # model.key_frame_input: x̂^k beside each frame's z', as input channels
      z_prime = jnp.concatenate([z_prime, jnp.broadcast_to(key_x0[:, None], z_prime.shape)], axis=-1)
    flat = z_prime.reshape((b * m,) + z_prime.shape[2:])
    lab = None if label is None else jnp.repeat(label, m)
    cond = None if condition is None else jnp.repeat(condition, m, axis=0)
    # (B, m): each example's own frames (train.residual_frames); (m,): the same frames for every example.
    frame_index = frame_index.reshape(-1) if frame_index.ndim == 2 else jnp.tile(frame_index, b)
    out = run("residual", flat, jnp.repeat(t, m), lab, frame_index, cond)
    return out.reshape(z_prime.shape[:-1] + out.shape[-1:])

  return base_fn, residual_fn


def make_video_fn(networks: dict[str, nn.Module], params, label: jnp.ndarray | None, train: bool = False,
                  rng: jax.Array | None = None, condition: jnp.ndarray | None = None) -> Callable:
  """VDM*'s closure ``video_fn(z (B, N, H, W, C), t (B,)) -> ε̂ (B, N, H, W, C)``: the space-time
  U-Net on whole videos, conditioned as ``make_apply_fns``' generators (``label`` ``(B,)`` or
  ``condition`` ``(B, D)``, repeated for every frame)."""
  kwargs = {"rngs": {"dropout": rng}} if train and rng is not None else {}

  def video_fn(z, t):
    b, n = z.shape[:2]
    rep = lambda a: None if a is None else jnp.repeat(a, n, axis=0)  # noqa: E731
    out = networks["video"].apply({"params": params["video"]}, z.reshape((b * n,) + z.shape[2:]), rep(t), rep(label),
                                  train=train, condition=rep(condition), **kwargs)
    return out.reshape(z.shape[:-1] + out.shape[-1:])

  return video_fn
