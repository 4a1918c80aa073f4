"""Shared fixtures. Eight CPU devices so that sharded and unsharded runs can be compared."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))


def tiny_config(**overrides):
  """The demo config shrunk to 8x8, 4 frames, 8 channels: compiles in seconds on a CPU. The
  key-frame embedding and the prior (on the clip id), as the paper."""
  import demo

  from videofusion_jax.config import unet_config

  c = demo.get_config()
  c.data.update(num_frames=4, image_size=8, frame_stride=2)
  c.model.base = unet_config(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(4,), head_dim=8)
  c.model.residual = unet_config(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                 attention_resolutions=(), head_dim=8)
  # The paper's path (the demo's clean key-frame input has its own tests).
  c.model.update(key_frame_input=False, key_frame_clean=False)
  # A prior as small as the generators (the demo's would dominate this step's FLOPs).
  c.model.prior.update(width=32, num_layers=2)
  c.train.prior_repeats = 2
  c.train.update(batch_size=8, num_steps=4, warmup_steps=2, log_every=1, checkpoint_every=2,
                 keep_checkpoints=5, learning_rate=1e-3)
  c.sample.update(num_steps=5, num_samples=3, batch_size=3, upscale=1, num_real_clips=12)
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data dir with the demo clips built once per session."""
  return str(tmp_path_factory.mktemp("tfds"))
