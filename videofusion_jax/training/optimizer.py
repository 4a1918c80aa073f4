"""Which networks train, their learning rates, per-network clipping and AdamW."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from videofusion_jax.models.factory import network_names

# The encoder belongs with the base generator (a pretrained base comes with its encoder, as
# DALL-E 2's decoder with CLIP): it trains at the base's rate and is frozen with it.
WITH_BASE = ("base", "encoder")


def trainable_networks(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The parameter subtrees the stage updates: the base (with encoder and prior) in the image
  stage; with ``train.freeze_base`` the residual and the prior; all otherwise. The step
  differentiates only these."""
  t = config.train
  names = network_names(config)
  if t.stage == "image":
    return tuple(n for n in names if n != "residual")
  return tuple(n for n in names if n not in WITH_BASE) if t.freeze_base else names


def learning_rate_schedule(config: ml_collections.ConfigDict, scale: float) -> optax.Schedule:
  """Linear warm-up from 0 over ``train.warmup_steps`` steps (none when 0: the first step takes the
  full rate) to ``learning_rate * scale``, then constant (``train.lr_decay='constant'``) or a cosine
  decay to 0 at ``train.num_steps`` (``'cosine'``)."""
  t = config.train
  peak = t.learning_rate * scale
  warmup = int(t.warmup_steps)
  if t.lr_decay == "cosine":
    after = optax.cosine_decay_schedule(peak, max(int(t.num_steps) - warmup, 1))
  else:  # 'constant' (config.validate admits no other)
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def base_lr_scale(config: ml_collections.ConfigDict) -> float:
  """The base generator's share of the learning rate: 1 in the image stage (it trains from
  scratch there); ``train.base_lr_scale`` in the video stage (fine-tuning a pretrained base)."""
  return 1.0 if config.train.stage == "image" else float(config.train.base_lr_scale)


# The helpers below are jitted per parameter so that the step's trace holds one call per
# parameter, traced once per distinct shape, instead of a few operations each traced on its own:
# tracing is host time that no compilation cache saves, paid by every run (benchmarks/RESULTS.md).
# Their bodies use lax, not jnp: each jnp operation is itself a jitted call, several times dearer
# to trace.
@jax.jit
def _sum_of_squares(g):
  g = lax.convert_element_type(g, jnp.float32)
  return lax.reduce_sum(lax.mul(g, g), tuple(range(g.ndim)))


@jax.jit
def _scaled(g, factor):
  return lax.convert_element_type(lax.mul(lax.convert_element_type(g, jnp.float32), factor), g.dtype)


@jax.jit
def _kept(keep_new, new, old):
  """``new`` where the scalar ``keep_new``, else ``old`` (an array like ``new``, or a scalar for all of it)."""
  old = lax.convert_element_type(old, new.dtype)
  if old.shape != new.shape:
    old = lax.broadcast_in_dim(old, new.shape, ())
  return lax.select(lax.broadcast_in_dim(keep_new, new.shape, ()), new, old)


def scaled(tree, factor) -> object:
  """Each leaf of ``tree`` times the scalar ``factor``, computed in float32, kept in its own dtype."""
  return jax.tree.map(lambda g: _scaled(g, factor), tree)


def kept_where(keep_new, new, old):
  """The tree ``new`` where the scalar ``keep_new`` is True, else ``old`` (a tree like it), leaf by leaf."""
  return jax.tree.map(lambda n, o: _kept(keep_new, n, o), new, old)


def global_norm(tree) -> jax.Array:
  """The L2 norm of all of ``tree``'s leaves together, as ``optax.global_norm`` but squared and
  summed in float32 whatever the leaves' dtype (optax squares in theirs: a float16 gradient above
  256 made its norm inf, and the clipping then zeroed the update)."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(jnp.sum(jnp.stack([_sum_of_squares(g) for g in leaves]))) if leaves else jnp.float32(0)


def clip_each_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Clips each generator's gradient ``updates[name]`` to global norm ``max_norm`` on its own, so
  that one network's large gradient does not shrink the other's update. Stateless (its state is
  ``EmptyState``, as ``optax.clip_by_global_norm``'s, so checkpoints of either restore)."""

  def clip(tree):
    norm = global_norm(tree)
    factor = jnp.where(norm < max_norm, 1.0, max_norm / jnp.maximum(norm, 1e-30))
    return scaled(tree, factor)

  def update(updates, state, params=None):
    del params
    return {name: clip(tree) for name, tree in updates.items()}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
  """``optax.adamw``'s update with its state (so checkpoints of either restore), computed by one
  jitted function per parameter (see ``_sum_of_squares``), where optax traces a dozen operations
  per parameter. Gradients, moments and parameters share one dtype (the moments take the
  parameters', as in optax): lax does not promote."""
  if not callable(learning_rate):
    learning_rate = optax.constant_schedule(learning_rate)
  reference = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  @jax.jit
  def leaf(g, mu, nu, p, lr, correction1, correction2):
    k = lambda value: lax.convert_element_type(value, g.dtype)  # noqa: E731  (rank 0 broadcasts)
    mu = lax.add(lax.mul(k(1 - b1), g), lax.mul(k(b1), mu))
    nu = lax.add(lax.mul(k(1 - b2), lax.mul(g, g)), lax.mul(k(b2), nu))
    u = lax.div(lax.div(mu, k(correction1)), lax.add(lax.sqrt(lax.div(nu, k(correction2))), k(eps)))
    if weight_decay:
      u = lax.add(u, lax.mul(k(weight_decay), p))
    return lax.mul(k(-lr), u), mu, nu

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("adamw needs the parameters for its weight decay: tx.update(grads, state, params).")
    adam, decay_state, schedule_state = state
    count = optax.safe_increment(adam.count)
    # In float32 whatever the moments' dtype: b2**count in low precision rounds to 1 (optax's note).
    c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
    lr = jnp.asarray(learning_rate(schedule_state.count), jnp.float32)
    grads, tree = jax.tree.flatten(updates)
    mus, nus, ps = (tree.flatten_up_to(x) for x in (adam.mu, adam.nu, params))
    rows = [leaf(g, m, v, p, lr, c1, c2) for g, m, v, p in zip(grads, mus, nus, ps)]
    new_updates, mu, nu = (tree.unflatten([row[i] for row in rows]) for i in range(3))
    return new_updates, (adam._replace(count=count, mu=mu, nu=nu), decay_state,
                         schedule_state._replace(count=optax.safe_increment(schedule_state.count)))

  return optax.GradientTransformation(reference.init, update)


class LossScaleState(NamedTuple):
  """The dynamic loss scale of float16 training (Micikevicius et al., 2018), kept in the optimizer
  state so that checkpoints carry it (other dtypes have no such state: their checkpoints are as before)."""

  scale: jax.Array  # float32 (): the step multiplies the loss by it, and divides the gradients by it
  good_steps: jax.Array  # int32 (): updates applied since the scale last changed
  skipped_steps: jax.Array  # int32 (): updates skipped so far (non-finite gradients)
  inner: Any  # the optimizer's own state


MAX_LOSS_SCALE = 2.0 ** 64  # doubling stops here: float32 holds the scale, and no float16 gradient needs more


def dynamic_loss_scaling(inner: optax.GradientTransformation, initial_scale: float,
                         growth_interval: int) -> optax.GradientTransformation:
  """``inner`` behind float16's dynamic loss scale. Its ``update`` takes the gradients already divided
  by ``state.scale`` (the step scales the loss by it, so that small gradients do not round to 0 in
  float16, and unscales in float32). Where they are all finite, ``inner``'s update is applied, and
  after ``growth_interval`` such steps in a row the scale doubles; where any is not (the scaled
  backward pass overflowed float16), the update is skipped (zero updates, ``inner``'s state kept but
  for its learning-rate schedules' counts) and the scale halves, down to 1."""

  def init(params):
    return LossScaleState(jnp.float32(initial_scale), jnp.int32(0), jnp.int32(0), inner.init(params))

  def update(grads, state: LossScaleState, params=None):
    finite = jnp.isfinite(global_norm(grads))
    updates, inner_state = inner.update(grads, state.inner, params)
    # -0.0 is the identity of addition (p + -0.0 = p for every p, -0.0 included; + 0.0 turns -0.0 into 0.0):
    # a skipped step leaves the parameters as they were, bit for bit.
    updates = jax.tree.map(lambda u: _kept(finite, u, -0.0), updates)
    # A schedule's count moves on with the step (the rate at step k is the schedule's at k, as logged, and a
    # cosine decay still ends at train.num_steps); Adam's moments and count stay.
    inner_state = jax.tree.map(
        lambda new, old: new if isinstance(new, optax.ScaleByScheduleState) else kept_where(finite, new, old),
        inner_state, state.inner, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
    grow = finite & (state.good_steps + 1 >= growth_interval)
    scale = jnp.where(finite, jnp.where(grow, jnp.minimum(2 * state.scale, MAX_LOSS_SCALE), state.scale),
                      jnp.maximum(state.scale / 2, 1.0))
    good = jnp.where(finite & ~grow, state.good_steps + 1, 0)
    return updates, LossScaleState(scale, good, state.skipped_steps + (~finite).astype(jnp.int32), inner_state)

  return optax.GradientTransformation(init, update)


def loss_scale(opt_state) -> jax.Array | None:
  """The loss scale of a float16 run's optimizer state (``LossScaleState``); None for other dtypes."""
  return opt_state.scale if isinstance(opt_state, LossScaleState) else None


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, dict]:
  """Per-network clipping, then AdamW with one learning rate for ``params['base']`` and the
  encoder (``base_lr_scale``) and one for the residual generator and the prior; networks the
  stage does not train get no update. VDM* (``model.kind='vdm'``) trains every network at
  ``learning_rate``: its temporal layers are new even when its spatial ones come from a
  pretrained base. In float16 (``model.dtype``) all of it sits behind ``dynamic_loss_scaling``.
  Returns the transformation and the schedules by name (for logging)."""
  t = config.train
  if config.model.kind == "vdm":
    schedules = {"video": learning_rate_schedule(config, 1.0)}
    group = lambda name: "video"  # noqa: E731
  else:
    schedules = {"base": learning_rate_schedule(config, base_lr_scale(config)),
                 "residual": learning_rate_schedule(config, 1.0)}
    group = lambda name: "base" if name in WITH_BASE else "residual"  # noqa: E731
  trainable = trainable_networks(config)
  transforms = {name: adamw(schedules[group(name)], b1=0.9, b2=0.999, weight_decay=t.weight_decay)
                if name in trainable else optax.set_to_zero() for name in network_names(config)}
  labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}  # noqa: E731
  tx = optax.chain(clip_each_by_global_norm(t.grad_clip), optax.multi_transform(transforms, labels))
  if config.model.dtype == "float16":
    tx = dynamic_loss_scaling(tx, t.loss_scale_initial, t.loss_scale_period)
  return tx, schedules
