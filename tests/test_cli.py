"""The command line: bad input ends with one clear message, no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args, workdir):
  cmd = [sys.executable, "-m", "videofusion_jax.main", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,message", [
    ("--config.diffusion.lam=1.5", "config.diffusion.lam=1.5: λ is the base-noise share"),
    ("--config.data.num_frames=1", "config.data.num_frames=1: VideoFusion needs at least 2"),
    ("--config.data.image_size=17", "image size 17 cannot be downsampled"),
    ("--config.sample.guidance_scale=-1", "config.sample.guidance_scale=-1.0: must be >= 0"),
    ("--config.model.base.head_dim=40", "config.model.base.head_dim=40: attention over 96 channels"),
])
def test_bad_config_values(override, message, tmp_path):
  r = run_main("--config=configs/demo.py", override, workdir=tmp_path)
  assert r.returncode == 1
  assert message in r.stderr and "Traceback" not in r.stderr


def test_missing_dataset_and_missing_checkpoint(tmp_path):
  r = run_main("--config=configs/ucf101.py", f"--config.data.data_dir={tmp_path}",
               f"--config.data.manual_dir={tmp_path / 'nowhere'}", workdir=tmp_path)
  assert r.returncode == 1 and "Traceback" not in r.stderr
  # One message: where it looked, the layout it expects, where the data comes from, the flags.
  assert f"{tmp_path / 'nowhere'} does not exist" in r.stderr and "UCF-101/" in r.stderr
  assert "crcv.ucf.edu" in r.stderr and "--config.data.manual_dir" in r.stderr
  r = run_main("--config=configs/demo.py", "--mode=sample", workdir=tmp_path / "empty")
  assert r.returncode == 1 and "no checkpoint" in r.stderr and "Traceback" not in r.stderr
