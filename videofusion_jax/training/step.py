"""The train step: the stage's loss, gradients of the generators it trains, and the update."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from videofusion_jax import diffusion
from videofusion_jax.experiment import Experiment
from videofusion_jax.models.factory import generator_names, make_apply_fns, make_prior_fn, make_video_fn
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.optimizer import trainable_networks
from videofusion_jax.training.state import TrainState, ema_update


def labels_with_dropout(batch: dict, config: ml_collections.ConfigDict, rng: jax.Array) -> jnp.ndarray | None:
  """The batch's labels ``(B,)`` with ``train.label_dropout`` of them replaced by the null label
  ``num_classes`` (classifier-free guidance); None for an unconditional dataset."""
  if not config.data.num_classes:
    return None
  label = batch["label"].astype(jnp.int32)
  drop = jax.random.bernoulli(rng, config.train.label_dropout, label.shape)
  return jnp.where(drop, config.data.num_classes, label)


def condition_with_dropout(c: jnp.ndarray, config: ml_collections.ConfigDict, rng: jax.Array) -> jnp.ndarray:
  """The embeddings ``(B, D)`` with ``train.label_dropout`` of the rows replaced by the null
  condition (zeros), for classifier-free guidance on c."""
  drop = jax.random.bernoulli(rng, config.train.label_dropout, c.shape[:1])
  return jnp.where(drop[:, None], 0.0, c)


def prior_loss(params, ema_params, experiment: Experiment, key_frames, batch, rng):
  """The prior's ε loss on the key frames' embeddings by the EMA encoder (stop-gradient): the
  embeddings that the EMA generators are paired with at generation time. Each embedding is
  noised at ``train.prior_repeats`` timesteps: the prior is an MLP, so a larger effective batch
  costs little next to the U-Nets and lowers its gradient noise."""
  t_rng, n_rng, l_rng = jax.random.split(rng, 3)
  config, schedule = experiment.config, experiment.prior_schedule
  repeats = config.train.prior_repeats
  target = jnp.repeat(jax.lax.stop_gradient(experiment.encode(ema_params, key_frames)), repeats, axis=0)
  labels = labels_with_dropout({"label": jnp.repeat(batch["label"], repeats)}, config, l_rng)
  prior_fn = make_prior_fn(experiment.networks, params, labels)
  t = diffusion.sample_timesteps(t_rng, target.shape[0], schedule.num_timesteps)
  return diffusion.denoising_loss(prior_fn, target, t, jax.random.normal(n_rng, target.shape), schedule)


def loss_fn(params, experiment: Experiment, batch, rng, ema_params=None):
  """The stage's loss and its terms for one batch ``{'video': (B, N, H, W, C), 'label': (B,)}``.

  With ``model.condition='embedding'`` both generators are conditioned on ``c = encode(params,
  key frame)`` (with dropout to the null condition), and the loss adds the prior's term (its
  target from ``ema_params``' encoder, default ``params``); the prior and the generators share no
  parameters, so one sum serves both. ``terms['loss_generators']`` is the generators' part.
  """
  networks, config, lambdas, schedule = experiment.networks, experiment.config, experiment.lambdas, experiment.schedule
  t_rng, n_rng, d_rng, l_rng, f_rng, p_rng = jax.random.split(rng, 6)
  video = batch["video"]
  b = video.shape[0]
  image_stage = config.train.stage == "image"
  if image_stage:
    x0 = video[jnp.arange(b), jax.random.randint(f_rng, (b,), 0, video.shape[1])]
    key_frames = x0
  else:
    key_frames = video[:, diffusion.key_frame_index(video.shape[1])]
  embedding = config.model.condition == "embedding"
  label, condition = None, None
  if embedding:
    condition = condition_with_dropout(experiment.encode(params, key_frames), config, l_rng)
  else:
    label = labels_with_dropout(batch, config, l_rng)
  t = diffusion.sample_timesteps(t_rng, b, schedule.num_timesteps)
  if config.model.kind == "vdm":  # VDM*: one space-time network, ε loss on every frame
    video_fn = make_video_fn(networks, params, label, train=True, rng=d_rng, condition=condition)
    noise = diffusion.decomposed_noise(n_rng, video.shape, lambdas)  # independent per frame at λ = 0
    loss, terms = diffusion.video_denoising_loss(video_fn, video, t, noise, schedule)
    return _with_prior(loss, terms, params, experiment, key_frames, batch, p_rng, ema_params)
  base_fn, residual_fn = make_apply_fns(networks, params, label, train=True, rng=d_rng, condition=condition)
  if image_stage:
    loss = diffusion.denoising_loss(base_fn, x0, t, jax.random.normal(n_rng, x0.shape), schedule)
    terms = {"loss_key": loss, "loss_residual": jnp.zeros(())}
  else:
    noise = diffusion.decomposed_noise(n_rng, video.shape, lambdas)
    loss, terms = diffusion.joint_loss(base_fn, residual_fn, video, t, noise, lambdas, schedule,
                                       key_frame_input=config.model.key_frame_input,
                                       clean_key_frame=config.model.key_frame_clean)
  return _with_prior(loss, terms, params, experiment, key_frames, batch, p_rng, ema_params)


def _with_prior(loss, terms, params, experiment, key_frames, batch, rng, ema_params):
  """The generators' loss plus, for the embedding condition, the prior's term."""
  terms["loss_generators"] = loss
  if experiment.config.model.condition != "embedding":
    return loss, terms
  terms["loss_prior"] = prior_loss(params, params if ema_params is None else ema_params, experiment,
                                   key_frames, batch, rng)
  return loss + terms["loss_prior"], terms


def train_step(state: TrainState, batch, *, experiment: Experiment):
  """One optimizer step. Returns the new state and scalar metrics.

  Only the networks the stage trains are differentiated: a frozen base (or the image
  stage's idle residual) runs forward only and costs no backward pass.
  """
  config, tx, schedules = experiment.config, experiment.tx, experiment.lr_schedules
  rng = jax.random.fold_in(state.rng, state.step)
  trainable = trainable_networks(config)

  def loss_of(sub):
    return loss_fn({**state.params, **sub}, experiment, batch, rng, ema_params=state.ema_params)

  (loss, terms), sub_grads = jax.value_and_grad(loss_of, has_aux=True)({k: state.params[k] for k in trainable})
  grads = {k: sub_grads[k] if k in sub_grads else jax.tree.map(jnp.zeros_like, v) for k, v in state.params.items()}
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  ema = ema_update(state.ema_params, params, config.train.ema_decay, state.step)
  metrics = {
      # 'loss' is what the step minimises: eq. 12 (or the image loss, or VDM*'s), plus the prior's term.
      "loss": loss, **terms,
      # Norms before clipping (each generator is clipped to train.grad_clip on its own).
      **{f"grad_norm_{k}": optax.global_norm(grads[k]) for k in generator_names(config)},
      **{f"lr_{k}": schedule(state.step) for k, schedule in schedules.items()},
  }
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


class Trainer(Experiment):
  """An experiment and its train step, jitted over the mesh (state donated)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    super().__init__(config, mesh)
    step = functools.partial(train_step, experiment=self)
    self.step = self.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                         out_shardings=(self.state_sharding, shd.replicated(self.mesh)),
                         donate_argnums=0)
