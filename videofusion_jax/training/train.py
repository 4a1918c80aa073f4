"""The train step (jit over a mesh) and the training loop."""
from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from videofusion_jax import diffusion
from videofusion_jax.config import ConfigError, validate
from videofusion_jax.training import checkpoint as ckpt
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.state import (
  TrainState,
  boxed_abstract_params,
  count_params,
  ema_update,
  init_params,
  make_apply_fns,
  make_networks,
  make_optimizer,
)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; nothing from that step was saved."""


def _labels(batch, config, rng):
  """The batch's labels with ``label_dropout`` of them replaced by the null label."""
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
  label = _labels(batch, config, l_rng)
  base_fn, residual_fn = make_apply_fns(networks, params, label, train=True, rng=d_rng)
  t = diffusion.sample_timesteps(t_rng, b, schedule.num_timesteps)
  if config.train.stage == "image":
    frame = jax.random.randint(f_rng, (b,), 0, video.shape[1])
    x0 = video[jnp.arange(b), frame]
    loss = diffusion.image_loss(base_fn, x0, t, jax.random.normal(n_rng, x0.shape), schedule)
    return loss, {"loss_key": loss, "loss_residual": jnp.zeros(())}
  noise = diffusion.decomposed_noise(n_rng, video.shape, lambdas)
  return diffusion.joint_loss(base_fn, residual_fn, video, t, noise, lambdas, schedule)


def train_step(state: TrainState, batch, *, networks, config, tx, schedules, lambdas, schedule):
  """One optimizer step. Returns the new state and scalar metrics."""
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, networks, config, batch, rng, lambdas, schedule)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  ema = ema_update(state.ema_params, params, config.train.ema_decay, state.step)
  metrics = {
      "loss": loss, **terms,
      "grad_norm_base": _norm(grads["base"]), "grad_norm_residual": _norm(grads["residual"]),
      "lr_base": schedules["base"](state.step), "lr_residual": schedules["residual"](state.step),
  }
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def _norm(tree) -> jnp.ndarray:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


class Trainer:
  """Builds networks, mesh, state shardings and the jitted step from a config."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    validate(config)
    self.config = config
    self.mesh = mesh if mesh is not None else shd.make_mesh(config)
    if config.train.batch_size % self.mesh.devices.size:
      raise ConfigError(
          f"config.train.batch_size={config.train.batch_size} does not split evenly over the "
          f"{self.mesh.devices.size} devices of the mesh; use a multiple of {self.mesh.devices.size}.")
    self.networks = make_networks(config)
    self.schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    self.lambdas = diffusion.frame_lambdas(config.data.num_frames, config.diffusion.lam)
    self.tx, self.schedules = make_optimizer(config)
    boxed = boxed_abstract_params(self.networks, config)
    self.num_params = {k: count_params(v) for k, v in boxed.items()}
    param_sh = shd.param_shardings(boxed, self.mesh, config.sharding_rules)
    rep = shd.replicated(self.mesh)
    abstract_params = nn.unbox(boxed)
    opt_sh = _like_params(jax.eval_shape(self.tx.init, abstract_params), param_sh, rep)
    self.state_sharding = TrainState(step=rep, params=param_sh, ema_params=param_sh,
                                     opt_state=opt_sh, rng=rep)
    step = functools.partial(train_step, networks=self.networks, config=config, tx=self.tx,
                             schedules=self.schedules, lambdas=self.lambdas, schedule=self.schedule)
    self.step = jax.jit(step, in_shardings=(self.state_sharding, shd.batch_sharding(self.mesh)),
                        out_shardings=(self.state_sharding, rep), donate_argnums=0)

    self._init = jax.jit(self._init_fn, out_shardings=self.state_sharding)

  def _init_fn(self, rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = nn.unbox(init_params(self.networks, self.config, init_rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=self.tx.init(params), rng=state_rng)

  def init_state(self, seed: int) -> TrainState:
    """A fresh state, laid out on the mesh (compiled once per trainer)."""
    return self._init(jax.random.PRNGKey(seed))

  def abstract_state(self):
    """Shapes, dtypes and shardings of the state, without allocating it."""
    return ckpt.abstract_like(jax.eval_shape(self._init_fn, jax.random.PRNGKey(0)), self.state_sharding)


def _like_params(opt_shapes, param_sh, rep):
  """Optimizer-state shardings: a moment takes the sharding of the parameter whose path ends
  its own path (``...mu['base']['conv_in']['kernel']``); counts and scalars are replicated."""
  def keys(path):
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
  by_path = {keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  def pick(path, leaf):
    k = keys(path)
    for i in range(len(k)):
      if k[i:] in by_path and by_path[k[i:]] is not None:
        return by_path[k[i:]]
    return rep
  return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def _format_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _Writer:
  """TensorBoard event files through tensorboardX when it is installed (else console only)."""

  def __init__(self, workdir: Path):
    try:
      from tensorboardX import SummaryWriter
      self._w = SummaryWriter(str(workdir / "tensorboard"))
    except ImportError:
      print("note: tensorboardX is not installed; metrics go to the console only.")
      self._w = None

  def scalars(self, step: int, metrics: dict) -> None:
    if self._w:
      for k, v in metrics.items():
        self._w.add_scalar(k, float(v), step)
      self._w.flush()

  def close(self) -> None:
    if self._w:
      self._w.close()


def _init_base_from(trainer: Trainer, state: TrainState, workdir: str) -> TrainState:
  """Copies the base generator (and its EMA) from another run's latest checkpoint."""
  restored, step = ckpt.restore_raw(workdir)
  new = {}
  for field in ("params", "ema_params"):
    src = restored[field]["base"]
    dst = getattr(state, field)["base"]
    if jax.tree.structure(src) != jax.tree.structure(dst) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(dst))):
      raise ckpt.CheckpointError(
          f"the base generator in {workdir} (step {step}) has another shape than "
          "config.model.base; train the image stage with the same config.model.base.")
    new[field] = {**getattr(state, field),
                  "base": jax.device_put(src, trainer.state_sharding.params["base"])}
  print(f"base generator initialised from {workdir} (step {step}).")
  params = new["params"]
  return state.replace(params=params, ema_params=new["ema_params"],
                       opt_state=jax.jit(trainer.tx.init, out_shardings=trainer.state_sharding.opt_state)(params))


def prepare_dataset(config: ml_collections.ConfigDict) -> None:
  """Builds the TFDS dataset from the raw files if needed: on host 0 only, the others wait."""
  from jax.experimental import multihost_utils

  from videofusion_jax.data import pipeline

  # The other hosts only check, so that a missing dataset stops each with its message, not at the barrier.
  pipeline.get_builder(config.data, build=jax.process_index() == 0)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")


def resume_position(saved: dict | None, stream: dict, step: int) -> int:
  """The input-stream batch to resume at: the saved position when the stream is laid out as it
  was (data, seed, hosts, per-host batch); otherwise the batch that has consumed as many examples."""
  if saved is None:
    return step  # a checkpoint without a stream position: one batch per step from batch 0
  if all(saved.get(k) == v for k, v in stream.items()):
    return int(saved["batches"])
  examples = int(saved["batches"]) * saved["local_batch_size"] * saved["process_count"]
  position = examples // (stream["local_batch_size"] * stream["process_count"])
  print(f"note: the input stream was {saved} and is now {stream}; the example order cannot continue "
        f"exactly, so it restarts at batch {position} (the same number of examples seen).")
  return position


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def train(config: ml_collections.ConfigDict, workdir: str, batches: Iterator[dict] | None = None,
          trainer: Trainer | None = None, verbose: bool = True) -> TrainState:
  """Trains (or resumes) in ``workdir``: checkpoints, TensorBoard events and ``config.json``.

  ``batches`` yields host-local numpy batches; by default the config's TFDS pipeline.
  ``trainer`` reuses an already compiled step (built from the same model and train config).
  """
  workdir = Path(workdir)
  validate(config)
  if batches is None:
    from videofusion_jax.data import pipeline
    prepare_dataset(config)  # a missing dataset stops us before the model is built
  trainer = trainer or Trainer(config)
  save_config(config, workdir)
  manager = ckpt.make_manager(workdir, config.train.keep_checkpoints)
  saved_stream = None
  if manager.latest_step() is not None:
    state = ckpt.restore(manager, trainer.abstract_state())
    saved_stream = ckpt.restore_data_state(manager, int(state.step))
    print(f"resumed from checkpoint {int(state.step)} in {manager.directory}")
  else:
    state = trainer.init_state(config.seed)
    if config.train.init_base_from:
      state = _init_base_from(trainer, state, config.train.init_base_from)
  start = int(state.step)
  total = config.train.num_steps
  if verbose:
    print(f"parameters: base {trainer.num_params['base']:,}, residual "
          f"{trainer.num_params['residual']:,}; devices {trainer.mesh.devices.size} "
          f"(mesh {dict(trainer.mesh.shape)}); stage {config.train.stage}, λ={config.diffusion.lam}")
  if start >= total:
    manager.close()
    return state
  local_batch = config.train.batch_size // jax.process_count()
  d = config.data
  # Everything the record order depends on: which videos qualify, how they are split and shuffled.
  stream = {"dataset": d.name, "split": d.split, "num_frames": d.num_frames, "frame_stride": d.frame_stride,
            "seed": config.seed, "process_count": jax.process_count(), "local_batch_size": local_batch}
  start_batch = resume_position(saved_stream, stream, start)
  if batches is None:
    batches = pipeline.train_iterator(config, local_batch, seed=config.seed, process_index=jax.process_index(),
                                      process_count=jax.process_count(), start_batch=start_batch)
  writer = _Writer(workdir) if jax.process_index() == 0 else None
  pending = None  # (step, metrics) not yet checked on the host
  t0, last_log_time, last_log_step = time.time(), time.time(), start

  def check(step, metrics):
    host = jax.device_get(metrics)
    if not all(np.isfinite(v) for v in host.values()):
      manager.wait_until_finished()
      last = manager.latest_step()
      kept = f"the last good checkpoint (step {last}) is intact" if last is not None else "no checkpoint was saved yet"
      raise NonFiniteLossError(
          f"the loss became non-finite at step {step} (loss={host['loss']}, grad norms "
          f"base={host['grad_norm_base']}, residual={host['grad_norm_residual']}); training "
          f"stopped and {kept} in {manager.directory}. Lower config.train.learning_rate or "
          f"check the data for NaNs, then rerun to resume.")
    return host

  try:
    for step in range(start + 1, total + 1):
      try:
        local = next(batches)
      except StopIteration:
        raise RuntimeError(f"the input ran out at step {step}; the pipeline should repeat.") from None
      state, metrics = trainer.step(state, shd.global_batch(local, trainer.mesh))
      if pending is not None:
        check(*pending)
      pending = (step, metrics)
      log_now = step % config.train.log_every == 0 or step == total
      save_now = step % config.train.checkpoint_every == 0 or step == total
      if log_now or save_now:  # a checkpoint is written only after its step's loss was checked
        host = check(*pending)
        pending = None
      if log_now:
        now = time.time()
        rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        host["steps_per_sec"] = rate
        if writer:
          writer.scalars(step, host)
        if verbose:
          print(f"step {step:>6}/{total}  loss {host['loss']:.4f} (key {host['loss_key']:.4f}, "
                f"residual {host['loss_residual']:.4f})  lr {host['lr_base']:.1e}/{host['lr_residual']:.1e}  "
                f"|g| {host['grad_norm_base']:.2f}/{host['grad_norm_residual']:.2f}  {rate:5.2f} steps/s  "
                f"elapsed {_format_time(now - t0)}  left {_format_time((total - step) / max(rate, 1e-9))}",
                flush=True)
      if save_now:
        ckpt.save(manager, step, state, {**stream, "batches": start_batch + step - start})
    manager.wait_until_finished()
  finally:
    if writer:
      writer.close()
    manager.close()
  sys.stdout.flush()
  return state

