"""The train step: the stage's loss, gradients of the generators it trains, and the update."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from videofusion_jax import diffusion
from videofusion_jax.experiment import Experiment
from videofusion_jax.models.factory import make_apply_fns
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.optimizer import trainable_generators
from videofusion_jax.training.state import TrainState, ema_update


def labels_with_dropout(batch: dict, config: ml_collections.ConfigDict, rng: jax.Array) -> jnp.ndarray | None:
  """The batch's labels ``(B,)`` with ``train.label_dropout`` of them replaced by the null label
  ``num_classes`` (classifier-free guidance); None for an unconditional dataset."""
  if not config.data.num_classes:
    return None
  label = batch["label"].astype(jnp.int32)
  drop = jax.random.bernoulli(rng, config.train.label_dropout, label.shape)
  return jnp.where(drop, config.data.num_classes, label)


def loss_fn(params, networks, config, batch, rng, lambdas, schedule):
  """The stage's loss and its terms for one batch ``{'video': (B, N, H, W, C), 'label': (B,)}``."""
  t_rng, n_rng, d_rng, l_rng, f_rng = jax.random.split(rng, 5)
  video = batch["video"]
  b = video.shape[0]
  label = labels_with_dropout(batch, config, l_rng)
  base_fn, residual_fn = make_apply_fns(networks, params, label, train=True, rng=d_rng)
  t = diffusion.sample_timesteps(t_rng, b, schedule.num_timesteps)
  if config.train.stage == "image":
    frame = jax.random.randint(f_rng, (b,), 0, video.shape[1])
    x0 = video[jnp.arange(b), frame]
    loss = diffusion.image_loss(base_fn, x0, t, jax.random.normal(n_rng, x0.shape), schedule)
    return loss, {"loss_key": loss, "loss_residual": jnp.zeros(())}
  noise = diffusion.decomposed_noise(n_rng, video.shape, lambdas)
  return diffusion.joint_loss(base_fn, residual_fn, video, t, noise, lambdas, schedule,
                              key_frame_input=config.model.key_frame_input)


def train_step(state: TrainState, batch, *, networks, config, tx, schedules, lambdas, schedule):
  """One optimizer step. Returns the new state and scalar metrics.

  Only the generators the stage trains are differentiated: a frozen base (or the image
  stage's idle residual) runs forward only and costs no backward pass.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  trainable = trainable_generators(config)

  def loss_of(sub):
    return loss_fn({**state.params, **sub}, networks, config, batch, rng, lambdas, schedule)

  (loss, terms), sub_grads = jax.value_and_grad(loss_of, has_aux=True)({k: state.params[k] for k in trainable})
  grads = {k: sub_grads[k] if k in sub_grads else jax.tree.map(jnp.zeros_like, v) for k, v in state.params.items()}
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  ema = ema_update(state.ema_params, params, config.train.ema_decay, state.step)
  metrics = {
      "loss": loss, **terms,
      # Norms before clipping (each generator is clipped to train.grad_clip on its own).
      "grad_norm_base": optax.global_norm(grads["base"]), "grad_norm_residual": optax.global_norm(grads["residual"]),
      "lr_base": schedules["base"](state.step), "lr_residual": schedules["residual"](state.step),
  }
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


class Trainer(Experiment):
  """An experiment and its train step, jitted over the mesh (state donated)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    super().__init__(config, mesh)
    step = functools.partial(train_step, networks=self.networks, config=config, tx=self.tx,
                             schedules=self.lr_schedules, lambdas=self.lambdas, schedule=self.schedule)
    self.step = self.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                         out_shardings=(self.state_sharding, shd.replicated(self.mesh)),
                         donate_argnums=0)
