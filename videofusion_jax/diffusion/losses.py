"""Training objectives: the joint VideoFusion loss (eq. 12), VDM*'s video loss, and the ε loss of
the image stage and the prior."""
from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from videofusion_jax.diffusion.decomposition import (
  decomposed_eps,
  key_frame_index,
  non_key_frames,
  q_sample,
  take_frames,
)
from videofusion_jax.diffusion.schedules import Schedule

BaseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
ResidualFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def joint_loss(base_fn: BaseFn, residual_fn: ResidualFn, x0: jnp.ndarray, t: jnp.ndarray,
               noise: jnp.ndarray, lambdas: jnp.ndarray, schedule: Schedule, key_frame_input: bool = False,
               clean_key_frame: bool = False, weights: jnp.ndarray | None = None,
               frames: jnp.ndarray | None = None):
  """Eq. (12), the joint loss with stop-gradient, divided by ``N·H·W·C`` and averaged over B
  (with ``weights`` ``(B,)``, each example's term is weighted first: ``min_snr_weights``).

  ``L = ‖ε^k - z_φ^b(z^k)‖² + Σ_{i≠k} ‖ε^i - √λ^i sg[z_φ^b(z^k)] - √(1-λ^i) z_ψ^r(z'^i, i)‖²``
  where ``z'`` is built from ``sg[z_φ^b]`` (eq. 10). The base generator therefore learns
  from the key-frame term alone.

  Args:
    base_fn, residual_fn: the networks, as in ``decomposed_eps``.
    x0: clean videos ``(B, N, H, W, C)``; t: ``(B,)``; noise: decomposed ``ε`` like x0.
    key_frame_input: pass the residual generator ``x̂^k`` (``decomposed_eps``), from ``sg[z_φ^b]``;
      with ``clean_key_frame``, the real key frame ``x0[:, k]`` instead.
    frames: ``(B, R)`` non-key frames of each example (``sample_residual_frames``) whose term is
      taken: beyond eq. 12, an unbiased estimate of ``loss_residual`` (the mean over all N-1 frames)
      at R/(N-1) of the residual generator's cost. None: every non-key frame.
  Returns:
    ``(loss, {'loss_key': ..., 'loss_residual': ...})``: scalars; the two terms are
    mean squared errors over their own frames, and
    ``loss = (loss_key + (N-1) loss_residual) / N``.
  """
  chex.assert_rank(x0, 5)
  chex.assert_equal_shape([x0, noise])
  num_frames = x0.shape[1]
  z_t = q_sample(x0, t, noise, schedule)
  k = key_frame_index(num_frames)
  eps_hat, base_eps, _ = decomposed_eps(base_fn, residual_fn, z_t, t, lambdas, schedule,
                                        stop_base_gradient=True, key_frame_input=key_frame_input,
                                        key_frame=x0[:, k] if key_frame_input and clean_key_frame else None,
                                        frames=frames)
  loss_key = _weighted_mean(jnp.square(noise[:, k].astype(jnp.float32) - base_eps.astype(jnp.float32)), weights)
  if frames is None:
    target, estimate = noise[:, non_key_frames(num_frames)], eps_hat[:, non_key_frames(num_frames)]
  else:  # eps_hat holds those frames only
    target, estimate = take_frames(noise, frames), eps_hat
  loss_residual = _weighted_mean(jnp.square(target.astype(jnp.float32) - estimate.astype(jnp.float32)), weights)
  loss = (loss_key + (num_frames - 1) * loss_residual) / num_frames
  return loss, {"loss_key": loss_key, "loss_residual": loss_residual}


def video_denoising_loss(eps_fn: BaseFn, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray,
                         schedule: Schedule, weights: jnp.ndarray | None = None):
  """Eq. (1)'s ε loss for a network on whole videos (VDM*): ``‖ε - eps_fn(z_t, t)‖²`` with
  ``eps_fn(z (B, N, H, W, C), t (B,)) -> (B, N, H, W, C)``, averaged over every element.

  ``noise`` is independent per frame for VDM (``decomposed_noise`` with λ = 0). Returns ``(loss,
  terms)`` with the terms of ``joint_loss`` (the key frame's MSE and the other frames'), so that
  both kinds of model log the same figures; ``loss = (loss_key + (N-1) loss_residual) / N``.
  ``weights`` ``(B,)``: per-example weights, as in ``joint_loss``.
  """
  chex.assert_rank(x0, 5)
  chex.assert_equal_shape([x0, noise])
  num_frames = x0.shape[1]
  err = jnp.square(noise.astype(jnp.float32) - eps_fn(q_sample(x0, t, noise, schedule), t).astype(jnp.float32))
  per_frame = jnp.mean(_scale_examples(err, weights), axis=(0, 2, 3, 4))
  loss_key = per_frame[key_frame_index(num_frames)]
  loss_residual = jnp.mean(per_frame[non_key_frames(num_frames)])
  return jnp.mean(per_frame), {"loss_key": loss_key, "loss_residual": loss_residual}


def denoising_loss(eps_fn: BaseFn, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray,
                   schedule: Schedule, weights: jnp.ndarray | None = None):
  """The ε-prediction loss of an ordinary DPM: ``‖ε - eps_fn(√ᾱ x0 + √(1-ᾱ) ε, t)‖²``.

  The image stage trains the base generator with it on single frames ``(B, H, W, C)``; the
  prior, on embeddings ``(B, D)``. ``t``: ``(B,)``. Returns the mean over all elements (with
  ``weights`` ``(B,)``, of each example's weighted error).
  """
  chex.assert_equal_shape([x0, noise])
  z_t = q_sample(x0, t, noise, schedule)
  return _weighted_mean(jnp.square(noise.astype(jnp.float32) - eps_fn(z_t, t).astype(jnp.float32)), weights)


def _scale_examples(err: jnp.ndarray, weights: jnp.ndarray | None) -> jnp.ndarray:
  """``err`` ``(B, ...)`` with example ``b``'s entries times ``weights[b]`` (None: unchanged)."""
  return err if weights is None else err * weights.reshape(weights.shape + (1,) * (err.ndim - 1))


def _weighted_mean(err: jnp.ndarray, weights: jnp.ndarray | None) -> jnp.ndarray:
  """Mean of ``err`` ``(B, ...)`` over every element, each example's entries scaled by ``weights[b]``."""
  return jnp.mean(_scale_examples(err, weights))


def min_snr_weights(t: jnp.ndarray, schedule: Schedule, gamma: float) -> jnp.ndarray:
  """Min-SNR-γ loss weights for ε-prediction (Hang et al., ICCV 2023): ``min(SNR_t, γ) / SNR_t``
  with ``SNR_t = ᾱ_t / (1-ᾱ_t)``, ``(B,)`` for ``t`` ``(B,)``.

  The ε loss weighs the clean-image error by ``SNR_t``; this caps that weight at ``γ``, so that the
  nearly clean timesteps (whose ε is hardest to tell and matters least to samples) stop dominating
  the gradient. Timesteps with ``SNR_t <= γ`` keep weight 1.
  """
  a = jnp.asarray(schedule.alphas_cumprod)[t]
  snr = a / (1.0 - a)
  return jnp.where(snr > gamma, gamma / snr, 1.0)  # not min(snr, γ)/snr: no 0/0 where ᾱ_t rounds to 0


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int, stratified: bool = False) -> jnp.ndarray:
  """Training timesteps, ``(B,)`` int32 in ``[0, T)``, each uniform.

  ``stratified`` (the low-discrepancy sampler of Kingma et al., 2021): ``[0, T)`` is cut into B equal
  strata, one timestep is drawn in each from one shared offset, and the strata are dealt to the
  examples in a random order. Each timestep is still uniform (exactly so when B divides T), but the
  batch covers every noise level, so the loss of a small batch varies far less from step to step.
  """
  if not stratified:
    return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  u_rng, p_rng = jax.random.split(rng)
  strata = jax.random.permutation(p_rng, batch_size).astype(jnp.float32)
  u = jax.random.uniform(u_rng, ())
  t = jnp.floor((strata + u) / batch_size * num_timesteps).astype(jnp.int32)
  return jnp.minimum(t, num_timesteps - 1)


def sample_residual_frames(rng: jax.Array, batch_size: int, num_frames: int, count: int) -> jnp.ndarray:
  """``count`` distinct non-key frames of each example, drawn uniformly: ``(B, count)`` int32 indices
  into the ``N = num_frames`` frames (the key frame ``k`` never among them), for ``joint_loss(frames=)``.
  Every non-key frame is drawn with probability ``count / (N-1)``."""
  if not 1 <= count <= num_frames - 1:
    raise ValueError(f"count must be in [1, {num_frames - 1}] (the non-key frames of {num_frames}), got {count}.")
  order = jnp.argsort(jax.random.uniform(rng, (batch_size, num_frames - 1)), axis=1)[:, :count]
  return non_key_frames(num_frames)[order]
