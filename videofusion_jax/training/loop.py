"""The training loop: input stream -> jitted step -> checked metrics, events and checkpoints."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np

from videofusion_jax.data.stream import prepare_dataset, resume_position, stream_identity
from videofusion_jax.training import checkpoint as ckpt
from videofusion_jax.training.state import TrainState
from videofusion_jax.training.step import Trainer


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; nothing from that step was saved."""


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


def base_from_scratch_warning(config: ml_collections.ConfigDict) -> str | None:
  """A warning for a video run whose base generator starts from scratch but is trained as a
  pretrained one is (a small learning rate, or frozen); None when the recipe is consistent."""
  t = config.train
  if config.model.kind == "vdm" or t.stage != "video" or t.init_base_from or not (t.freeze_base or t.base_lr_scale < 1):
    return None
  how = "frozen (train.freeze_base=True)" if t.freeze_base else f"at {t.base_lr_scale} x the learning rate"
  return (f"warning: the base generator starts from scratch (train.init_base_from is empty) but trains {how}, "
          "a setting meant for fine-tuning a pretrained base. Train the image stage first "
          "(--config.train.stage=image) and pass its workdir as --config.train.init_base_from, or set "
          "--config.train.base_lr_scale=1 --config.train.freeze_base=False.")


def _spatial_from_base(base: dict, video: dict, where: str) -> dict:
  """VDM*'s parameters ``video`` with every layer the image U-Net ``base`` also has taken from it;
  the temporal layers (``*_temporal*``) keep their fresh values (identity at init)."""
  missing = sorted(k for k in video if "temporal" not in k and k not in base)
  if missing:
    raise ckpt.CheckpointError(f"the base generator in {where} lacks VDM*'s layers {missing[:4]}: train it with "
                               "the same config.model.base as this run.")
  return {k: base[k] if "temporal" not in k else v for k, v in video.items()}


def init_base_from(trainer: Trainer, state: TrainState, workdir: str) -> TrainState:
  """Starts the base generator (weights and EMA) from the EMA weights of another run's latest
  checkpoint, as a released pretrained diffusion model is, together with the key-frame encoder
  and the prior when both runs have them (the base is conditioned on that encoder's embeddings);
  the optimizer starts afresh. For VDM* the base fills every layer of the space-time U-Net but
  the temporal ones (VDM* on the same base generator as VideoFusion)."""
  restored, step = ckpt.restore_raw(workdir)
  source = dict(restored["ema_params"])
  if "video" in state.params and "base" in source:
    source["video"] = _spatial_from_base(source["base"], jax.device_get(state.params["video"]),
                                         f"{workdir} (step {step})")
  names = [n for n in ("base", "video", "encoder", "prior") if n in state.params]
  missing = [n for n in names if n not in source]
  if missing:
    raise ckpt.CheckpointError(
        f"{workdir} (step {step}) has no {' or '.join(missing)}: it was trained with another "
        "config.model.condition. Train the image stage with the same config.model as this run.")
  params, ema = dict(state.params), dict(state.ema_params)
  for name in names:
    src = jax.device_get(source[name])  # host copies: each device_put below makes new buffers
    dst = state.params[name]
    if jax.tree.structure(src) != jax.tree.structure(dst) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(dst))):
      raise ckpt.CheckpointError(
          f"the {name} network in {workdir} (step {step}) has another shape than this config's; "
          "train the image stage with the same config.model.")
    # Two copies: the step donates the state, and one buffer must not be donated twice (device_put of
    # a device array onto a sharding that includes its device may reuse its buffer).
    params[name] = jax.device_put(src, trainer.state_sharding.params[name])
    ema[name] = jax.device_put(src, trainer.state_sharding.ema_params[name])
  print(f"{', '.join(names)} initialised from the EMA weights of {workdir} (step {step}).")
  opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_sharding.opt_state)(params)
  return state.replace(params=params, ema_params=ema, opt_state=opt_state)


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def train(config: ml_collections.ConfigDict, workdir: str, batches: Iterator[dict] | None = None,
          trainer: Trainer | None = None, verbose: bool = True) -> TrainState:
  """Trains (or resumes) in ``workdir``: checkpoints, TensorBoard events and ``config.json``.

  ``batches`` yields host-local numpy batches; by default the config's TFDS pipeline.
  ``trainer`` reuses an already built (and compiled) step for the same model and train config;
  otherwise one is built here, which validates the config.
  """
  workdir = Path(workdir)
  trainer = trainer or Trainer(config)
  if batches is None:
    prepare_dataset(config)
  warning = base_from_scratch_warning(config)
  if warning and verbose:
    print(warning, flush=True)
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
      state = init_base_from(trainer, state, config.train.init_base_from)
  start = int(state.step)
  total = config.train.num_steps
  if verbose:
    sizes = ", ".join(f"{k} {v:,}" for k, v in trainer.num_params.items())
    print(f"parameters: {sizes}; devices {trainer.mesh.devices.size} "
          f"(mesh {dict(trainer.mesh.shape)}); {config.model.kind}, stage {config.train.stage}, "
          f"λ={config.diffusion.lam}, "
          f"condition: {config.model.condition}")
  if start >= total:
    manager.close()
    return state
  local_batch = config.train.batch_size // jax.process_count()
  stream = stream_identity(config, jax.process_count(), local_batch)
  start_batch = resume_position(saved_stream, stream, start)
  if batches is None:
    from videofusion_jax.data import pipeline
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
      norms = ", ".join(f"{k[len('grad_norm_'):]}={v}" for k, v in host.items() if k.startswith("grad_norm_"))
      raise NonFiniteLossError(
          f"the loss became non-finite at step {step} (loss={host['loss']}, grad norms {norms}); training "
          f"stopped and {kept} in {manager.directory}. Lower config.train.learning_rate or "
          f"check the data for NaNs, then rerun to resume.")
    return host

  try:
    for step in range(start + 1, total + 1):
      try:
        local = next(batches)
      except StopIteration:
        raise RuntimeError(f"the input ran out at step {step}; the pipeline should repeat.") from None
      state, metrics = trainer.step(state, trainer.global_batch(local))
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
          prior = f", prior {host['loss_prior']:.4f}" if "loss_prior" in host else ""
          lrs = "/".join(f"{v:.1e}" for k, v in host.items() if k.startswith("lr_"))
          norms = "/".join(f"{v:.2f}" for k, v in host.items() if k.startswith("grad_norm_"))
          print(f"step {step:>6}/{total}  loss {host['loss']:.4f} (key {host['loss_key']:.4f}, "
                f"residual {host['loss_residual']:.4f}{prior})  lr {lrs}  |g| {norms}  {rate:5.2f} steps/s  "
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
