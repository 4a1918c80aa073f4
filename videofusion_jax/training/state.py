"""The train state (what is checkpointed) and the EMA of the parameters."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Everything that is checkpointed. ``params`` is ``{'base': ..., 'residual': ...}``."""

  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray  # raw uint32 key data, so that Orbax saves it as an array


def ema_update(ema, params, decay: float, step: jnp.ndarray):
  """``ema ← d·ema + (1-d)·params`` with ``d = min(decay, (1+step)/(10+step))`` (warm-up)."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: _ema_leaf(e, p, 1.0 - d), ema, params)


@jax.jit
def _ema_leaf(e, p, one_minus_d):
  # Jitted per leaf, in lax: the step's trace holds one call per parameter, traced once per shape,
  # not three jnp operations (each a jitted call) per parameter (training/optimizer.py). 1 - d comes
  # in float32: in bfloat16 d = 0.999 rounds to 1, and 1 - d to 0. As e + (1-d)(p - e): where p = e (a
  # network this stage does not train) the average stays e to the bit; d·e + (1-d)·p, rounded twice, drifted
  # off it by an ulp in a fifth of the values.
  cast = lambda v: jax.lax.convert_element_type(v, e.dtype)  # noqa: E731
  return jax.lax.add(e, jax.lax.mul(cast(one_minus_d), jax.lax.sub(p, e)))
