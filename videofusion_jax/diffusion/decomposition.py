"""The decomposed forward process: per-frame λ, shared base noise, per-frame residual.

Videos are ``(B, N, H, W, C)``; the key frame is ``k = N // 2``. Equation numbers are those
of ``method.md``.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from videofusion_jax.diffusion.schedules import Schedule, per_example


def key_frame_index(num_frames: int) -> int:
  """The key frame ``k = ⌊N/2⌋`` that carries the content shared by the clip."""
  return num_frames // 2


def frame_lambdas(num_frames: int, lam: float) -> jnp.ndarray:
  """Per-frame share of the base part ``λ^i``, shape ``(N,)``: ``lam`` everywhere and 1 at
  the key frame (eq. 9). ``lam = 0`` gives independent per-frame noise (ordinary per-frame diffusion)."""
  if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 2:
    raise ValueError(
        f"num_frames must be an integer >= 2 (a key frame plus at least one other), "
        f"got {num_frames!r}.")
  lam = float(lam)
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"lambda (the base-noise share) must lie in [0, 1], got {lam}.")
  lambdas = jnp.full((num_frames,), lam, dtype=jnp.float32)
  return lambdas.at[key_frame_index(num_frames)].set(1.0)


def _frame_weights(lambdas: jnp.ndarray, ndim: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """``√λ^i`` and ``√(1-λ^i)`` shaped ``(1, N, 1, ..., 1)`` for a rank-``ndim`` video (from
  per-example ``lambdas`` ``(B, N)``: ``(B, N, 1, ..., 1)``)."""
  shape = (1,) * (2 - lambdas.ndim) + lambdas.shape + (1,) * (ndim - 2)
  return jnp.sqrt(lambdas).reshape(shape), jnp.sqrt(1.0 - lambdas).reshape(shape)


def frame_residuals(x: jnp.ndarray, lambdas: jnp.ndarray) -> jnp.ndarray:
  """Eq. (2) solved for the residual: ``Δx^i = (x^i - √λ^i x^k) / √(1-λ^i)``.

  ``x``: ``(B, N, H, W, C)``. The key frame (``λ^k = 1``) has no residual and gets 0.
  """
  chex.assert_rank(x, 5)
  chex.assert_shape(lambdas, (x.shape[1],))
  sqrt_lam, sqrt_one_minus = _frame_weights(lambdas, x.ndim)
  key = x[:, key_frame_index(x.shape[1])][:, None]
  safe = jnp.where(sqrt_one_minus > 0, sqrt_one_minus, 1.0)
  return jnp.where(sqrt_one_minus > 0, (x - sqrt_lam * key) / safe, 0.0)


def compose_noise(base: jnp.ndarray, residual: jnp.ndarray, lambdas: jnp.ndarray) -> jnp.ndarray:
  """Eq. (4): ``ε^i = √λ^i b + √(1-λ^i) r^i``.

  ``base``: ``(B, H, W, C)``, shared by all frames; ``residual``: ``(B, N, H, W, C)``; ``lambdas``
  ``(N,)``, or ``(B, N)`` where each example has frames of its own (``take_frames``).
  Returns ``(B, N, H, W, C)``; each frame is N(0, I) and ``Cov(ε^i, ε^j) = √(λ^i λ^j) I``.
  """
  chex.assert_rank(residual, 5)
  chex.assert_shape(base, residual.shape[:1] + residual.shape[2:])
  chex.assert_shape(lambdas, residual.shape[:2] if lambdas.ndim == 2 else residual.shape[1:2])
  sqrt_lam, sqrt_one_minus = _frame_weights(lambdas, residual.ndim)
  return sqrt_lam * base[:, None] + sqrt_one_minus * residual


def decomposed_noise(rng: jax.Array, shape: tuple[int, ...], lambdas: jnp.ndarray,
                     dtype=jnp.float32) -> jnp.ndarray:
  """Draws decomposed noise of ``shape = (B, N, H, W, C)`` (eqs. 4 and 8).

  ``rng`` is split into ``(base_rng, residual_rng)``; the base noise is
  ``normal(base_rng, (B, H, W, C))`` and the residual ``normal(residual_rng, shape)``.
  """
  if len(shape) != 5:
    raise ValueError(f"decomposed_noise needs a video shape (B, N, H, W, C), got {shape}.")
  base_rng, residual_rng = jax.random.split(rng)
  base = jax.random.normal(base_rng, shape[:1] + shape[2:], dtype)
  residual = jax.random.normal(residual_rng, shape, dtype)
  return compose_noise(base, residual, lambdas).astype(dtype)


def q_sample(x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray, schedule: Schedule) -> jnp.ndarray:
  """Eqs. (1) and (7): ``z_t = √ᾱ_t x0 + √(1-ᾱ_t) ε``.

  ``x0`` and ``noise``: ``(B, ...)`` (frames or videos); ``t``: ``(B,)`` integer indices.
  With decomposed ``noise`` this is eq. (7); with independent noise, eq. (1).
  """
  chex.assert_equal_shape([x0, noise])
  a = per_example(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  s = per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return a * x0 + s * noise


def predict_x0(z_t: jnp.ndarray, eps_hat: jnp.ndarray, t: jnp.ndarray, schedule: Schedule,
               clip_x0: bool = False) -> jnp.ndarray:
  """``x̂0 = (z_t - √(1-ᾱ_t) ε̂) / √ᾱ_t``, optionally clipped to the data range [-1, 1]."""
  a = per_example(schedule.alphas_cumprod, t, z_t.ndim)
  x0 = (z_t - jnp.sqrt(1.0 - a) * eps_hat) / jnp.sqrt(a)
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def remove_base_noise(z_t: jnp.ndarray, base_eps: jnp.ndarray, t: jnp.ndarray,
                      lambdas: jnp.ndarray, schedule: Schedule) -> jnp.ndarray:
  """Eq. (10): ``z'^i_t = z^i_t - √λ^i √(1-ᾱ_t) b̂`` for every frame.

  ``z_t``: ``(B, N, H, W, C)``; ``base_eps``: ``(B, H, W, C)``, the base generator's
  estimate of ``b_t`` from the key frame; ``t``: ``(B,)``. The key frame's entry becomes
  ``√ᾱ_t x^k`` and is not used by the residual generator.
  """
  chex.assert_rank(z_t, 5)
  chex.assert_shape(base_eps, z_t.shape[:1] + z_t.shape[2:])
  sqrt_lam, _ = _frame_weights(lambdas, z_t.ndim)
  s = per_example(schedule.sqrt_one_minus_alphas_cumprod, t, z_t.ndim)
  return z_t - sqrt_lam * s * base_eps[:, None]


def combine_noise(base_eps: jnp.ndarray, residual_eps: jnp.ndarray, lambdas: jnp.ndarray) -> jnp.ndarray:
  """Eq. (11): ``ε̂^k = b̂`` and ``ε̂^i = √λ^i b̂ + √(1-λ^i) r̂^i`` for ``i ≠ k``.

  ``base_eps``: ``(B, H, W, C)``; ``residual_eps``: ``(B, N, H, W, C)`` (the key frame's
  entry is multiplied by ``√(1-λ^k) = 0``). Returns ``(B, N, H, W, C)``.
  """
  return compose_noise(base_eps, residual_eps, lambdas)


def non_key_frames(num_frames: int) -> jnp.ndarray:
  """Indices of the frames ``i ≠ k`` that the residual generator sees, shape ``(N-1,)``."""
  k = key_frame_index(num_frames)
  return jnp.array([i for i in range(num_frames) if i != k], dtype=jnp.int32)


def insert_key_frame(others: jnp.ndarray, key: jnp.ndarray) -> jnp.ndarray:
  """Inverse of taking the non-key frames: ``(B, N-1, ...)`` and ``(B, ...)`` -> ``(B, N, ...)``."""
  k = key_frame_index(others.shape[1] + 1)
  return jnp.concatenate([others[:, :k], key[:, None], others[:, k:]], axis=1)


def take_frames(video: jnp.ndarray, frames: jnp.ndarray) -> jnp.ndarray:
  """Each example's own frames: ``video`` ``(B, N, ...)`` and ``frames`` ``(B, R)`` -> ``(B, R, ...)``."""
  chex.assert_rank(frames, 2)
  chex.assert_equal_shape_prefix([video, frames], 1)
  return jnp.take_along_axis(video, frames.reshape(frames.shape + (1,) * (video.ndim - 2)), axis=1)


def decomposed_eps(base_fn, residual_fn, z_t: jnp.ndarray, t: jnp.ndarray, lambdas: jnp.ndarray,
                   schedule: Schedule, stop_base_gradient: bool = False, key_frame_input: bool = False,
                   key_frame: jnp.ndarray | None = None, frames: jnp.ndarray | None = None):
  """Eqs. (10) and (11) together: the noise estimate of every frame from the two networks.

  ``base_fn(z_key (B, H, W, C), t (B,)) -> (B, H, W, C)`` predicts ``b_t`` from the key frame;
  ``residual_fn(z' (B, N-1, H, W, C), t (B,), frame_index (N-1,)) -> (B, N-1, H, W, C)``
  predicts the residual noise of the other frames. Returns ``(eps_hat, base_eps,
  residual_eps)`` with ``eps_hat`` of shape ``(B, N, H, W, C)``. With
  ``stop_base_gradient`` the base estimate enters eqs. (10)-(11) through
  ``jax.lax.stop_gradient`` (the sg of eq. 12).

  ``key_frame_input`` (beyond the paper): the residual generator also receives the base
  generator's current estimate of the clean key frame, ``residual_fn(z', t, i, x̂^k (B, H, W, C))``
  with ``x̂^k = predict_x0(z^k, b̂, t)`` clipped to [-1, 1], built from the same (stop-gradient,
  when asked) base estimate as ``z'``, so that each frame is denoised as a change of the key frame.
  With ``key_frame`` ``(B, H, W, C)`` given, the residual generator reads that clean key frame
  instead (``model.key_frame_clean``: the real one in training, the finished one at generation).

  ``frames`` ``(B, R)`` (``train.residual_frames``): the residual generator runs on these non-key
  frames of each example only (``frame_index`` ``(B, R)``), and ``eps_hat`` and ``residual_eps`` are
  theirs, ``(B, R, H, W, C)``.
  """
  chex.assert_rank(z_t, 5)
  num_frames = z_t.shape[1]
  k = key_frame_index(num_frames)
  base_eps = base_fn(z_t[:, k], t)
  used_base = jax.lax.stop_gradient(base_eps) if stop_base_gradient else base_eps
  z_prime = remove_base_noise(z_t, used_base, t, lambdas, schedule)
  idx = non_key_frames(num_frames) if frames is None else frames
  z_in = z_prime[:, idx] if frames is None else take_frames(z_prime, frames)
  if key_frame is not None:
    residual_others = residual_fn(z_in, t, idx, key_frame)
  elif key_frame_input:
    key_x0 = predict_x0(z_t[:, k], used_base, t, schedule, clip_x0=True)
    residual_others = residual_fn(z_in, t, idx, key_x0)
  else:
    residual_others = residual_fn(z_in, t, idx)
  if frames is not None:
    return combine_noise(used_base, residual_others, lambdas[frames]), base_eps, residual_others
  residual_eps = insert_key_frame(residual_others, jnp.zeros_like(base_eps))
  return combine_noise(used_base, residual_eps, lambdas), base_eps, residual_eps
