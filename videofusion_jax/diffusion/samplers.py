"""Sampler steps (DDIM, DDPM) whose fresh noise is drawn decomposed (eq. 8), and the loop.

Every step takes the full-video noise estimate ``eps_hat`` of eq. (11). Timesteps are
0-based; ``t_prev = -1`` means the end of the chain (``ᾱ_{-1} = 1``).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from videofusion_jax.diffusion.decomposition import decomposed_eps, decomposed_noise, predict_x0
from videofusion_jax.diffusion.guidance import guided_decomposed_eps
from videofusion_jax.diffusion.schedules import Schedule, per_example


def _broadcast(values: jnp.ndarray, ndim: int) -> jnp.ndarray:
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _alpha_bar(schedule: Schedule, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """``ᾱ_t`` with ``ᾱ_{-1} = 1``, broadcast for a rank-``ndim`` array."""
  t = jnp.asarray(t)
  return _broadcast(jnp.where(t < 0, 1.0, schedule.alphas_cumprod[jnp.maximum(t, 0)]), ndim)


def fresh_noise(rng: jax.Array, shape: tuple[int, ...], lambdas: jnp.ndarray | None, dtype) -> jnp.ndarray:
  """A sampler's fresh Gaussian: decomposed as eq. (8) for videos, independent with ``lambdas=None``
  (the prior's embeddings)."""
  if lambdas is None:
    return jax.random.normal(rng, shape, dtype)
  return decomposed_noise(rng, shape, lambdas, dtype)


def ddim_step(z_t: jnp.ndarray, eps_hat: jnp.ndarray, t: jnp.ndarray, t_prev: jnp.ndarray,
              rng: jax.Array, lambdas: jnp.ndarray | None, schedule: Schedule, eta: float = 0.0,
              clip_x0: bool = False) -> jnp.ndarray:
  """One DDIM step (Song et al. 2021, eq. 12) from ``t`` to ``t_prev``:

  ``z_{t'} = √ᾱ_{t'} x̂0 + √(1-ᾱ_{t'}-σ²) ε̂ + σ ε'``, with
  ``σ = η √((1-ᾱ_{t'})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t'})`` and ``ε'`` decomposed noise (eq. 8), or
  independent noise with ``lambdas=None``.
  ``z_t``, ``eps_hat``: ``(B, N, H, W, C)``; ``t``, ``t_prev``: ``(B,)`` or scalars.
  With ``clip_x0`` the ε used for the direction is recomputed from the clipped x̂0, as ADM
  (guided-diffusion) does (diffusers: ``clip_sample=True, use_clipped_model_output=True``).
  """
  chex.assert_equal_shape([z_t, eps_hat])
  a_t = per_example(schedule.alphas_cumprod, t, z_t.ndim)
  a_prev = _alpha_bar(schedule, t_prev, z_t.ndim)
  x0 = predict_x0(z_t, eps_hat, t, schedule, clip_x0)
  if clip_x0:
    eps_hat = (z_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
  sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t)) * jnp.sqrt(1.0 - a_t / a_prev)
  direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps_hat
  z_prev = jnp.sqrt(a_prev) * x0 + direction
  if eta > 0:
    z_prev = z_prev + sigma * fresh_noise(rng, z_t.shape, lambdas, z_t.dtype)
  return z_prev


def ddpm_step(z_t: jnp.ndarray, eps_hat: jnp.ndarray, t: jnp.ndarray, rng: jax.Array,
              lambdas: jnp.ndarray | None, schedule: Schedule, clip_x0: bool = False) -> jnp.ndarray:
  """One ancestral DDPM step (Ho et al. 2020) from ``t`` to ``t - 1``: the posterior mean

  ``μ = √ᾱ_{t-1} β_t/(1-ᾱ_t) x̂0 + √α_t (1-ᾱ_{t-1})/(1-ᾱ_t) z_t``, plus
  ``σ_t ε'`` with ``σ_t² = β_t (1-ᾱ_{t-1})/(1-ᾱ_t)`` ("fixed small") and ``ε'`` decomposed
  noise (eq. 8); no noise is added at ``t = 0``.
  """
  chex.assert_equal_shape([z_t, eps_hat])
  nd = z_t.ndim
  beta = per_example(schedule.betas, t, nd)
  alpha = per_example(schedule.alphas, t, nd)
  a_t = per_example(schedule.alphas_cumprod, t, nd)
  a_prev = per_example(schedule.alphas_cumprod_prev, t, nd)
  x0 = predict_x0(z_t, eps_hat, t, schedule, clip_x0)
  mean = (jnp.sqrt(a_prev) * beta / (1.0 - a_t)) * x0 + (jnp.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)) * z_t
  var = jnp.maximum(beta * (1.0 - a_prev) / (1.0 - a_t), 1e-20)
  noise = fresh_noise(rng, z_t.shape, lambdas, z_t.dtype)
  nonzero = _broadcast((jnp.asarray(t) > 0).astype(z_t.dtype), nd)
  return mean + nonzero * jnp.sqrt(var) * noise


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly spaced ("leading") DDIM timesteps, descending, e.g. T=1000, 50 -> 980 ... 0."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}.")
  step = num_timesteps // num_steps
  return (np.arange(num_steps) * step)[::-1].astype(np.int32)


def sampler_timesteps(method: str, num_timesteps: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The chain's ``(t, t_prev)`` pairs: ``num_steps`` DDIM steps, or all T for DDPM."""
  if method == "ddim":
    ts = ddim_timesteps(num_timesteps, num_steps)
  elif method == "ddpm":
    ts = np.arange(num_timesteps)[::-1].astype(np.int32)
  else:
    raise ValueError(f"Unknown sampler {method!r}; use 'ddim' or 'ddpm'.")
  return ts, np.concatenate([ts[1:], [-1]]).astype(np.int32)


def sample_chain(eps_fn, rng: jax.Array, shape: tuple[int, ...], lambdas: jnp.ndarray | None,
                 schedule: Schedule, method: str = "ddim", num_steps: int = 50, eta: float = 0.0,
                 clip_x0: bool = True, initial_noise: jnp.ndarray | None = None) -> jnp.ndarray:
  """The sampler loop for any noise estimate ``eps_fn(z (B, ...), t (B,)) -> (B, ...)``: from
  ``z_T`` (``initial_noise``, or drawn decomposed with ``lambdas`` (eqs. 7-8), independent with
  ``lambdas=None``) down to ``x0``. ``method`` is ``ddim`` (``num_steps``, ``eta``) or ``ddpm``
  (all T steps); every fresh noise is drawn as ``z_T`` is. Jit-compatible: a ``lax.scan``."""
  ts, t_prevs = sampler_timesteps(method, schedule.num_timesteps, num_steps)
  init_rng, rng = jax.random.split(rng)
  z = fresh_noise(init_rng, shape, lambdas, jnp.float32) if initial_noise is None else initial_noise
  batch = shape[0]

  def body(z, inputs):
    t, t_prev, step_rng = inputs
    tb = jnp.full((batch,), t, jnp.int32)
    eps_hat = eps_fn(z, tb).astype(jnp.float32)
    if method == "ddim":
      z = ddim_step(z, eps_hat, tb, jnp.full((batch,), t_prev, jnp.int32), step_rng, lambdas,
                    schedule, eta=eta, clip_x0=clip_x0)
    else:
      z = ddpm_step(z, eps_hat, tb, step_rng, lambdas, schedule, clip_x0=clip_x0)
    return z, None

  rngs = jax.random.split(rng, len(ts))
  z, _ = jax.lax.scan(body, z, (jnp.asarray(ts), jnp.asarray(t_prevs), rngs))
  return z


def sample_embeddings(eps_fn, rng: jax.Array, shape: tuple[int, int], schedule: Schedule,
                      num_steps: int = 64, eta: float = 1.0) -> jnp.ndarray:
  """Ordinary (independent-noise) DDIM sampling of vectors ``(B, D)``: the prior's embeddings.

  ``eps_fn(z (B, D), t (B,)) -> (B, D)``. No clipping: embeddings are not bounded to [-1, 1]
  (which is also why there is no DDPM here: without clipping, its first steps from a cosine
  schedule's ᾱ_T ≈ 0 amplify the ε error without bound). ``eta = 1`` keeps the covariance of a
  learned distribution where ``eta = 0`` may stretch it (see the prior's test).
  """
  return sample_chain(eps_fn, rng, shape, None, schedule, "ddim", num_steps, eta, clip_x0=False)


def sample(base_fn, residual_fn, rng: jax.Array, shape: tuple[int, ...], lambdas: jnp.ndarray,
           schedule: Schedule, method: str = "ddim", num_steps: int = 50, eta: float = 0.0,
           clip_x0: bool = True, initial_noise: jnp.ndarray | None = None,
           guidance_scale: float | None = None, key_frame_input: bool = False,
           key_frame: jnp.ndarray | None = None) -> jnp.ndarray:
  """Generates videos ``(B, N, H, W, C)`` with VideoFusion's two networks from decomposed noise
  ``z_T`` (eq. 7 at t = T), each step's estimate from eqs. (10)-(11).

  ``base_fn``, ``residual_fn`` as in ``decomposed_eps``; the chain as in ``sample_chain``. With
  ``guidance_scale`` the networks take the doubled batch of ``guided_decomposed_eps`` (conditioned
  rows, then null-conditioned rows) and each step uses the guided estimate. ``key_frame_input`` and
  ``key_frame`` (a clean key frame ``(B, H, W, C)`` the residual generator reads at every step) as
  in ``decomposed_eps``.
  """
  eps_fn = decomposed_eps_fn(base_fn, residual_fn, lambdas, schedule, guidance_scale, key_frame_input, key_frame)
  return sample_chain(eps_fn, rng, shape, lambdas, schedule, method, num_steps, eta, clip_x0, initial_noise)


def decomposed_eps_fn(base_fn, residual_fn, lambdas: jnp.ndarray, schedule: Schedule,
                      guidance_scale: float | None = None, key_frame_input: bool = False,
                      key_frame: jnp.ndarray | None = None):
  """VideoFusion's per-step estimate ``eps_fn(z (B, N, H, W, C), t (B,))`` for ``sample_chain``:
  eqs. (10)-(11), or with ``guidance_scale`` their guided mix (``guided_decomposed_eps``)."""
  def eps_fn(z, t):
    if guidance_scale is None:
      return decomposed_eps(base_fn, residual_fn, z, t, lambdas, schedule, key_frame_input=key_frame_input,
                            key_frame=key_frame)[0]
    return guided_decomposed_eps(base_fn, residual_fn, z, t, lambdas, schedule, guidance_scale,
                                 key_frame_input=key_frame_input, key_frame=key_frame)
  return eps_fn
