"""One benchmark for VideoFusion and VDM*: the jitted train step and DDIM sampling on synthetic
input, one JSON line per result. No TensorFlow (the GPU machines have none).

python benchmarks/train_step.py --config=configs/ucf101.py             # the config's model
python benchmarks/train_step.py --config=configs/ucf101.py --compare   # and VDM* on the same base

For each model: compile time of the step cold (an empty persistent cache) and warm (the cache
filled, in-memory caches cleared), the median step time over ``--steps`` steps after
``--warmup``, clips/s, XLA's FLOPs per step (its cost analysis of the compiled program; off the
CPU, of the program lowered for a host CPU device: a GPU's own count leaves out cuBLAS and cuDNN),
achieved TFLOP/s, MFU against ``--peak_tflops`` (695: a bf16 matrix product measured on an H200,
see the GPU notes) times the devices, and peak memory (the device's memory stats where it has
them, else XLA's memory analysis of the step). For sampling: videos/s of DDIM with ``--sample_steps`` steps at the
config's sample batch and size, and its MFU (FLOPs: XLA's count for one step of each chain, times
the steps, since XLA counts a loop's body once; those steps, and the step with XLA's attention that
stands in for cuDNN's, are counted lowered, not compiled: within 1% on the demo, minutes sooner).
``--compare`` also prints VideoFusion / VDM* ratios.

Several runs can share one device (``benchmarks/gpu_check.sh``: a lease is short and compiling is
host work): with ``--sync_dir`` each run compiles everything it needs (FLOP counting included),
waits until ``--sync_parties`` runs have, then times alone (a file lock), so the compiles overlap
and the timings do not. ``--summarize=FILE`` prints the ratios of such runs' JSON lines;
``--flops_only`` prints the FLOP counts alone, nothing compiled or run (a device's rows, counted
on any host). ``--compile_profile`` traces each cold compile and prints where XLA spent the time;
``--compile_deadline_s`` gives up on a compile that would outlast a lease, saying what it spent;
``--measure_peak=8192`` measures the MFU's denominator on this device (an H100's is not the H200's).
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from compile_trace import CompileUnfinished, trace_phases, watched_compile
from ml_collections import config_flags

_START = time.perf_counter()
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")  # what XLA runs with, in every row


def xla_settings() -> dict:
  """What XLA compiled with, for every row: its flags, and whether JAX asked for its optimisations
  (``JAX_DISABLE_MOST_OPTIMIZATIONS``, as the test suite runs, turns them off without a flag)."""
  return {"xla_flags": _XLA_FLAGS, "xla_optimised": not jax.config.read("jax_disable_most_optimizations")}

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps (after the warm-up ones).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps after compiling.")
_PEAK = flags.DEFINE_float("peak_tflops", 695.0, "Device peak TFLOP/s for MFU (695: bf16 matmul on an H200).")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "DDIM steps of the sampling benchmark (0: skip it).")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 3, "Timed sampling batches (median).")
_COMPARE = flags.DEFINE_bool("compare", False, "Also run VDM* on the same base generator, and print ratios.")
_CACHE_ROOT = flags.DEFINE_string("cache_root", "", "Where the fresh compilation caches go ('' = a temp dir).")
_TRAIN = flags.DEFINE_bool("train", True, "Time the train step (--notrain: sampling only, from initial weights).")
_SYNC_DIR = flags.DEFINE_string("sync_dir", "", "A folder shared by runs side by side on one device ('' = alone).")
_SYNC_PARTIES = flags.DEFINE_integer("sync_parties", 1, "How many runs share --sync_dir.")
_SYNC_TIMEOUT = flags.DEFINE_float("sync_timeout", 300.0, "Time alone only until this many s after the start.")
_KINDS = flags.DEFINE_list("kinds", ["videofusion", "vdm"], "With --compare: which of the two to run.")
_SUMMARIZE = flags.DEFINE_string("summarize", "", "A file of these JSON lines: print their ratios, run nothing.")
_REPORT = flags.DEFINE_list("report", [], "Files holding these JSON lines (a run's log will do): print them in "
                            "short, a line each (a compile's phases: its longest), run nothing. With several "
                            "files, each under its name; a file without results shows its last lines instead.")
_INIT = flags.DEFINE_enum(
    "init", "random", ["random", "zeros"],
    "The state timed: the config's initializers, or zeros of the same shapes, dtypes and layout (no speed, FLOP "
    "count or memory figure depends on the values; skips compiling the initializers, 1.4-2.3 minutes at the "
    "ucf101 size on an H200).")
_FLOPS_ONLY = flags.DEFINE_bool(
    "flops_only", False, "Print XLA's FLOP counts of the programs the rows time (as they count them, but "
    "lowered), nothing compiled or run: the FLOPs of a device's rows, counted anywhere.")
_COUNT_ON = flags.DEFINE_enum(
    "count_flops_on", "auto", ["auto", "host", "device"],
    "Where XLA counts the FLOPs: 'device', the compiled step; 'host', the step lowered for one of the host's "
    "CPU devices (XLA's GPU cost analysis leaves out the products it hands to cuBLAS and cuDNN); 'auto': "
    "'device' on one CPU device, else 'host'.")
_PROFILE = flags.DEFINE_string(
    "compile_profile", "", "A folder: trace each cold compile with jax.profiler there (a subfolder per program) "
    "and print a 'compile_phases' line: where XLA spent the time (HLO passes, autotuning, code generation), "
    "longest first.")
_MEASURE_PEAK = flags.DEFINE_integer(
    "measure_peak", 0, "Measure the MFU's denominator on this device instead of a model: a bfloat16 N x N matrix "
    "product (N = this flag; 8192 as in the GPU notes) on the first device, after a second of warm-up; prints a "
    "'peak' JSON line with its median TFLOP/s over --peak_repeats samples (pass it as --peak_tflops), runs "
    "nothing else.")
_PEAK_REPEATS = flags.DEFINE_integer("peak_repeats", 10, "With --measure_peak: timed samples (median), each "
                                     "about 50 ms of products.")
_DEADLINE = flags.DEFINE_float(
    "compile_deadline_s", 0.0, "Give up on a cold compile still running this many seconds after the run's "
    "start (0: never): print what it spent (and, with --compile_profile, on what) in a 'compile_unfinished' "
    "line and exit 3, where a run killed by a timeout says nothing. A warm compile still running then is given "
    "up: the timing goes on, its row says null.")


def vdm_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """VDM* on ``config``'s base generator: the same U-Net made space-time, independent noise."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.update(kind="vdm", key_frame_input=False, key_frame_clean=False)
  c.diffusion.lam = 0.0
  c.train.update(stage="video", freeze_base=False, residual_frames=0)
  return c


_CACHES: list[str] = []  # the measurement's fresh caches (removed at exit)


def remove_caches() -> None:
  """The measurement's fresh caches removed (before an ``os._exit``, which runs no atexit)."""
  for path in _CACHES:
    shutil.rmtree(path, ignore_errors=True)


def fresh_compilation_cache(root: str) -> str:
  """Points XLA's persistent cache at a new empty folder (every program cached, however small)."""
  from jax._src import compilation_cache  # the public switch alone does not re-open a used cache

  path = tempfile.mkdtemp(prefix="xla_cache_", dir=root or None)
  atexit.register(shutil.rmtree, path, ignore_errors=True)  # a measurement's cache, not the user's
  _CACHES.append(path)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  return path


def deadline() -> float | None:
  """The ``time.perf_counter()`` time of ``--compile_deadline_s`` (None: no deadline)."""
  return _START + _DEADLINE.value if _DEADLINE.value else None


_ABANDONED: list[threading.Thread] = []  # warm compiles given up, still running: the run ends with os._exit


def compile_cold(jitted, *args, model: str, program: str):
  """``(compiled, cold_s)``: trace + compile with an empty persistent cache, traced and given up at
  the deadline as ``--compile_profile`` and ``--compile_deadline_s`` say; ``model`` and ``program``
  name it there."""
  fresh_compilation_cache(_CACHE_ROOT.value)
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - t0
  row = {"model": model, "program": program, "lower_s": round(lower_s, 2), **xla_settings()}
  profile = os.path.join(_PROFILE.value, f"{model}_{program}") if _PROFILE.value else ""
  try:
    compiled, compile_s, trace = watched_compile(lowered, profile, deadline())
  except CompileUnfinished as e:
    give_up({**row, "compile_s_so_far": round(e.elapsed_s, 1), "deadline_s": _DEADLINE.value}, e.trace)
  cold = lower_s + compile_s  # not the trace's writing
  if trace:
    print_phases({**row, "finished": True, "compile_cold_s": round(cold, 2)}, trace)
  return compiled, cold


def compile_warm(jitted, *args, until: float | None) -> tuple[float | None, float | None]:
  """``(warm_s, warm_trace_lower_s)``: ``jitted`` traced and compiled again with the persistent cache
  ``compile_cold`` filled and jax's in-memory caches cleared (what a rerun of the same job pays).
  ``warm_trace_lower_s``: its tracing and lowering to StableHLO, host Python that XLA's cache does not
  save (the rest is the cache lookup; on the CPU also XLA's code generation, which its cache entries do
  not hold); for the train step, a ``StoredJit``, loading its traced program from the store beside the
  cache instead, and lowering that. ``(None, None)`` when unfinished at ``until`` (a ``time.perf_counter()``
  time; None: never), where the run goes on to its timing: a cold compile that ended near the deadline left
  the warm one, then the timing, to gpu_check.sh's timeout, which killed the run with every figure unprinted."""
  jax.clear_caches()
  jitted.clear_cache()  # a StoredJit's programs in memory too: the warm run reads its store, as a rerun does
  done: dict = {}

  def work():
    try:
      t0 = time.perf_counter()
      lowered = jitted.lower(*args)
      done["trace_lower"] = time.perf_counter() - t0
      lowered.compile()
      done["warm"] = time.perf_counter() - t0
    except BaseException as e:  # handed to the caller's thread
      done["error"] = e

  thread = threading.Thread(target=work, name="warm compile", daemon=True)
  thread.start()
  thread.join(None if until is None else max(until - time.perf_counter(), 0.0))
  if thread.is_alive():
    _ABANDONED.append(thread)
    return None, None
  if "error" in done:
    raise done["error"]
  return done["warm"], done["trace_lower"]


def seconds(value: float | None) -> float | None:
  return None if value is None else round(value, 2)


def print_phases(row: dict, trace: str) -> None:
  """The 'compile_phases' line: ``row`` (which compile), the trace's path and its phases."""
  print(json.dumps({"result": "compile_phases", **row, "trace": trace, **trace_phases(trace)}), flush=True)


def give_up(row: dict, trace: str | None) -> None:
  """Ends the run at the compile deadline: the phases traced so far, a 'compile_unfinished' line,
  exit 3 (at once: XLA's compile cannot be stopped, and waits for nothing)."""
  if trace:
    print_phases({**row, "finished": False}, trace)
  print(json.dumps({"result": "compile_unfinished", **row, "device": jax.devices()[0].device_kind}), flush=True)
  if _SYNC_DIR.value:
    mark_ready()  # the runs beside this one need not wait for it
  remove_caches()
  os._exit(3)


def mark_ready() -> None:
  open(os.path.join(_SYNC_DIR.value, f"{os.getpid()}.ready"), "w").close()


@contextlib.contextmanager
def timing_turn():
  """Yields a dict for the result: with ``--sync_dir``, once every party has compiled (or
  ``--sync_timeout`` seconds have passed since this run started), holding the folder's lock, so
  that no two runs time at once."""
  if not _SYNC_DIR.value:
    yield {}
    return
  mark_ready()
  compiled_at, t0 = time.time(), time.perf_counter()
  ready = lambda: len(glob.glob(os.path.join(_SYNC_DIR.value, "*.ready")))  # noqa: E731
  while ready() < _SYNC_PARTIES.value and time.perf_counter() - _START < _SYNC_TIMEOUT.value:
    time.sleep(1.0)
  parties = f"{min(ready(), _SYNC_PARTIES.value)}/{_SYNC_PARTIES.value} compiled"
  with open(os.path.join(_SYNC_DIR.value, "timing.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the run ends, however it ends
    try:
      # Wall-clock times, so that the runs' logs show the barrier and the turns.
      turn = {"synced": parties, "sync_waited_s": round(time.perf_counter() - t0, 1),
              "compiled_at": compiled_at, "timed_from": time.time()}
      yield turn
      turn["timed_to"] = time.time()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def xla_flops(program) -> float:
  """XLA's FLOP count of a compiled program, or of a lowered one (before XLA's optimisations:
  within 1% of the compiled count on the demo's steps, without the minutes a compile takes)."""
  cost = program.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def memory(compiled) -> tuple[int, int, str]:
  """``(peak bytes, program bytes, source)``: the device's peak in use where it reports one (this
  process so far), else the program's; the program's: XLA's buffers for arguments, outputs and
  temporaries, less what is aliased (donated)."""
  m = compiled.memory_analysis()
  program = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), program, "device memory_stats (process peak so far)"
  return program, program, "compiled.memory_analysis (arguments + outputs + temporaries - aliased)"


def counts_on_host() -> bool:
  """Whether XLA's FLOPs are counted on the host's CPU backend (``--count_flops_on``). On a GPU,
  XLA's cost analysis of a compiled step counts only what XLA generates itself, not the matrix
  products and convolutions it hands to cuBLAS and cuDNN (VDM*'s ucf101 step on an H200: 6.35
  TFLOP, against 69.3 by the CPU's count), and gives nothing for a lowered program; on several
  devices a compiled program is one device's share."""
  if _COUNT_ON.value != "auto":
    return _COUNT_ON.value == "host"
  return not (jax.default_backend() == "cpu" and jax.device_count() == 1)


def counting_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` as XLA's FLOPs of the model are counted on: XLA's attention where ``config`` uses
  cuDNN's fused one (a custom call XLA's cost analysis does not count), the batch in one pass where
  it accumulates micro-batches (XLA counts a loop's body once), no recompute (``remat`` repeats
  forward passes that are not the model's work). The same sums otherwise: the count is the step's."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.model.attention_implementation == "cudnn":
    c.model.attention_implementation = ""
  c.train.update(grad_accum_steps=1, remat="")
  return c


def flops_trainer(trainer):
  """The experiment whose programs XLA's FLOPs are counted on: ``trainer`` itself, or (only
  lowered, for counting) the same model as ``counting_config`` has it, on one host CPU device where
  ``counts_on_host()``: the whole step's FLOPs, whatever the devices run."""
  from videofusion_jax.training import sharding as shd
  from videofusion_jax.training.step import Trainer

  c = counting_config(trainer.config)
  same = c.to_dict() == trainer.config.to_dict()
  # A GPU's cost analysis of a program only lowered is empty (0 FLOPs): another model is counted on the host.
  host = counts_on_host() or (not same and jax.default_backend() != "cpu")
  if not host and same:
    return trainer
  if not host:
    return Trainer(c, mesh=trainer.mesh)
  c.mesh.update(data=1, fsdp=1)
  try:
    cpu = jax.devices("cpu")[:1]
  except RuntimeError:
    raise app.UsageError(
        f"XLA's FLOPs are counted on a host CPU device where the device is not the CPU, and JAX has no CPU "
        f"backend here (JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}): add cpu to it (e.g. "
        "JAX_PLATFORMS=cuda,cpu), or pass --count_flops_on=device (a GPU's own count leaves out cuBLAS and "
        "cuDNN).") from None
  return Trainer(c, mesh=shd.make_mesh(c, cpu))


def synthetic_batch(config: ml_collections.ConfigDict) -> dict:
  """A train batch of ``config``'s shapes (numpy): videos uniform in [-1, 1], random labels, and
  where the model reads stored CLIP embeddings, random unit ones: ``frame_embeddings`` ``(B, N, D)``
  and for a prior on text ``caption_embeddings`` ``(B, D)`` (the pipeline's keys)."""
  b, d, m = config.train.batch_size, config.data, config.model
  rng = np.random.default_rng(0)
  batch = {"video": rng.uniform(-1, 1, (b, d.num_frames, d.image_size, d.image_size, 3)).astype(np.float32),
           "label": rng.integers(0, max(d.num_classes, 1), b).astype(np.int32)}

  def unit(*shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

  if m.condition == "embedding" and m.encoder.kind == "clip":
    batch["frame_embeddings"] = unit(b, d.num_frames, m.encoder.embed_dim)
    if m.prior.condition == "text":
      batch["caption_embeddings"] = unit(b, m.encoder.embed_dim)
  return batch


def step_flops(counter, batch: dict) -> float:
  """XLA's FLOPs of ``counter``'s train step on ``batch``'s shapes, lowered (nothing compiled)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=counter.batch_sharding), batch)
  # The step as traced (``.plain``), as a run without a compilation cache (--flops_only) has it:
  # lowered through the stored program, XLA counts about one operation per argument differently.
  return xla_flops(counter.step.plain.lower(counter.abstract_state(), abstract))


def initial_state(trainer):
  """The state to time from (``--init``): ``trainer``'s fresh state, or zero weights laid out as it, with the
  optimizer's fresh state for them (Adam's zeros; float16's loss scale at its start, not 0)."""
  if _INIT.value == "random":
    return trainer.init_state(trainer.config.seed)
  abstract = trainer.abstract_state()

  def zeros():
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    return state.replace(opt_state=trainer.tx.init(state.params))
  return jax.jit(zeros, out_shardings=trainer.state_sharding)()


def bench_train(trainer, counter) -> tuple[dict, object]:
  """Times ``trainer``'s step on a synthetic batch (FLOPs from ``counter``'s step); returns the
  figures and the last state."""
  from videofusion_jax.training.optimizer import trainable_networks

  c = trainer.config
  b, d = c.train.batch_size, c.data
  batch = trainer.global_batch(synthetic_batch(c))
  compiled, cold = compile_cold(trainer.step, trainer.abstract_state(), batch, model=c.model.kind,
                                program="train_step")
  device_flops = xla_flops(compiled)
  flops = device_flops if counter is trainer else step_flops(counter, batch)
  # Before the turn: a run leaves the device at the end of its turn (JAX's allocator keeps what the step
  # peaked at until the process exits, and the next run times then).
  warm, trace_lower = compile_warm(trainer.step, trainer.abstract_state(), batch, until=deadline())
  with timing_turn() as sync:
    # The state is made in the run's turn: runs side by side on one device (gpu_check.sh) hold only their
    # programs while they wait. An H100 would not hold VDM*'s 56.7 GB step beside three ucf101 states of ~9.5 GB.
    state = initial_state(trainer)
    made_at = time.time()
    for _ in range(_WARMUP.value):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    peak, program, source = memory(compiled)
    beside = any(thread.is_alive() for thread in _ABANDONED)  # a warm compile given up, still on the host
  step_s = statistics.median(times)
  out = {
      "result": "train_step", "model": c.model.kind, "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "pid": os.getpid(), "init": _INIT.value, "batch": b, "frames": d.num_frames,
      "size": d.image_size,
      "dtype": c.model.dtype, "stage": c.train.stage, "trainable": list(trainable_networks(c)),
      "residual_frames": c.train.residual_frames, "grad_accum_steps": c.train.grad_accum_steps,
      "remat": c.train.remat,
      **{f"params_{k}": v for k, v in trainer.num_params.items()},
      "compile_cold_s": round(cold, 2), "compile_warm_s": seconds(warm),
      "compile_warm_trace_lower_s": seconds(trace_lower), "warm_step_program": trainer.step.source,
      "steps_timed": len(times),
      "step_ms_median": round(1000 * step_s, 3), "step_ms_min": round(1000 * min(times), 3),
      "step_ms": [round(1000 * t, 3) for t in times],
      "clips_per_s": round(b / step_s, 3),
      "xla_flops_per_step": flops, "attention": c.model.attention_implementation or "xla",
      "flops_source": flops_source(trainer, counter, "step", compiled=counter is trainer),
      "device_xla_flops_per_step": device_flops,
      "tflops_per_s": round(flops / step_s / 1e12, 4), "peak_tflops": _PEAK.value,
      "mfu": round(flops / step_s / 1e12 / (_PEAK.value * jax.device_count()), 5),
      "peak_memory_bytes": peak, "program_memory_bytes": program, "memory_source": source,
      "state_made_at": made_at, "timed_beside_warm_compile": beside, **xla_settings(), **sync,
  }
  return out, state


def flops_source(trainer, counter, what: str, compiled: bool, train: bool = True) -> str:
  """What a FLOP count of ``what`` is (``train``: of the train step): XLA's cost analysis of which
  program, where."""
  text = f"XLA cost analysis of the {what} {'compiled' if compiled else 'lowered'}"
  ours, counted = trainer.config, counter.config
  if counted.model.attention_implementation != ours.model.attention_implementation:
    text += " with XLA's attention (XLA does not count cuDNN's)"
  if train and counted.train.grad_accum_steps != ours.train.grad_accum_steps:
    text += f" with the batch in one pass (the run's {ours.train.grad_accum_steps} micro-batches do the same sums)"
  if train and counted.train.remat != ours.train.remat:
    text += f" without remat (the run's remat={ours.train.remat!r} also recomputes forward passes)"
  if counts_on_host() or (counter.mesh.devices.flat[0].platform == "cpu" and jax.default_backend() != "cpu"):
    text += " on one host CPU device (the whole step; a GPU's own count leaves out cuBLAS and cuDNN)"
  return text


def sampling_flops(trainer, b: int) -> float:
  """XLA's FLOPs for one generated batch of ``b`` videos: each chain's one-step estimate (lowered,
  not compiled, on ``trainer``'s devices), times its steps."""
  from videofusion_jax import sampling

  c, d = trainer.config, trainer.config.data
  params = trainer.abstract_state().ema_params
  with jax.default_device(trainer.mesh.devices.flat[0]):  # the inputs below: where the count is made
    labels = jnp.zeros((b,), jnp.int32) if d.num_classes else None
    cond = jnp.zeros((b, c.model.encoder.embed_dim)) if c.model.condition == "embedding" else None
    net_labels, net_cond = sampling.network_conditions(c, labels, cond)
    z = jnp.zeros((b, d.num_frames, d.image_size, d.image_size, 3))
    t = jnp.zeros((b,), jnp.int32)
    key = jnp.zeros((b, d.image_size, d.image_size, 3)) if c.model.key_frame_clean else None

    def count(fn, *args):
      return xla_flops(jax.jit(fn).lower(*args))

    total = c.sample.num_steps * count(
        lambda p, zz, tt: sampling.video_eps_fn(trainer, p, net_labels, net_cond, key_frame=key)(zz, tt),
        params, z, t)
    if c.model.key_frame_clean:
      total += c.sample.num_steps * count(
          lambda p, zz, tt: sampling.video_eps_fn(trainer, p, net_labels, net_cond, residual=False)(zz, tt),
          params, z, t)
    if cond is not None:
      text = cond if sampling.text_prior(c) else None  # the caption's embedding: zeros count the same
      total += c.sample.prior_num_steps * count(
          lambda p, e, tt: sampling.prior_eps_fn(trainer, p, None if text is not None else labels, text)(e, tt),
          params, cond, t)
  return total


def bench_sample(trainer, counter, make_params) -> dict:
  """Videos/s of the config's generator (the prior, then the chains) with DDIM, on the EMA weights
  ``make_params()`` gives in the run's turn (compiled before, on their shapes)."""
  from videofusion_jax import sampling

  c = trainer.config
  b = sampling.sampling_batch(trainer)
  labels = jnp.zeros((b,), jnp.int32) if c.data.num_classes else None
  generate = sampling.make_generate_fn(trainer)
  rows = np.arange(b)
  anchor = jnp.zeros((b, c.data.image_size, c.data.image_size, 3), jnp.float32)
  text = None
  if sampling.text_prior(c):
    text = jnp.zeros((b, c.model.encoder.embed_dim), jnp.float32)
    labels = None
  args = (labels, text, None, anchor, jnp.float32(0))
  keys = sampling.row_keys(0, rows, rows)
  compiled, cold = compile_cold(generate, trainer.abstract_state().ema_params, keys, *args, model=c.model.kind,
                                program="sample")
  flops = sampling_flops(counter, b)
  warm, trace_lower = compile_warm(generate, trainer.abstract_state().ema_params, keys, *args, until=deadline())
  with timing_turn() as sync:
    params = make_params()  # in the turn, as bench_train's state
    made_at = time.time()
    jax.block_until_ready(compiled(params, keys, *args))
    times = []
    for i in range(_SAMPLE_REPEATS.value):
      keys = sampling.row_keys(i + 1, rows, rows)
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, keys, *args))
      times.append(time.perf_counter() - t0)
    beside = any(thread.is_alive() for thread in _ABANDONED)
  batch_s = statistics.median(times)
  return {
      "result": "sample", "model": c.model.kind, "device": jax.devices()[0].device_kind, "init": _INIT.value,
      "batch": b,
      "method": c.sample.method, "steps": c.sample.num_steps, "guidance_scale": c.sample.guidance_scale,
      "sample_compile_cold_s": round(cold, 2), "sample_compile_warm_s": seconds(warm),
      "sample_compile_warm_trace_lower_s": seconds(trace_lower), "warm_sample_program": generate.source,
      "sample_s_per_batch": round(batch_s, 6), "sample_s": [round(t, 6) for t in times],
      "videos_per_s": round(b / batch_s, 4),
      "sample_xla_flops_per_batch": flops,
      "sample_flops_source": flops_source(trainer, counter, "step of each chain (prior, key frame, video)", train=False,
                                          compiled=False) + ", x its steps",
      "sample_tflops_per_s": round(flops / batch_s / 1e12, 4),
      "sample_mfu": round(flops / batch_s / 1e12 / (_PEAK.value * jax.device_count()), 5),
      "state_made_at": made_at, "timed_beside_warm_compile": beside, **xla_settings(), **sync,
  }


def count_flops(trainer, counter) -> dict:
  """``--flops_only``: XLA's counts for the train step and a sampling batch, lowered on ``counter``."""
  from videofusion_jax import sampling

  c, d = trainer.config, trainer.config.data
  out = {"result": "flops", "model": c.model.kind, "batch": c.train.batch_size, "frames": d.num_frames,
         "size": d.image_size}
  if _TRAIN.value:
    out["xla_flops_per_step"] = step_flops(counter, synthetic_batch(c))
    out["flops_source"] = flops_source(trainer, counter, "step", compiled=False)
  if _SAMPLE_STEPS.value:
    out["sample_batch"] = sampling.sampling_batch(trainer)
    out["sample_steps"] = c.sample.num_steps
    out["sample_xla_flops_per_batch"] = sampling_flops(counter, out["sample_batch"])
  return out


def run_model(config: ml_collections.ConfigDict) -> list[dict]:
  from videofusion_jax.config import ConfigError
  from videofusion_jax.training.step import Trainer

  try:
    trainer = Trainer(config)
  except ConfigError as e:  # one line, as the main program gives it
    raise app.UsageError(str(e)) from None
  counter = flops_trainer(trainer)
  results = []

  def result(row: dict) -> None:  # printed at once: a later part given up at the deadline loses no row
    results.append(row)
    print(json.dumps(row), flush=True)

  if _FLOPS_ONLY.value:
    result(count_flops(trainer, counter))
  elif _TRAIN.value:
    train, state = bench_train(trainer, counter)
    result(train)
  if _SAMPLE_STEPS.value and not _FLOPS_ONLY.value:
    trained = _TRAIN.value  # the timed steps' weights, else a fresh state's
    result(bench_sample(trainer, counter, lambda: state.ema_params if trained else initial_state(trainer).ema_params))
  return results


def ratios(vf: list[dict], vdm: list[dict]) -> dict:
  """VideoFusion / VDM* for speed and memory (same base generator), from each kind's rows: its
  train step and, where present, its sampling. ``peak_memory_ratio`` only where both peaks are
  the device's and come from separate processes: a process's peak includes all it ran before."""
  one = lambda rows, kind: next((r for r in rows if r["result"] == kind), None)  # noqa: E731
  out = {"result": "compare", "model": "videofusion / vdm"}
  vf_train, vdm_train = one(vf, "train_step"), one(vdm, "train_step")
  if vf_train and vdm_train:
    out.update(
        clips_per_s_ratio=round(vf_train["clips_per_s"] / vdm_train["clips_per_s"], 3),
        program_memory_ratio=round(vf_train["program_memory_bytes"] / vdm_train["program_memory_bytes"], 3),
        xla_flops_ratio=round(vf_train["xla_flops_per_step"] / vdm_train["xla_flops_per_step"], 3),
        params_ratio=round(sum(v for k, v in vf_train.items() if k.startswith("params_"))
                           / sum(v for k, v in vdm_train.items() if k.startswith("params_")), 3))
    if (all(r["memory_source"].startswith("device") for r in (vf_train, vdm_train))
        and vf_train["pid"] != vdm_train["pid"]):
      out["peak_memory_ratio"] = round(vf_train["peak_memory_bytes"] / vdm_train["peak_memory_bytes"], 3)
  vf_sample, vdm_sample = one(vf, "sample"), one(vdm, "sample")
  if vf_sample and vdm_sample:
    out["videos_per_s_ratio"] = round(vf_sample["videos_per_s"] / vdm_sample["videos_per_s"], 3)
    if vdm_sample["sample_xla_flops_per_batch"]:  # 0 where XLA counted none (a GPU's lowered program)
      out["sample_xla_flops_ratio"] = round(
          vf_sample["sample_xla_flops_per_batch"] / vdm_sample["sample_xla_flops_per_batch"], 3)
  return out


def _host_part(row: dict, seconds: str, program: str) -> str:
  """' (S s of it on the host, the program P)': what the warm compile spent before XLA, and whether
  it loaded the stored program ('stored') or traced it; '' for rows from before these fields."""
  if seconds not in row:
    return ""
  return f" ({row[seconds]} s of it on the host, the program {row.get(program, 'traced')})"


def _warm(row: dict, warm: str, seconds: str, program: str) -> str:
  """The warm compile in short: 'W s warm (S s of it on the host, ...)', or that it was given up."""
  if row[warm] is None:
    return "warm unfinished at the deadline" + (", timed beside it" if row.get("timed_beside_warm_compile") else "")
  return f"{row[warm]} s warm{_host_part(row, seconds, program)}"


def short(row: dict, phases: int = 6) -> str:
  """One result line in short, for the end of a device run's output (the reply shows only its end)."""
  r, what = row, row["result"]
  settings = ", ".join(filter(None, [r.get("xla_flags"), "" if r.get("xla_optimised", True) else "unoptimised"]))
  head = f"{r.get('model', '')} {r.get('program', what)}" + (f" [{settings}]" if settings else "")
  if what == "train_step":
    return (f"{head} batch {r['batch']} {r['attention']}: {r['step_ms_median']} ms, {r['clips_per_s']} clips/s, "
            f"MFU {r['mfu']:.2%}, peak {r['peak_memory_bytes'] / 1e9:.2f} GB, compile {r['compile_cold_s']} s "
            f"cold / {_warm(r, 'compile_warm_s', 'compile_warm_trace_lower_s', 'warm_step_program')}")
  if what == "sample":
    return (f"{head} batch {r['batch']}: {r['videos_per_s']} videos/s, MFU {r['sample_mfu']:.2%}, compile "
            f"{r['sample_compile_cold_s']} s cold / "
            f"{_warm(r, 'sample_compile_warm_s', 'sample_compile_warm_trace_lower_s', 'warm_sample_program')}")
  if what == "peak":
    return (f"{r['device']} {r['dtype']} {r['size']}^3 matrix product: {r['tflops_per_s']} TFLOP/s "
            f"(median of {r['repeats']})")
  if what == "compile_unfinished":
    return f"{head}: still compiling {r['compile_s_so_far']} s after lowering (deadline {r['deadline_s']} s)"
  if what == "compile_phases":
    longest = "; ".join(f"{p['name'][:60]} {p['self_s']} s x{p['count']}" for p in r["phases"][:phases])
    state = "compiled" if r["finished"] else "unfinished"
    return f"{head} compile ({state}, {r['span_s']} s traced, {r['threads']} threads), self time: {longest}"
  return json.dumps(row)


def report(path: str, named: bool = False) -> None:
  """Prints ``path``'s JSON lines in short (``short``), under ``== name`` if ``named``; a file with no
  train or sampling result also shows its last 3 lines (why the run stopped)."""
  with open(path) as f:
    lines = f.read().splitlines()
  rows = [json.loads(line) for line in lines if line.startswith("{")]
  if named:
    print(f"== {os.path.splitext(os.path.basename(path))[0]}")
  for row in rows:
    print(short(row))
  if not any(r["result"] in ("train_step", "sample", "peak") for r in rows):
    for line in lines[-3:]:
      print(line[:400])
  sys.stdout.flush()


def summarize(path: str) -> dict:
  """The ratios of the VideoFusion and VDM* rows (XLA's attention, the same batch) in a file of
  this benchmark's JSON lines, such as runs side by side wrote."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.startswith("{")]
  rows = [r for r in rows if r.get("attention", "xla") == "xla" and r["result"] != "compare"]
  by_kind = {k: [r for r in rows if r["model"] == k] for k in ("videofusion", "vdm")}
  for kind in ("train_step", "sample"):
    batches = {r["batch"] for r in rows if r["result"] == kind}
    if len(batches) > 1:
      raise app.UsageError(f"{path}: {kind} rows of batches {sorted(batches)}; compare rows of one batch.")
  if not by_kind["videofusion"] or not by_kind["vdm"]:
    raise app.UsageError(f"{path}: needs rows of both kinds (videofusion and vdm), found "
                         f"{sorted({r['model'] for r in rows})}.")
  return ratios(by_kind["videofusion"], by_kind["vdm"])


def measure_peak(size: int, repeats: int) -> dict:
  """The 'peak' row: the median TFLOP/s of a ``(size, size) @ (size, size)`` bfloat16 product on the
  first device (2 size**3 FLOPs each; XLA's own count beside it). After a second of untimed products (a
  GPU's clocks rise under load), each of ``repeats`` samples times enough products queued back to back
  to fill about 50 ms, so that one dispatch and one wait are a small part of it."""
  device = jax.devices()[0]
  a, b = (jax.device_put(jax.random.normal(jax.random.key(i), (size, size), jnp.bfloat16), device) for i in (1, 2))
  product = jax.jit(jnp.matmul).lower(a, b).compile()

  def timed(count: int) -> float:
    t0 = time.perf_counter()
    for _ in range(count):
      out = product(a, b)  # the one before is freed once done: one output held, not count
    out.block_until_ready()  # one stream: the last one done, all are
    return time.perf_counter() - t0

  warm, count = time.perf_counter(), 1
  while time.perf_counter() - warm < 1.0:
    count = max(1, min(1000, round(0.05 / max(timed(count) / count, 1e-9))))
  median = statistics.median(timed(count) / count for _ in range(repeats))
  flops = 2.0 * size**3
  return {"result": "peak", "device": device.device_kind, "dtype": "bfloat16", "size": size, "repeats": repeats,
          "products_per_sample": count, "median_s": median, "flops": flops, "xla_flops": xla_flops(product),
          "tflops_per_s": round(flops / median / 1e12, 4), **xla_settings()}


def override(node: ml_collections.ConfigDict, why: str, **values) -> None:
  """Sets ``values`` in ``node`` (a part of the config), with a note for each one that changes."""
  changed = {k: (node[k], v) for k, v in values.items() if node[k] != v}
  if changed:
    print(f"note: {why} sets " + ", ".join(f"{k}={v!r} (the config has {old!r})" for k, (old, v) in changed.items()),
          file=sys.stderr, flush=True)
  node.update(values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag (quote a value with spaces).")
  if _SUMMARIZE.value:
    print(json.dumps(summarize(_SUMMARIZE.value)), flush=True)
    return
  if _REPORT.value:
    for path in _REPORT.value:
      report(path, named=len(_REPORT.value) > 1)
    return
  if _MEASURE_PEAK.value:
    if _MEASURE_PEAK.value < 1 or _PEAK_REPEATS.value < 1:
      raise app.UsageError(f"--measure_peak={_MEASURE_PEAK.value} --peak_repeats={_PEAK_REPEATS.value}: both "
                           "must be at least 1 (the matrix size, the timed products).")
    print(json.dumps(measure_peak(_MEASURE_PEAK.value, _PEAK_REPEATS.value)), flush=True)
    return
  if _PEAK.value <= 0:
    raise app.UsageError(f"--peak_tflops={_PEAK.value}: the device's peak must be above 0 (695: an H200's bf16 "
                         "matrix product; --measure_peak=8192 measures this device's).")
  if _SYNC_DIR.value:
    atexit.register(mark_ready)  # a run that fails before timing must not keep the others waiting
  c = _CONFIG.value
  if _SAMPLE_STEPS.value:
    override(c.sample, "--sample_steps", method="ddim")
    c.sample.num_steps = _SAMPLE_STEPS.value
  if _COMPARE.value:
    if c.model.kind == "vdm":
      raise app.UsageError("--compare runs VideoFusion and VDM* from a VideoFusion config; this one is VDM*.")
    # Both kinds train every network on whole videos (VideoFusion as the paper: every frame's residual term).
    override(c.train, "--compare", stage="video", freeze_base=False, residual_frames=0)
    unknown = set(_KINDS.value) - {"videofusion", "vdm"}
    if unknown or not _KINDS.value:
      raise app.UsageError(f"--kinds={','.join(_KINDS.value)}: use videofusion, vdm or both.")
    # VideoFusion runs first: where the device reports a process-wide peak, VDM*'s includes
    # VideoFusion's; program_memory_bytes is each compiled step's own.
    vf = run_model(c) if "videofusion" in _KINDS.value else []
    vdm = run_model(vdm_of(c)) if "vdm" in _KINDS.value else []
    if vf and vdm and not _FLOPS_ONLY.value:
      print(json.dumps(ratios(vf, vdm)), flush=True)
  else:
    if _KINDS.present:
      raise app.UsageError("--kinds chooses between the two kinds of --compare; add --compare.")
    run_model(c)
  if _ABANDONED:  # XLA's compile cannot be stopped, nor waited for past the deadline: the rows are printed
    print(f"note: {len(_ABANDONED)} warm compile(s) unfinished at --compile_deadline_s={_DEADLINE.value:g} were "
          "given up (their rows say null).", file=sys.stderr, flush=True)
    remove_caches()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
  app.run(main)
