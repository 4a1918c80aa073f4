"""The command line: bad input ends with one clear message, no traceback."""
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from videofusion_jax.data import pipeline

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
    ("--process_id=1", "jax.distributed.initialize(process_id=1) failed"),
    # The image stage leaves the residual generator untrained: its videos were noise but for the key frame.
    ("--mode=train_and_sample --config.train.stage=image", "--mode=train_and_sample with config.train.stage='image'"),
    # Evaluation ran to its end, then NumPy's generator refused the seed: no results written.
    ("--mode=eval --config.eval.seed=-1", "config.eval.seed=-1: a random seed must be an integer in [0, 4294967295]"),
    # A ZeroDivisionError inside validation.
    ("--config.model.base.head_dim=0", "config.model.base.head_dim=0: must be an integer >= 1"),
    # A CLIP directory on the learned encoder: a run without CLIP, its config.json recording the directory.
    ("--config.model.encoder.clip_dir=/nowhere/clip", "config.model.encoder.clip_dir='/nowhere/clip' is read by a "
     "CLIP key-frame encoder alone (model.encoder.kind='learned'): add --config.model.encoder.kind=clip"),
])
def test_bad_config_values(override, message, tmp_path):
  r = run_main("--config=configs/demo.py", *override.split(), workdir=tmp_path)
  assert r.returncode == 1
  assert message in r.stderr and "Traceback" not in r.stderr


def test_cudnn_attention_is_refused_where_its_kernels_would_refuse_the_heads_or_the_frames(monkeypatch):
  """cuDNN's fused attention takes heads whose width is a multiple of 8, at most 128 before Hopper and 256 from
  it, and trains attention with a bias (VDM*'s relative positions over the frames) on sequences of even length:
  elsewhere JAX raised NotImplementedError inside the first trace (the first train step, for VDM*'s odd frame
  counts), with its traceback. Checked here on stand-ins for an A100 and an H100 (no GPU in the suite)."""
  import types

  import jax
  import ucf101

  from videofusion_jax.config import ConfigError, check_cudnn_training, cudnn_head_widths, validate
  from videofusion_jax.training.step import Trainer

  def on(capability: str, **overrides):
    device = types.SimpleNamespace(platform="gpu", client=types.SimpleNamespace(platform_version="cuda 12080"),
                                   device_kind=f"NVIDIA sm_{capability}", compute_capability=capability)
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    c = ucf101.get_config(overrides.pop("variant", ""))
    c.model.update(attention_implementation="cudnn", dtype="bfloat16")
    for key, value in overrides.items():
      *path, last = key.split(".")
      node = c
      for part in path:
        node = node[part]
      node[last] = value
    validate(c)
    return c

  # ucf101: heads of 64 in every layer (the base's 512 to 1024 channels, the residual's 384 and 512), VDM*'s
  # temporal attention too.
  assert {w for w, _ in cudnn_head_widths(on("8.0"))} == {64}
  temporal = [w for w, where in cudnn_head_widths(on("9.0", variant="vdm")) if "temporal attention" in where]
  assert len(temporal) >= 3 and set(temporal) == {64}
  # head_dim=4 splits 512 to 1024 channels into heads of 4; 256 into heads wider than an A100 takes.
  with pytest.raises(ConfigError, match=re.escape("the base U-Net's attention over 512 channels (head_dim=4) has "
                                                  "heads of 4 channels") + ".* multiples of 8, at most 256"):
    on("9.0", **{"model.base.head_dim": 4})
  with pytest.raises(ConfigError, match=r"heads of 256 channels, .* at most 128 on this GPU \(NVIDIA sm_8.0\)"):
    on("8.0", **{"model.base.head_dim": 256})
  on("9.0", **{"model.base.head_dim": 256})
  # One head where the channels are fewer than head_dim: the residual's 36 x 3 = 108 at 8 x 8, and its middle's.
  with pytest.raises(ConfigError, match=re.escape("the residual U-Net's attention over 108 channels (head_dim=128) "
                                                  "has heads of 108 channels")):
    on("9.0", **{"model.residual.base_channels": 36, "model.residual.channel_mult": (1, 2, 3, 3),
                 "model.residual.head_dim": 128})
  # VDM* on an odd frame count: refused for training (the Trainer's check), not for sampling, which runs.
  odd = on("9.0", variant="vdm", **{"data.num_frames": 15})
  for check in (check_cudnn_training, lambda c: Trainer.check_work(types.SimpleNamespace(config=c, mesh=None))):
    with pytest.raises(ConfigError, match="kind='vdm' and config.data.num_frames=15: cuDNN trains attention with a "
                                          "bias .* on sequences of even length only"):
      check(odd)
  check_cudnn_training(on("9.0", **{"data.num_frames": 15}))  # VideoFusion's attention has no bias


def test_workdir_is_required_but_for_embed():
  """--mode=embed writes beside the dataset (its help says the workdir is not used), yet it was refused without
  one; the other modes need it, and say what it is."""
  cmd = [sys.executable, "-m", "videofusion_jax.main", "--config=configs/demo.py"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "--workdir is required" in r.stderr and "Traceback" not in r.stderr
  r = subprocess.run([*cmd, "--mode=embed"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and "--workdir" not in r.stderr  # past the flags: the config's own problem
  assert "--mode=embed stores CLIP frame embeddings: it needs --config.model.encoder.kind=clip" in r.stderr


def test_the_config_file_after_a_space_under_a_home_path_or_given_twice(tmp_path):
  """``--config FILE`` (absl takes it) and ``--config=~/FILE`` get the checks and messages of ``--config=FILE`` (the
  first gave a misspelled override as a KeyError's repr, the second config_flags' failure to load '~/...'); a
  second ``--config`` is one message (absl's was that every override is defined twice)."""
  import shutil
  home = tmp_path / "home"
  home.mkdir()
  shutil.copy(ROOT / "configs" / "demo.py", home / "demo.py")
  misspelled = ("error: --config.train.batch_sz: the config has no such field; did you mean "
                "--config.train.batch_size?")
  for args, message in (
      (["--config", "configs/demo.py", "--config.train.batch_sz=4"], misspelled),
      (["--config=~/demo.py", "--config.diffusion.lam=1.5"], "error: config.diffusion.lam=1.5: λ is the base-noise "),
      (["--config", "configs/nosuch.py"], "error: --config=configs/nosuch.py: no such file (configs here: "),
      (["--config=configs/demo.py", "--config=configs/demo.py:unconditional", "--config.train.num_steps=10"],
       "error: --config is given 2 times (configs/demo.py, configs/demo.py:unconditional): give one config file (a "
       "variant as --config=FILE:VARIANT)."),
  ):
    r = subprocess.run([sys.executable, "-m", "videofusion_jax.main", *args, f"--workdir={tmp_path / 'run'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(home)})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and errors[0].startswith(message), (args, r.stderr)
  assert not (tmp_path / "run").exists()


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


def test_sampler_settings_that_would_give_wrong_samples_are_refused(tmp_path):
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
  # A schedule whose last step still holds much of the signal, where sampling starts from pure noise: the linear
  # schedules' betas are DDPM's for T=1000, unscaled (ucf101's linear at T=100: √ᾱ_99 = 0.60; a perfect ε
  # sampled a N(0.5, 0.2²) data set as mean 0.42, sd 0.24). The figure is the schedule's own ᾱ. A new training
  # run is refused it, before anything is written; a run trained so before is sampled with a warning (refusing it
  # there left no way forward: its record refuses any other num_timesteps).
  from videofusion_jax.config import schedule_end_problem, schedule_end_warning
  from videofusion_jax.training.loop import train

  assert f"√ᾱ = {float(make_schedule('linear', 100).sqrt_alphas_cumprod[99]):.2f}" == "√ᾱ = 0.60"
  short = demo.get_config()
  short.diffusion.update(schedule="linear", num_timesteps=100)
  short.sample.update(num_steps=50, spacing="trailing")
  validate(short)
  said = "config.diffusion.num_timesteps=100 with schedule='linear': its last step (t=99) still holds √ᾱ = 0.60"
  assert schedule_end_problem(short).startswith(said) and schedule_end_warning(short) == "warning: " + \
      schedule_end_problem(short)
  with pytest.raises(ConfigError, match=re.escape(said)):
    train(short, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  prior = demo.get_config()
  prior.model.prior.update(schedule="scaled_linear", num_timesteps=250)
  assert schedule_end_problem(prior).startswith("config.model.prior.num_timesteps=250 with schedule='scaled_linear'")
  for kind, steps in (("linear", 1000), ("scaled_linear", 1000), ("cosine", 50)):
    ok = demo.get_config()
    ok.diffusion.update(schedule=kind, num_timesteps=steps)
    assert schedule_end_problem(ok) == "" and schedule_end_warning(ok) is None
  for where, value in (("diffusion__num_timesteps", 1), ("diffusion__num_timesteps", 0)):
    assert f"config.diffusion.num_timesteps={value}: the diffusion's steps, an integer >= 2" in refused(
        **{where: value, "sample__num_steps": 1})  # a traceback from the schedule, or blamed on num_steps


def test_a_config_short_of_fields_or_not_a_configdict_is_one_message(tmp_path):
  """A section built by hand (a U-Net's fields without unet_config) and a config file returning a dict: one
  message naming what is missing (they were tracebacks: a KeyError deep in the model, an AttributeError)."""
  import ml_collections

  from videofusion_jax.config import ConfigError, validate

  c = tiny_config()
  c.model.base = ml_collections.ConfigDict(dict(base_channels=8, channel_mult=(1, 2)))
  with pytest.raises(ConfigError, match=re.escape("config.model.base has no field 'attention_resolutions' (build it "
                                                  "with unet_config(...))")):
    validate(c)
  config = tmp_path / "plain.py"
  config.write_text("def get_config():\n  return {'seed': 0, 'compilation_cache_dir': ''}\n")
  r = run_main(f"--config={config}", workdir=tmp_path / "run")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "error: the config file's get_config() returned a dict, not an ml_collections.ConfigDict" in r.stderr
  assert not (tmp_path / "run").exists()


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
      ("train.profile_steps", (3, 2), "config.train.profile_steps=(3, 2): the steps to trace with jax.profiler, as "
       "(first, last) with 1 <= first <= last"),
      ("train.profile_steps", (0, 2), "config.train.profile_steps=(0, 2): the steps to trace"),
      ("train.profile_steps", (5,), "config.train.profile_steps=(5,): the steps to trace"),
      ("train.label_dropout", 1.5, "config.train.label_dropout=1.5: the share of examples"),
      # At 1 no example sees its condition: the label embeddings and the key-frame encoder never train.
      ("train.label_dropout", 1.0, "config.train.label_dropout=1.0: the share of examples trained on the null "
       "condition; must lie in [0, 1)"),
      ("sharding_rules", (("batch", ("dta", "fsdp")),), "config.sharding_rules: ('batch', ('dta', 'fsdp')) names "
       "'dta', not an axis of the mesh (data, fsdp"),
      # A misspelled logical axis: its weights left unsharded, without a word.
      ("sharding_rules", (("channel_out", "fsdp"),), "config.sharding_rules: ('channel_out', 'fsdp') maps no axis "
       "the networks name, so it would shard nothing; did you mean channels_out?"),
      ("sharding_rules", (("batch",),), "config.sharding_rules=(('batch',),): a table of (logical axis, mesh axes)"),
      # No rule for the batch, or one that splits it over nothing: every device ran the whole batch, without a word.
      ("sharding_rules", (("channels_out", "fsdp"),), "config.sharding_rules splits the 'batch' axis over no mesh "
       "axis (None): every device would compute the whole batch"),
      ("sharding_rules", (("batch", (None,)),), "splits the 'batch' axis over no mesh axis ((None,))"),
      # Flax takes a name's first rule: a later one that splits the batch does not count.
      ("sharding_rules", (("batch", None), ("batch", ("data", "fsdp"))), "splits the 'batch' axis over no mesh "
       "axis (None): every device would compute the whole batch, as slow on N devices as on one; map 'batch' to"),
      ("train.num_steps", 0, "config.train.num_steps=0: must be >= 1."),
      ("train.batch_size", None, "config.train.batch_size=None: give it a value (base_config()'s is 64)."),
      ("train.learning_rate", -1.0, "config.train.learning_rate=-1.0: must be a finite number >= 0"),
      ("train.weight_decay", float("nan"), "config.train.weight_decay=nan: must be a finite number >= 0"),
      # The optimizer clips every network's gradient on its own (optimizer.clip_each_by_global_norm).
      ("train.grad_clip", 0.0, "config.train.grad_clip=0.0: must be a finite number > 0 (each network's gradient is "
       "clipped to this global norm on its own: each generator's, the learned encoder's and the prior's)"),
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
               f"--config.data.manual_dir={tmp_path / 'nowhere'}", workdir=tmp_path / "run")
  assert r.returncode == 1 and "Traceback" not in r.stderr
  # One message: where it looked, the layout it expects, where the data comes from, the flags.
  assert f"{tmp_path / 'nowhere'} does not exist" in r.stderr and "UCF-101/" in r.stderr
  assert "crcv.ucf.edu" in r.stderr and "--config.data.manual_dir" in r.stderr
  assert not (tmp_path / "run").exists()  # the run's folders, empty, are removed (an empty checkpoints/ stayed)
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
  # Eight programs of a few KB each into a cache of 8 KB: the least recently used ones are removed. The limit is
  # set by a second call, after the cache was opened with the default one (JAX kept the first limit).
  code = ("import jax, jax.numpy as jnp\n"
          "from videofusion_jax.experiment import enable_compilation_cache\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
          f"enable_compilation_cache({str(tmp_path / 'small')!r})\n"
          "float(jax.jit(lambda x: jnp.cos(x) @ x.T)(jnp.ones((8, 8))).sum())\n"
          f"enable_compilation_cache({str(tmp_path / 'small')!r}, max_gb=8000 / 2**30)\n"
          "for k in range(8):\n"
          "  float(jax.jit(lambda x: jnp.sin(x) @ x.T + k)(jnp.ones((8, 8))).sum())\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  sizes = [p.stat().st_size for p in (tmp_path / "small").iterdir() if p.name.endswith("-cache")]
  assert 1 <= len(sizes) < 8 and 0 < sum(sizes) <= 8000, sizes
  # Called again in one process (a notebook's second run): programs go to the new folder, and '' ends the cache
  # (JAX opened its cache at the first compile and went on writing there, whatever the setting said).
  a, b = tmp_path / "a", tmp_path / "b"
  code = ("import jax, jax.numpy as jnp, pathlib\n"
          "from videofusion_jax.experiment import enable_compilation_cache\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
          f"for k, folder in enumerate([{str(a)!r}, {str(b)!r}, '']):\n"
          "  enable_compilation_cache(folder)\n"
          "  float(jax.jit(lambda x: jnp.sin(x) @ x.T + k)(jnp.ones((8, 8))).sum())\n"
          f"  print(*(len(list(pathlib.Path(d).glob('*-cache'))) for d in ({str(a)!r}, {str(b)!r})))\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  (a0, b0), (a1, b1), (a2, b2) = [tuple(map(int, line.split())) for line in r.stdout.splitlines()]
  assert a0 >= 1 and b0 == 0, r.stdout  # the first program in a
  assert a1 == a0 and b1 >= 1, r.stdout  # the second in b only
  assert (a2, b2) == (a1, b1), r.stdout  # the third nowhere
  code = "from videofusion_jax.experiment import enable_compilation_cache\nenable_compilation_cache('x', 0.0)\n"
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "config.compilation_cache_max_gb=0.0: must be > 0" in r.stderr
  # The command line turns the cache on before the config is validated: an infinite size is that one error line
  # too (it was OverflowError's traceback).
  r = run_main("--config=configs/demo.py", "--config.compilation_cache_max_gb=inf", workdir=tmp_path / "w_inf")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  assert "error: config.compilation_cache_max_gb=inf: must be > 0 and finite" in r.stderr
  (tmp_path / "a_file").write_text("")
  r = run_main("--config=configs/demo.py", f"--config.compilation_cache_dir={tmp_path / 'a_file' / 'x'}",
               workdir=tmp_path / "w")
  assert r.returncode == 1 and "config.compilation_cache_dir=" in r.stderr and "Traceback" not in r.stderr


def test_a_cloud_storage_cache_folder_goes_to_jax_as_it_is(tmp_path):
  """config.compilation_cache_dir=gs://bucket/path (a TPU pod's usual cache, one folder for every host) goes to JAX
  unchanged and without a size limit (JAX's eviction lock would be a local file named after the URL); nothing is
  created here (it was made into a local folder ./gs:/bucket/xla, of each host its own); a bucket out of reach,
  other URLs, and no package to reach Cloud Storage are one error line each; file:// is a local folder."""
  import json
  code = ("import importlib.util, json, os, jax\n"
          "from etils import epath\n"
          "from videofusion_jax.config import ConfigError\n"
          "from videofusion_jax.experiment import enable_compilation_cache\n"
          "made = []\n"
          "def mkdir(self, parents=False, exist_ok=False):  # Cloud Storage, without the network\n"
          "  if 'unreachable' in str(self):\n"
          "    raise OSError('Could not resolve host: www.googleapis.com')\n"
          "  made.append(str(self))\n"
          "type(epath.Path('gs://bucket/xla')).mkdir = mkdir\n"
          "from jax._src.compiler import get_compile_options\n"
          "def xla_caches():  # what JAX hands XLA: its GPU autotuning cache's folder, and the setting\n"
          "  options = get_compile_options(num_replicas=1, num_partitions=1)  # kept: its parts are views of it\n"
          "  folder = options.executable_build_options.debug_options.xla_gpu_per_fusion_autotune_cache_dir\n"
          "  return [folder, jax.config.jax_persistent_cache_enable_xla_caches]\n"
          "default = xla_caches()[1]\n"
          "out = [enable_compilation_cache('gs://bucket/xla'), jax.config.jax_compilation_cache_dir,\n"
          "       jax.config.jax_compilation_cache_max_size, sorted(os.listdir('.')), made, xla_caches(), default]\n"
          "enable_compilation_cache('local', 1.0)\n"
          "out.append(jax.config.jax_compilation_cache_max_size)\n"
          "out.append(xla_caches())\n"
          "out.append(enable_compilation_cache('file://' + os.path.abspath('there')))\n"
          "out.append([enable_compilation_cache('file://'), jax.config.jax_compilation_cache_dir])\n"
          "try:\n"
          "  enable_compilation_cache('gs://unreachable/xla')\n"
          "except ConfigError as e:\n"
          "  out.append(str(e))\n"
          "find = importlib.util.find_spec\n"
          "importlib.util.find_spec = lambda name, *a: None if name in ('tensorflow', 'gcsfs') else find(name, *a)\n"
          "for url in ('gcs://bucket/xla', 's3://bucket/xla', 'gs://', 'gs://bucket/xla'):\n"
          "  try:\n"
          "    enable_compilation_cache(url)\n"
          "  except ConfigError as e:\n"
          "    out.append(str(e))\n"
          "print(json.dumps(out))\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert r.returncode == 0, r.stderr
  (url, jax_dir, size, here, made, bucket_xla, default, local_size, local_xla, there, off,
   unreachable, *errors) = json.loads(r.stdout.splitlines()[-1])
  assert url == jax_dir == "gs://bucket/xla" and size == -1 and here == [], (url, jax_dir, size, here)
  assert made == ["gs://bucket/xla"]  # as JAX does at its first compile, where a bucket out of reach is one line
  # XLA's GPU autotuning cache, which JAX puts in its cache's folder, is off for a bucket (XLA cannot open gs://),
  # and back for a local folder.
  assert default and bucket_xla == ["", "none"], (bucket_xla, default)
  assert local_xla == [str(tmp_path / "local" / "xla_gpu_per_fusion_autotune_cache_dir"), default], local_xla
  assert local_size == 2**30 and there == str(tmp_path / "there") and (tmp_path / "there").is_dir()
  assert off == [None, None], off  # a bare file:// is no folder, not the current one
  assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "there"]
  assert unreachable == ("config.compilation_cache_dir='gs://unreachable/xla': cannot reach it (OSError: Could not "
                         "resolve host: www.googleapis.com); check this host's network and Google Cloud credentials, "
                         "or give a local or mounted folder, or '' to turn the cache off."), unreachable
  assert len(errors) == 4, errors
  for url, error in zip(("gcs://bucket/xla", "s3://bucket/xla"), errors):
    assert error.startswith(f"config.compilation_cache_dir={url!r}: of the URLs, only a Cloud Storage folder"), error
  assert errors[2] == "config.compilation_cache_dir='gs://': name the bucket, and a folder in it (gs://bucket/path)."
  assert "needs the gcsfs package (pip install gcsfs) or TensorFlow" in errors[3], errors[3]


def test_a_cloud_storage_cache_is_shared_by_every_host_without_a_marker(tmp_path, monkeypatch):
  """The check that the hosts share the cache's folder (process 0's side, its collectives given): a local folder
  gets a marker file, there while the others look, removed after; a bucket gets none (a token of zeros, which every
  host takes as seen: process 1, looking for process 0's marker in gs://, warned that it did not see it)."""
  import jax
  from jax.experimental import multihost_utils

  from videofusion_jax.experiment import hosts_not_sharing_cache
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  sent = []

  def broadcast(token):
    sent.append((token.copy(), sorted(p.name for p in (tmp_path / "cache").glob(".shared-by-every-host-*"))))
    return token
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda seen: np.array([seen, seen]))
  (tmp_path / "cache").mkdir()
  (tmp_path / "gs:" / "bucket" / "xla").mkdir(parents=True)  # as the earlier version made it, named by the URL
  assert hosts_not_sharing_cache(str(tmp_path / "cache")) == []
  assert hosts_not_sharing_cache("gs://bucket/xla") == []
  (local, markers), (bucket, none) = sent
  assert local.any() and markers == [f".shared-by-every-host-{local.tobytes().hex()}"], (local, markers)
  assert not bucket.any() and none == [], (bucket, none)
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
      "cache", "gs:", "gs:/bucket", "gs:/bucket/xla"]  # the marker removed, none in the bucket's namesake


def test_the_compile_log_tells_a_compile_from_a_cache_load(tmp_path):
  """experiment.CompileLog (the training log's "compiled in 5.1 s" or "loaded from the compilation cache in
  0.2 s"): one program compiled without a cache, compiled into an empty one (whose file it writes), then
  loaded from it once the in-memory caches are cleared, then found in memory."""
  import json
  code = ("import json, pathlib, jax, jax.numpy as jnp\n"
          "from videofusion_jax.experiment import CompileLog, enable_compilation_cache\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
          "x, logs = jnp.ones((8, 8)), []\n"
          "f = jax.jit(lambda x: jnp.sin(x) @ x.T)\n"
          "for folder in ('', CACHE, CACHE, CACHE):\n"
          "  enable_compilation_cache(folder)\n"
          "  if len(logs) < 3:\n"
          "    jax.clear_caches()\n"
          "  with CompileLog() as log:\n"
          "    f(x).block_until_ready()\n"
          "  files = len(list(pathlib.Path(CACHE).glob('*-cache')))\n"
          "  logs.append([log.hits, log.compiled, log.cached, log.compiled_s, log.loaded_s, log.describe(), files])\n"
          "print(json.dumps(logs))\n").replace("CACHE", repr(str(tmp_path / "cache")))
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  off, cold, warm, again = json.loads(r.stdout.splitlines()[-1])
  assert off[:3] == [0, 1, False] and off[3] > 0 and off[4] == 0 and off[6] == 0, off
  assert re.fullmatch(r"compiled in [0-9.]+ s, without a compilation cache", off[5]), off
  assert cold[:3] == [0, 1, True] and cold[3] > 0 and cold[4] == 0 and cold[6] == 1, cold  # its program written
  assert re.fullmatch(r"compiled in [0-9.]+ s", cold[5]), cold
  assert warm[:3] == [1, 0, True] and warm[3] == 0 and warm[4] > 0 and warm[6] == 1, warm  # read, nothing added
  assert re.fullmatch(r"loaded from the compilation cache in [0-9.]+ s", warm[5]), warm
  assert again[:2] == [0, 0] and again[3:5] == [0, 0] and again[5] == "already compiled in this process", again


def test_the_first_progress_line_of_sampling_says_what_xla_did(capsys):
  """Sampling's and evaluation's progress: the first line (its seconds hold the compile) says whether the batch's
  programs compiled or loaded from the compilation cache (it said "compile included"), and the ``with`` block
  leaves no monitoring listener behind, reported or not (an error before the first batch)."""
  import jax
  import jax.numpy as jnp
  from jax._src import monitoring

  from videofusion_jax.sampling import Progress
  listeners = len(monitoring.get_event_duration_listeners())
  f = jax.jit(lambda x: jnp.cos(x) * float(np.random.default_rng().uniform(2, 3)))  # never compiled before
  with Progress("videos", 2, every_s=0) as progress:
    f(jnp.ones(5)).block_until_ready()
    progress(1)
    progress(2)
  with Progress("clips", 1) as progress:
    f(jnp.ones(5)).block_until_ready()
    progress(1)
  with pytest.raises(ValueError), Progress("videos", 1):
    raise ValueError("before the first batch")
  with Progress("videos", 1, quiet=True) as progress:
    progress(1)
  assert len(monitoring.get_event_duration_listeners()) == listeners
  first, second, third = capsys.readouterr().out.splitlines()
  assert re.fullmatch(r"  videos: 1/2 \(\d+ s; compiled in [0-9.]+ s(, without a compilation cache)?\)", first), first
  assert re.fullmatch(r"  videos: 2/2 \([0-9.]+ videos/s, 0 s left\)", second), second
  assert re.fullmatch(r"  clips: 1/1 \(\d+ s; already compiled in this process\)", third), third


def test_a_host_stopped_alone_by_ctrl_c_tells_the_others(monkeypatch, capsys):
  """A second Ctrl-C stops its host at once, alone: on several hosts the others are told as of a failure
  (``sharding.report_failure``: they stop at once, where they waited for it in their next collective, then every
  host aborted at JAX's shutdown barrier), and a host whose others stopped leaves without that barrier. A stop
  every host agreed on (the first Ctrl-C, SIGTERM) tells nobody; one process has nobody to tell."""
  import signal

  from videofusion_jax import main
  from videofusion_jax.training import preemption, sharding
  assert sharding.report_failure("alone", what="was interrupted") is False  # one process: nobody to tell
  told, answer = [], [True]
  monkeypatch.setattr(sharding, "report_failure", lambda message, what: told.append((message, what)) or answer[0])
  handler = signal.getsignal(signal.SIGINT)

  def exit_now(code):
    raise SystemExit(("os._exit", code))
  monkeypatch.setattr(os, "_exit", exit_now)

  def ended(e):
    try:
      with pytest.raises(SystemExit) as stop:
        main._interrupted(e, "the checkpoints saved before are intact (rerun to resume)")
      # A third Ctrl-C while the others are told (seconds) is ignored: it ended the telling half done.
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
      signal.signal(signal.SIGINT, handler)
    return stop.value.code
  assert ended(KeyboardInterrupt()) == ("os._exit", 128 + signal.SIGINT)  # the others stopped: no barrier
  assert told == [("Ctrl-C stopped it at once; the checkpoints saved before are intact (rerun to resume)",
                   "was interrupted")]
  answer[0] = False  # one process, or the others failing too: the barrier, which every host reaches
  assert ended(KeyboardInterrupt()) == 128 + signal.SIGINT and len(told) == 2
  agreed = preemption.Interrupted("SIGTERM", how="every host stopped after the same batch")
  assert ended(agreed) == 128 + signal.SIGTERM and len(told) == 2
  assert "interrupted by SIGTERM: every host stopped after the same batch; the checkpoints" in capsys.readouterr().err


def test_the_compile_log_of_several_hosts_counts_the_other_hosts_that_compiled(monkeypatch):
  """On several processes the first step's line says what the other hosts did (their seconds of compiling
  and how many programs each compiled, one all-gather, here given as process 0 would receive it)."""
  import jax
  from jax.experimental import multihost_utils

  from videofusion_jax.experiment import CompileLog
  log = CompileLog()
  log.compiled_s, log.loaded_s, log.compiled, log.hits, log.cached = 0.2, 1.0, 0, 1, True
  here = "loaded from the compilation cache in 1.2 s here"
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  for others, said in (([[0.1, 0], [0.3, 0]], f"{here}; no other host compiled for 1 s or more"),
                       ([[14.94, 1], [0.3, 0]], f"{here}; 1 of the 2 other hosts compiled, 14.9 s at most"),
                       ([[2.0, 2], [1.2, 1]], f"{here}; 2 of the 2 other hosts compiled, 2.0 s at most")):
    rows = np.array([[log.compiled_s, log.compiled], *others], np.float32)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x, rows=rows: rows)
    assert log.describe_every_host() == said
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.array([[0.2, 0], [9.0, 1]], np.float32))
  assert log.describe_every_host() == f"{here}; the other host compiled, 9.0 s at most"


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


@pytest.mark.parametrize("overrides,message", [
    ({"seed": -3}, "config.seed=-3: a random seed must be an integer in [0, 4294967295]"),
    ({"sample.seed": -1}, "config.sample.seed=-1: a random seed"),
    ({"eval.seed": 2**32}, "config.eval.seed=4294967296: a random seed"),  # JAX's key of seed 0
    ({"model.base.head_dim": 0}, "config.model.base.head_dim=0: must be an integer >= 1"),  # was ZeroDivisionError
    ({"model.residual.num_res_blocks": 0}, "config.model.residual.num_res_blocks=0: must be an integer >= 1"),
    ({"model.base.dropout": 1.0}, "config.model.base.dropout=1.0: the share of activations dropped in training "
     "must lie in [0, 1)"),
    ({"model.residual.dropout": 1.5}, "config.model.residual.dropout=1.5: the share of activations dropped"),
    ({"model.base.dropout": -0.5}, "config.model.base.dropout=-0.5: the share of activations dropped"),
    # tiny_config's U-Nets at 8x8: the base two levels deep (feature maps of 8 and 4), the residual one (8).
    ({"model.base.attention_resolutions": (32,)}, "config.model.base.attention_resolutions=(32,): at "
     "config.data.image_size=8 the U-Net's feature maps have the sizes [8, 4], so [32] would get no attention"),
    ({"model.residual.attention_resolutions": (8, 2)}, "config.model.residual.attention_resolutions=(8, 2): at "
     "config.data.image_size=8 the U-Net's feature maps have the sizes [8], so [2] would get no attention"),
    # VDM*'s spatial attention (the base generator's U-Net, made space-time).
    ({"model.kind": "vdm", "diffusion.lam": 0.0, "model.base.attention_resolutions": (16,)},
     "config.model.base.attention_resolutions=(16,): at config.data.image_size=8"),
    # The learned encoder's, which failed at network init (ZeroDivisionError).
    ({"model.encoder.base_channels": 0}, "config.model.encoder.base_channels=0: the learned encoder's width"),
    ({"model.encoder.channel_mult": (0,)}, "config.model.encoder.channel_mult=(0,): one positive integer per level"),
    # OverflowError where the cache's size limit is set.
    ({"compilation_cache_dir": "/tmp/cache", "compilation_cache_max_gb": float("inf")},
     "config.compilation_cache_max_gb=inf: the persistent compilation cache's size limit in GiB must be a finite "
     "number > 0"),
    ({"compilation_cache_dir": "/tmp/cache", "compilation_cache_max_gb": float("nan")},
     "config.compilation_cache_max_gb=nan: the persistent compilation cache's size limit"),
])
def test_seeds_networks_and_cache_size_are_validated(overrides, message):
  """Each refused by validation with one message (before: a late crash, a raw traceback, or a network
  that silently differs from its config)."""
  from videofusion_jax.config import ConfigError, validate

  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(tiny_config(**overrides))


def test_the_limits_of_those_settings_pass():
  """The edges of each range above are valid, and fields a model does not use are not checked."""
  from videofusion_jax.config import validate

  validate(tiny_config(**{"seed": 0, "sample.seed": 2**32 - 1, "eval.seed": 2**32 - 1, "model.base.dropout": 0.0,
                          "model.residual.dropout": 0.99, "model.base.attention_resolutions": (8, 4),
                          "model.residual.attention_resolutions": ()}))
  # A frozen encoder has no width or levels; the cache's size means nothing with the cache off.
  validate(tiny_config(**{"model.encoder.kind": "frozen", "model.encoder.embed_dim": 49,
                          "model.encoder.base_channels": 0, "model.encoder.channel_mult": (0,),
                          "compilation_cache_dir": "", "compilation_cache_max_gb": float("inf")}))
  # VDM* builds no residual generator.
  validate(tiny_config(**{"model.kind": "vdm", "diffusion.lam": 0.0, "model.residual.dropout": 1.5,
                          "model.residual.attention_resolutions": (32,), "model.residual.num_res_blocks": 0}))


def test_misspelled_fields_in_a_config_file_are_refused(tmp_path):
  """A config file that sets a misspelled field added it as a new one, which nothing read, and the field
  meant kept its default: refused, naming it and the nearest field, in validation, in unet_config,
  and on the command line as one line; every shipped config passes."""
  import demo
  import sky_timelapse
  import taichi
  import ucf101
  import webvid

  from videofusion_jax.config import ConfigError, unet_config, validate

  c = demo.get_config()
  c.train.update(warmup_step=5)
  with pytest.raises(ConfigError, match=re.escape("config.train.warmup_step=5: the config has no such field")
                     + ".*" + re.escape("did you mean config.train.warmup_steps?")):
    validate(c)
  c = demo.get_config()
  c.model.base.num_res_block = 3
  with pytest.raises(ConfigError, match=re.escape("config.model.base.num_res_block=3: the config has no such field")
                     + ".*" + re.escape("did you mean config.model.base.num_res_blocks?")):
    validate(c)
  c = demo.get_config()
  c.modle = c.model  # a whole section: named, without its contents
  with pytest.raises(ConfigError, match=re.escape("config.modle: the config has no such field") + ".*"
                     + re.escape("did you mean config.model?")):
    validate(c)
  with pytest.raises(ConfigError, match=re.escape("unet_config(num_res_block=...): a U-Net has no field "
                                                  "'num_res_block'") + ".*did you mean num_res_blocks\\?"):
    unet_config(num_res_block=3)
  with pytest.raises(KeyError, match=re.escape("tiny_config(train.warmup_step=...): the config has no such field")):
    tiny_config(**{"train.warmup_step": 5})
  for module, variants in ((demo, ("", "unconditional", "vdm", "text")), (ucf101, ("", "small", "vdm", "vdm_small")),
                           (webvid, ("", "small")), (taichi, ("",)), (sky_timelapse, ("",))):
    for variant in variants:
      validate(module.get_config(variant))
  for body, message in (
      ("c.train.update(warmup_step=5)", "error: config.train.warmup_step=5: the config has no such field"),
      ("c.model.base = unet_config(num_res_block=3)", "unet_config(num_res_block=...): a U-Net has no field")):
    path = tmp_path / "misspelled.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'configs')!r})\nimport demo\n"
                    "from videofusion_jax.config import unet_config\n\n\ndef get_config():\n"
                    f"  c = demo.get_config()\n  {body}\n  return c\n")
    r = run_main(f"--config={path}", workdir=tmp_path / "w")
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_sampling_refuses_a_head_dim_or_image_size_other_than_training(tmp_path):
  """No parameter's shape depends on head_dim (qkv maps c channels to 3c however they split into heads) or on
  the image size, so restoring cannot tell: the recorded config.json's values are compared, for sampling
  (TRAINED_FIELDS) and for train.init_base_from (BASE_FIELDS, with the encoder that gives the base's c; not the
  image size there)."""
  import json

  import jax

  from videofusion_jax.config import ConfigError
  from videofusion_jax.models.factory import boxed_abstract_params, make_networks
  from videofusion_jax.sampling import check_trained_config
  from videofusion_jax.training.loop import check_base_source, check_resumed_config

  config = tiny_config()
  other = tiny_config(**{"model.base.head_dim": 4})  # 2 heads of 8 channels in the middle attention, or 4 of 4
  shapes = lambda c: jax.tree.map(lambda x: x.shape, boxed_abstract_params(make_networks(c), c))  # noqa: E731
  assert shapes(other) == shapes(config)  # the premise: weights of either restore into the other

  def record(trained_config, **changes):
    """A workdir whose config.json is ``trained_config``'s with ``changes`` (dotted keys)."""
    trained = trained_config.to_dict()
    for key, value in changes.items():
      *path, last = key.split(".")
      node = trained
      for part in path:
        node = node[part]
      node[last] = value
    workdir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(trained))
    return str(workdir)

  check_trained_config(config, record(config))
  for key, value, now in (("model.base.head_dim", 4, 8), ("model.residual.head_dim", 2, 8),
                          ("data.image_size", 16, 8)):
    with pytest.raises(ConfigError, match=re.escape(f"config.{key}={now} (trained with {value})") + ".*"
                       + re.escape(f"--config.{key}={value}")):
      check_trained_config(config, record(config, **{key: value}))
  # Nor the clip stride: the real clips the samples are measured against are read at this config's, on the same
  # dataset (another dataset has its own).
  with pytest.raises(ConfigError, match=re.escape(f"config.data.frame_stride=2 ({tmp_path}") + ".* was trained on "
                     + re.escape(f"{config.data.name} with 4)") + ".*" + re.escape("--config.data.frame_stride=4.")):
    check_trained_config(config, record(config, **{"data.frame_stride": 4}))
  check_trained_config(config, record(config, **{"data.frame_stride": 4, "data.name": "ucf101"}))
  # Only the demo's samples are measured against real clips: elsewhere sampling reads no stride.
  ucf = tiny_config(**{"data.name": "ucf101/64"})
  check_trained_config(ucf, record(ucf, **{"data.frame_stride": 4}))
  # VDM* has no residual generator: its recorded head_dim means nothing to it.
  vdm = tiny_config(**{"model.kind": "vdm", "diffusion.lam": 0.0})
  check_trained_config(vdm, record(vdm, **{"model.residual.head_dim": 2}))
  with pytest.raises(ConfigError, match=re.escape("config.model.base.head_dim=8 (trained with 4)")):
    check_trained_config(vdm, record(vdm, **{"model.base.head_dim": 4}))
  # init_base_from: the base's head_dim, and the encoder whose c the base and prior taken were trained on.
  for key, value, now in (("model.base.head_dim", 4, 8), ("model.encoder.kind", "frozen", "learned")):
    source = record(config, **{key: value})
    with pytest.raises(ConfigError, match=re.escape(f"config.{key}={now!r} (that run's {value!r})")):
      check_base_source(tiny_config(**{"train.init_base_from": source}))
  check_base_source(tiny_config(**{"train.init_base_from": record(config, **{"model.residual.head_dim": 2})}))
  # A base trained at another image size is fine-tuned at this one (progressive resolution), not refused.
  check_base_source(tiny_config(**{"train.init_base_from": record(config, **{"data.image_size": 16})}))
  # A resumed run: the encoder too (training runs it, and both generators and the prior learn its c; a frozen
  # or CLIP encoder has no parameters whose shapes would tell another one).
  frozen = tiny_config(**{"model.encoder.kind": "frozen", "model.encoder.frozen_name": "pixels",
                          "model.encoder.embed_dim": 49})
  for trained_config in (config, frozen):
    check_resumed_config(trained_config, Path(record(trained_config)))
  for trained_config, key, value, now in ((config, "model.encoder.kind", "frozen", "learned"),
                                          (frozen, "model.encoder.frozen_name", "grey", "pixels")):
    with pytest.raises(ConfigError, match=re.escape(f"config.{key}={now!r} (trained with {value!r})") + ".*"
                       + re.escape(f"--config.{key}={value}")):
      check_resumed_config(trained_config, Path(record(trained_config, **{key: value})))


def test_a_full_disk_names_the_folders_written_to_when_the_error_names_no_file(tmp_path):
  """numpy, zipfile and TFDS writes raise ENOSPC with no filename: the line names the run's folders."""
  from videofusion_jax.main import _os_error
  config = tiny_config(**{"data.data_dir": str(tmp_path / "data"), "compilation_cache_dir": "~/cache"})
  with pytest.raises(OSError) as e, open("/dev/full", "wb") as f:  # a real full disk: every write fails
    np.save(f, np.zeros(1 << 16))
  assert e.value.filename is None
  line = _os_error(e.value, config, str(tmp_path / "run"))
  assert line == ("[Errno 28] No space left on device: a disk (or quota) this run writes to is full (the workdir "
                  f"{tmp_path / 'run'}; the datasets' data_dir {tmp_path / 'data'}; the compilation cache "
                  f"{Path('~/cache').expanduser()}). Free space there and rerun."), line
  # The datasets' default folder when data_dir is '', and a full quota alike.
  quota = _os_error(OSError(errno.EDQUOT, "Disk quota exceeded"), tiny_config(**{"data.data_dir": ""}), "/w")
  assert f"the datasets' data_dir {pipeline.default_data_dir()};" in quota and "the workdir /w;" in quota
  # An error that names its file says enough as it is.
  named = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "samples.npz"))
  assert _os_error(named, config, str(tmp_path / "run")) == str(named)
