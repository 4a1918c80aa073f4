"""The objects a run is built from, shared by training, sampling, evaluation and benchmarks:
networks, noise schedule, per-frame λs, optimizer, mesh, every sharding, the abstract state,
and restoring a checkpoint onto this mesh."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax._src import config as jax_config  # threefry_gpu_kernel_lowering: a setting with no public context manager
from jax.experimental.compilation_cache import compilation_cache

from videofusion_jax import diffusion
from videofusion_jax.config import ConfigError, validate
from videofusion_jax.models import factory
from videofusion_jax.models.encoder import frozen_encoder_in_package
from videofusion_jax.training import checkpoint as ckpt
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.optimizer import make_optimizer
from videofusion_jax.training.program_store import StoredJit, config_json, program_context, unread_train_fields
from videofusion_jax.training.state import TrainState


def enable_compilation_cache(directory: str, max_gb: float = 10.0) -> str | None:
  """Turns on XLA's persistent compilation cache in ``directory`` (created if missing), kept under
  ``max_gb`` GiB by removing the least recently used programs; '' turns it off. A Cloud Storage folder
  (``gs://bucket/path``) is given to JAX as it is, with no size limit (``_use_bucket``). Call before anything
  is compiled, or again to move or end it (a notebook's second run). Returns the absolute path or the URL
  used, or None."""
  if directory.startswith("file://"):
    directory = directory[len("file://"):]
  if not directory:
    if jax.config.jax_compilation_cache_dir:
      _use_cache_dir(None)
    return None
  if not (isinstance(max_gb, (int, float)) and math.isfinite(max_gb) and max_gb > 0):  # inf: no int of it
    raise ConfigError(f"config.compilation_cache_max_gb={max_gb}: must be > 0 and finite (the persistent compilation "
                      "cache's size; config.compilation_cache_dir='' turns the cache off).")
  if "://" in directory:
    return _use_bucket(directory)
  _xla_caches_for(local=True)
  path = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"config.compilation_cache_dir={directory!r}: cannot create {path} ({e.strerror}); "
                      "pass a writable folder, or '' to turn the cache off.") from None
  # A limit, unlike JAX's default of none, also makes every read and write of the folder take its
  # file lock: without it a run could load a program that another is still writing.
  _use_cache_dir(path, int(max_gb * 2**30))
  return path


def _use_bucket(url: str) -> str:
  """Points JAX's cache at a Cloud Storage folder (``gs://bucket/path``, which JAX reaches through
  ``etils.epath``): the usual cache of a TPU pod, one folder for every host. Returns ``url``."""
  if not url.startswith("gs://"):
    raise ConfigError(f"config.compilation_cache_dir={url!r}: of the URLs, only a Cloud Storage folder "
                      "(gs://bucket/path) is supported; mount other storage at the same path on every host and give "
                      "that path, or '' to turn the cache off.")
  if not url[len("gs://"):].strip("/"):
    raise ConfigError(f"config.compilation_cache_dir={url!r}: name the bucket, and a folder in it "
                      "(gs://bucket/path).")
  import importlib.util
  if not any(importlib.util.find_spec(m) for m in ("tensorflow", "gcsfs")):
    raise ConfigError(f"config.compilation_cache_dir={url!r}: reaching Cloud Storage needs the gcsfs package "
                      "(pip install gcsfs) or TensorFlow, and this environment has neither; install one, or give a "
                      "local or mounted folder.")
  from etils import epath  # what JAX reaches the bucket through
  # As JAX would at its first compile, where a bucket out of reach is one warning and the run goes on without a
  # cache, compiling every program on every run.
  try:
    epath.Path(url).mkdir(parents=True, exist_ok=True)
  except Exception as e:  # noqa: BLE001 - each storage backend raises its own
    raise ConfigError(f"config.compilation_cache_dir={url!r}: cannot reach it ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}); check this host's network and Google Cloud credentials, "
                      "or give a local or mounted folder, or '' to turn the cache off.") from None
  # No size limit (config.compilation_cache_max_gb is not applied: the bucket's lifecycle rules keep its size):
  # JAX's eviction takes a file lock that, for a URL, is a file of that name under the current folder, held by this
  # host alone (filelock's SoftFileLock). Without the lock no reader sees half a program: Cloud Storage makes an
  # object whole or not at all.
  _use_cache_dir(url, -1)
  _xla_caches_for(local=False)
  return url


_XLA_CACHES = "jax_persistent_cache_enable_xla_caches"
_xla_caches_before_bucket: list = []  # the setting a bucket replaced, restored for a local folder


def _xla_caches_for(local: bool) -> None:
  """XLA's own caches beside JAX's (on GPUs its autotuning results, in ``<cache>/xla_gpu_per_fusion_autotune_
  cache_dir``): off for a bucket, whose URL XLA's C++ file layer cannot open (the first GPU compile failed with
  "File system scheme 'gs' not implemented"); as they were for a local folder."""
  if not local and not _xla_caches_before_bucket:
    _xla_caches_before_bucket.append(getattr(jax.config, _XLA_CACHES))
    jax.config.update(_XLA_CACHES, "none")
  elif local and _xla_caches_before_bucket:
    jax.config.update(_XLA_CACHES, _xla_caches_before_bucket.pop())


class CompileLog:
  """What XLA did for this process inside a ``with`` block, from JAX's monitoring events (the block's other
  threads included): ``compiled`` programs that missed the persistent cache and took at least JAX's threshold
  for storing one (``compiled_s`` seconds for every miss, small ones included), ``hits`` programs loaded
  from the cache (in ``loaded_s``), ``cached`` whether the cache was on (``config.compilation_cache_dir``).
  A program's seconds are JAX's whole compile-or-load span (a miss's cache read and write included), so one
  just under the threshold may count as compiled. With ``jax_share_binary_between_hosts`` (the project does
  not set it) a host handed a program by another counts its wait as a compile."""

  _PROGRAM = "/jax/core/compile/backend_compile_duration"  # each program: its compile, or its cache load
  _HIT = "/jax/compilation_cache/cache_hits"  # recorded just before the program's duration, on its thread

  def __init__(self):
    self.compiled_s = self.loaded_s = 0.0
    self.compiled = self.hits = self._misses = 0
    self.cached = False
    self._hit = threading.local()

  def _event(self, event: str, **kwargs) -> None:
    if event == self._HIT:
      self._hit.pending = True

  def _duration(self, event: str, seconds: float, **kwargs) -> None:
    if event != self._PROGRAM:
      return
    if getattr(self._hit, "pending", False):
      self._hit.pending = False
      self.hits += 1
      self.loaded_s += seconds
    else:
      self.compiled_s += seconds
      self._misses += 1
      self.compiled += seconds >= jax.config.jax_persistent_cache_min_compile_time_secs

  def __enter__(self) -> CompileLog:
    self.cached = bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)
    jax.monitoring.register_event_listener(self._event)
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_listener(self._event)
    jax.monitoring.unregister_event_duration_listener(self._duration)

  def describe(self) -> str:
    """'compiled in 14.9 s', 'loaded from the compilation cache in 0.4 s', both parts, or 'already compiled
    in this process' (nothing compiled or loaded)."""
    if self.hits and not self.compiled:  # the program loaded; small ones beside it (never stored) compiled
      return f"loaded from the compilation cache in {self.loaded_s + self.compiled_s:.1f} s"
    if not self.hits and not self._misses:
      return "already compiled in this process"
    said = f"compiled in {self.compiled_s:.1f} s"
    if self.hits:
      return f"{said}, {self.hits} program{'s' * (self.hits > 1)} loaded from the compilation cache"
    return said if self.cached else f"{said}, without a compilation cache"

  def describe_every_host(self) -> str:
    """``describe()``, and on several processes how many of the other hosts compiled a program rather than
    load it, and the longest compile among them (a host that compiles holds up every host at the first
    collective). One all-gather: every process calls it."""
    said = self.describe()
    if jax.process_count() == 1:
      return said
    from jax.experimental import multihost_utils
    rows = np.asarray(multihost_utils.process_allgather(np.array([self.compiled_s, self.compiled],
                                                                 np.float32))).reshape(-1, 2)
    others = np.delete(rows, jax.process_index(), axis=0)
    compiling = others[others[:, 1] > 0, 0]
    if not len(compiling):
      return (f"{said} here; no other host compiled for "
              f"{jax.config.jax_persistent_cache_min_compile_time_secs:g} s or more")
    every = "the other host" if len(others) == 1 else f"{len(compiling)} of the {len(others)} other hosts"
    return f"{said} here; {every} compiled, {compiling.max():.1f} s at most"


def hosts_not_sharing_cache(path: str | None) -> list[int]:
  """The processes that do not see the compilation cache's folder ``path`` (``enable_compilation_cache``'s
  value, None where the cache is off) as process 0 does: a marker file that process 0 creates there, named
  by a token it broadcasts. JAX writes compiled programs from process 0 alone, for every process to read, so
  a folder local to each host (the default, under ``~``) leaves the others compiling every program anew on
  every run. [] with one process, or no cache on process 0. Every process must call it, whatever its own
  ``path`` (two collectives), after the run's checks on every host."""
  if jax.process_count() == 1:
    return []
  from jax.experimental import multihost_utils
  marker = None
  token = np.zeros(16, np.uint8)
  # A bucket (gs://) is one folder wherever it is read: no marker, a token of zeros, which every host takes as seen.
  if jax.process_index() == 0 and path is not None and "://" not in path:
    token = np.frombuffer(os.urandom(16), np.uint8).copy()
    marker = Path(path) / f"{_MARKER}{token.tobytes().hex()}"
    try:
      marker.touch()
    except OSError:  # a folder process 0 cannot write: JAX stores nothing there either, and says so
      token[:], marker = 0, None
  try:
    # Created before the broadcast, which no host leaves before process 0 enters it.
    token = np.asarray(multihost_utils.broadcast_one_to_all(token), np.uint8)
    seen = True
    if token.any():
      try:
        seen = path is not None and (Path(path) / f"{_MARKER}{token.tobytes().hex()}").exists()
      except OSError:
        seen = False
    seen = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
  finally:
    if marker is not None:
      try:
        marker.unlink(missing_ok=True)
      except OSError:  # a check, not the run's work: an empty file left behind, which no cache reads
        pass
  return [int(i) for i in np.flatnonzero(seen == 0)]


_MARKER = ".shared-by-every-host-"


def _use_cache_dir(path: str | None, max_bytes: int | None = None) -> None:
  """Points JAX's persistent cache at ``path`` (None: none), kept under ``max_bytes`` (None: as it is). JAX
  opens its cache once, at the first compile, and went on with that folder and limit whatever the settings
  said later: it is reset when either changes."""
  changed = jax.config.jax_compilation_cache_dir != path
  jax.config.update("jax_compilation_cache_dir", path)
  if max_bytes is not None:
    changed |= jax.config.jax_compilation_cache_max_size != max_bytes
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
  if changed:
    compilation_cache.reset_cache()


# What an Experiment's programs are built from (its networks, schedules, λs), whatever the mode; a run handed
# an Experiment with another config would record one model and run another. Training adds the train
# section (optimizer, loss, step), but for the loop's own fields, and ``train.num_steps`` unless the rate
# decays to it; sampling and evaluation add the sampler's settings (``sampling.make_generate_fn``).
PROGRAM_SECTIONS = ("model", "diffusion", "data.num_frames", "data.image_size", "data.num_classes")
SAMPLER_FIELDS = ("method", "num_steps", "eta", "clip_x0", "spacing", "variance", "guidance_scale",
                  "continuity_frames", "batch_size", "prior_num_steps", "prior_spacing", "prior_eta",
                  "prior_guidance_scale")


def _flat(tree: dict, prefix: str = "") -> dict:
  """A config's ``to_dict()`` as ``{dotted name: value}``."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    flat.update(_flat(value, name + ".") if isinstance(value, dict) else {name: value})
  return flat


def _changes(was: dict, now: dict) -> list[str]:
  """``name=now (was was)`` for each dotted field that differs between two flat configs."""
  return [f"{k}={now.get(k, '<none>')!r} (was {was.get(k, '<none>')!r})" for k in sorted(was.keys() | now.keys())
          if was.get(k, "<none>") != now.get(k, "<none>")]


DOING = {"train": "training", "sample": "sampling", "eval": "evaluation"}  # a work's name in a message


class DeviceMemoryError(RuntimeError):
  """A program did not fit the device's memory (XLA's RESOURCE_EXHAUSTED, at compile or run time); the
  message names the settings that size it and how to lower them."""


def out_of_memory(error: BaseException) -> bool:
  """Whether ``error`` is XLA's out-of-memory: a ``JaxRuntimeError`` whose first line is RESOURCE_EXHAUSTED
  and names memory (not, say, the coordination service's message-size limit, of the same status)."""
  first = str(error).strip().partition("\n")[0]
  return (isinstance(error, jax.errors.JaxRuntimeError) and first.startswith("RESOURCE_EXHAUSTED")
          and "memory" in first.lower())


def _xla_said(error: BaseException) -> str:
  """XLA's first line, less its status code, with its byte counts in GB (the rest is a buffer dump)."""
  line = str(error).strip().splitlines()[0].removeprefix("RESOURCE_EXHAUSTED:").strip().rstrip(".")
  return re.sub(r"(\d{7,}) bytes", lambda m: f"{int(m.group(1)) / 1e9:.2f} GB", line)


def init_lowering():
  """The setting the initial state's program is traced and lowered under: on a GPU each random draw
  is JAX's threefry kernel (the same bits), not the unrolled rounds JAX emits there by default. The
  initializers draw at 430 places at the ucf101 size; lowered for CUDA, the unrolled rounds are 95k
  of the program's 118k operations once its calls are inlined (about half constants and broadcasts),
  24k operations in all with the kernel (benchmarks/gpu_lowering.py). That program took 1.4-2.3
  minutes to compile on an H200; with the kernel it is not yet timed there. A CPU has a lowering of
  its own (rolled loops), which this leaves as it is. Not for the step: there the kernel's bits, as
  large as the activations at each dropout, may be kept in memory where the unrolled rounds are fused
  into their use (unmeasured)."""
  return jax_config.threefry_gpu_kernel_lowering(True)


class Experiment:
  """Everything a config determines before any data is read or any step is compiled.

  The config is validated here, once per run: build one ``Experiment`` and hand it to every
  mode the run performs (``check_config``: with the config it was built from).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    validate(config)
    self.config = config
    self._program_context = program_context(config)  # the config everything below is built from
    self._built_from = _flat(json.loads(config_json(config)))  # as config.json records it: tuples as lists
    try:
      self.mesh = mesh if mesh is not None else shd.make_mesh(config)
    except ValueError as e:  # the mesh's shape against the devices there are
      raise ConfigError(str(e)) from None
    self.check_work()  # before the networks are built
    self.networks = factory.make_networks(config)
    self.schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    self.prior_schedule, self.encode = None, None
    if config.model.condition == "embedding":
      self.prior_schedule = diffusion.make_schedule(config.model.prior.schedule, config.model.prior.num_timesteps)
      self.encode = factory.make_encode_fn(self.networks, config)
    self.lambdas = diffusion.frame_lambdas(config.data.num_frames, config.diffusion.lam)
    self.tx, self.lr_schedules = make_optimizer(config)
    rules = config.sharding_rules
    boxed = factory.boxed_abstract_params(self.networks, config)
    self.num_params = {k: factory.count_params(v) for k, v in boxed.items()}
    param_sh = shd.param_shardings(boxed, self.mesh, rules)
    params = nn.unbox(boxed)
    opt_state = jax.eval_shape(self.tx.init, params)
    opt_sh = shd.opt_state_shardings(opt_state, param_sh, self.mesh)
    rep = shd.replicated(self.mesh)
    self.state_sharding = TrainState(step=rep, params=param_sh, ema_params=param_sh, opt_state=opt_sh, rng=rep)
    # What _init_fn gives, from the shapes above: tracing it again costs a second per call at the
    # ucf101 size, twice per resume.
    key = jax.eval_shape(lambda r: jax.random.split(r)[1], jax.random.PRNGKey(0))
    self._abstract_state = ckpt.abstract_like(
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, ema_params=params, opt_state=opt_state,
                   rng=key), self.state_sharding)
    self.batch_sharding = shd.batch_sharding(self.mesh, rules)
    self._init = self.stored_jit(self._init_fn, "init", out_like=self._abstract_state,
                                 out_shardings=self.state_sharding)

  def check_config(self, config: ml_collections.ConfigDict, work: str) -> None:
    """A ConfigError unless ``config``, which ``work`` ('train', 'sample' or 'eval') records and reads, agrees
    with the config this experiment was built from (a snapshot taken then) on what its programs read
    (``PROGRAM_SECTIONS``, and the train section or the sampler's fields): the same config changed in place
    since the build (its compiled programs and cached samplers would go on with the old values while
    config.json and the sidecars said the new), or another one. Other fields may differ."""
    fields = list(PROGRAM_SECTIONS)
    if work == "train":
      unread = unread_train_fields(config)
      fields += [f"train.{k}" for k in self.config.train.keys() if k not in unread]
    else:  # long videos' clips are the sampler's; evaluation draws single clips whatever num_clips says
      fields += [f"sample.{k}" for k in SAMPLER_FIELDS + (("num_clips",) if work == "sample" else ())]
    picked = lambda flat: {k: v for k, v in flat.items() if any(k == f or k.startswith(f + ".") for f in fields)}  # noqa: E731
    changed = _changes(picked(self._built_from), picked(_flat(json.loads(config_json(config)))))
    if not changed:
      return
    name = type(self).__name__
    if config is self.config:
      raise ConfigError(f"the config of this {name} was changed after it was built ({', '.join(changed)}): its "
                        f"programs are built from the old values. Build a new {name} from the changed config.")
    raise ConfigError(f"{DOING[work]} was given a {name} built from another config ({', '.join(changed)}): it would "
                      f"run the {name}'s and record this one. Build a {name} from this config.")

  @contextlib.contextmanager
  def explain_out_of_memory(self, work: str) -> Iterator[None]:
    """Inside, XLA's out-of-memory error (``out_of_memory``; at compile or run time) becomes a
    ``DeviceMemoryError`` (``memory_error``) for ``work``; other errors pass as they are."""
    try:
      yield
    except jax.errors.JaxRuntimeError as e:
      if not out_of_memory(e):
        raise
      raise self.memory_error(e, work) from e

  def memory_error(self, error: BaseException, work: str) -> DeviceMemoryError:
    """The DeviceMemoryError for XLA's out-of-memory ``error`` in ``work`` ('train', 'sample', 'eval', or
    'eval_real': the real clips' I3D features): what the device was asked for, the batch per device that
    sizes it, and the settings that lower it."""
    device = jax.local_devices()[0]  # memory_stats of another host's device is an error
    try:
      limit = (device.memory_stats() or {}).get("bytes_limit")
    except jax.errors.JaxRuntimeError:
      limit = None
    on = device.device_kind + (f", {limit / 1e9:.1f} GB" if limit else "")
    how = self._train_memory_advice() if work == "train" else self._sampling_memory_advice(work)
    return DeviceMemoryError(f"the device ran out of memory in {DOING[work.removesuffix('_real')]} (XLA: "
                             f"{_xla_said(error)}; device: {on}). {how}")

  def _memory_switches(self) -> list[str]:
    """The settings beyond the batch that lower a step's memory, as flags in words."""
    c, devices = self.config, self.mesh.devices.size
    ways = ["split each step into micro-batches (--config.train.grad_accum_steps=K, the same update)"]
    if c.train.remat != "block":
      ways.append("recompute activations in the backward pass (--config.train.remat=block)")
    if c.model.dtype == "float32":
      ways.append("compute in bfloat16 (--config.model.dtype=bfloat16)")
    if self.mesh.shape["fsdp"] < devices:
      ways.append("shard the state over the devices (--config.mesh.data=1 --config.mesh.fsdp=-1)")
    return ways

  def _clip(self) -> str:
    d = self.config.data
    return f"{d.num_frames} x {d.image_size}x{d.image_size} frames"

  def _train_memory_advice(self) -> str:
    t, devices = self.config.train, self.mesh.devices.size
    per_device = self.batch_sharding.shard_shape((t.batch_size,))[0]
    parts = t.grad_accum_steps
    steps = f", in {parts} micro-batches of {per_device // parts}" if parts > 1 else ""
    return (f"config.train.batch_size={t.batch_size} puts {per_device} clip(s) of {self._clip()} on each of the "
            f"{devices} device(s){steps}. Lower it, or {', or '.join(self._memory_switches())}; benchmarks/memory.py "
            "gives a setting's memory without running it. No checkpoint was changed: rerun to resume from the last "
            "one, if any.")

  def _sampling_memory_advice(self, work: str) -> str:
    c, devices = self.config, self.mesh.devices.size
    if work == "eval_real":
      return (f"The real clips' I3D features are computed config.eval.batch_size={c.eval.batch_size} clips at a "
              "time: lower it, then run it again.")
    from videofusion_jax.sampling import guided  # sampling builds on this module
    batch = -(-c.sample.batch_size // devices)
    twice = " (twice that with guidance: the conditioned and the null-conditioned pass)" if guided(c) else ""
    i3d = (f"; their I3D features config.eval.batch_size={c.eval.batch_size} at a time (lower it too)"
           if work == "eval" else "")
    bf16 = ", or compute in bfloat16 (--config.model.dtype=bfloat16)" if c.model.dtype == "float32" else ""
    return (f"config.sample.batch_size={c.sample.batch_size} draws up to {batch} video(s) of {self._clip()} on each "
            f"of the {devices} device(s) at a time{twice}{i3d}. Lower it (each video's noise is its own: the videos "
            f"do not depend on it){bf16}; then run it again.")

  def check_work(self) -> None:
    """What this experiment's work needs of its config and ``self.mesh`` beyond ``validate``, else a
    ConfigError; nothing here: sampling and evaluation draw their own batches, on any mesh, in any compute
    type (``Trainer`` checks the training batch)."""

  def _init_fn(self, rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = nn.unbox(factory.init_params(self.networks, self.config, init_rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=self.tx.init(params), rng=state_rng)

  def init_state(self, seed: int) -> TrainState:
    """A fresh state, laid out on the mesh (compiled once per experiment; its traced program
    stored as the step's)."""
    with init_lowering():
      return self._init(jax.random.PRNGKey(seed))

  @property
  def init_source(self) -> str | None:
    """How ``init_state``'s program was had: 'stored', 'traced' or 'plain' (``StoredJit.source``)."""
    return self._init.source

  def abstract_state(self):
    """Shapes, dtypes and shardings of the state, without allocating it."""
    return self._abstract_state

  def global_batch(self, local: dict) -> dict:
    """This host's numpy batch -> global arrays split over the mesh as the rule table says."""
    return shd.global_batch(local, self.batch_sharding)

  def jit(self, fn, **kwargs):
    """``jax.jit(fn)`` traced with the rule table in context (U-Net activations split by batch)."""
    return jax.jit(shd.with_activation_rules(fn, self.mesh, self.config.sharding_rules), **kwargs)

  def stored_jit(self, fn, name: str, **kwargs) -> StoredJit:
    """``self.jit(fn, **kwargs)`` whose traced program is kept beside the compilation cache under
    ``name`` and this run's config (``training.program_store``; ``config.store_programs``): a later
    run loads it untraced."""
    return StoredJit(shd.with_activation_rules(fn, self.mesh, self.config.sharding_rules), name,
                     self._program_context, self.mesh, enabled=self.stores_programs, **kwargs)

  def stores_programs(self) -> bool:
    """``config.store_programs``, unless the programs would run what their key cannot see: a config
    changed after this experiment built its networks, schedule and optimizer from it, or a frozen
    encoder registered from outside this package. Those programs are traced every run."""
    e = self.config.model.encoder
    external = self.config.model.condition == "embedding" and e.kind == "frozen" and not frozen_encoder_in_package(
        e.frozen_name)
    return (bool(self.config.get("store_programs", True)) and not external
            and program_context(self.config) == self._program_context)

  def restore(self, workdir: str | Path, step: int | None = None, ema_only: bool = False) -> TrainState:
    """The state of checkpoint ``step`` (default: the newest intact one) of ``workdir``, on this
    mesh; reads only. ``ema_only`` (sampling, evaluation): only ``step`` and ``ema_params`` are
    read, the other fields are None (a quarter of the arrays with Adam: no weights, no moments)."""
    manager = ckpt.make_manager(workdir, self.config.train.keep_checkpoints, read_only=True)
    try:
      return ckpt.restore(manager, self.abstract_state(), step, fields=("step", "ema_params") if ema_only else None)
    finally:
      manager.close()
