"""Sampler steps (DDIM, DDPM) whose fresh noise is drawn decomposed (eq. 8), and the loop.

Every step takes the full-video noise estimate ``eps_hat`` of eq. (11). Timesteps are
0-based; ``t_prev = -1`` means the end of the chain (``ᾱ_{-1} = 1``).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from videofusion_jax.diffusion.decomposition import compose_noise, decomposed_eps, decomposed_noise, predict_x0
from videofusion_jax.diffusion.guidance import guided_decomposed_eps
from videofusion_jax.diffusion.schedules import Schedule, betas_of, per_example


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


RowKeys = tuple  # (base_keys (B, 2), residual_keys (B, 2) or None): a chain's keys, row by row


def row_noise(row_keys: RowKeys, draw, shape: tuple[int, ...], lambdas: jnp.ndarray | None,
              dtype=jnp.float32) -> jnp.ndarray:
  """The chain's draw number ``draw`` (0: ``z_T``; s: step s's fresh noise) when every row has its
  own keys ``row_keys = (base (B, 2), residual (B, 2))``: row ``b``'s base noise comes from
  ``base[b]`` and its residual noise from ``residual[b]`` (eq. 8); with ``lambdas=None`` the whole
  (independent) noise comes from ``base[b]``.

  A row's noise so depends on its keys alone, not on the batch or the devices it is drawn on; rows
  that share a base key share the base noise of every step (under DDIM with η = 0, the key frame),
  rows that share a residual key share the residual noise.
  """
  base_keys, residual_keys = row_keys
  if lambdas is not None and residual_keys is None:
    raise ValueError("row_noise: decomposed (video) noise needs residual keys, row_keys = (base, residual).")
  fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))

  def normal(keys, tail):
    return jax.vmap(lambda k: jax.random.normal(k, tail, dtype))(fold(keys, draw))

  if lambdas is None:
    return normal(base_keys, shape[1:])
  return compose_noise(normal(base_keys, shape[2:]), normal(residual_keys, shape[1:]), lambdas).astype(dtype)


def ddim_step(z_t: jnp.ndarray, eps_hat: jnp.ndarray, t: jnp.ndarray, t_prev: jnp.ndarray,
              rng: jax.Array, lambdas: jnp.ndarray | None, schedule: Schedule, eta: float = 0.0,
              clip_x0: bool = False, noise: jnp.ndarray | None = None) -> jnp.ndarray:
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
    z_prev = z_prev + sigma * (fresh_noise(rng, z_t.shape, lambdas, z_t.dtype) if noise is None else noise)
  return z_prev


def ddpm_step(z_t: jnp.ndarray, eps_hat: jnp.ndarray, t: jnp.ndarray, rng: jax.Array,
              lambdas: jnp.ndarray | None, schedule: Schedule, clip_x0: bool = False,
              noise: jnp.ndarray | None = None, variance: str = "fixed_small") -> jnp.ndarray:
  """One ancestral DDPM step (Ho et al. 2020) from ``t`` to ``t - 1``: the posterior mean

  ``μ = √ᾱ_{t-1} β_t/(1-ᾱ_t) x̂0 + √α_t (1-ᾱ_{t-1})/(1-ᾱ_t) z_t``, plus
  ``σ_t ε'`` with ``σ_t² = β_t (1-ᾱ_{t-1})/(1-ᾱ_t)`` (``variance="fixed_small"``) or
  ``σ_t² = β_t`` (``"fixed_large"``; Ho et al.'s other choice, diffusers' ``variance_type``) and
  ``ε'`` decomposed noise (eq. 8), or ``noise`` when given; no noise is added at ``t = 0``.
  """
  _check_variance(variance)
  chex.assert_equal_shape([z_t, eps_hat])
  nd = z_t.ndim
  beta = per_example(schedule.betas, t, nd)
  alpha = per_example(schedule.alphas, t, nd)
  a_t = per_example(schedule.alphas_cumprod, t, nd)
  a_prev = per_example(schedule.alphas_cumprod_prev, t, nd)
  x0 = predict_x0(z_t, eps_hat, t, schedule, clip_x0)
  mean = (jnp.sqrt(a_prev) * beta / (1.0 - a_t)) * x0 + (jnp.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)) * z_t
  if variance == "fixed_large":
    var = beta
  else:
    var = jnp.maximum(beta * (1.0 - a_prev) / (1.0 - a_t), 1e-20)
  if noise is None:
    noise = fresh_noise(rng, z_t.shape, lambdas, z_t.dtype)
  nonzero = _broadcast((jnp.asarray(t) > 0).astype(z_t.dtype), nd)
  return mean + nonzero * jnp.sqrt(var) * noise


DDIM_SPACINGS = ("leading", "trailing")
DDPM_VARIANCES = ("fixed_small", "fixed_large")


def _check_variance(variance: str) -> None:
  if variance not in DDPM_VARIANCES:
    raise ValueError(f"Unknown DDPM variance {variance!r}; use one of {DDPM_VARIANCES}.")


def _check_spacing(spacing: str) -> None:
  if spacing not in DDIM_SPACINGS:
    raise ValueError(f"Unknown DDIM timestep spacing {spacing!r}; use one of {DDIM_SPACINGS}.")


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> np.ndarray:
  """``num_steps`` distinct DDIM timesteps, descending. ``spacing`` as diffusers'
  ``timestep_spacing``: ``leading`` (multiples of ``T // num_steps``, e.g. T=1000, 50 -> 980 ... 0;
  never visits ``T-1``) or ``trailing`` (``round(arange(T, 0, -T/num_steps)) - 1``, e.g. 999 ... 19:
  starts at ``T-1``, Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
  """
  _check_spacing(spacing)
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}.")
  if spacing == "trailing":
    # diffusers' formula; [:num_steps] drops the extra ~0 (-> -1) that float arange yields for
    # some (T, num_steps), e.g. (50, 29), and that diffusers keeps.
    ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(np.int64)[:num_steps] - 1
    return ts.astype(np.int32)
  step = num_timesteps // num_steps
  return (np.arange(num_steps) * step)[::-1].astype(np.int32)


def start_signal(schedule_kind: str, num_timesteps: int, num_steps: int, spacing: str = "leading"
                 ) -> tuple[int, float]:
  """The DDIM chain's first timestep ``t`` and ``√ᾱ_t`` there: the share of the signal that the chain
  takes its starting noise to still hold (pure noise holds none). Near 0 for ``trailing`` (``t = T-1``);
  ``leading`` starts lower, far too low when ``num_steps > T/2`` (step 1: ``t = num_steps - 1``) or
  when there are very few steps (one step: ``t = 0``). NumPy only: config validation calls it before
  any device is set up."""
  t = int(ddim_timesteps(num_timesteps, num_steps, spacing)[0])
  return t, float(np.sqrt(np.prod(1.0 - betas_of(schedule_kind, num_timesteps)[:t + 1])))


def sampler_timesteps(method: str, num_timesteps: int, num_steps: int,
                      spacing: str = "leading") -> tuple[np.ndarray, np.ndarray]:
  """The chain's ``(t, t_prev)`` pairs: ``num_steps`` DDIM steps (``spacing`` as in
  ``ddim_timesteps``), or all T for DDPM (where both spacings are the same)."""
  _check_spacing(spacing)
  if method == "ddim":
    ts = ddim_timesteps(num_timesteps, num_steps, spacing)
  elif method == "ddpm":
    ts = np.arange(num_timesteps)[::-1].astype(np.int32)
  else:
    raise ValueError(f"Unknown sampler {method!r}; use 'ddim' or 'ddpm'.")
  return ts, np.concatenate([ts[1:], [-1]]).astype(np.int32)


def sample_chain(eps_fn, rng: jax.Array | None, shape: tuple[int, ...], lambdas: jnp.ndarray | None,
                 schedule: Schedule, method: str = "ddim", num_steps: int = 50, eta: float = 0.0,
                 clip_x0: bool = True, initial_noise: jnp.ndarray | None = None,
                 row_keys: RowKeys | None = None, spacing: str = "leading",
                 variance: str = "fixed_small") -> jnp.ndarray:
  """The sampler loop for any noise estimate ``eps_fn(z (B, ...), t (B,)) -> (B, ...)``: from
  ``z_T`` (``initial_noise``, or drawn decomposed with ``lambdas`` (eqs. 7-8), independent with
  ``lambdas=None``) down to ``x0``. ``method`` is ``ddim`` (``num_steps``, ``eta``) or ``ddpm``
  (all T steps); every fresh noise is drawn as ``z_T`` is: from ``rng`` for the whole batch, or,
  with ``row_keys`` (``rng`` unused), row by row (``row_noise``). ``spacing``: the DDIM timesteps
  (``ddim_timesteps``); ``variance``: DDPM's σ_t² (``ddpm_step``). Jit-compatible: a ``lax.scan``."""
  _check_variance(variance)
  ts, t_prevs = sampler_timesteps(method, schedule.num_timesteps, num_steps, spacing)
  batch = shape[0]
  if (rng is None) == (row_keys is None):
    raise ValueError("sample_chain draws its noise from rng (one key for the batch) or from row_keys (a key per "
                     "row); give exactly one of them.")
  if row_keys is None:
    init_rng, rng = jax.random.split(rng)
    draws = jax.random.split(rng, len(ts))
    z = fresh_noise(init_rng, shape, lambdas, jnp.float32) if initial_noise is None else initial_noise
  else:
    draws = jnp.arange(1, len(ts) + 1)
    z = row_noise(row_keys, 0, shape, lambdas) if initial_noise is None else initial_noise
  stochastic = method == "ddpm" or eta > 0

  def body(z, inputs):
    t, t_prev, draw = inputs  # draw: this step's key, or with row_keys its draw number
    step_rng = draw if row_keys is None else None
    noise = row_noise(row_keys, draw, shape, lambdas) if row_keys is not None and stochastic else None
    tb = jnp.full((batch,), t, jnp.int32)
    eps_hat = eps_fn(z, tb).astype(jnp.float32)
    if method == "ddim":
      z = ddim_step(z, eps_hat, tb, jnp.full((batch,), t_prev, jnp.int32), step_rng, lambdas,
                    schedule, eta=eta, clip_x0=clip_x0, noise=noise)
    else:
      z = ddpm_step(z, eps_hat, tb, step_rng, lambdas, schedule, clip_x0=clip_x0, noise=noise,
                    variance=variance)
    return z, None

  z, _ = jax.lax.scan(body, z, (jnp.asarray(ts), jnp.asarray(t_prevs), draws))
  return z


def sample_embeddings(eps_fn, rng: jax.Array | None, shape: tuple[int, int], schedule: Schedule,
                      num_steps: int = 64, eta: float = 1.0, row_keys: RowKeys | None = None,
                      spacing: str = "leading") -> jnp.ndarray:
  """Ordinary (independent-noise) DDIM sampling of vectors ``(B, D)``: the prior's embeddings.

  ``eps_fn(z (B, D), t (B,)) -> (B, D)``. No clipping: embeddings are not bounded to [-1, 1]
  (which is also why there is no DDPM here: without clipping, its first steps from a cosine
  schedule's ᾱ_T ≈ 0 amplify the ε error without bound). ``eta = 1`` keeps the covariance of a
  learned distribution where ``eta = 0`` may stretch it (see the prior's test). ``row_keys``:
  ``(keys (B, 2), None)``, each row's noise from its own key (``row_noise``). ``spacing``: the
  timesteps, as ``ddim_timesteps``.
  """
  return sample_chain(eps_fn, rng, shape, None, schedule, "ddim", num_steps, eta, clip_x0=False,
                      row_keys=row_keys, spacing=spacing)


def sample(base_fn, residual_fn, rng: jax.Array, shape: tuple[int, ...], lambdas: jnp.ndarray,
           schedule: Schedule, method: str = "ddim", num_steps: int = 50, eta: float = 0.0,
           clip_x0: bool = True, initial_noise: jnp.ndarray | None = None,
           guidance_scale: float | None = None, key_frame_input: bool = False,
           key_frame: jnp.ndarray | None = None, spacing: str = "leading",
           variance: str = "fixed_small") -> jnp.ndarray:
  """Generates videos ``(B, N, H, W, C)`` with VideoFusion's two networks from decomposed noise
  ``z_T`` (eq. 7 at t = T), each step's estimate from eqs. (10)-(11).

  ``base_fn``, ``residual_fn`` as in ``decomposed_eps``; the chain as in ``sample_chain`` (``spacing``:
  the DDIM timesteps, ``variance``: DDPM's σ_t², as ``config.sample`` names them). With
  ``guidance_scale`` the networks take the doubled batch of ``guided_decomposed_eps`` (conditioned
  rows, then null-conditioned rows) and each step uses the guided estimate. ``key_frame_input`` and
  ``key_frame`` (a clean key frame ``(B, H, W, C)`` the residual generator reads at every step) as
  in ``decomposed_eps``.
  """
  eps_fn = decomposed_eps_fn(base_fn, residual_fn, lambdas, schedule, guidance_scale, key_frame_input, key_frame)
  return sample_chain(eps_fn, rng, shape, lambdas, schedule, method, num_steps, eta, clip_x0, initial_noise,
                      spacing=spacing, variance=variance)


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
