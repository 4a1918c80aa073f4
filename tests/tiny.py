"""The tiny config of the tests, importable without conftest's side effects (a config file
for subprocess runs: ``tiny_config_file``)."""
import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def tiny_config(**overrides):
  """The demo config shrunk to 8x8, 4 frames, 8 channels: compiles in seconds on a CPU. The
  key-frame embedding and the prior (on the clip id), as the paper."""
  import demo

  from videofusion_jax.config import unet_config

  c = demo.get_config()
  c.data.update(num_frames=4, image_size=8, frame_stride=2)
  c.model.base = unet_config(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(4,), head_dim=8)
  # The residual generator and the encoder one level deep, the prior one layer: what the tests check of them
  # holds at any depth, and each level or layer is compiled again in every run a test starts (the step compiled
  # in ~7 s instead of ~11 s; benchmarks/RESULTS.md, "The tiny model made smaller"). The base keeps two levels
  # and its attention: the sharded down- and up-sampling paths, and where VDM* puts its temporal attention.
  c.model.residual = unet_config(base_channels=8, channel_mult=(1,), num_res_blocks=1,
                                 attention_resolutions=(), head_dim=8)
  c.model.encoder.update(base_channels=8, channel_mult=(1,))
  # The paper's path (the demo's clean key-frame input, loss weighting and residual frames have their own tests).
  c.model.update(key_frame_input=False, key_frame_clean=False)
  c.train.update(timesteps="uniform", loss_weighting="", residual_frames=0)
  # A prior as small as the generators (the demo's would dominate this step's FLOPs).
  c.model.prior.update(width=32, num_layers=1)
  c.train.prior_repeats = 2
  c.train.update(batch_size=8, num_steps=4, warmup_steps=2, log_every=1, checkpoint_every=2,
                 keep_checkpoints=5, learning_rate=1e-3)
  # Five steps from T-1 ('leading' would start the five at t=800, which validation refuses).
  c.sample.update(num_steps=5, spacing="trailing", num_samples=3, batch_size=3, upscale=1, num_real_clips=12)
  # The suite's own XLA cache (conftest.py; inherited by the runs it starts), never the user's: a run
  # of main.py points the process's cache at config.compilation_cache_dir.
  c.compilation_cache_dir = os.environ.get("VIDEOFUSION_TESTS_XLA_CACHE", "")
  # No traced program stored: storing one costs ~1 s more per program and init than tracing alone
  # (jax.export, written and read back), and hardly a test program runs twice. The store's own
  # tests, the CLI runs that resume, the two-process run and VDM* on a 4x2 mesh turn it on
  # (store_programs=True); the tests built from other configs (the builders', the demo's, the
  # benchmark's) keep the project's default, on.
  c.store_programs = False
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    if last not in node:  # setting it would add a field that nothing reads
      raise KeyError(f"tiny_config({key}=...): the config has no such field.")
    node[last] = value
  return c


def tiny_config_file(directory: Path, **overrides) -> Path:
  """A config file for ``--config=`` that gives ``tiny_config(**overrides)``."""
  path = Path(directory) / "tiny_config.py"
  path.write_text(f"import sys\nsys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent / 'configs')!r}]\n"
                  f"from tiny import tiny_config\n\n\ndef get_config():\n  return tiny_config(**{overrides!r})\n")
  return path
