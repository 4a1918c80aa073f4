"""Two processes on this machine joined by ``jax.distributed`` (CPU collectives through gloo),
started as a pod's hosts are: the command line with --coordinator_address, --num_processes
and --process_id."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from conftest import tiny_config
from test_faults import one_device_env
from tiny import tiny_config_file

from videofusion_jax import sampling
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.loop import train
from videofusion_jax.training.step import Trainer

ROOT = Path(__file__).resolve().parents[1]

# The command line's main, with the trained state's parameters (this host's copy) saved afterwards.
WORKER = """
import sys
import numpy as np
from absl import app
import jax
from videofusion_jax import main
from videofusion_jax.training import loop

def train_and_dump(*args, **kwargs):
  state = train(*args, **kwargs)
  leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
  np.savez(sys.argv[1], *leaves, devices=np.array([jax.process_count(), jax.device_count()]))
  return state

train, loop.train = loop.train, train_and_dump
app.run(main.main, argv=[sys.argv[0]] + sys.argv[2:], flags_parser=main._parse_flags)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_and_sample_as_one_and_a_single_process_resumes(tmp_path, tfds_dir, capsys):
  """Training, then sampling (3 videos in batches of 2 spread over both hosts' devices), on two
  processes; process 0 alone prints and writes; one process alone then draws the same videos and
  resumes the training."""
  config_file = tiny_config_file(tmp_path, **{"data.data_dir": tfds_dir, "train.num_steps": 3,
                                              "train.checkpoint_every": 3, "train.log_every": 1,
                                              "sample.batch_size": 2})
  (tmp_path / "worker.py").write_text(WORKER)
  workdir, port = tmp_path / "run", free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / f"params_{i}.npz"), f"--config={config_file}",
       f"--workdir={workdir}", "--mode=train_and_sample",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_device_env()) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out + err[-3000:]
  # Process 0 alone prints and writes events; both trained on a 2-device mesh, one device each.
  assert "step      3/3" in outs[0][0] and "step" not in outs[1][0] and "2 processes" in outs[0][0]
  params = [np.load(tmp_path / f"params_{i}.npz") for i in range(2)]
  assert list(params[0]["devices"]) == [2, 2] and list(params[1]["devices"]) == [2, 2]
  names = [k for k in params[0].files if k != "devices"]
  for k in names:
    np.testing.assert_array_equal(params[0][k], params[1][k])
  # One checkpoint, written together; metrics from process 0 only.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3"]
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3
  # The samples: written once, by process 0; one process on one device draws the same videos.
  assert "wrote 3 videos" in outs[0][0] and "wrote" not in outs[1][0] and "sampl" not in outs[1][0]
  assert sorted(p.name for p in (workdir / "samples" / "step_3").glob("*.mp4")) == [
      "sample_000_label0.mp4", "sample_001_label1.mp4", "sample_002_label2.mp4"]
  npz = np.load(workdir / "samples" / "step_3" / "samples.npz")
  # A single process restores it, samples and continues.
  c = tiny_config(**{"data.data_dir": tfds_dir, "train.num_steps": 4, "train.checkpoint_every": 3})
  trainer = Trainer(c, mesh=shd.make_mesh(c, devices=jax.devices()[:1]))
  restored = trainer.restore(workdir)
  for k, leaf in zip(names, jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(np.asarray(leaf), params[0][k])
  alone = sampling.generate_videos(trainer, restored.ema_params, 3, c.sample.seed, npz["labels"])
  np.testing.assert_allclose(npz["videos"], alone, atol=1e-4)
  state = train(c, workdir, trainer=trainer)
  assert int(state.step) == 4 and "resumed from checkpoint 3" in capsys.readouterr().out
  assert os.path.isdir(workdir / "checkpoints" / "4")
