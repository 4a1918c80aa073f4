"""The command line: bad input ends with one clear message, no traceback."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args, workdir, env=None):
  if not any(a.startswith("--config.compilation_cache_dir=") for a in args):
    # The suite's XLA cache (conftest.py), never the user's: main.py points its process's cache there.
    args = (*args, f"--config.compilation_cache_dir={os.environ.get('VIDEOFUSION_TESTS_XLA_CACHE', '')}")
  cmd = [sys.executable, "-m", "videofusion_jax.main", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=None if env is None else {**os.environ, **env})


@pytest.mark.parametrize("override,message", [
    ("--config.diffusion.lam=1.5", "config.diffusion.lam=1.5: λ is the base-noise share"),
    ("--config.model.encoder.kind=frozen", "the frozen encoder 'pixels' gives embeddings of width 49; set "
     "--config.model.encoder.embed_dim=49"),
    ("--config.data.num_classes=0 --config.sample.label=1",
     "config.sample.label=1: use -1 (every class in turn); this config is unconditional"),
    ("--config.data.num_frames=1", "config.data.num_frames=1: VideoFusion needs at least 2"),
    ("--config.data.image_size=17", "image size 17 cannot be downsampled"),
    ("--config.sample.guidance_scale=-1", "config.sample.guidance_scale=-1.0: must be >= 0"),
    ("--config.model.base.head_dim=40", "config.model.base.head_dim=40: attention over 96 channels"),
    ("--config.sample.num_steps=600", "config.sample.num_steps=600 with config.sample.spacing='leading' starts the "
     "chain at t=599 of 1000"),
    # cuDNN's attention where JAX would fail inside the first trace (float32; no NVIDIA GPU here).
    ("--config.model.attention_implementation=cudnn", "with config.model.dtype='float32': cuDNN's fused attention "
     "takes bfloat16 or float16"),
    ("--config.model.attention_implementation=cudnn --config.model.dtype=bfloat16",
     "cuDNN's fused attention needs an NVIDIA GPU and this run's devices are 'cpu'"),
    # An unquoted value with spaces: the words after the first were dropped (the prompt 'a').
    ("--config.sample.prompt=a dog runs", "unexpected arguments 'dog runs': every setting is a --flag"),
    # A process id without --multihost ran alone, as process 0, in the shared workdir.
    ("--process_id=1 --num_processes=2", "jax.distributed.initialize(num_processes=2, process_id=1) failed"),
    # The image stage leaves the residual generator untrained: its videos were noise but for the key frame.
    ("--mode=train_and_sample --config.train.stage=image", "--mode=train_and_sample with config.train.stage='image'"),
])
def test_bad_config_values(override, message, tmp_path):
  r = run_main("--config=configs/demo.py", *override.split(), workdir=tmp_path)
  assert r.returncode == 1
  assert message in r.stderr and "Traceback" not in r.stderr


def test_workdir_is_required_but_for_embed():
  """--mode=embed writes beside the dataset (its help says the workdir is not used), yet it was refused without
  one; the other modes need it, and say what it is."""
  cmd = [sys.executable, "-m", "videofusion_jax.main", "--config=configs/demo.py"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "--workdir is required" in r.stderr and "Traceback" not in r.stderr
  r = subprocess.run([*cmd, "--mode=embed"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "--workdir" not in r.stderr  # past the flags: the config's own problem
  assert "--mode=embed stores CLIP frame embeddings: it needs --config.model.encoder.kind=clip" in r.stderr


def test_train_and_sample_checks_what_sampling_reads_before_training(tmp_path):
  """A text model's missing prompt, or a given embeddings file that cannot be read, stopped the run only after
  every training step."""
  for args, message in (
      (("--config=configs/demo.py:text", "--config.sample.prompts_file="),
       "this model generates from text: give --config.sample.prompt="),
      (("--config=configs/demo.py", f"--config.sample.embeddings={tmp_path / 'none.npy'}"),
       "config.sample.embeddings=")):
    workdir = tmp_path / "run"
    r = run_main(*args, "--mode=train_and_sample", workdir=workdir)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "step " not in r.stdout and not (workdir / "checkpoints").exists()


def test_configs_without_variants_say_so():
  import sky_timelapse
  import taichi

  for module, name in ((taichi, "taichi"), (sky_timelapse, "sky_timelapse")):
    assert module.get_config().data.name == module.get_config("").data.name == f"{name}/64"
    with pytest.raises(ValueError, match=f"configs/{name}.py has no variant 'small'"):
      module.get_config("small")


def test_sampler_settings_that_would_give_wrong_samples_are_refused():
  """A DDIM chain must start where its noise holds about no signal (√ᾱ at its first step, against the
  schedule's ᾱ), η lies in [0, 1], guidance scales are finite and have a condition to guide by, and the
  writer's fps and upscale are >= 1."""
  import demo

  from videofusion_jax.config import ConfigError, validate
  from videofusion_jax.diffusion import ddim_timesteps, make_schedule
  from videofusion_jax.diffusion.samplers import start_signal

  for kind, steps, spacing in [("cosine", 600, "leading"), ("cosine", 10, "leading"), ("linear", 3, "leading"),
                               ("cosine", 1, "trailing"), ("scaled_linear", 10, "leading")]:
    t = int(ddim_timesteps(1000, steps, spacing)[0])
    assert start_signal(kind, 1000, steps, spacing) == (t, pytest.approx(
        float(make_schedule(kind, 1000).sqrt_alphas_cumprod[t]), rel=1e-5))

  def refused(**overrides):
    c = demo.get_config()  # cosine, T = 1000 for both the generators and the prior
    for key, value in overrides.items():
      section, field = key.split("__")
      c[section][field] = value
    with pytest.raises(ConfigError) as e:
      validate(c)
    return str(e.value)

  validate(demo.get_config())  # 250 leading steps start at t=996; the prior's 64 at t=945 (√ᾱ 0.08)
  assert "t=599 of 1000" in refused(sample__num_steps=600) and "√ᾱ_t = 0.58" in refused(sample__num_steps=600)
  assert "t=900 of 1000" in refused(sample__num_steps=10)  # √ᾱ 0.16: leading's known flaw at few steps
  assert "t=0 of 1000" in refused(sample__num_steps=1)
  assert "config.sample.prior_num_steps=2 with config.sample.prior_spacing='leading'" in refused(
      sample__prior_num_steps=2)
  ok = demo.get_config()
  ok.sample.update(num_steps=10, spacing="trailing", prior_num_steps=2, prior_spacing="trailing")
  validate(ok)
  ok.sample.update(method="ddpm", num_steps=1000, spacing="leading")  # DDPM runs every timestep
  validate(ok)
  for field, value in [("eta", -1.0), ("eta", float("nan")), ("prior_eta", 1.5)]:
    assert f"config.sample.{field}={value!r}: DDIM's η must lie in [0, 1]" in refused(**{f"sample__{field}": value})
  assert "must be a finite number" in refused(sample__guidance_scale=float("nan"))
  assert "must be a finite number" in refused(sample__prior_guidance_scale=float("inf"))
  for field in ("fps", "upscale", "num_real_clips"):
    assert f"config.sample.{field}=0: must be an integer >= 1" in refused(**{f"sample__{field}": 0})
  assert "config.sample.prior_spacing='middle'" in refused(sample__prior_spacing="middle")
  # Guidance where there is no condition to guide by (the sidecar would record a scale never applied).
  assert "this model is unconditional" in refused(model__condition="label", data__num_classes=0,
                                                  sample__guidance_scale=3.0)
  assert "this prior is on nothing" in refused(data__num_classes=0, sample__prior_guidance_scale=2.0)
  given = demo.get_config()  # given embeddings: the prior does not run, its guidance scale is not read
  given.data.num_classes, given.sample.prior_guidance_scale, given.sample.embeddings = 0, 2.0, "c.npy"
  validate(given)


def test_training_settings_that_would_lose_checkpoints_or_fail_late_are_refused():
  """Each refused by validation, before anything runs: keep_checkpoints=0 (Orbax would keep none: the first
  save would delete every checkpoint), intervals of 0 (a modulo by zero after the compile), a mesh the
  devices cannot make, and values read nowhere else."""
  from videofusion_jax.config import ConfigError
  from videofusion_jax.experiment import Experiment

  for key, value, message in [
      ("train.keep_checkpoints", 0, "config.train.keep_checkpoints=0: the checkpoints kept on disk"),
      ("train.checkpoint_every", 0, "config.train.checkpoint_every=0: the steps between checkpoints"),
      ("train.log_every", 0, "config.train.log_every=0: the steps between log lines"),
      ("train.label_dropout", 1.5, "config.train.label_dropout=1.5: the share of examples"),
      ("train.learning_rate", -1.0, "config.train.learning_rate=-1.0: must be a finite number >= 0"),
      ("train.weight_decay", float("nan"), "config.train.weight_decay=nan: must be a finite number >= 0"),
      ("data.num_classes", -1, "config.data.num_classes=-1: the dataset's class count"),
      ("model.residual.channel_mult", (), "config.model.residual.channel_mult=(): one positive integer per"),
      ("mesh.fsdp", 0, "config.mesh.fsdp=0: the devices along the mesh's 'fsdp' axis"),
      ("mesh.fsdp", -1, "config.mesh.data and config.mesh.fsdp are both -1"),
      ("mesh.data", 3, "config.mesh data=3, fsdp=1 does not cover the 8 devices"),
  ]:
    with pytest.raises(ConfigError, match=re.escape(message)):
      Experiment(tiny_config(**{key: value}))


def test_missing_dataset_and_missing_checkpoint(tmp_path):
  r = run_main("--config=configs/ucf101.py", f"--config.data.data_dir={tmp_path}",
               f"--config.data.manual_dir={tmp_path / 'nowhere'}", workdir=tmp_path)
  assert r.returncode == 1 and "Traceback" not in r.stderr
  # One message: where it looked, the layout it expects, where the data comes from, the flags.
  assert f"{tmp_path / 'nowhere'} does not exist" in r.stderr and "UCF-101/" in r.stderr
  assert "crcv.ucf.edu" in r.stderr and "--config.data.manual_dir" in r.stderr
  r = run_main("--config=configs/demo.py", "--mode=sample", workdir=tmp_path / "empty")
  assert r.returncode == 1 and "empty does not exist: train first" in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "empty").exists()  # sampling creates nothing where there is nothing
  (tmp_path / "empty").mkdir()
  r = run_main("--config=configs/demo.py", "--mode=sample", workdir=tmp_path / "empty")
  assert r.returncode == 1 and "no checkpoint in" in r.stderr and "Traceback" not in r.stderr
  assert list((tmp_path / "empty").iterdir()) == []
  # A workdir given as ~/... (a shell leaves the ~ of --workdir=~/... alone) is the one in the home folder,
  # for every mode, not a folder named ~ in the current one.
  r = run_main("--config=configs/demo.py", "--mode=sample", workdir="~/empty", env={"HOME": str(tmp_path)})
  assert r.returncode == 1 and f"no checkpoint in {tmp_path / 'empty' / 'checkpoints'}" in r.stderr, r.stderr
  r = run_main("--config=configs/demo.py", workdir="")
  assert r.returncode == 1 and "error: --workdir is empty" in r.stderr and "Traceback" not in r.stderr


def test_persistent_compilation_cache(tmp_path):
  """config.compilation_cache_dir: compiled programs land there (so a rerun loads them); an
  unusable path is a config error naming the field."""
  code = ("import jax, jax.numpy as jnp\n"
          "from videofusion_jax.experiment import enable_compilation_cache\n"
          f"print(enable_compilation_cache({str(tmp_path / 'cache')!r}))\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
          "print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum()))\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines()[0] == str(tmp_path / "cache")
  assert any(p.name.endswith("-cache") for p in (tmp_path / "cache").iterdir())
  assert (tmp_path / "cache" / ".lockfile").exists()  # the size limit turns on JAX's file lock
  # Eight programs of a few KB each into a cache of 8 KB: the least recently used ones are removed.
  code = ("import jax, jax.numpy as jnp\n"
          "from videofusion_jax.experiment import enable_compilation_cache\n"
          f"enable_compilation_cache({str(tmp_path / 'small')!r}, max_gb=8000 / 2**30)\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
          "for k in range(8):\n"
          "  float(jax.jit(lambda x: jnp.sin(x) @ x.T + k)(jnp.ones((8, 8))).sum())\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  sizes = [p.stat().st_size for p in (tmp_path / "small").iterdir() if p.name.endswith("-cache")]
  assert 1 <= len(sizes) < 8 and 0 < sum(sizes) <= 8000, sizes
  code = "from videofusion_jax.experiment import enable_compilation_cache\nenable_compilation_cache('x', 0.0)\n"
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "config.compilation_cache_max_gb=0.0: must be > 0" in r.stderr
  (tmp_path / "a_file").write_text("")
  r = run_main("--config=configs/demo.py", f"--config.compilation_cache_dir={tmp_path / 'a_file' / 'x'}",
               workdir=tmp_path / "w")
  assert r.returncode == 1 and "config.compilation_cache_dir=" in r.stderr and "Traceback" not in r.stderr


def test_a_recorded_config_is_compared_under_a_home_path_and_only_on_fields_the_model_has(tmp_path, monkeypatch):
  """The record of a run given as ~/run is found (its checkpoints are: the check was skipped silently); a
  model without a prior is not refused for its recorded prior settings, which mean nothing to it."""
  import json

  from videofusion_jax.config import TRAINED_FIELDS, ConfigError, check_against_record, recorded_config

  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "run").mkdir()
  trained = json.loads(tiny_config(**{"diffusion.num_timesteps": 500}).to_json_best_effort())
  (tmp_path / "run" / "config.json").write_text(json.dumps(trained))
  record, found = recorded_config("~/run")
  assert record == tmp_path / "run" / "config.json" and found == trained
  with pytest.raises(ConfigError, match=re.escape("config.diffusion.num_timesteps=1000 (trained with 500)")):
    check_against_record(tiny_config(), found, TRAINED_FIELDS, "trained with", "why", "otherwise")
  # The label model (no encoder, no prior) against a record whose prior differs: nothing to refuse; with a
  # prior, refused.
  label = tiny_config(**{"model.condition": "label"})
  found = json.loads(label.to_json_best_effort())
  found["model"]["prior"]["schedule"] = "linear" if label.model.prior.schedule != "linear" else "cosine"
  found["model"]["condition"] = "label"
  check_against_record(label, found, TRAINED_FIELDS, "trained with", "why", "otherwise")
  found["model"]["condition"] = tiny_config().model.condition
  with pytest.raises(ConfigError, match="config.model.prior.schedule="):
    check_against_record(tiny_config(), found, TRAINED_FIELDS, "trained with", "why", "otherwise")
