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


def test_benchmark_prints_every_field_for_both_kinds(tmp_path):
  env = {**one_device_env(), "PYTHONPATH": str(ROOT)}
  r = subprocess.run([sys.executable, "benchmarks/train_step.py", "--config=configs/demo.py", "--steps=3",
                      "--warmup=1", "--sample_steps=2", "--sample_repeats=1", "--compare",
                      f"--cache_root={tmp_path}", *TINY],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert not list(tmp_path.iterdir())  # the measurement's fresh caches are removed at exit
  lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
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


def test_side_by_side_runs_wait_for_each_other_take_turns_and_summarize(tmp_path):
  """benchmarks/gpu_check.sh's way: one kind per run (sampling only), the runs started together
  and sharing --sync_dir. Each times only once both have compiled, never while the other times,
  and --summarize gives the ratios of their rows."""
  env = {**one_device_env(), "PYTHONPATH": str(ROOT)}
  (tmp_path / "sync").mkdir()
  args = [sys.executable, "benchmarks/train_step.py", "--config=configs/demo.py", "--notrain", "--sample_steps=2",
          "--sample_repeats=3", "--compare", f"--cache_root={tmp_path}", f"--sync_dir={tmp_path / 'sync'}",
          "--sync_parties=2", "--sync_timeout=800", *TINY]
  procs = [subprocess.Popen([*args, f"--kinds={kind}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for kind in ("videofusion", "vdm")]
  outs = [p.communicate(timeout=900) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
  rows = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outs]
  assert [[(r["result"], r["model"]) for r in run] for run in rows] == [[("sample", "videofusion")],
                                                                          [("sample", "vdm")]]
  vf, vdm = rows[0][0], rows[1][0]
  assert vf["synced"] == vdm["synced"] == "2/2 compiled"
  assert min(vf["timed_from"], vdm["timed_from"]) >= max(vf["compiled_at"], vdm["compiled_at"])  # the barrier
  first, second = sorted((vf, vdm), key=lambda r: r["timed_from"])
  assert first["timed_from"] < first["timed_to"] <= second["timed_from"] < second["timed_to"]  # the lock

  lines = tmp_path / "bench.jsonl"
  lines.write_text(json.dumps(vf) + "\n" + json.dumps(vdm) + "\n")
  r = subprocess.run([sys.executable, "benchmarks/train_step.py", f"--summarize={lines}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.splitlines()[-1]) == {
      "result": "compare", "model": "videofusion / vdm",
      "videos_per_s_ratio": round(vf["videos_per_s"] / vdm["videos_per_s"], 3),
      "sample_xla_flops_ratio": round(vf["sample_xla_flops_per_batch"] / vdm["sample_xla_flops_per_batch"], 3)}

  lines.write_text(json.dumps(vf) + "\n" + json.dumps({**vdm, "batch": 3}) + "\n")  # rows of two batches
  r = subprocess.run([sys.executable, "benchmarks/train_step.py", f"--summarize={lines}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "sample rows of batches [2, 3]" in r.stderr, r.stderr[-2000:]
