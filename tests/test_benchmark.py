"""The benchmark (benchmarks/train_step.py --compare) on a tiny config: every field, and the
figures that can be checked independently (FLOPs ratio, params, clips/s from the step time); the
compile's trace (benchmarks/compile_trace.py) on a trace of known times."""
import gzip
import json
import statistics
import subprocess
import sys

import pytest
from conftest import ROOT, load_benchmark
from test_faults import one_device_env

compile_trace = load_benchmark("compile_trace")

TINY = ["--config.data.num_frames=4", "--config.data.image_size=8", "--config.model.base.base_channels=8",
        "--config.model.base.head_dim=8", "--config.model.base.attention_resolutions=(4,)",
        "--config.model.residual.base_channels=4", "--config.model.residual.head_dim=4",
        "--config.model.residual.channel_mult=(1,)", "--config.model.encoder.base_channels=8",
        "--config.model.encoder.channel_mult=(1,)", "--config.model.prior.width=32",
        "--config.model.prior.num_layers=1",
        "--config.train.batch_size=2", "--config.sample.batch_size=2", "--config.sample.prior_num_steps=2",
        "--config.sample.spacing=trailing", "--config.sample.prior_spacing=trailing",  # short chains from T-1
        "--config.compilation_cache_dir="]


# benchmarks/train_step.py whose warm compiles start at the deadline (as a cold compile ending near it leaves them).
WARM_LATE = """
import sys, time
sys.path.insert(0, "benchmarks")
import train_step
from absl import app
given = train_step.compile_warm
train_step.compile_warm = lambda *args, until: given(*args, until=time.perf_counter())
app.run(train_step.main)
"""


def test_benchmark_prints_every_field_for_both_kinds_and_side_by_side_runs_take_turns(tmp_path):
  """``--compare`` in one run and, started beside it as benchmarks/gpu_check.sh does, a second
  run of one kind (VDM*, sampling only; its warm compile given up past the deadline). They share
  ``--sync_dir``: each times only once both have compiled, never while the other times; ``--summarize``
  gives the ratios of the rows."""
  env = {**one_device_env(), "PYTHONPATH": str(ROOT)}
  caches, sync = tmp_path / "caches", tmp_path / "sync"
  caches.mkdir()
  sync.mkdir()
  options = ["--config=configs/demo.py", "--sample_steps=2", "--compare", f"--cache_root={caches}",
             f"--sync_dir={sync}", "--sync_parties=2", "--sync_timeout=800", *TINY]
  common = [sys.executable, "benchmarks/train_step.py", *options]
  profile = tmp_path / "profile"
  (tmp_path / "warm_late.py").write_text(WARM_LATE)
  runs = [subprocess.Popen([*common, "--steps=3", "--warmup=1", "--sample_repeats=1", "--count_flops_on=host",
                            f"--compile_profile={profile}"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
          subprocess.Popen([sys.executable, str(tmp_path / "warm_late.py"), *options, "--kinds=vdm", "--notrain",
                            "--sample_repeats=3", "--init=zeros", "--compile_deadline_s=600"], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  outs = [run.communicate(timeout=900) for run in runs]
  assert [run.returncode for run in runs] == [0, 0], [err[-3000:] for _, err in outs]
  assert not list(caches.iterdir())  # the measurement's fresh caches are removed at exit
  lines, beside = ([json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outs)
  traced = [x for x in lines if x["result"] == "compile_phases"]
  lines = [x for x in lines if x["result"] != "compile_phases"]
  assert [(x["result"], x["model"]) for x in lines] == [
      ("train_step", "videofusion"), ("sample", "videofusion"), ("train_step", "vdm"), ("sample", "vdm"),
      ("compare", "videofusion / vdm")]
  vf, vf_sample, vdm, vdm_sample, compare = lines
  # --compile_profile: each cold compile traced, its phases printed before its result.
  assert [(x["model"], x["program"], x["finished"]) for x in traced] == [
      ("videofusion", "train_step", True), ("videofusion", "sample", True), ("vdm", "train_step", True),
      ("vdm", "sample", True)]
  colds = ("compile_cold_s", "sample_compile_cold_s") * 2
  for row, result, cold in zip(traced, (vf, vf_sample, vdm, vdm_sample), colds):
    assert row["compile_cold_s"] == result[cold] and row["trace"].startswith(str(profile))
    # XLA's events lie within the compile (its cold time less the lowering) and fill most of it.
    assert 0.5 * (row["compile_cold_s"] - row["lower_s"]) < row["span_s"] <= row["compile_cold_s"], row
    assert row["phases"] == compile_trace.trace_phases(row["trace"])["phases"]
    assert any("Compile" in p["name"] for p in row["phases"])
    assert all(0 <= p["self_s"] <= p["total_s"] for p in row["phases"])
  for train in (vf, vdm):
    for field in ("compile_cold_s", "compile_warm_s", "step_ms_median", "clips_per_s", "xla_flops_per_step",
                  "tflops_per_s", "mfu", "peak_memory_bytes", "program_memory_bytes", "memory_source"):
      assert field in train, field
    assert train["steps_timed"] == 3 and train["peak_tflops"] == 695.0
    # The step's time is the median of the timed steps (each in the row), its rates the batch and XLA's FLOPs
    # over it.
    assert len(train["step_ms"]) == 3 and train["step_ms_min"] == min(train["step_ms"])
    assert train["step_ms_median"] == pytest.approx(statistics.median(train["step_ms"]), abs=1e-3)
    assert abs(train["clips_per_s"] * train["step_ms_median"] / 1000 - 2) < 1e-2  # batch / median step
    tflops = train["xla_flops_per_step"] / (train["step_ms_median"] / 1000) / 1e12
    assert train["tflops_per_s"] == pytest.approx(tflops, rel=1e-3, abs=1e-4)
    assert abs(train["mfu"] - tflops / 695) < 1e-4
    assert train["peak_memory_bytes"] > 0 and train["xla_flops_per_step"] > 0
    # Counted as on a GPU (--count_flops_on=host): the step lowered for a host CPU device, against the
    # device's own count of the compiled step (XLA's optimisations of this tiny model's elementwise
    # work move it by ~12%; the demo's by under 1%).
    assert "lowered on one host CPU device" in train["flops_source"]
    assert abs(train["xla_flops_per_step"] / train["device_xla_flops_per_step"] - 1) < 0.2
    assert 0 < train["compile_warm_s"] < train["compile_cold_s"]  # the persistent cache is used
    assert 0 < train["compile_warm_trace_lower_s"] < train["compile_warm_s"]  # a part of the warm compile
    assert train["warm_step_program"] == "stored"  # the warm compile loaded the traced step, no tracing
  for sample in (vf_sample, vdm_sample):
    assert sample["steps"] == 2 and sample["method"] == "ddim" and sample["videos_per_s"] > 0
    assert len(sample["sample_s"]) == 1 and sample["sample_s_per_batch"] == sample["sample_s"][0]
    tflops = sample["sample_xla_flops_per_batch"] / sample["sample_s_per_batch"] / 1e12
    assert sample["videos_per_s"] == pytest.approx(sample["batch"] / sample["sample_s_per_batch"], rel=2e-3)
    assert sample["sample_tflops_per_s"] == pytest.approx(tflops, rel=2e-3, abs=1e-4)
    assert sample["sample_mfu"] == pytest.approx(tflops / 695, rel=2e-3, abs=1e-5)
    for field in ("sample_compile_cold_s", "sample_compile_warm_s", "sample_tflops_per_s", "sample_mfu",
                  "sample_xla_flops_per_batch"):
      assert field in sample, field
    assert 0 < sample["sample_compile_warm_trace_lower_s"] < sample["sample_compile_warm_s"]
    assert sample["warm_sample_program"] == "stored"
  assert "params_video" in vdm and "params_base" in vf and "params_residual" in vf
  # VDM* runs the base U-Net (plus temporal layers) on all N frames, VideoFusion on the key frame
  # and the smaller residual U-Net on N-1: XLA's counts must show VideoFusion cheaper.
  assert compare["xla_flops_ratio"] == round(vf["xla_flops_per_step"] / vdm["xla_flops_per_step"], 3) < 1
  assert compare["clips_per_s_ratio"] == round(vf["clips_per_s"] / vdm["clips_per_s"], 3)
  assert compare["videos_per_s_ratio"] == round(vf_sample["videos_per_s"] / vdm_sample["videos_per_s"], 3)

  # The run beside: VDM* sampling alone (--kinds, --notrain), then the turns of both runs. Its warm compile was
  # still going at the deadline: given up, the run timed and printed its row (the timeout of gpu_check.sh, a minute
  # past the deadline, killed a run whose cold compile ended near it in the warm one, its figures unprinted).
  assert [(x["result"], x["model"]) for x in beside] == [("sample", "vdm")]
  alone = beside[0]
  assert alone["steps"] == 2 and alone["videos_per_s"] > 0 and alone["sample_xla_flops_per_batch"] > 0
  assert len(alone["sample_s"]) == 3 and alone["sample_s_per_batch"] == pytest.approx(
      statistics.median(alone["sample_s"]), abs=1e-6)
  assert alone["sample_compile_warm_s"] is None and alone["sample_compile_warm_trace_lower_s"] is None
  assert alone["sample_compile_cold_s"] > 0, alone
  # Whether that compile still ran on the host while the run timed (it may have ended by then): said in the row.
  assert isinstance(alone["timed_beside_warm_compile"], bool)
  assert not any(x["timed_beside_warm_compile"] for x in (vf, vf_sample, vdm, vdm_sample))
  assert "1 warm compile(s) unfinished at --compile_deadline_s=600" in outs[1][1], outs[1][1]
  assert alone["init"] == "zeros" and vdm_sample["init"] == "random"  # --init: the state's values only
  # Counted on the device (its default on one CPU device) and on the host: one program, one count.
  assert "host" not in alone["sample_flops_source"] and "host" in vdm_sample["sample_flops_source"]
  assert alone["sample_xla_flops_per_batch"] == vdm_sample["sample_xla_flops_per_batch"]
  turns = [vf, vf_sample, vdm, vdm_sample, alone]
  assert all(x["synced"] == "2/2 compiled" for x in turns)
  assert vf["timed_from"] >= alone["compiled_at"] and alone["timed_from"] >= vf["compiled_at"]  # the barrier
  # Each run's state (or EMA weights) made in its turn, not held while the other times (gpu_check.sh's runs
  # share one device).
  assert all(x["timed_from"] <= x["state_made_at"] <= x["timed_to"] for x in turns)
  windows = sorted((x["timed_from"], x["timed_to"]) for x in turns)
  assert all(a_from < a_to <= b_from for (a_from, a_to), (b_from, _) in zip(windows, windows[1:]))  # the lock

  # --flops_only: the counts of the timed rows (run 1 counted on the host), nothing compiled or run.
  counted = subprocess.run([sys.executable, "benchmarks/train_step.py", "--config=configs/demo.py", "--sample_steps=2",
                            "--compare", "--flops_only", "--count_flops_on=host", *TINY],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert counted.returncode == 0, counted.stderr[-3000:]
  rows = [json.loads(line) for line in counted.stdout.splitlines() if line.startswith("{")]
  assert [(x["result"], x["model"], x["batch"], x["sample_batch"]) for x in rows] == [
      ("flops", "videofusion", 2, 2), ("flops", "vdm", 2, 2)]
  for row, train, sample in zip(rows, (vf, vdm), (vf_sample, vdm_sample)):
    assert (row["xla_flops_per_step"], row["sample_xla_flops_per_batch"]) == (
        train["xla_flops_per_step"], sample["sample_xla_flops_per_batch"])

  # --compile_deadline_s: a compile still running at the deadline (here: passed before it began) ends the
  # run with its phases so far and a 'compile_unfinished' line, exit 3; --report prints rows in short.
  late = subprocess.run([sys.executable, "benchmarks/train_step.py", "--config=configs/demo.py", "--sample_steps=0",
                         "--compare", "--kinds=videofusion", "--init=zeros", "--compile_deadline_s=0.5",
                         f"--compile_profile={tmp_path / 'late'}", *TINY],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert late.returncode == 3, late.stderr[-3000:]
  late_rows = [json.loads(line) for line in late.stdout.splitlines() if line.startswith("{")]
  assert [(x["result"], x["program"]) for x in late_rows] == [("compile_phases", "train_step"),
                                                             ("compile_unfinished", "train_step")]
  assert late_rows[0]["finished"] is False and late_rows[1]["deadline_s"] == 0.5
  assert 0 <= late_rows[1]["compile_s_so_far"] < 5  # given up at once: the deadline had passed
  # --report of two runs' logs: each under its name, in short; the run without results also shows its
  # log's last lines (here its own last JSON line, then the logging that followed).
  timed, stopped = tmp_path / "timed.log", tmp_path / "stopped.log"
  timed.write_text("".join(json.dumps(x) + "\n" for x in [vf, vf_sample, alone]))
  stopped.write_text(late.stdout + "a line\nlast line\n")
  report = subprocess.run([sys.executable, "benchmarks/train_step.py", f"--report={timed},{stopped}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert report.returncode == 0, report.stderr[-3000:]
  # The rows say what XLA ran with: the suite's flags, and its optimisations off (JAX_DISABLE_MOST_OPTIMIZATIONS).
  assert vf["xla_flags"] == late_rows[1]["xla_flags"] == env["XLA_FLAGS"]
  assert vf["xla_optimised"] is late_rows[1]["xla_optimised"] is (env.get("JAX_DISABLE_MOST_OPTIMIZATIONS") != "1")
  flags = f" [{env['XLA_FLAGS']}, unoptimised]"
  assert report.stdout.splitlines() == [
      "== timed",
      f"videofusion train_step{flags} batch 2 xla: {vf['step_ms_median']} ms, {vf['clips_per_s']} clips/s, MFU "
      f"{vf['mfu']:.2%}, peak {vf['peak_memory_bytes'] / 1e9:.2f} GB, compile {vf['compile_cold_s']} s cold / "
      f"{vf['compile_warm_s']} s warm ({vf['compile_warm_trace_lower_s']} s of it on the host, the program stored)",
      f"videofusion sample{flags} batch 2: {vf_sample['videos_per_s']} videos/s, MFU {vf_sample['sample_mfu']:.2%}, "
      f"compile {vf_sample['sample_compile_cold_s']} s cold / {vf_sample['sample_compile_warm_s']} s warm "
      f"({vf_sample['sample_compile_warm_trace_lower_s']} s of it on the host, the program stored)",
      f"vdm sample{flags} batch 2: {alone['videos_per_s']} videos/s, MFU {alone['sample_mfu']:.2%}, compile "
      f"{alone['sample_compile_cold_s']} s cold / warm unfinished at the deadline"
      + (", timed beside it" if alone["timed_beside_warm_compile"] else ""),
      "== stopped",
      f"videofusion train_step{flags} compile (unfinished, {late_rows[0]['span_s']} s traced, "
      f"{late_rows[0]['threads']} threads), self time: "
      + "; ".join(f"{p['name'][:60]} {p['self_s']} s x{p['count']}" for p in late_rows[0]["phases"][:6]),
      f"videofusion train_step{flags}: still compiling {late_rows[1]['compile_s_so_far']} s after lowering "
      "(deadline 0.5 s)",
      late.stdout.splitlines()[-1][:400], "a line", "last line"]

  def summarize(*rows):
    """``--summarize`` of a file of ``rows``: the process's result."""
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return subprocess.run([sys.executable, "benchmarks/train_step.py", f"--summarize={path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)

  r = summarize(*lines, alone)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.splitlines()[-1]) == compare  # the first row of each kind and result, as in one run
  # Peaks the device reported (a GPU's): a ratio only when the two rows come from separate processes.
  device = "device memory_stats (process peak so far)"
  apart = [{**vf, "memory_source": device}, {**vdm, "memory_source": device, "pid": vf["pid"] + 1}]
  r = summarize(*apart)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.splitlines()[-1]) == {
      **{k: v for k, v in compare.items() if not k.startswith(("videos", "sample"))},
      "peak_memory_ratio": round(vf["peak_memory_bytes"] / vdm["peak_memory_bytes"], 3)}
  r = summarize(*({**x, "pid": vf["pid"]} for x in apart))  # one process: its peak is shared
  assert r.returncode == 0 and "peak_memory_ratio" not in json.loads(r.stdout.splitlines()[-1]), r.stderr[-3000:]
  r = summarize(vf_sample, {**alone, "batch": 3})
  assert r.returncode != 0 and "sample rows of batches [2, 3]" in r.stderr, r.stderr[-2000:]


def test_flops_are_the_steps_under_memory_switches_and_for_a_model_on_stored_clip_embeddings():
  """XLA counts a loop's body once (micro-batches) and counts remat's recomputed forward passes: with
  both switches the count is the plain step's. ``--compare`` says which settings it changes. A model
  on stored CLIP embeddings with a prior on text gets a synthetic batch with them and its prior's
  count (both failed: a missing batch key, a prior called without its text)."""
  env = {**one_device_env(), "PYTHONPATH": str(ROOT)}

  def flops(config, *extra):
    r = subprocess.run([sys.executable, "benchmarks/train_step.py", f"--config={config}", "--flops_only",
                        "--sample_steps=2", "--count_flops_on=host", *TINY, *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")][-1], r.stderr

  compare = ["--compare", "--kinds=videofusion"]
  plain, said = flops("configs/demo.py", *compare)
  assert "note: --compare sets residual_frames=0 (the config has 2)" in said  # demo's departure, undone
  switched, _ = flops("configs/demo.py", *compare, "--config.train.grad_accum_steps=2",
                      "--config.train.remat=block")
  assert switched["xla_flops_per_step"] == plain["xla_flops_per_step"] > 0
  assert switched["sample_xla_flops_per_batch"] == plain["sample_xla_flops_per_batch"]
  assert "the run's 2 micro-batches" in switched["flops_source"] and "without remat" in switched["flops_source"]
  assert "micro-batches" not in plain["flops_source"] and "remat" not in plain["flops_source"]
  text, _ = flops("configs/demo.py:text")
  assert text["xla_flops_per_step"] > 0 and text["sample_xla_flops_per_batch"] > 0


def test_measured_peak_is_the_products_flops_over_their_median_time(tmp_path):
  """``--measure_peak=N``: the MFU's denominator on this device, 2 N^3 FLOPs (XLA's count beside it) over
  the median of the timed products; ``--report`` prints it in short; a size or a peak of 0 is refused."""
  env = {**one_device_env(), "PYTHONPATH": str(ROOT)}
  r = subprocess.run([sys.executable, "benchmarks/train_step.py", "--measure_peak=96", "--peak_repeats=3"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  assert [x["result"] for x in rows] == ["peak"]
  peak = rows[0]
  assert (peak["dtype"], peak["size"], peak["repeats"], peak["device"]) == ("bfloat16", 96, 3, "cpu")
  assert 1 <= peak["products_per_sample"] <= 1000  # about 50 ms of products a sample
  # median_s is one product's time: a sample of them fills about 50 ms (fewer at the cap of 1000), and no
  # 2-core CPU multiplies at 5 TFLOP/s.
  assert peak["median_s"] * peak["products_per_sample"] < 5 and peak["tflops_per_s"] < 5
  # XLA counts the product's 2 N^3 and, on the CPU, a FLOP per element of its conversions to and from
  # float32 (two inputs, one output).
  assert peak["flops"] == 2 * 96**3 and peak["xla_flops"] == 2 * 96**3 + 3 * 96**2
  assert peak["median_s"] > 0 and peak["tflops_per_s"] == round(2 * 96**3 / peak["median_s"] / 1e12, 4)
  log = tmp_path / "peak.log"
  log.write_text(r.stdout)
  report = subprocess.run([sys.executable, "benchmarks/train_step.py", f"--report={log}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert report.stdout.splitlines() == [
      f"cpu bfloat16 96^3 matrix product: {peak['tflops_per_s']} TFLOP/s (median of 3)"], report.stderr[-2000:]
  bad = subprocess.run([sys.executable, "benchmarks/train_step.py", "--measure_peak=-8"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--measure_peak=-8 --peak_repeats=10: both must be at least 1" in bad.stderr
  zero = subprocess.run([sys.executable, "benchmarks/train_step.py", "--peak_tflops=0"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)  # a peak measured as 0.0 (a tiny product)
  assert zero.returncode != 0 and "--peak_tflops=0.0: the device's peak must be above 0" in zero.stderr


def test_compile_phases_of_a_trace_of_known_times(tmp_path):
  """Self time is an event's duration less its children's on the same thread; numbers in names
  are one phase; jax's wrapper around the whole compile is left out; the span runs from the first
  start to the last end. A trace written by hand, times in microseconds."""
  def event(name, ts, dur, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}

  events = [event("Compile", 0, 100_000),
            event("pass.1", 10_000, 30_000), event("autotune", 20_000, 10_000),  # autotune inside pass.1
            event("pass.2", 50_000, 10_000),
            event("kernel", 5_000, 40_000, tid=2), event("kernel", 60_000, 50_000, tid=2),
            event("backend_compile_and_load", 0, 100_000, tid=3),
            {"ph": "i", "name": "instant", "ts": 1, "pid": 7, "tid": 1}]
  path = tmp_path / "trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  out = compile_trace.compile_phases(compile_trace.read_events(str(path)), top=3)
  assert out["span_s"] == 0.11 and out["events"] == 6 and out["threads"] == 2
  # kernel 90 ms; Compile 100 - 30 - 10 = 60 ms; pass.# (30 - 10) + 10 = 30 ms; autotune 10 ms.
  assert out["phases"] == [{"name": "kernel", "count": 2, "self_s": 0.09, "total_s": 0.09},
                           {"name": "Compile", "count": 1, "self_s": 0.06, "total_s": 0.1},
                           {"name": "pass.#", "count": 2, "self_s": 0.03, "total_s": 0.04}]
  # An event that outlives the one it started in takes only its overlap from the parent's self time
  # (before: the parent's whole duration less the child's, -85 ms here).
  crossing = compile_trace.compile_phases([event("parent", 0, 10_000), event("child", 5_000, 95_000)])
  assert crossing["phases"] == [{"name": "child", "count": 1, "self_s": 0.095, "total_s": 0.095},
                                {"name": "parent", "count": 1, "self_s": 0.005, "total_s": 0.01}]
  assert compile_trace.compile_phases([], top=3) == {"span_s": 0.0, "events": 0, "threads": 0, "phases": []}
  with pytest.raises(FileNotFoundError, match="no perfetto_trace.json.gz under"):
    compile_trace.perfetto_trace(str(tmp_path / "nothing"))
