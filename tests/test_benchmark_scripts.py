"""The smaller benchmark scripts: the input pipeline's figure on the UCF101 stand-in, the memory
benchmark's state bytes, and bad flags answered with one message instead of a traceback."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, load_benchmark, tiny_config

from videofusion_jax.experiment import Experiment

memory = load_benchmark("memory")


def test_pipeline_stand_in_decodes_every_clip_says_what_it_read_and_leaves_no_files(tmp_path, monkeypatch):
  """The stand-in's few videos fit the config's data.cache_mb, but real UCF101 never does: it runs with
  cache_mb=0 (``cached`` false) unless a cache is asked for. A dataset already prepared in --data_dir
  is reused by TFDS whatever --videos and --frames say: ``source`` and ``videos`` describe the one read.
  The temporary folder (the stand-in's raw files, and the TFDS build without --data_dir) is removed; a
  given --data_dir stays."""
  import ucf101

  pipeline = load_benchmark("pipeline")
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  config = ucf101.get_config()
  d = config.data.to_dict()
  assert 3 * 40 * d["image_size"]**2 * 3 * 4 / 2**20 < d["cache_mb"]  # 3 videos of 40 frames would fit the cache

  data_dir = tmp_path / "tfds"
  first = pipeline.measure(config, 2, 1, data_dir=str(data_dir), videos=3, frames=40)
  assert (first["cached"], first["cache_mb"], first["videos"]) == (False, 0.0, 3)
  assert first["source"] == "UCF101 stand-in (3 x 40 frames, 320x240 avi)"
  assert first["batch_shape"] == [2, d["num_frames"], d["image_size"], d["image_size"], 3]
  assert first["clips_per_s"] == pytest.approx(2 / first["timed_s"], rel=1e-2, abs=0.06)  # 1 batch of 2 timed
  assert list(temp.glob("pipeline_bench_*")) == []
  again = pipeline.measure(config, 2, 1, data_dir=str(data_dir), videos=4, frames=50, cache_mb=512)
  assert (again["cached"], again["cache_mb"], again["videos"]) == (True, 512.0, 3)
  assert "(3 x 40 frames; not the stand-in of this run)" in again["source"], again["source"]
  assert list(temp.glob("pipeline_bench_*")) == [] and any(data_dir.iterdir())
  assert config.data.to_dict() == d  # the caller's config untouched


def test_memory_state_bytes_summed_over_the_devices_count_every_copy():
  """Data parallelism (8x1) holds the whole state on each of the 8 devices; FSDP (1x8) splits it, so
  together the devices hold about one copy (a little more: the few replicated arrays). Independently:
  the bytes of every shard of a state of zeros placed with those shardings."""
  rows = {}
  for mesh in ((8, 1), (1, 8)):
    e = Experiment(memory.config_for(tiny_config(), mesh, 1))
    rows[mesh] = {k: memory.state_bytes(e, k)["total"] for k in ("device", "all_devices", "one_copy")}
    placed = jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding), e.abstract_state())
    shards = [s.data.nbytes for x in jax.tree.leaves(placed) for s in x.addressable_shards]
    assert rows[mesh]["all_devices"] == sum(shards)
    assert rows[mesh]["one_copy"] == sum(x.nbytes for x in jax.tree.leaves(placed))
  assert rows[(8, 1)]["all_devices"] == 8 * rows[(8, 1)]["device"] == 8 * rows[(8, 1)]["one_copy"]
  assert rows[(1, 8)]["all_devices"] == 8 * rows[(1, 8)]["device"]
  assert rows[(1, 8)]["one_copy"] <= rows[(1, 8)]["all_devices"] < 1.2 * rows[(1, 8)]["one_copy"]
  # The rows the benchmark prints (run()), not only the helper: its 'summed over the devices' column.
  printed = memory.run(tiny_config(), [(8, 1), (1, 8)], [], [""], [1], 80.0, emit=lambda line: None)
  for row, mesh in zip(printed, ((8, 1), (1, 8))):
    assert row["mesh"] == f"{mesh[0]}x{mesh[1]}"
    assert row["total_bytes_summed_over_devices"] == rows[mesh]["all_devices"]  # the sum of shards, above
    assert row["total_bytes_one_copy"] == rows[mesh]["one_copy"]
    assert row["total_bytes_per_device"] == rows[mesh]["device"]
  table = memory.tables([{"result": "state", "mesh": "8x1", **{f"{k}_bytes_per_device": 2**30 for k in
                                                                ("params", "ema_params", "opt_state", "total")},
                          "total_bytes_summed_over_devices": 8 * 2**30, "total_bytes_one_copy": 2**30}])
  assert "total summed over the devices | total of one copy" in table and "| 1.00 | 8.00 | 1.00" in table


def test_memory_rows_of_the_compiled_step_are_xlas_analysis_and_the_fit_their_line(monkeypatch):
  """run()'s train_step rows: XLA's memory analysis of the step it compiled, per device, with program =
  argument + output + temp - alias (the donated state counted once); its fit row: the line through the
  rows' program bytes at the two batches, and the largest batch under the budget on it."""
  compiled = []
  compile_step = memory.compile_step
  monkeypatch.setattr(memory, "compile_step", lambda *a, **k: compiled.append(compile_step(*a, **k)) or compiled[-1])
  rows = memory.run(tiny_config(), [], [(8, 1)], [""], [1, 2], 1.0, emit=lambda line: None)
  assert [r["result"] for r in rows] == ["train_step", "train_step", "fit"] and len(compiled) == 2
  for row, (program, _, _), b in zip(rows, compiled, (1, 2)):
    analysis = program.memory_analysis()
    sizes = {k: getattr(analysis, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")}
    assert {k: row[f"{k}_bytes"] for k in sizes} == sizes
    assert (row["per_device_batch"], row["global_batch"]) == (b, 8 * b)
    assert row["program_bytes"] == sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    # The state is donated: its bytes alias the outputs', and the arguments hold it and the batch.
    assert 0.9 * row["state_bytes_per_device"] <= sizes["alias"] <= sizes["argument"]
    assert sizes["argument"] >= row["state_bytes_per_device"] + row["batch_bytes_per_device"]
  one, two, fit = rows
  slope = two["program_bytes"] - one["program_bytes"]
  assert slope > 0 and fit["bytes_per_example"] == round(slope)
  assert fit["intercept_bytes"] == round(one["program_bytes"] - slope)
  assert fit["largest_per_device_batch"] == int(np.floor((2**30 - (one["program_bytes"] - slope)) / slope)) > 0


def test_train_profile_figures_of_a_trace_made_by_hand():
  """Two steps (0-100 and 100-300 ms) on the host; kernels on two XLA threads of the CPU (10-50 and 40-90: 80 ms
  together) and on a GPU's stream (130-280), one begun before the window (-20 to 5: 5 ms of it inside); the host's
  own events (its thread, a step's whole span) are no device time. Busy 5 + 80 + 150 = 235 of 300 ms, gaps 40
  and 5 ms; the programs dispatched 10 and 30 ms into their steps."""
  train_profile = load_benchmark("train_profile")
  ms = 1000.0  # the trace's unit is the microsecond
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  meta += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}
           for pid, tid, name in ((1, 10, "main.py"), (1, 11, "tf_XLAEigen/1"), (1, 12, "tf_XLAEigen/2"),
                                  (2, 20, "Stream #1"))]

  def event(name, pid, tid, start, end, **args):
    return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": start * ms, "dur": (end - start) * ms,
            **({"args": args} if args else {})}

  events = meta + [
      event("train", 1, 10, 0, 100, step_num="5"), event("train", 1, 10, 100, 300, step_num="6"),
      event("CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice", 1, 10, 10, 12),
      event("PjRtStreamExecutorLoadedExecutable::Execute", 1, 10, 130, 131),
      event("fusion.1", 1, 11, 10, 50), event("convolution.2", 1, 12, 40, 90), event("copy", 1, 11, -20, 5),
      event("gemm", 2, 20, 130, 280), event("np.asarray(jax.Array)", 1, 10, 290, 299)]
  figures = train_profile.summarize(events)
  assert figures["steps"] == [{"step": 5, "wall_ms": 100.0, "host_before_dispatch_ms": 10.0},
                              {"step": 6, "wall_ms": 200.0, "host_before_dispatch_ms": 30.0}]
  assert (figures["window_ms"], figures["device_busy_ms"]) == (300.0, 235.0)
  assert figures["device_busy_share"] == round(235 / 300, 4) and figures["longest_device_gaps_ms"] == [40.0, 5.0]
  assert "note" not in figures
  blind = train_profile.summarize([e for e in events if "Execute" not in e.get("name", "")])
  assert [row["host_before_dispatch_ms"] for row in blind["steps"]] == [None, None] and "no '" in blind["note"]
  with pytest.raises(ValueError, match="no 'train' step annotations"):
    train_profile.summarize(meta)


TINY_CONFIG = f"""import sys
sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT / 'configs')!r}]
from tiny import tiny_config


def get_config():
  return tiny_config()
"""


def test_gpu_lowering_counts_each_call_where_xla_inlines_it_and_threefrys_rounds():
  """A program lowered for CUDA: a jitted function called twice is lowered once and counted twice (its
  sine), its three draws (a split, two normals) each 20 rotations (shift_left) of threefry's unrolled
  rounds, or one call of JAX's kernel each under ``init_lowering``; the rounds are the ops the draws
  add to the program. Then the tiny config's init and step through the script: the same draws under
  both lowerings, the init with fewer operations on the kernel, the step's convolutions."""
  import contextlib

  import jax.numpy as jnp

  from videofusion_jax.experiment import init_lowering
  gpu_lowering = load_benchmark("gpu_lowering")
  inner = jax.jit(lambda x: jnp.sin(x) * 3.0)

  def program(key, x, draw=True):
    a, b = jax.random.split(key)
    y = inner(inner(x))
    return y + jax.random.normal(a, x.shape) + jax.random.normal(b, (7,)).sum() if draw else y
  args = (jax.random.PRNGKey(0), jnp.ones(5))

  def counts(kernel: bool, draw: bool = True) -> dict:
    with init_lowering() if kernel else contextlib.nullcontext():
      text = jax.jit(program, static_argnums=2).trace(*args, draw).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.sine") == 1
    return gpu_lowering.inlined_ops(text)
  unrolled, kernel, none = counts(False), counts(True), counts(False, draw=False)
  assert [c["by_op"]["stablehlo.sine"] for c in (unrolled, kernel, none)] == [2, 2, 2]
  assert unrolled["draws"] == kernel["draws"] == 3 and none["draws"] == 0
  assert unrolled["by_op"]["stablehlo.shift_left"] == 3 * 20 and "stablehlo.shift_left" not in kernel["by_op"]
  assert kernel["by_op"]["stablehlo.custom_call@cu_threefry2x32_ffi"] == 3
  assert unrolled["threefry_round_ops"] > 3 * 20 * 4 and kernel["threefry_round_ops"] < 3 * 10
  # What the draws add beyond the rounds is the same under both lowerings (keys, conversion to floats).
  assert unrolled["ops"] - unrolled["threefry_round_ops"] == kernel["ops"] - kernel["threefry_round_ops"]

  with tempfile.TemporaryDirectory() as tmp:
    tiny = Path(tmp) / "tiny_config.py"
    tiny.write_text(TINY_CONFIG)
    r = subprocess.run([sys.executable, "benchmarks/gpu_lowering.py", f"--config={tiny}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = {(row["program"], row["threefry"]): row for row in map(json.loads, r.stdout.splitlines())}
  assert set(rows) == {("init", "kernel"), ("init", "unrolled"), ("step", "unrolled"), ("step", "kernel")}
  assert rows["init", "kernel"]["lowering"] == rows["step", "unrolled"]["lowering"] == "the project's"
  for name in ("init", "step"):
    k, u = rows[name, "kernel"], rows[name, "unrolled"]
    assert k["random_draws"] == u["random_draws"] == k["threefry_kernel_calls"] > 0
    assert u["threefry_kernel_calls"] == 0 and k["ops_inlined"] < u["ops_inlined"]
    assert u["ops_inlined"] - u["threefry_round_ops"] == k["ops_inlined"] - k["threefry_round_ops"]
  assert rows["init", "unrolled"]["threefry_share"] > 0.5 and rows["init", "kernel"]["convolutions"] == 0
  assert 0 < rows["step", "kernel"]["distinct_convolutions"] < rows["step", "kernel"]["convolutions"]

@pytest.mark.parametrize("script, args, expected", [
    ("pipeline", ["--batch_size=0"], "--batch_size"),
    ("pipeline", ["--manual_dir=/nonexistent/ucf101"], "manual_dir"),
    ("memory", ["--state_meshes=8", "--compile_meshes="], "--state_meshes: '8' is not a mesh"),
    ("memory", ["--state_meshes=2x2", "--compile_meshes="], "--state_meshes=2x2: data x fsdp = 4"),
    ("memory", ["--per_device_batches="], "--per_device_batches"),
    ("i3d", ["--frames=4"], "--frames"),
    ("clip", ["--clip_dir=/nonexistent/clip"], "--clip_dir=/nonexistent/clip: CLIP directory"),
    ("clip", ["--repeats=0"], "--repeats"),
    ("train_profile", ["/nonexistent/run/profile"], "no perfetto_trace.json.gz under /nonexistent/run/profile"),
    ("gpu_lowering", ["--config={tiny}", "--programs=init,sttep"], "--programs: ['sttep'] not among init, step"),
    ("gpu_lowering", ["--config={tiny}", "--config.model.kind=vdm"], "config.diffusion.lam=0.5: VDM* is trained"),
    ("long_videos", ["--config={tiny}", "--workdir=/nonexistent/run", "--config.sample.num_clips=2",
                     "--config.sample.continuity_frames=1"], "--workdir=/nonexistent/run: no checkpoint"),
])
def test_bad_flags_give_one_message_not_a_traceback(tmp_path, script, args, expected):
  """Each fails before compiling anything: exit status 1, the flag named, no traceback."""
  tiny = tmp_path / "tiny_config.py"
  tiny.write_text(TINY_CONFIG)
  r = subprocess.run([sys.executable, f"benchmarks/{script}.py", *(a.format(tiny=tiny) for a in args)], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  out = r.stdout + r.stderr
  assert r.returncode == 1 and "Traceback" not in out and expected in out, out[-3000:]


def test_gpu_check_loop_says_how_the_training_run_ended(tmp_path):
  """PART=loop of benchmarks/gpu_check.sh reports the training run's exit status and, when it failed, its
  log's last lines (it said 'exit 0' of every run: the status read after the echo's own $(date)). python3
  is a stand-in here whose training run fails with status 7."""
  (tmp_path / "bin").mkdir()
  fake = tmp_path / "bin" / "python3"
  fake.write_text("#!/bin/sh\ncase \"$*\" in *videofusion_jax.main*) echo 'RuntimeError: a stand-in'; exit 7;; "
                  "esac\ncat > /dev/null\nexit 0\n")
  fake.chmod(0o755)
  out = tmp_path / "out"
  env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "OUT": str(out), "PART": "loop", "HOME": str(tmp_path)}
  r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "loop: exit 7" in (out / "bench.log").read_text(), (out / "bench.log").read_text()
  assert "RuntimeError: a stand-in" in r.stdout, r.stdout
