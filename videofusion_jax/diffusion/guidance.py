"""Steering the estimate: classifier-free guidance over the whole decomposed estimate (eqs. 10-11
run twice), and the anchor that joins the clips of a long video.

Guiding each network on its own is not the same thing: the residual generator would see frames
from which the *guided* base estimate was removed, an input its null-conditioned pass never
met in training. Here eqs. (10)-(11) run once with the condition and once with the null
condition, each pass as in training, and the two full-video estimates are mixed.
"""
from __future__ import annotations

import chex
import jax.numpy as jnp

from videofusion_jax.diffusion.decomposition import decomposed_eps, predict_x0
from videofusion_jax.diffusion.schedules import Schedule, per_example


def classifier_free_guidance(eps_cond: jnp.ndarray, eps_null: jnp.ndarray, scale: float) -> jnp.ndarray:
  """``ε̂ = ε̂_∅ + s (ε̂_c - ε̂_∅)`` (Ho & Salimans 2022): ``s = 1`` is the conditional estimate,
  ``s = 0`` the null-conditioned one."""
  chex.assert_equal_shape([eps_cond, eps_null])
  return eps_null + scale * (eps_cond - eps_null)


def guided_eps(eps_fn, z_t: jnp.ndarray, t: jnp.ndarray, scale: float) -> jnp.ndarray:
  """The guided estimate for any network: ``eps_fn(z (2B, ...), t (2B,))`` conditions its first
  ``B`` rows and null-conditions the last ``B``; both passes run in one call."""
  b = z_t.shape[0]
  eps = eps_fn(jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]))
  return classifier_free_guidance(eps[:b], eps[b:], scale)


def guided_decomposed_eps(base_fn, residual_fn, z_t: jnp.ndarray, t: jnp.ndarray, lambdas: jnp.ndarray,
                          schedule: Schedule, scale: float, key_frame_input: bool = False,
                          key_frame: jnp.ndarray | None = None) -> jnp.ndarray:
  """The guided noise estimate ``(B, N, H, W, C)`` of every frame.

  ``base_fn`` and ``residual_fn`` are those of ``decomposed_eps`` for a batch of ``2B``: the
  first ``B`` rows conditioned, the last ``B`` null-conditioned. Both passes go through each
  network in one call. ``key_frame`` ``(B, H, W, C)``, if given, serves both passes.
  """
  chex.assert_rank(z_t, 5)
  doubled_key = None if key_frame is None else jnp.concatenate([key_frame, key_frame])

  def eps_fn(z, tt):
    return decomposed_eps(base_fn, residual_fn, z, tt, lambdas, schedule, key_frame_input=key_frame_input,
                          key_frame=doubled_key)[0]
  return guided_eps(eps_fn, z_t, t, scale)


def anchor_weights(num_frames: int, num_anchored: int, num_steps: int = 1) -> jnp.ndarray:
  """Per-frame pull toward the anchor at each of ``num_steps`` sampler steps, ``(N,)``.

  Over the whole chain frame ``a < m = num_anchored`` is to be pulled by ``w^a = (m - a)/(m + 1)``
  (0 from frame m on), so that frames that were all ``F`` would climb from the anchor ``P`` to ``F``
  in ``m + 1`` even steps of ``(F - P)/(m + 1)``. A pull applied at every step compounds (the model
  denoises what it was pulled to), so each step pulls by ``1 - (1 - w^a)^(1/num_steps)``: the
  compounded pull is ``w^a`` where the model follows, less where it pulls back.
  """
  a = jnp.arange(num_frames, dtype=jnp.float32)
  total = jnp.where(a < num_anchored, (num_anchored - a) / (num_anchored + 1.0), 0.0)
  return 1.0 - (1.0 - total) ** (1.0 / num_steps)


def anchored_eps(z_t: jnp.ndarray, eps_hat: jnp.ndarray, t: jnp.ndarray, anchor: jnp.ndarray,
                 weights: jnp.ndarray, schedule: Schedule, clip_x0: bool = True) -> jnp.ndarray:
  """Soft replacement of the clean estimate at the start of a clip (beyond the paper: long videos
  whose clips join without a seam): ``x̂0^a <- x̂0^a + w^a (anchor - x̂0^a)``, then the ε that
  gives that ``x̂0``, ``(z_t - √ᾱ_t x̂0) / √(1-ᾱ_t)``, so that any sampler's step moves toward it.

  ``z_t``, ``eps_hat``: ``(B, N, H, W, C)``; ``anchor``: ``(B, H, W, C)`` (the last frame of the
  clip before); ``weights``: ``(N,)`` (``anchor_weights``, 0 at the key frame so the content the
  clips share is untouched). Replacement as in Ho et al.'s VDM cannot serve here: VideoFusion's
  generators see each non-key frame on its own (with the key frame), so frames given to a clip
  would not inform its other frames; the frames must be pulled themselves.
  """
  chex.assert_equal_shape([z_t, eps_hat])
  chex.assert_shape(anchor, z_t.shape[:1] + z_t.shape[2:])
  a = per_example(schedule.alphas_cumprod, t, z_t.ndim)
  x0 = predict_x0(z_t, eps_hat, t, schedule, clip_x0)
  w = weights.reshape((1, -1) + (1,) * (z_t.ndim - 2))
  x0 = x0 + w * (anchor[:, None] - x0)
  return (z_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
