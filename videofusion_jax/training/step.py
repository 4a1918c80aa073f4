"""The train step: the stage's loss, gradients of the generators it trains, and the update."""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from videofusion_jax import diffusion
from videofusion_jax.config import ConfigError, check_cudnn_training, text_prior
from videofusion_jax.experiment import Experiment
from videofusion_jax.models.encoder import to_sphere
from videofusion_jax.models.factory import make_apply_fns, make_prior_fn, make_video_fn
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.optimizer import global_norm, kept_where, loss_scale, scaled, trainable_networks
from videofusion_jax.training.state import TrainState, ema_update


def _drop_labels(label: jnp.ndarray, config: ml_collections.ConfigDict, drop: jnp.ndarray) -> jnp.ndarray:
  """``label`` ``(B,)`` with the rows where ``drop`` is True replaced by the null label ``num_classes``."""
  return jnp.where(drop, config.data.num_classes, label.astype(jnp.int32))


def condition_with_dropout(c: jnp.ndarray, config: ml_collections.ConfigDict, rng: jax.Array) -> jnp.ndarray:
  """The embeddings ``(B, D)`` with ``train.label_dropout`` of the rows replaced by the null
  condition (zeros), for classifier-free guidance on c."""
  return _drop_condition(c, jax.random.bernoulli(rng, config.train.label_dropout, c.shape[:1]))


def _drop_condition(c: jnp.ndarray, drop: jnp.ndarray) -> jnp.ndarray:
  """``c`` ``(B, D)`` with the rows where ``drop`` ``(B,)`` is True replaced by the null condition (zeros)."""
  return jnp.where(drop[:, None], 0.0, c)


def draw_randomness(experiment: Experiment, rng: jax.Array, video_shape: tuple[int, ...]) -> tuple[dict, jax.Array]:
  """Every random value of the loss on a batch of videos ``video_shape = (B, N, H, W, C)``, drawn
  once for the whole batch, each with the example as its leading axis: a micro-batch's values are
  the slice of its examples, however the batch is split (``train.grad_accum_steps``).

  ``t`` ``(B,)``; ``noise`` like the videos (the image stage: ``(B, H, W, C)``, with ``frame`` ``(B,)``,
  the frame each example trains on); with ``train.residual_frames`` below N-1, ``residual_frames``
  ``(B, train.residual_frames)``, the non-key frames whose residual term each example takes;
  ``drop`` ``(B,)``, whose condition is dropped to the null one;
  for the prior (``model.condition='embedding'``) ``prior_t``, ``prior_drop`` ``(B, R)`` and
  ``prior_noise`` ``(B, R, D)``, ``R = train.prior_repeats``. Returns them and the key of the
  networks' own dropout layers (their masks are drawn per call, so per micro-batch)."""
  config = experiment.config
  t_rng, n_rng, d_rng, l_rng, f_rng, p_rng = jax.random.split(rng, 6)
  b, num_frames = video_shape[:2]
  draws = {"t": diffusion.sample_timesteps(t_rng, b, experiment.schedule.num_timesteps,
                                           stratified=config.train.timesteps == "stratified"),
           "drop": jax.random.bernoulli(l_rng, config.train.label_dropout, (b,))}
  if config.train.stage == "image":
    draws["frame"] = jax.random.randint(f_rng, (b,), 0, num_frames)
    draws["noise"] = jax.random.normal(n_rng, (b,) + tuple(video_shape[2:]))
  else:
    draws["noise"] = diffusion.decomposed_noise(n_rng, tuple(video_shape), experiment.lambdas)
    if 0 < config.train.residual_frames < num_frames - 1:
      draws["residual_frames"] = diffusion.sample_residual_frames(f_rng, b, num_frames, config.train.residual_frames)
  if config.model.condition == "embedding":
    pt_rng, pn_rng, pl_rng = jax.random.split(p_rng, 3)
    repeats, width = config.train.prior_repeats, config.model.encoder.embed_dim
    # Drawn as (B·R,) rows, example i's repeats in rows iR..iR+R-1 (as jnp.repeat lays them out).
    draws["prior_t"] = diffusion.sample_timesteps(pt_rng, b * repeats, experiment.prior_schedule.num_timesteps)
    draws["prior_noise"] = jax.random.normal(pn_rng, (b * repeats, width))
    draws["prior_drop"] = jax.random.bernoulli(pl_rng, config.train.label_dropout, (b * repeats,))
    draws.update({k: draws[k].reshape((b, repeats) + draws[k].shape[1:]) for k in ("prior_t", "prior_noise",
                                                                                  "prior_drop")})
  return draws, d_rng


def key_frame_embeddings(params, experiment: Experiment, key_frames: jnp.ndarray, batch: dict, draws: dict):
  """c ``(B, D)`` of the key frames ``(B, H, W, 3)``: the encoder's, or with ``model.encoder.kind='clip'``
  the stored CLIP embedding of the same frame (``batch['frame_embeddings']`` ``(B, N, D)``: the key
  frame's row, or in the image stage that of the frame trained on), scaled to norm √D."""
  if experiment.encode is not None:
    return experiment.encode(params, key_frames)
  frames = batch["frame_embeddings"]
  if experiment.config.train.stage == "image":
    return to_sphere(frames[jnp.arange(frames.shape[0]), draws["frame"]])
  return to_sphere(frames[:, diffusion.key_frame_index(frames.shape[1])])


def prior_loss(params, ema_params, experiment: Experiment, key_frames, batch, draws: dict):
  """The prior's ε loss on the key frames' embeddings by the EMA encoder (stop-gradient): the
  embeddings that the EMA generators are paired with at generation time. Each embedding is
  noised at ``train.prior_repeats`` timesteps (``draws['prior_*']``, ``draw_randomness``): the prior
  is an MLP, so a larger effective batch costs little next to the U-Nets and lowers its gradient noise."""
  config, schedule = experiment.config, experiment.prior_schedule
  repeats = config.train.prior_repeats
  target = jnp.repeat(jax.lax.stop_gradient(key_frame_embeddings(ema_params, experiment, key_frames, batch, draws)),
                      repeats, axis=0)
  flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731  (B, R, ...) -> (B·R, ...)
  labels = text = None
  if config.model.prior.condition == "text":  # the caption's CLIP text embedding, or the null text (zeros)
    text = _drop_condition(jnp.repeat(to_sphere(batch["caption_embeddings"]), repeats, axis=0),
                           flat(draws["prior_drop"]))
  elif config.data.num_classes:
    labels = _drop_labels(jnp.repeat(batch["label"], repeats), config, flat(draws["prior_drop"]))
  prior_fn = make_prior_fn(experiment.networks, params, labels, text)
  return diffusion.denoising_loss(prior_fn, target, flat(draws["prior_t"]), flat(draws["prior_noise"]), schedule)


def loss_fn(params, experiment: Experiment, batch, rng, ema_params=None):
  """The stage's loss and its terms for one batch ``{'video': (B, N, H, W, C), 'label': (B,)}``,
  its random values drawn from ``rng`` (``draw_randomness``); see ``loss_on_draws``."""
  draws, dropout_rng = draw_randomness(experiment, rng, batch["video"].shape)
  return loss_on_draws(params, experiment, batch, draws, dropout_rng, ema_params)


def loss_on_draws(params, experiment: Experiment, batch, draws: dict, dropout_rng: jax.Array, ema_params=None):
  """The stage's loss and its terms for ``batch`` and its random values ``draws`` (``draw_randomness``,
  or a slice of them for a micro-batch); ``dropout_rng``: the networks' dropout layers.

  With ``model.condition='embedding'`` both generators are conditioned on ``c = encode(params,
  key frame)`` (with dropout to the null condition), and the loss adds the prior's term (its
  target from ``ema_params``' encoder, default ``params``); the prior and the generators share no
  parameters, so one sum serves both. ``terms['loss_generators']`` is the generators' part.
  Every term is a mean over the examples.
  """
  networks, config, lambdas, schedule = experiment.networks, experiment.config, experiment.lambdas, experiment.schedule
  video, t, noise = batch["video"], draws["t"], draws["noise"]
  b = video.shape[0]
  weights = None  # train.loss_weighting: per-example weights of the generators' loss
  if config.train.loss_weighting == "min_snr":
    weights = diffusion.min_snr_weights(t, schedule, config.train.min_snr_gamma)
  image_stage = config.train.stage == "image"
  if image_stage:
    x0 = video[jnp.arange(b), draws["frame"]]
    key_frames = x0
  else:
    key_frames = video[:, diffusion.key_frame_index(video.shape[1])]
  label, condition = None, None
  if config.model.condition == "embedding":
    condition = _drop_condition(key_frame_embeddings(params, experiment, key_frames, batch, draws), draws["drop"])
  elif config.data.num_classes:
    label = _drop_labels(batch["label"], config, draws["drop"])
  if config.model.kind == "vdm":  # VDM*: one space-time network, ε loss on every frame (independent noise: λ = 0)
    video_fn = make_video_fn(networks, params, label, train=True, rng=dropout_rng, condition=condition)
    loss, terms = diffusion.video_denoising_loss(video_fn, video, t, noise, schedule, weights)
    return _with_prior(loss, terms, params, experiment, key_frames, batch, draws, ema_params)
  # A frozen base is a fixed function, as it is in sampling: no dropout in the z' the residual generator learns from.
  base_fn, residual_fn = make_apply_fns(networks, params, label, train=True, rng=dropout_rng, condition=condition,
                                        frozen=("base",) if config.train.freeze_base else ())
  if image_stage:
    loss = diffusion.denoising_loss(base_fn, x0, t, noise, schedule, weights)
    terms = {"loss_key": loss, "loss_residual": jnp.zeros(())}
  else:
    loss, terms = diffusion.joint_loss(base_fn, residual_fn, video, t, noise, lambdas, schedule,
                                       key_frame_input=config.model.key_frame_input,
                                       clean_key_frame=config.model.key_frame_clean, weights=weights,
                                       frames=draws.get("residual_frames"))
  return _with_prior(loss, terms, params, experiment, key_frames, batch, draws, ema_params)


def _with_prior(loss, terms, params, experiment, key_frames, batch, draws, ema_params):
  """The generators' loss plus, for the embedding condition, the prior's term."""
  terms["loss_generators"] = loss
  if experiment.config.model.condition != "embedding":
    return loss, terms
  terms["loss_prior"] = prior_loss(params, params if ema_params is None else ema_params, experiment,
                                   key_frames, batch, draws)
  return loss + terms["loss_prior"], terms


def micro_batches(tree, k: int, experiment: Experiment):
  """Each array ``(B, ...)`` of ``tree`` as ``(k, B/k, ...)``: micro-batch ``i`` holds examples ``i, i+k,
  i+2k, ...``. Strided, so that every device keeps its own rows (each holds ``B/(k·devices)`` of each
  micro-batch) and the split moves no data."""
  spec = P(None, *experiment.batch_sharding.spec)

  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(experiment.mesh, spec))
  return jax.tree.map(split, tree)


def accumulated_gradients(grads_of, k: int, batch: dict, draws: dict, dropout_rng: jax.Array,
                          experiment: Experiment, grad_shardings):
  """``grads_of(batch, draws, dropout_rng) -> (metrics, grads)`` averaged over ``k`` micro-batches
  (``micro_batches``) run one after the other in a ``lax.scan``: the memory of one micro-batch,
  and, every term being a mean over equally many examples, the mean over the whole batch. The
  networks' dropout key is folded with the micro-batch's index. The running sum of the gradients
  keeps the parameters' shardings (FSDP: each device sums its own shard)."""
  micro = micro_batches((batch, draws), k, experiment)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grads_of, *first, dropout_rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, xs):
    i, (mb, md) = xs
    metrics, grads = grads_of(mb, md, jax.random.fold_in(dropout_rng, i))
    total_metrics, total_grads = jax.tree.map(jnp.add, carry, (metrics, grads))
    return (total_metrics, jax.lax.with_sharding_constraint(total_grads, grad_shardings)), None

  (metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
  return jax.tree.map(lambda x: x / k, (metrics, grads))


def train_step(state: TrainState, batch, *, experiment: Experiment):
  """One optimizer step. Returns the new state and scalar metrics.

  Only the networks the stage trains are differentiated: a frozen base (or the image
  stage's idle residual) runs forward only and costs no backward pass. With
  ``train.grad_accum_steps = k > 1`` the batch's gradients are accumulated over ``k`` micro-batches
  (``accumulated_gradients``) before the one update; every random value of the loss is drawn for
  the whole batch first, so the update is that of the whole batch at once.
  """
  config, tx, schedules = experiment.config, experiment.tx, experiment.lr_schedules
  rng = jax.random.fold_in(state.rng, state.step)
  trainable = trainable_networks(config)
  draws, dropout_rng = draw_randomness(experiment, rng, batch["video"].shape)
  # Split like the batch: each device draws (and keeps) its own examples' values.
  draws = jax.lax.with_sharding_constraint(draws, experiment.batch_sharding)

  scale = loss_scale(state.opt_state)  # float16 only: the gradients of the loss times it, then divided by it

  def grads_of(batch, draws, dropout_rng):
    def loss_of(sub):
      loss, terms = loss_on_draws({**state.params, **sub}, experiment, batch, draws, dropout_rng,
                                  ema_params=state.ema_params)
      return (loss if scale is None else loss * scale), (loss, terms)
    (_, (loss, terms)), grads = jax.value_and_grad(loss_of, has_aux=True)({k: state.params[k] for k in trainable})
    return {"loss": loss, **terms}, grads

  micro_steps = config.train.grad_accum_steps
  if micro_steps == 1:
    losses, sub_grads = grads_of(batch, draws, dropout_rng)
  else:
    grad_shardings = {name: experiment.state_sharding.params[name] for name in trainable}
    losses, sub_grads = accumulated_gradients(grads_of, micro_steps, batch, draws, dropout_rng, experiment,
                                              grad_shardings)
  if scale is not None:  # in float32 (exact for the default scales, powers of 2)
    sub_grads = scaled(sub_grads, 1 / scale)
  grads = {k: sub_grads[k] if k in sub_grads else jax.tree.map(jnp.zeros_like, v) for k, v in state.params.items()}
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  ema = ema_update(state.ema_params, params, config.train.ema_decay, state.step)
  scaling = {}
  if scale is not None:  # an update skipped for float16's overflow leaves the EMA as it was too
    skipped = opt_state.skipped_steps - state.opt_state.skipped_steps
    ema = kept_where(skipped == 0, ema, state.ema_params)
    scaling = {"loss_scale": scale, "update_skipped": skipped.astype(jnp.float32),
               "skipped_steps": opt_state.skipped_steps.astype(jnp.float32)}
  metrics = {
      # 'loss' is what the step minimises: eq. 12 (or the image loss, or VDM*'s), plus the prior's term.
      **losses,
      # Norms before clipping, of every network the stage trains (each is clipped to train.grad_clip on its own).
      **{f"grad_norm_{k}": global_norm(grads[k]) for k in trainable},
      **{f"lr_{k}": schedule(state.step) for k, schedule in schedules.items()},
      # float16: the scale this step's loss was multiplied by; 1 where its update was skipped (the gradients
      # overflowed, their norms above are inf or NaN); the run's skipped updates so far.
      **scaling,
  }
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def check_train_batch(config: ml_collections.ConfigDict, devices: int) -> None:
  """``train.batch_size`` (and each of its ``train.grad_accum_steps`` micro-batches) split evenly over
  ``devices``, else a ConfigError: only the train step splits the training batch (sampling and
  evaluation draw their own batches)."""
  batch, k = config.train.batch_size, config.train.grad_accum_steps
  if batch % devices:
    raise ConfigError(
        f"config.train.batch_size={batch} does not split evenly over the {devices} devices of the mesh; use a "
        f"multiple of {devices}.")
  if k > 1 and batch % (k * devices):
    # Each micro-batch keeps the batch's split: every device holds batch / (k x devices) of its rows.
    raise ConfigError(
        f"config.train.batch_size={batch} with grad_accum_steps={k} gives micro-batches of {batch // k}, which do "
        f"not split evenly over the {devices} devices of the mesh; use a batch size that is a multiple of "
        f"{k * devices} (grad_accum_steps x devices), or fewer accumulation steps.")


# How far past [-1, 1] a caller's video may reach: the pipeline clips its frames to [-1, 1] exactly; this is
# room for a caller's own float rounding, while frames left in [0, 255] (or scaled by a mean and std) are caught.
VIDEO_RANGE_SLACK = 0.01


def batch_keys(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The arrays the train step reads from a batch, each with what it is: ``video`` always; ``label`` where
  the generators or the prior are conditioned on the class (``data.num_classes`` > 0, no prior on text);
  ``frame_embeddings`` for a 'clip' encoder; ``caption_embeddings`` for a prior on text."""
  m = config.model
  keys = {"video": "(B, N, S, S, 3) float32 in [-1, 1]"}
  if config.data.num_classes and not text_prior(config):
    keys["label"] = f"(B,) int32 in [0, {config.data.num_classes})"
  if m.condition == "embedding" and m.encoder.kind == "clip":
    keys["frame_embeddings"] = "(B, N, D), the stored CLIP embeddings of the clip's frames"
  if text_prior(config):
    keys["caption_embeddings"] = "(B, D), the caption's CLIP text embedding"
  return keys


def _expected_shape(key: str, config: ml_collections.ConfigDict, b: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """The shape of ``batch[key]`` for a batch of ``b`` examples, and the config field each axis follows."""
  hosts = jax.process_count()
  per_host = (f"config.train.batch_size={config.train.batch_size} / {hosts} hosts" if hosts > 1
              else "config.train.batch_size")
  if key == "label":
    return (b,), (per_host,)
  d = config.data
  if key == "video":
    return ((b, d.num_frames, d.image_size, d.image_size, 3),
            (per_host, "config.data.num_frames", "config.data.image_size", "config.data.image_size", "RGB"))
  width = config.model.encoder.embed_dim
  if key == "frame_embeddings":
    return (b, d.num_frames, width), (per_host, "config.data.num_frames", "config.model.encoder.embed_dim")
  return (b, width), (per_host, "config.model.encoder.embed_dim")  # caption_embeddings


def synthetic_batches(config: ml_collections.ConfigDict, local_batch_size: int, seed: int, process_index: int,
                      start_batch: int = 0, distinct: int = 2) -> Iterator[dict]:
  """The input of ``data.name='synthetic'``: this host's batches from ``start_batch`` on, each what ``check_batch``
  asks for (videos uniform in [-1, 1], labels uniform over the classes, embeddings on the unit sphere). Batch ``k``
  is the ``k % distinct``-th of ``distinct`` drawn once from ``(seed, process_index)``: no time per step (a
  ucf101 batch is 50M values), and a resumed run goes on with the same stream."""
  rng = np.random.default_rng([seed, process_index])
  pool = []
  for _ in range(distinct):
    batch = {}
    for key in batch_keys(config):
      shape = _expected_shape(key, config, local_batch_size)[0]
      if key == "video":
        batch[key] = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
      elif key == "label":
        batch[key] = rng.integers(0, config.data.num_classes, shape).astype(np.int32)
      else:
        x = rng.standard_normal(shape).astype(np.float32)
        batch[key] = x / np.linalg.norm(x, axis=-1, keepdims=True)
    pool.append(batch)
  k = start_batch
  while True:
    yield pool[k % distinct]
    k += 1


def check_batch(config: ml_collections.ConfigDict, batch, local_batch_size: int, values: bool = True) -> None:
  """A host's training batch against ``config``, on the host and before anything is traced, else a
  ConfigError naming the array and the config field: the arrays the step reads (``batch_keys``), their
  shapes (``local_batch_size`` examples, ``data.num_frames`` frames of ``data.image_size``, embeddings of
  ``model.encoder.embed_dim``), a floating video and integer labels in [0, ``data.num_classes``) (a label
  past the classes is the null label or, past that, a NaN embedding). ``values``: also that the video
  (within ``VIDEO_RANGE_SLACK`` of [-1, 1]) and the embeddings are finite: a pass over the whole video,
  for the first batch only (the loop's NaN check catches a later one's NaN at its step); the rest reads
  shapes, dtypes and the B labels: microseconds, no device sync."""
  if not isinstance(batch, Mapping):
    raise ConfigError(f"a training batch is a dict of arrays ({', '.join(repr(k) for k in batch_keys(config))}), "
                      f"not a {type(batch).__name__}.")
  needed = batch_keys(config)
  for key, what in needed.items():
    if key not in batch:
      why = {"video": "",
             "label": f" (config.data.num_classes={config.data.num_classes}: the model is class-conditional; "
                      "0 trains an unconditional one)",
             "frame_embeddings": " (config.model.encoder.kind='clip')",
             "caption_embeddings": " (config.model.prior.condition='text')"}[key]
      raise ConfigError(f"the training batch has no {key!r} (its keys: {sorted(batch)}); this config needs it"
                        f"{why}: {key} {what}.")
  arrays = {k: v if hasattr(v, "shape") and hasattr(v, "dtype") else np.asarray(v) for k, v in batch.items()}
  for key, x in arrays.items():
    if key in needed:
      expected, fields = _expected_shape(key, config, local_batch_size)
      if tuple(x.shape) != expected:
        wrong = ([f"axis {i} ({n}) is not {fields[i]}={e}" for i, (n, e) in enumerate(zip(x.shape, expected)) if n != e]
                 if len(x.shape) == len(expected) else [f"{len(x.shape)} axes, not {len(expected)}"])
        raise ConfigError(f"batch[{key!r}] has shape {tuple(x.shape)}, where this config needs {expected} "
                          f"({', '.join(fields)}): {'; '.join(wrong)}.")
    elif not x.shape or x.shape[0] != local_batch_size:  # global_batch splits every array by example
      raise ConfigError(f"batch[{key!r}] has shape {tuple(x.shape)}: every array of a batch holds one row per "
                        f"example, {local_batch_size} here (this host's share of config.train.batch_size).")
  video = arrays["video"]
  if not jnp.issubdtype(video.dtype, jnp.floating):
    raise ConfigError(f"batch['video'] is {video.dtype}; give float32 in [-1, 1]: video / 127.5 - 1 for uint8 "
                      "frames in [0, 255].")
  for key in ("frame_embeddings", "caption_embeddings"):
    if key in needed and not jnp.issubdtype(arrays[key].dtype, jnp.floating):
      raise ConfigError(f"batch[{key!r}] is {arrays[key].dtype}; give the float32 CLIP embeddings.")
  if "label" in needed:
    label, n = np.asarray(arrays["label"]), config.data.num_classes
    if not jnp.issubdtype(label.dtype, jnp.integer):
      raise ConfigError(f"batch['label'] is {label.dtype}; give the class ids as integers (int32) in [0, {n}) "
                        f"(config.data.num_classes={n}).")
    if label.size and (label.min() < 0 or label.max() >= n):
      raise ConfigError(f"batch['label'] holds labels {label.min()}..{label.max()}, outside [0, {n}) "
                        f"(config.data.num_classes={n}); give 0-based class ids below {n} (not 1-based ones, nor -1 "
                        "for none), or set --config.data.num_classes to the class count.")
  if not values:
    return
  lo, hi = np.min(video), np.max(video)  # NaN comes out of both; no array the size of the video is made
  if not (np.isfinite(lo) and np.isfinite(hi)):
    raise ConfigError("batch['video'] holds NaN or infinite values; give float32 frames in [-1, 1].")
  if lo < -1 - VIDEO_RANGE_SLACK or hi > 1 + VIDEO_RANGE_SLACK:
    raise ConfigError(f"batch['video'] holds values in [{float(lo):g}, {float(hi):g}]; the model trains on frames in "
                      "[-1, 1]: give video / 127.5 - 1 for frames in [0, 255], clipped to [-1, 1].")
  for key in ("frame_embeddings", "caption_embeddings"):
    if key in needed and not np.all(np.isfinite(arrays[key])):
      raise ConfigError(f"batch[{key!r}] holds NaN or infinite values.")


class Trainer(Experiment):
  """An experiment and its train step, jitted over the mesh (state donated)."""

  def check_work(self) -> None:
    check_cudnn_training(self.config)
    check_train_batch(self.config, self.mesh.devices.size)

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    super().__init__(config, mesh)
    step = functools.partial(train_step, experiment=self)
    # Kept traced beside the compilation cache: a warm start runs none of the step's Python.
    self.step = self.stored_jit(step, "train_step", in_shardings=(self.state_sharding, self.batch_sharding),
                                out_shardings=(self.state_sharding, shd.replicated(self.mesh)), donate_argnums=0)
