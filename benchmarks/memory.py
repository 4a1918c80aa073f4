"""The memory switches (issue 11, item 5) on a config's model, from XLA's memory analysis of the
train step compiled for 8 simulated CPU devices (lowered and compiled, never run; the state is
abstract, ``jax.eval_shape``). One JSON line per result, then readable tables.

python benchmarks/memory.py --config=configs/ucf101.py           # DP and FSDP, three remat modes
python benchmarks/memory.py --config=configs/ucf101.py --quick   # 8x1 and 1x8 state, 1x8 compiles, '' and 'block'

Reported per device:
- ``state``: bytes of the parameters, their EMA and the optimizer state (Adam's moments), summed
  from the shardings of the state (the shard each device holds: with data parallelism (8x1)
  every device holds all of it; with FSDP (1x8) weights are split over ``fsdp``), and the compiled
  step's argument size (state + one batch shard) as a check. Also the state's bytes summed over
  every device's shard (8x1: eight copies) and one copy's (the arrays' logical size).
- ``train_step``: the compiled step's argument, output, temporary and aliased (donated) bytes, and
  ``program_bytes = argument + output + temp - alias`` (what the step holds at its peak by XLA's
  buffer assignment), per remat mode and per-device batch.
- ``fit``: a line through ``program_bytes`` against the per-device batch (memory is close to linear
  in it), and the largest per-device batch under ``--budget_gib``: an extrapolation from the CPU
  compile. XLA's CPU and GPU buffer assignment differ (fusion, scheduling, and the CPU computes
  bfloat16 convolutions in float32, so its activations are larger), so the GPU's figure will differ;
  measure there before relying on it.

The CPU pipeline removes ``jax.checkpoint``'s optimization barriers before common-subexpression
elimination, which then merges the recomputation back into the forward pass: remat would show no
effect. GPU and TPU pipelines remove them only after scheduling; the compiles here keep them to the
end (``KEEP_REMAT_BARRIERS``), as those do.
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

# Per-compile XLA options: keep jax.checkpoint's barriers until the end of the CPU pipeline (see above).
KEEP_REMAT_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander"}
GIB = 2**30


def config_for(config: ml_collections.ConfigDict, mesh: tuple[int, int], per_device_batch: int,
               remat: str = "") -> ml_collections.ConfigDict:
  """``config`` on a ``(data, fsdp)`` mesh with ``per_device_batch`` examples per device and ``remat``."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.mesh.update(data=mesh[0], fsdp=mesh[1])
  c.train.update(batch_size=per_device_batch * mesh[0] * mesh[1], remat=remat, grad_accum_steps=1)
  return c


def _shard_bytes(x) -> int:
  """Bytes of the shard of ``x`` (a ShapeDtypeStruct or array with a sharding) on each device."""
  return int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _held_bytes(x) -> int:
  """Bytes of ``x`` held by all its devices together: every device's shard (replicas counted each time)."""
  itemsize = np.dtype(x.dtype).itemsize
  return sum(int(np.prod([len(range(*s.indices(n))) for s, n in zip(index, x.shape)], dtype=np.int64)) * itemsize
             for index in x.sharding.devices_indices_map(x.shape).values())


def _bytes(tree, count: str) -> int:
  leaves = jax.tree.leaves(tree)
  if count == "device":
    return sum(_shard_bytes(x) for x in leaves)
  if count == "all_devices":
    return sum(_held_bytes(x) for x in leaves)
  if count == "one_copy":
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in leaves)
  raise ValueError(f"count={count!r}: 'device', 'all_devices' or 'one_copy'.")


def state_bytes(experiment, count: str = "device") -> dict:
  """Bytes of the train state by part, ``{'params', 'ema_params', 'opt_state', 'total'}``: held by one
  device (``'device'``; NamedShardings split evenly, so every device holds the same), by all devices
  together (``'all_devices'``: data parallelism holds a copy on each) or in one copy (``'one_copy'``)."""
  state = experiment.abstract_state()
  out = {k: _bytes(getattr(state, k), count) for k in ("params", "ema_params", "opt_state")}
  out["total"] = _bytes(state, count)  # with the step and the rng key
  return out


def abstract_batch(experiment) -> dict:
  """One global batch of the experiment's config, as ShapeDtypeStructs with the batch sharding."""
  c = experiment.config
  b, d = c.train.batch_size, c.data
  return {"video": jax.ShapeDtypeStruct((b, d.num_frames, d.image_size, d.image_size, 3), np.float32,
                                        sharding=experiment.batch_sharding),
          "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=experiment.batch_sharding)}


def compile_step(trainer, keep_barriers: bool = True):
  """``(compiled, lower_s, compile_s)``: the trainer's step lowered on the abstract state and batch,
  compiled (``KEEP_REMAT_BARRIERS`` with ``keep_barriers``), not run."""
  t0 = time.perf_counter()
  lowered = trainer.step.lower(trainer.abstract_state(), abstract_batch(trainer))
  t1 = time.perf_counter()
  compiled = lowered.compile(KEEP_REMAT_BARRIERS if keep_barriers else None)
  return compiled, t1 - t0, time.perf_counter() - t1


def memory_figures(compiled) -> dict:
  """XLA's memory analysis of a compiled program, per device, and ``program_bytes`` = argument +
  output + temp - alias (donated arguments reused for outputs are counted once)."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  out["program"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return {f"{k}_bytes": v for k, v in out.items()}


def fit_line(batches, program_bytes) -> tuple[float, float]:
  """``(intercept, slope)``: the least-squares line of bytes against the per-device batch."""
  slope, intercept = np.polyfit(np.asarray(batches, np.float64), np.asarray(program_bytes, np.float64), 1)
  return float(intercept), float(slope)


def largest_batch(intercept: float, slope: float, budget_bytes: float) -> int:
  """The largest per-device batch whose extrapolated bytes ``intercept + slope·b`` fit the budget (0: none)."""
  if slope <= 0:
    raise ValueError(f"memory does not grow with the batch (slope {slope}); compile larger batches.")
  return max(int(np.floor((budget_bytes - intercept) / slope)), 0)


def parse_mesh(text: str) -> tuple[int, int]:
  """``'8x1'`` -> ``(8, 1)`` (data, fsdp); a ValueError saying what is wrong otherwise."""
  parts = text.strip().lower().split("x")
  if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
    raise ValueError(f"{text!r} is not a mesh: give data x fsdp, two integers >= 1 such as 8x1 or 2x4.")
  return int(parts[0]), int(parts[1])


def _gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def run(config: ml_collections.ConfigDict, state_meshes, compile_meshes, remats, batches, budget_gib: float,
        emit=print) -> list[dict]:
  """Every figure as a list of dicts (each also passed to ``emit`` as a JSON line)."""
  from videofusion_jax.experiment import Experiment
  from videofusion_jax.training.step import Trainer

  rows = []

  def out(row):
    rows.append(row)
    emit(json.dumps(row))

  devices = jax.device_count()
  for mesh in state_meshes:
    experiment = Experiment(config_for(config, mesh, min(batches)))
    out({"result": "state", "mesh": f"{mesh[0]}x{mesh[1]}", "devices": devices,
         **{f"{k}_bytes_per_device": v for k, v in state_bytes(experiment).items()},
         "total_bytes_summed_over_devices": state_bytes(experiment, "all_devices")["total"],
         "total_bytes_one_copy": state_bytes(experiment, "one_copy")["total"],
         "source": "the state's shardings: each device's shard; summed over the devices; one copy's logical size"})
  for mesh in compile_meshes:
    for remat in remats:
      for b in batches:
        trainer = Trainer(config_for(config, mesh, b, remat))
        compiled, lower_s, compile_s = compile_step(trainer)
        figures = memory_figures(compiled)
        batch_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(abstract_batch(trainer)))
        out({"result": "train_step", "mesh": f"{mesh[0]}x{mesh[1]}", "remat": remat or "off", "per_device_batch": b,
             "global_batch": trainer.config.train.batch_size, **figures,
             "state_bytes_per_device": state_bytes(trainer)["total"], "batch_bytes_per_device": batch_bytes,
             "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
             "source": "compiled.memory_analysis() of the CPU compile (remat barriers kept), per device"})
      mine = [r for r in rows if r["result"] == "train_step" and r["mesh"] == f"{mesh[0]}x{mesh[1]}"
              and r["remat"] == (remat or "off")]
      if len({r["per_device_batch"] for r in mine}) < 2:
        continue
      intercept, slope = fit_line([r["per_device_batch"] for r in mine], [r["program_bytes"] for r in mine])
      out({"result": "fit", "mesh": f"{mesh[0]}x{mesh[1]}", "remat": remat or "off",
           "intercept_bytes": round(intercept), "bytes_per_example": round(slope), "budget_gib": budget_gib,
           "largest_per_device_batch": largest_batch(intercept, slope, budget_gib * GIB),
           "note": "a line through program_bytes at the compiled batches, extrapolated; CPU buffer assignment "
                   "(bfloat16 convolutions in float32), not the GPU's"})
  return rows


def tables(rows: list[dict]) -> str:
  """The rows as three readable tables (GiB per device)."""
  lines = ["state per device (GiB): mesh | params | EMA | optimizer | total | total summed over the devices | "
           "total of one copy"]
  for r in rows:
    if r["result"] == "state":
      parts = ("params", "ema_params", "opt_state", "total")
      lines.append(f"  {r['mesh']:>4} | " + " | ".join(_gib(r[f"{k}_bytes_per_device"]) for k in parts)
                   + f" | {_gib(r['total_bytes_summed_over_devices'])} | {_gib(r['total_bytes_one_copy'])}")
  lines.append("compiled train step per device (GiB): mesh | remat | batch/device | argument | output | alias | temp | "
               "program (arg + out + temp - alias) | compile s")
  for r in rows:
    if r["result"] == "train_step":
      lines.append(f"  {r['mesh']:>4} | {r['remat']:>10} | {r['per_device_batch']:>3} | {_gib(r['argument_bytes'])} | "
                   f"{_gib(r['output_bytes'])} | {_gib(r['alias_bytes'])} | {_gib(r['temp_bytes'])} | "
                   f"{_gib(r['program_bytes'])} | {r['compile_s']}")
  lines.append("largest batch per device (extrapolated from the CPU compile): mesh | remat | GiB + GiB/example | "
               "budget GiB | batch")
  for r in rows:
    if r["result"] == "fit":
      lines.append(f"  {r['mesh']:>4} | {r['remat']:>10} | {_gib(r['intercept_bytes'])} + "
                   f"{_gib(r['bytes_per_example'])} | {r['budget_gib']} | {r['largest_per_device_batch']}")
  return "\n".join(lines)


def meshes_of(flag: str, values: list[str], devices: int) -> list[tuple[int, int]]:
  """The meshes of ``--flag``, each covering the ``devices``; a ValueError naming the flag otherwise."""
  meshes = []
  for text in values:
    try:
      mesh = parse_mesh(text)
    except ValueError as e:
      raise ValueError(f"--{flag}: {e}") from None
    if mesh[0] * mesh[1] != devices:
      raise ValueError(f"--{flag}={text}: data x fsdp = {mesh[0] * mesh[1]} does not cover the {devices} devices; "
                       f"give meshes whose product is {devices}.")
    meshes.append(mesh)
  return meshes


def batches_of(values: list[str]) -> list[int]:
  """``--per_device_batches`` as integers >= 1 (at least one); a ValueError naming the flag otherwise."""
  if not values or not all(v.strip().isdigit() and int(v) >= 1 for v in values):
    raise ValueError(f"--per_device_batches={','.join(values)}: give one or more integers >= 1 (two or more for the "
                     "fit), e.g. 1,2.")
  return [int(v) for v in values]


def main(argv):
  from absl import app, flags

  from videofusion_jax.config import ConfigError

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
  f = flags.FLAGS
  devices = jax.device_count()
  if devices != 8:
    print(f"note: {devices} devices (XLA_FLAGS set elsewhere); the meshes must cover them.")
  quick = f.quick
  try:
    state_meshes = meshes_of("state_meshes", f.state_meshes, devices)
    compile_meshes = meshes_of("compile_meshes", ["1x8"] if quick else f.compile_meshes, devices)
    batches = batches_of(f.per_device_batches)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if not f.budget_gib > 0:
    raise app.UsageError(f"--budget_gib={f.budget_gib}: give the device memory in GiB, > 0.")
  remats = ["", "block"] if quick else ["" if r in ("off", "none") else r for r in f.remat]
  try:
    rows = run(_CONFIG.value, state_meshes, compile_meshes, remats, batches, f.budget_gib)
  except ConfigError as e:  # one line, as the main program gives it (e.g. an unknown --remat)
    raise app.UsageError(str(e)) from None
  print(tables(rows), flush=True)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", "configs/ucf101.py", "Config file (its model is measured).")
  flags.DEFINE_list("state_meshes", ["8x1", "1x8"], "Meshes (data x fsdp) whose state bytes are summed.")
  flags.DEFINE_list("compile_meshes", ["8x1", "1x8"], "Meshes whose train step is compiled.")
  flags.DEFINE_list("remat", ["off", "block", "block_dots"], "train.remat modes to compile ('off' = '').")
  flags.DEFINE_list("per_device_batches", ["1", "2"], "Per-device batches to compile (two or more for the fit).")
  flags.DEFINE_float("budget_gib", 80.0, "Device memory for the largest-batch estimate (80 GiB: an 80 GB A100/H100).")
  flags.DEFINE_bool("quick", False, "Compile only the 1x8 (FSDP) mesh with remat '' and 'block'.")
  app.run(main)
