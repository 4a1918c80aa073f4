"""Noise schedules: betas, alphas and their cumulative products.

Timesteps are 0-based indices ``t = 0 .. T-1`` (the paper's ``t = 1 .. T``), as in
diffusers, so ``alphas_cumprod[t]`` is the paper's ``ᾱ_{t+1}``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("linear", "cosine", "scaled_linear")


class Schedule(NamedTuple):
  """Per-timestep constants, each of shape ``(T,)`` in float32."""

  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray  # ᾱ_{t-1}, with ᾱ_{-1} = 1.
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (2021), eq. 17: ᾱ(t) = cos²(((t/T) + s) / (1 + s) · π/2)."""

  def alpha_bar(u: float) -> float:
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

  return np.array(
      [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
       for i in range(num_timesteps)],
      dtype=np.float64)


def betas_of(kind: str, num_timesteps: int) -> np.ndarray:
  """β_t, t = 0 .. T-1, in float64 (NumPy: usable before any device is set up)."""
  if not isinstance(num_timesteps, int) or num_timesteps < 2:
    raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}.")
  if kind == "linear":
    return np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
  if kind == "scaled_linear":
    return np.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=np.float64) ** 2
  if kind == "cosine":
    return _cosine_betas(num_timesteps)
  raise ValueError(f"Unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}.")


def make_schedule(kind: str, num_timesteps: int) -> Schedule:
  """Builds a schedule: ``linear`` (DDPM, β from 1e-4 to 0.02), ``cosine`` (Nichol and
  Dhariwal) or ``scaled_linear`` (Stable Diffusion: √β linear from √0.00085 to √0.012)."""
  betas = betas_of(kind, num_timesteps)
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
  return Schedule(
      betas=f32(betas),
      alphas=f32(alphas),
      alphas_cumprod=f32(alphas_cumprod),
      alphas_cumprod_prev=f32(alphas_cumprod_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
  )


def per_example(values: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """Gathers ``values[t]`` for ``t`` of shape ``(B,)`` (or a scalar) and reshapes it to
  broadcast against an array of rank ``ndim`` whose leading axis is the batch."""
  out = jnp.asarray(values)[jnp.asarray(t)]
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))
