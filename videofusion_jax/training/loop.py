"""The training loop: input stream -> jitted step -> checked metrics, events and checkpoints."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np

from videofusion_jax.config import (
    BASE_FIELDS,
    CLIP_FINGERPRINT,
    CLIP_TOKENIZER,
    RESUMED_FIELDS,
    SYNTHETIC_DATA,
    ConfigError,
    check_against_record,
    check_input_kind,
    clip_used,
    field_or_none,
    recorded_config,
    schedule_end_problem,
    text_prior,
)
from videofusion_jax.data.stream import resume_position, stream_identity
from videofusion_jax.experiment import CompileLog
from videofusion_jax.models.factory import network_names
from videofusion_jax.training import checkpoint as ckpt
from videofusion_jax.training.preemption import StopRequest
from videofusion_jax.training.sharding import checked_on_every_host
from videofusion_jax.training.state import TrainState
from videofusion_jax.training.step import Trainer, check_batch, synthetic_batches
from videofusion_jax.training.workdir import LOCK_NAME, WorkdirError, WorkdirLock, check_output_folders, write_whole


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; nothing from that step was saved."""


def _format_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _drop_metrics_after(path: Path, step: int) -> int:
  """Removes from ``path`` (metrics.jsonl) the lines of steps after ``step``, which a run that stopped
  without checkpointing them logged (a crash, not a preemption: that saves its last step), and a line
  cut short by the stop; returns how many were removed. The file is replaced whole (no half-written file)."""
  if not path.exists():
    return 0
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) < len(lines):
    write_whole(path, lambda tmp: tmp.write_text("".join(kept)))
  return len(lines) - len(kept)


class _Writer:
  """Metrics to ``workdir/metrics.jsonl`` (one JSON object per logged step, read by the notebook
  and by scripts without TensorBoard) and to TensorBoard event files through tensorboardX when
  it is installed. Only process 0 writes; a line it cannot write (a full disk, a dropped mount) is
  warned about and training goes on: the line is in the log, and process 0 stopping alone would leave
  the other hosts waiting in the next step's collectives."""

  def __init__(self, workdir: Path, start: int, say=print):
    dropped = _drop_metrics_after(workdir / "metrics.jsonl", start)
    if dropped:
      say(f"metrics.jsonl: {dropped} line(s) past step {start} removed (logged before the run stopped without "
          "a checkpoint of them; they are logged again as it resumes).")
    self._path, self._say, self._missed = workdir / "metrics.jsonl", say, []
    self._torn = self._tensorboard_failed = False
    # Unbuffered: a write that fails leaves nothing behind in a buffer to be written twice later.
    self._jsonl = open(self._path, "ab", buffering=0)  # appended: a resumed run continues the curve
    try:
      from tensorboardX import SummaryWriter
      # TensorBoard hides the events at and past purge_step that an earlier run wrote.
      self._w = SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1)
    except ImportError:
      print("note: tensorboardX is not installed; metrics go to the console only.")
      self._w = None

  def scalars(self, step: int, metrics: dict) -> None:
    # null for a value that is not finite (a skipped float16 step's gradient norms): JSON has no inf or NaN.
    line = (json.dumps({"step": step, **{k: float(v) if np.isfinite(v) else None for k, v in metrics.items()}})
            + "\n").encode()
    end = None
    try:
      end = os.fstat(self._jsonl.fileno()).st_size
      if self._torn:  # a part line an earlier failure could not remove: ended, so that it spoils no other line
        line = b"\n" + line
      if self._jsonl.write(line) != len(line):
        raise OSError(errno.ENOSPC, "the line was written in part", str(self._path))
      self._torn = False
    except OSError as e:
      try:  # a line cut short would end the file's readable part for the notebook
        if end is None:
          raise e
        os.ftruncate(self._jsonl.fileno(), end)
      except OSError:
        self._torn = True
      if not self._missed:
        self._say(f"warning: cannot write the metrics of step {step} to {self._path} ({e.strerror or e}); "
                  "training goes on (they are in this log) and tries again at each log.", flush=True)
      self._missed.append(step)
    else:
      if self._missed:
        self._say(f"metrics.jsonl: written again from step {step}; the steps {_spans(self._missed)} are missing "
                  "from it (they are in this log).", flush=True)
        self._missed = []
    if self._w:
      try:
        for k, v in metrics.items():
          if np.isfinite(v):  # as in metrics.jsonl: a skipped step's inf norms would squash the plot's scale
            self._w.add_scalar(k, float(v), step)
        self._w.flush()
      except OSError as e:
        if not self._tensorboard_failed:
          self._say(f"warning: cannot write TensorBoard's events ({e.strerror or e}); training goes on.", flush=True)
        self._tensorboard_failed = True

  def close(self) -> None:
    for close in [self._jsonl.close] + ([self._w.close] if self._w else []):
      try:
        close()
      except OSError as e:  # on process 0 alone, at the run's end or its stop: the others are not kept waiting
        self._say(f"warning: closing the metrics files: {e}", flush=True)


def _spans(steps: list[int]) -> str:
  """The logged steps ``steps`` in short: ``'5, 6'``, or ``'5-10 (6 logs)'`` for more than two."""
  if len(steps) <= 2:
    return ", ".join(map(str, steps))
  return f"{steps[0]}-{steps[-1]} ({len(steps)} logs)"


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


def warmup_warning(config: ml_collections.ConfigDict) -> str | None:
  """A warning for a run that ends before its learning-rate warm-up does (a short local run of a
  pod config); None otherwise."""
  t = config.train
  if t.warmup_steps < t.num_steps:
    return None
  decay = " and its cosine decay never starts" if t.lr_decay == "cosine" else ""
  return (f"warning: config.train.warmup_steps={t.warmup_steps} >= num_steps={t.num_steps}: the run ends on the "
          f"warm-up ramp, at {100 * (t.num_steps - 1) / t.warmup_steps:.0f}% of the learning rate{decay}. For a "
          f"short run set --config.train.warmup_steps={t.num_steps // 10}" + (" (or 0)." if t.num_steps >= 10 else "."))


SCHEDULE_FIELDS = ("learning_rate", "lr_decay", "num_steps", "warmup_steps")  # train.*: the rate at a step


def schedule_change_warning(config: ml_collections.ConfigDict, workdir: Path, step: int) -> str | None:
  """A warning for a run resumed at ``step`` whose learning-rate schedule gives another rate there than the
  one its ``config.json`` records (a raised ``num_steps`` stretches a cosine decay: the rate rises again; a
  changed warm-up puts the run back on its ramp); None when the rate is the same, or nothing is recorded."""
  from videofusion_jax.training.optimizer import learning_rate_schedule

  record, trained = recorded_config(workdir)
  if trained is None or step == 0:
    return None
  then = ml_collections.ConfigDict(config.to_dict())
  changed = []
  for name in SCHEDULE_FIELDS:
    was = field_or_none(trained, f"train.{name}")
    if was is not None and was != config.train[name]:
      then.train[name] = type(config.train[name])(was)
      changed.append(f"{name}={config.train[name]!r} (was {was!r})")
  if not changed:
    return None
  was, now = (float(learning_rate_schedule(c, 1.0)(step)) for c in (then, config))
  if abs(now - was) <= 1e-3 * max(abs(was), 1e-12):
    return None
  return (f"warning: the learning-rate schedule changed since checkpoint {step} was trained ({', '.join(changed)}; "
          f"{record}): at step {step} the rate is {now:.2e} (x the network's scale) where it was {was:.2e}, "
          f"{'up' if now > was else 'down'} {max(now, was) / max(min(now, was), 1e-30):.1f}x at once. With "
          "train.lr_decay='cosine' a higher num_steps stretches the decay to the new end; to keep the rate, resume "
          "with the recorded values.")


def _spatial_from_base(base: dict, video: dict, where: str) -> dict:
  """VDM*'s parameters ``video`` with every layer the image U-Net ``base`` also has taken from it;
  the temporal layers (``*_temporal*``) keep their fresh values (identity at init)."""
  missing = sorted(k for k in video if "temporal" not in k and k not in base)
  if missing:
    raise ckpt.CheckpointError(f"the base generator in {where} lacks VDM*'s layers {missing[:4]}: train it with "
                               "the same config.model.base as this run.")
  return {k: base[k] if "temporal" not in k else v for k, v in video.items()}


def check_base_source(config: ml_collections.ConfigDict) -> None:
  """The settings that the networks ``train.init_base_from`` gives were trained under (``BASE_FIELDS``, and
  a 'clip' encoder's CLIP) as that run's ``config.json`` records them: a ConfigError naming each that
  differs (no parameter's shape depends on them, so the restore cannot tell: a base trained on another
  noise schedule predicts ε for other noise levels). Nothing to compare without the record."""
  source = config.train.init_base_from
  record, trained = recorded_config(source)
  if trained is None:
    return
  check_input_kind(config, trained, f"the networks in config.train.init_base_from={source}")
  check_against_record(config, trained, BASE_FIELDS, "that run's",
                       f"config.train.init_base_from={source} trained the networks this run takes from it under "
                       f"other settings ({record}), and their weights would be wrong under these",
                       "train the image stage with this run's settings")


def check_resumed_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """The settings ``RESUMED_FIELDS`` (and a 'clip' encoder's CLIP) of a run resumed in ``workdir`` as its
  ``config.json`` records them: a ConfigError naming each that differs (the checkpoints' networks learned
  under the recorded ones; resuming would go on training them on another objective, and record these
  settings as theirs). Nothing to compare without the record."""
  record, trained = recorded_config(workdir)
  if trained is None:
    return
  check_input_kind(config, trained, f"the checkpoints in {workdir / 'checkpoints'}")
  check_against_record(config, trained, RESUMED_FIELDS, "trained with",
                       f"the checkpoints in {workdir / 'checkpoints'} were trained under other settings ({record}), "
                       "and resuming would train them on under these", "train these settings in a new workdir")


def init_base_from(trainer: Trainer, state: TrainState, workdir: str) -> TrainState:
  """Starts the base generator (weights and EMA) from the EMA weights of another run's latest
  checkpoint, as a released pretrained diffusion model is, together with the key-frame encoder
  and the prior when both runs have them (the base is conditioned on that encoder's embeddings);
  the optimizer starts afresh. For VDM* the base fills every layer of the space-time U-Net but
  the temporal ones (VDM* on the same base generator as VideoFusion)."""
  restored, step = ckpt.restore_raw(workdir, fields=("ema_params",))
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
  # A key of its own: with the image run's seed (the default, 0, in both) the state's key was that run's,
  # and every step drew the image stage's timesteps, noise and dropouts again, step for step.
  return state.replace(params=params, ema_params=ema, opt_state=opt_state, rng=jax.random.fold_in(state.rng, 1))


def non_finite(step: int, metrics: dict) -> str:
  """What is wrong with ``step``'s host ``metrics``, or '' when nothing is. A float16 step whose update was
  skipped (``update_skipped``: its gradients overflowed at its loss scale) may have gradient norms of inf or
  NaN; the scale then halves and the next step tries again, unless the scale was already 1: gradients that
  are not finite even unscaled are no overflow."""
  norms = ", ".join(f"{k[len('grad_norm_'):]}={v}" for k, v in metrics.items() if k.startswith("grad_norm_"))
  skipped = metrics.get("update_skipped", 0) == 1
  if skipped and metrics["loss_scale"] <= 1:
    return (f"the gradients were not finite at step {step} even at loss scale {metrics['loss_scale']:g}, the "
            f"smallest (loss={metrics['loss']}, grad norms {norms}): no overflow that loss scaling can avoid")
  if not all(np.isfinite(v) for k, v in metrics.items() if not (skipped and k.startswith("grad_norm_"))):
    return f"the loss became non-finite at step {step} (loss={metrics['loss']}, grad norms {norms})"
  return ""


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """``workdir/config.json``: the config, and for a 'clip' encoder on a CLIP directory that CLIP's
  fingerprint (``clip_fingerprint``) and, for a text prior, its tokenizer's (``clip_tokenizer``), by which
  sampling knows the same CLIP at another path."""
  workdir.mkdir(parents=True, exist_ok=True)
  record = json.loads(config.to_json_best_effort())
  if clip_used(config) is not None and config.model.encoder.clip_dir:
    from videofusion_jax.data.embeddings import fingerprint, tokenizer_digest
    record[CLIP_FINGERPRINT] = fingerprint(config.model.encoder.clip_dir, config.data.image_size)
    if text_prior(config):
      record[CLIP_TOKENIZER] = tokenizer_digest(config.model.encoder.clip_dir)
  # Whole or not at all: a record cut short (a full disk) cannot be read, and every later resume, sampling and
  # evaluation of the run would stop at it until it is put back.
  write_whole(workdir / "config.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2)))


def _warn(message: str) -> None:
  """A warning of this host's own, on every host (stderr; named by process where there are several)."""
  who = f" (process {jax.process_index()})" if jax.process_count() > 1 else ""
  print(f"warning{who}: {message}", file=sys.stderr, flush=True)


class ProfileWindow:
  """``config.train.profile_steps``: this run's steps in that window traced with ``jax.profiler`` into
  ``workdir/profile/process_<i>`` (each host its own), each step, its input's wait included, marked by a
  ``StepTraceAnnotation``; written once the last one has run, or as the run stops inside the window. A trace that
  cannot start or be written is said by its host (on stderr) and skipped: it never stops training."""

  def __init__(self, window: tuple[int, int] | tuple[()], start: int, total: int, workdir: Path,
               say: Callable[..., None]):
    self.directory = workdir / "profile" / f"process_{jax.process_index()}"
    self.say = say
    self.steps: tuple[int, int] | None = None
    self._first: int | None = None  # the first step traced, while a trace runs
    self._last: int | None = None
    self._annotation = None  # the open step's StepTraceAnnotation
    if window:
      first, last = max(window[0], start + 1), min(window[1], total)
      if first <= last:
        self.steps = (first, last)
      else:
        say(f"config.train.profile_steps={tuple(window)}: this run trains steps {start + 1}-{total}, none of "
            "them; nothing is profiled.")

  def begin(self, step: int) -> None:
    """Before step ``step``'s input is read."""
    if self.steps is None or not self.steps[0] <= step <= self.steps[1]:
      return
    if step == self.steps[0]:
      # XLA's, the runtime's and the steps' events, not Python's: those filled a tiny step's trace to the
      # profiler's cap (a million events, mostly Orbax's tree walks) and took 14 s to write.
      options = jax.profiler.ProfileOptions()
      options.python_tracer_level = 0
      try:
        jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True, profiler_options=options)
      except Exception as e:  # noqa: BLE001 - another trace running (a notebook's), an unwritable folder
        _warn(f"config.train.profile_steps: the profiler did not start ({e}); training goes on unprofiled.")
        self.steps = None
        return
      self._first = step
    self._last = step
    self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
    self._annotation.__enter__()

  def end(self, step: int, outputs: object) -> float:
    """After step ``step`` (its log and checkpoint included); at the window's last, waits for ``outputs``
    (the step's) and writes the trace. The seconds spent writing it (no training step's)."""
    if self._annotation is None:
      return 0.0
    self._annotation.__exit__(None, None, None)
    self._annotation = None
    if step != self.steps[1]:
      return 0.0
    jax.block_until_ready(outputs)
    t0 = time.time()
    self.close()
    return time.time() - t0

  def close(self) -> None:
    """Writes the trace, if one is running (a run stopped inside the window: its steps so far)."""
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    if self._first is None:
      return
    steps = f"{self._first}-{self._last}" if self._first < self._last else str(self._first)
    self._first = None
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # noqa: BLE001 - a full disk: training is what matters
      _warn(f"the profile of step(s) {steps} could not be written to {self.directory} ({e}).")
      return
    perfetto = sorted(self.directory.glob("plugins/profile/*/perfetto_trace.json.gz"), key=os.path.getmtime)
    hosts = " (and process_<i> on each host)" if jax.process_count() > 1 else ""
    self.say(f"profile of step(s) {steps} written to {self.directory}{hosts}: TensorBoard's Profile tab (tensorboard "
             f"--logdir {self.directory.parent}, with tensorboard-plugin-profile installed), or "
             f"{perfetto[-1] if perfetto else 'its perfetto_trace.json.gz'} in ui.perfetto.dev.", flush=True)


class Preempted(Exception):
  """Training stopped on SIGTERM or SIGINT after saving the step it was in (not an error)."""

  def __init__(self, step: int, signal_name: str, directory: str):
    super().__init__(f"stopped on {signal_name} at step {step}: checkpoint {step} is saved in {directory}; "
                     "run the same command again to resume from it.")
    self.step = step


def _resume(trainer: Trainer, manager, say, restored: tuple | None = None) -> tuple[TrainState, dict | None]:
  """The newest intact checkpoint and its stream position (``restored``: ``ckpt.restore``'s answer, when
  read already); damaged newer ones moved aside, so that their steps can be saved again."""
  state, saved_stream, step, damaged = restored or ckpt.restore(manager, trainer.abstract_state(), with_data=True,
                                                                log=say)
  ckpt.move_aside(manager, [s for s in damaged if s > step], log=say)
  say(f"resumed from checkpoint {step} in {manager.directory}")
  return state, saved_stream


def _start(trainer: Trainer, manager, config: ml_collections.ConfigDict, say) -> tuple[TrainState, dict | None]:
  """The state to train from: the newest intact checkpoint (``_resume``), else a fresh state, from
  ``train.init_base_from`` if given."""
  if manager.all_steps():
    return _resume(trainer, manager, say)
  t0 = time.time()
  with CompileLog() as xla:
    state = jax.block_until_ready(trainer.init_state(config.seed))
  how = {"stored": "its traced program loaded from the store; ",
         "traced": "its program traced and stored for the next run; "}.get(trainer.init_source, "")
  say(f"initial state made in {time.time() - t0:.1f} s ({how}{xla.describe()}, and run)")
  if config.train.init_base_from:
    state = init_base_from(trainer, state, config.train.init_base_from)
  return state, None


def prepare_dataset(config: ml_collections.ConfigDict) -> None:
  """Builds the TFDS dataset from the raw files if needed, on host 0 only while the others check that it
  could be (``pipeline.get_builder``: a missing dataset or one that does not fit ``config.data`` stops each
  host with its message); then every host opens the split it trains on (``data.split``, clips of
  ``data.num_frames`` x ``frame_stride`` frames), before the slow start of a run, not at its first batch.
  Each phase is agreed on: a host whose check, build or read fails stops with its error and the others with a
  pointer to it, where they would wait at their next collective until its timeout (a build that failed on
  host 0, a data_dir that is not shared and cannot be built into on another host)."""
  from videofusion_jax.data import pipeline  # imports TensorFlow when it builds

  checked_on_every_host(lambda: pipeline.get_builder(config.data, build=jax.process_index() == 0),
                        pipeline.PipelineError("another host could not check or build the dataset (its own error "
                                               "says why)."))
  checked_on_every_host(lambda: pipeline._source(config, config.data.split, verbose=False),
                        pipeline.PipelineError(
                            "another host cannot read the dataset process 0 prepared (its own error says why): every "
                            "host needs it at the same data_dir, shared (a bucket mounted at the same path on each) or "
                            "built on each from the same files."))
  if (jax.process_count() == 1 and config.model.get("condition") == "embedding"
      and config.model.encoder.kind == "clip"):
    # First-use CLIP work too (the project's own CLIP, the frame and caption tables: hours on WebVid), here where
    # a signal stops it at once; when the input opened it, a SIGTERM waited for its end and the first step.
    # Several hosts make them beforehand (--mode=embed).
    from videofusion_jax.data import embeddings

    own = None if config.model.encoder.clip_dir else embeddings.project_clip_dir(config)
    if own is not None and not (own / "model.safetensors").is_file():
      embeddings.make_project_clip(config, own)  # its training said, as before
    embeddings.frame_table(config, config.data.split)
    if config.model.prior.condition == "text":
      embeddings.caption_table(config, config.data.split)


def _lock_on_every_host(lock: WorkdirLock | None, workdir: Path) -> None:
  """Process 0 takes the workdir's lock (``lock``; None on the others); when it cannot, every host stops
  with an error, where the others would wait at the checkpoint manager's first barrier until its timeout."""
  refused = None
  if lock is not None:
    try:
      lock.acquire()
    except (WorkdirError, OSError) as e:  # OSError: a lock file this host cannot create (permissions, a bucket)
      refused = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    held = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
    if not held and refused is None:
      raise WorkdirError(f"process 0 could not lock {workdir / LOCK_NAME}: another training run holds the workdir, "
                         "or the lock file could not be written (process 0's error says which).")
  if refused is not None:
    raise refused


def train(config: ml_collections.ConfigDict, workdir: str, batches: Iterator[dict] | None = None,
          trainer: Trainer | None = None, verbose: bool = True) -> TrainState:
  """Trains (or resumes) in ``workdir``: checkpoints, TensorBoard events, ``metrics.jsonl`` and
  ``config.json`` (written once the checkpoints are known to match this config).

  ``batches`` yields host-local numpy batches; by default the config's TFDS pipeline.
  ``trainer`` reuses an already built (and compiled) step for the same model and train config;
  otherwise one is built here, which validates the config. The workdir is locked for the run
  (``train.lock``). SIGTERM or SIGINT save the step in flight and raise ``Preempted``.
  """
  workdir = Path(workdir)
  if config.train.init_base_from and not ckpt.has_checkpoints(workdir):  # a fresh run starts from that run's
    checked_on_every_host(  # weights: checked before the lock, the folders and any slow work
        lambda: (ckpt.check_other_run(config.train.init_base_from), check_base_source(config)),
        ConfigError("config.train.init_base_from: another host cannot use that run (its own error says why); "
                    "every host needs the same workdir, at the same path."))
  # Every host writes its part of each checkpoint: a folder it cannot write to failed only at the first save, in
  # the background (the steps until the next save lost), and Orbax's other threads then held the exit 5 minutes.
  checked_on_every_host(lambda: check_output_folders(workdir, "checkpoints"), WorkdirError(
      f"{workdir / 'checkpoints'}: another host cannot write there (its own error says why)."))
  trainer = trainer or Trainer(config)
  trainer.check_config(config, "train")
  problem = schedule_end_problem(config)
  if problem and not ckpt.has_checkpoints(workdir):  # a new model that could not be sampled
    raise ConfigError(problem)
  lead = jax.process_index() == 0
  say = print if verbose and lead else (lambda *a, **k: None)
  lock = WorkdirLock(workdir) if lead else None
  manager = None
  # The folders this run creates, removed again where it stops before it wrote anything in them (a missing dataset
  # left an empty workdir/checkpoints behind).
  created = [p for p in (workdir, workdir / "checkpoints") if not p.exists()] if lead else []
  # From here on a signal stops training at a step, with its checkpoint; XLA's out-of-memory (a restore, the
  # state, a step) is said with the settings that lower it.
  with StopRequest() as stop, trainer.explain_out_of_memory("train"):
    try:
      _lock_on_every_host(lock, workdir)
      manager = ckpt.make_manager(workdir, config.train.keep_checkpoints)
      ckpt.check_compatible(manager, trainer.abstract_state())  # before the slow start
      latest, started = manager.latest_step(), None
      if latest is not None:  # the settings no parameter's shape shows, before config.json records these
        checked_on_every_host(lambda: check_resumed_config(config, workdir), ConfigError(
            f"{workdir}: another host refused to resume under these settings (its own error says why); every "
            "host needs the same workdir, at the same path, and the same flags."))
      if latest is not None and latest >= config.train.num_steps:
        # Done, unless that checkpoint is damaged and the newest intact one is not: then training goes on
        # from it (the damaged ones moved aside), and saves their steps anew.
        restored = ckpt.restore(manager, trainer.abstract_state(), with_data=True, log=say)
        state, _, step, _ = restored
        if step >= config.train.num_steps:
          say(f"nothing to train: checkpoint {step} in {manager.directory} has reached "
              f"config.train.num_steps={config.train.num_steps}. Raise --config.train.num_steps to train on"
              + (" (with train.lr_decay='cosine' the decay then stretches to the new end: the learning rate rises "
                 "again)." if config.train.lr_decay == "cosine" else "."))
          return state
        started = _resume(trainer, manager, say, restored)
      if batches is None and config.data.name != SYNTHETIC_DATA:
        with stop.at_once():  # no step to save yet: a build of many minutes stops when told, not after it
          prepare_dataset(config)
      state, saved_stream = started or _start(trainer, manager, config, say)
      for warning in (base_from_scratch_warning(config), warmup_warning(config), problem and f"warning: {problem}",
                      schedule_change_warning(config, workdir, int(state.step)) if latest is not None else None):
        if warning:
          say(warning, flush=True)
      sizes = ", ".join(f"{k} {v:,}" for k, v in trainer.num_params.items())
      say(f"parameters: {sizes}; devices {trainer.mesh.devices.size} (mesh {dict(trainer.mesh.shape)}, "
          f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}); {config.model.kind}, "
          f"stage {config.train.stage}, λ={config.diffusion.lam}, condition: {config.model.condition}")
      state = _loop(trainer, state, manager, config, workdir, batches, saved_stream, stop, say)
      created = []
    finally:
      if manager is not None:
        manager.close()  # waits for a save in flight
      held = bool(lock and lock.held)  # refused, the folders are the run's that holds the lock
      if lock:
        lock.release()
      for folder in reversed(created if held else []):
        with contextlib.suppress(OSError):  # not empty: the run wrote there, and it stays
          folder.rmdir()
    # A signal while the last checkpoint was written, after the last step's check (one process; on several JAX's
    # preemption service keeps it for the work after training): the step is saved, and it was announced as a stop.
    if stop.signal_name is not None and jax.process_count() == 1:
      raise Preempted(int(state.step), stop.signal_name, str(manager.directory))
    return state


def _loop(trainer: Trainer, state: TrainState, manager, config, workdir: Path, batches, saved_stream, stop,
          say) -> TrainState:
  """Steps from ``state.step`` to ``train.num_steps``: metrics checked on the host (one step
  behind, so that the device never waits), logged, and checkpointed asynchronously."""
  start, total = int(state.step), config.train.num_steps
  local_batch = config.train.batch_size // jax.process_count()

  def open_input():
    """This host's input stream and its first batch, checked whole (a pass over the video for its values)
    against the config: a caller's batch (``train(batches=...)``) of other keys, shapes, dtypes or labels
    would train silently or fail deep in the trace. Agreed on by every host (one small collective, once):
    what fails here fails on one host (a CLIP table or a video missing from its disk, config.json or
    metrics.jsonl unwritable on host 0), which would leave the others waiting in the first step's collectives."""
    source, stream_batches = None, batches
    synthetic = stream_batches is None and config.data.name == SYNTHETIC_DATA
    if stream_batches is None and not synthetic:
      from videofusion_jax.data import pipeline
      source = pipeline.source_fingerprint(config, config.data.split)
    stream = stream_identity(config, jax.process_count(), local_batch, source)
    start_batch = resume_position(saved_stream, stream, start)
    if synthetic:
      stream_batches = synthetic_batches(config, local_batch, config.seed, jax.process_index(), start_batch)
    elif stream_batches is None:
      stream_batches = pipeline.train_iterator(
          config, local_batch, seed=config.seed, process_index=jax.process_index(),
          process_count=jax.process_count(), start_batch=start_batch)
    first = next(stream_batches, None)
    if first is None:
      raise RuntimeError(f"the input ran out at step {start + 1}; the pipeline should repeat.")
    check_batch(config, first, local_batch)
    if jax.process_index() == 0:
      save_config(config, workdir)
      opened["writer"] = _Writer(workdir, start, say)
    return stream, start_batch, stream_batches, first

  opened = {}
  try:
    stream, start_batch, batches, first = checked_on_every_host(
        open_input,
        ConfigError("another host could not open its training input, or its first batch does not fit the config, "
                    "or process 0 could not write config.json or metrics.jsonl (its own error says why)."))
  except BaseException:
    if opened.get("writer"):
      opened["writer"].close()
    raise
  writer = opened.get("writer")
  profile = ProfileWindow(config.train.profile_steps, start, total, workdir, say)
  pending = None  # (step, metrics) not yet checked on the host
  t0 = time.time()
  last_log_time, last_log_step = t0, start
  save_wait = 0.0  # seconds the loop was blocked by checkpoint saves since the last log

  def check(step, metrics):
    host = jax.device_get(metrics)
    problem = non_finite(step, host)
    if problem:
      manager.wait_until_finished()
      last = manager.latest_step()
      kept = f"the last good checkpoint (step {last}) is intact" if last is not None else "no checkpoint was saved yet"
      raise NonFiniteLossError(
          f"{problem}; training stopped and {kept} in {manager.directory}. Lower "
          f"config.train.learning_rate or check the data for NaNs, then rerun to resume.")
    return host

  try:
    for step in range(start + 1, total + 1):
      profile.begin(step)
      local = first if step == start + 1 else next(batches, None)
      if local is None:
        raise RuntimeError(f"the input ran out at step {step}; the pipeline should repeat.")
      # Later batches than the first (open_input), on one host, by their keys, shapes, dtypes and B labels
      # (microseconds, no device sync). Not on a pod: one host raising alone would leave the others waiting in
      # the step's collectives (a later batch's NaN, or label past the classes, is the NaN check's, which every
      # host sees).
      if step > start + 1 and jax.process_count() == 1:
        check_batch(config, local, local_batch, values=False)
      with CompileLog() if step == start + 1 else contextlib.nullcontext() as xla:
        state, metrics = trainer.step(state, trainer.global_batch(local))
      if step == start + 1:  # the compile: kept out of the steps/s and time-left estimates
        jax.block_until_ready(metrics)
        how = {"stored": "the step's traced program loaded from the store; ",
               "traced": "the step traced and stored for the next run; "}.get(trainer.step.source, "the step ")
        how += xla.describe_every_host()  # before the clock: its all-gather is no training step
        last_log_time, last_log_step = time.time(), step
        say(f"first step done in {last_log_time - t0:.1f} s ({how})", flush=True)
      if pending is not None:
        check(*pending)
      pending = (step, metrics)
      stopping = stop.reached(step)
      log_now = step % config.train.log_every == 0 or step == total or stopping
      save_now = step % config.train.checkpoint_every == 0 or step == total or stopping
      if log_now or save_now:  # a checkpoint is written only after its step's loss was checked
        host = check(*pending)
        pending = None
      if log_now:
        now = time.time()
        rate = (step - last_log_step) / max(now - last_log_time, 1e-9) if step > last_log_step else None
        last_log_time, last_log_step = now, step
        if rate is not None:
          host["steps_per_sec"] = rate
        host["checkpoint_wait_s"], save_wait = save_wait, 0.0
        if writer:
          writer.scalars(step, host)
        prior = f", prior {host['loss_prior']:.4f}" if "loss_prior" in host else ""
        lrs = "/".join(f"{v:.1e}" for k, v in host.items() if k.startswith("lr_"))
        norms = " ".join(f"{k}={host[f'grad_norm_{k}']:.2f}" for k in network_names(config)
                         if f"grad_norm_{k}" in host)
        speed = (f"{rate:5.2f} steps/s  left {_format_time((total - step) / max(rate, 1e-9))}" if rate is not None
                 else "rate after the next log")
        scaling = (f"  loss scale {host['loss_scale']:g} ({host['skipped_steps']:.0f} updates skipped)"
                   if "loss_scale" in host else "")
        say(f"step {step:>6}/{total}  loss {host['loss']:.4f} (key {host['loss_key']:.4f}, "
            f"residual {host['loss_residual']:.4f}{prior})  lr {lrs}  |g| {norms}{scaling}  {speed}  "
            f"elapsed {_format_time(now - t0)}", flush=True)
      if save_now:
        t_save = time.time()
        ckpt.save(manager, step, state, {**stream, "batches": start_batch + step - start})
        waited = time.time() - t_save  # the device-to-host copy; the write itself goes on in the background
        save_wait += waited
        say(f"checkpoint {step}: training waited {waited:.2f} s for it (written in the background)", flush=True)
      last_log_time += profile.end(step, (state, metrics))  # kept out of the steps/s
      if stopping:
        t_wait = time.time()
        manager.wait_until_finished()
        say(f"checkpoint {step} written ({time.time() - t_wait:.1f} s waiting for the write).")
        raise Preempted(step, stop.signal_name or "SIGTERM", str(manager.directory))
    manager.wait_until_finished()
  finally:
    profile.close()
    if writer:
      writer.close()
  sys.stdout.flush()
  return state
