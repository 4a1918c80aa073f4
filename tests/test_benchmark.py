"""The benchmark (benchmarks/train_step.py --compare) on a tiny config: every field, and the
figures that can be checked independently (FLOPs ratio, params, clips/s from the step time)."""
import json
import subprocess
import sys

from conftest import ROOT
from test_faults import one_device_env

TINY = ["--config.data.num_frames=4", "--config.data.image_size=8", "--config.model.base.base_channels=8",
        "--config.model.base.head_dim=8", "--config.model.base.attention_resolutions=(4,)",
        "--config.model.residual.base_channels=4", "--config.model.residual.head_dim=4",
        "--config.model.encoder.base_channels=8", "--config.model.prior.width=32", "--config.model.prior.num_layers=2",
        "--config.train.batch_size=2", "--config.sample.batch_size=2", "--config.sample.prior_num_steps=2",
        "--config.compilation_cache_dir="]


def test_benchmark_prints_every_field_for_both_kinds_and_side_by_side_runs_take_turns(tmp_path):
  """``--compare`` in one run and, started beside it as benchmarks/gpu_check.sh does, a second
  run of one kind (VDM*, sampling only). They share ``--sync_dir``: each times only once both have
  compiled, never while the other times; ``--summarize`` gives the ratios of the rows."""
  env = {**one_device_env(), "PYTHONPATH": str(ROOT)}
  caches, sync = tmp_path / "caches", tmp_path / "sync"
  caches.mkdir()
  sync.mkdir()
  common = [sys.executable, "benchmarks/train_step.py", "--config=configs/demo.py", "--sample_steps=2", "--compare",
            f"--cache_root={caches}", f"--sync_dir={sync}", "--sync_parties=2", "--sync_timeout=800", *TINY]
  runs = [subprocess.Popen([*common, "--steps=3", "--warmup=1", "--sample_repeats=1", "--count_flops_on=host"],
                           cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
          subprocess.Popen([*common, "--kinds=vdm", "--notrain", "--sample_repeats=3", "--init=zeros"], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  outs = [run.communicate(timeout=900) for run in runs]
  assert [run.returncode for run in runs] == [0, 0], [err[-3000:] for _, err in outs]
  assert not list(caches.iterdir())  # the measurement's fresh caches are removed at exit
  lines, beside = ([json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outs)
  assert [(x["result"], x["model"]) for x in lines] == [
      ("train_step", "videofusion"), ("sample", "videofusion"), ("train_step", "vdm"), ("sample", "vdm"),
      ("compare", "videofusion / vdm")]
  vf, vf_sample, vdm, vdm_sample, compare = lines
  for train in (vf, vdm):
    for field in ("compile_cold_s", "compile_warm_s", "step_ms_median", "clips_per_s", "xla_flops_per_step",
                  "tflops_per_s", "mfu", "peak_memory_bytes", "program_memory_bytes", "memory_source"):
      assert field in train, field
    assert train["steps_timed"] == 3 and train["peak_tflops"] == 695.0
    assert abs(train["clips_per_s"] * train["step_ms_median"] / 1000 - 2) < 1e-2  # batch / median step
    assert abs(train["mfu"] - train["xla_flops_per_step"] / (train["step_ms_median"] / 1000) / 695e12) < 1e-4
    assert train["peak_memory_bytes"] > 0 and train["xla_flops_per_step"] > 0
    # Counted as on a GPU (--count_flops_on=host): the step lowered for a host CPU device, against the
    # device's own count of the compiled step (XLA's optimisations of this tiny model's elementwise
    # work move it by ~12%; the demo's by under 1%).
    assert "lowered on one host CPU device" in train["flops_source"]
    assert abs(train["xla_flops_per_step"] / train["device_xla_flops_per_step"] - 1) < 0.2
    assert 0 < train["compile_warm_s"] < train["compile_cold_s"]  # the persistent cache is used
    assert 0 < train["compile_warm_trace_lower_s"] < train["compile_warm_s"]  # a part of the warm compile
  for sample in (vf_sample, vdm_sample):
    assert sample["steps"] == 2 and sample["method"] == "ddim" and sample["videos_per_s"] > 0
    for field in ("sample_compile_cold_s", "sample_compile_warm_s", "sample_tflops_per_s", "sample_mfu",
                  "sample_xla_flops_per_batch"):
      assert field in sample, field
    assert 0 < sample["sample_compile_warm_trace_lower_s"] < sample["sample_compile_warm_s"]
  assert "params_video" in vdm and "params_base" in vf and "params_residual" in vf
  # VDM* runs the base U-Net (plus temporal layers) on all N frames, VideoFusion on the key frame
  # and the smaller residual U-Net on N-1: XLA's counts must show VideoFusion cheaper.
  assert compare["xla_flops_ratio"] == round(vf["xla_flops_per_step"] / vdm["xla_flops_per_step"], 3) < 1
  assert compare["clips_per_s_ratio"] == round(vf["clips_per_s"] / vdm["clips_per_s"], 3)
  assert compare["videos_per_s_ratio"] == round(vf_sample["videos_per_s"] / vdm_sample["videos_per_s"], 3)

  # The run beside: VDM* sampling alone (--kinds, --notrain), then the turns of both runs.
  assert [(x["result"], x["model"]) for x in beside] == [("sample", "vdm")]
  alone = beside[0]
  assert alone["steps"] == 2 and alone["videos_per_s"] > 0 and alone["sample_xla_flops_per_batch"] > 0
  assert alone["init"] == "zeros" and vdm_sample["init"] == "random"  # --init: the state's values only
  # Counted on the device (its default on one CPU device) and on the host: one program, one count.
  assert "host" not in alone["sample_flops_source"] and "host" in vdm_sample["sample_flops_source"]
  assert alone["sample_xla_flops_per_batch"] == vdm_sample["sample_xla_flops_per_batch"]
  turns = [vf, vf_sample, vdm, vdm_sample, alone]
  assert all(x["synced"] == "2/2 compiled" for x in turns)
  assert vf["timed_from"] >= alone["compiled_at"] and alone["timed_from"] >= vf["compiled_at"]  # the barrier
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
