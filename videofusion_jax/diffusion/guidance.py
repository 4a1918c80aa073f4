"""Classifier-free guidance over the whole decomposed estimate (eqs. 10-11 run twice).

Guiding each network on its own is not the same thing: the residual generator would see frames
from which the *guided* base estimate was removed, an input its null-conditioned pass never
met in training. Here eqs. (10)-(11) run once with the condition and once with the null
condition, each pass as in training, and the two full-video estimates are mixed.
"""
from __future__ import annotations

import chex
import jax.numpy as jnp

from videofusion_jax.diffusion.decomposition import decomposed_eps
from videofusion_jax.diffusion.schedules import Schedule


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
