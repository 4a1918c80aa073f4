"""Two processes on this machine joined by ``jax.distributed`` (CPU collectives through gloo),
started as a pod's hosts are: the command line with --coordinator_address, --num_processes
and --process_id."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import one_device, tiny_config
from test_faults import one_device_env
from tiny import tiny_config_file

from videofusion_jax import sampling
from videofusion_jax.evaluation import evaluate
from videofusion_jax.training.loop import train
from videofusion_jax.training.step import Trainer
from videofusion_jax.training.workdir import LOCK_NAME

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


# The command line's main, with the clips each process ran through I3D counted (saved at the end).
EVAL_WORKER = """
import sys
import numpy as np
from absl import app
from videofusion_jax import main
from videofusion_jax.evaluation import i3d

rows, call = [], i3d.I3DFeatures.__call__
def counting(self, videos, *args, **kwargs):
  rows.append(len(videos))
  return call(self, videos, *args, **kwargs)
i3d.I3DFeatures.__call__ = counting
try:
  app.run(main.main, argv=[sys.argv[0]] + sys.argv[2:], flags_parser=main._parse_flags)
finally:
  np.save(sys.argv[1], np.array(rows))
"""

EVAL = {"eval.num_real": 5, "eval.num_generated": 3, "eval.batch_size": 2, "eval.kvd_subsets": 2,
        "eval.kvd_subset_size": 2}


def run_two(worker: str, outputs: list[Path], config_file: Path, workdir: Path, mode: str) -> list[str]:
  """``worker`` (one of the scripts above) as two processes of one run on ``workdir``, process i
  writing ``outputs[i]``; asserts both exit 0 and returns their outputs."""
  procs, outs = start_two(worker, outputs, config_file, workdir, mode, timeout=400)
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out + err[-3000:]
  return [out for out, _ in outs]


def start_two(worker: str, outputs: list[Path], config_file: Path, workdir: Path, mode: str, timeout: float,
              *flags: str, signal_at: tuple[str, signal.Signals, int] | None = None,
              each: tuple[list[str], list[str]] = ([], [])):
  """The two processes of ``run_two`` (``flags`` added, and ``each[i]`` to process i), run to their end: the
  processes and their (stdout, stderr). ``signal_at=(start, sig, i)``: once process 0 prints a line beginning
  with ``start``, ``sig`` to process ``i`` (its output before that line is in its stdout too)."""
  script = outputs[0].parent / f"{mode}_worker.py"
  script.write_text(worker)
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-u", str(script), str(outputs[i]), f"--config={config_file}", f"--workdir={workdir}",
       f"--mode={mode}", f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
       *flags, *each[i]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_device_env())
      for i in range(2)]
  before = ""
  deadline = threading.Timer(timeout, lambda: [p.kill() for p in procs])  # the line never printed: no hang
  deadline.start()
  try:
    if signal_at is not None:
      start, sig, i = signal_at
      for line in procs[0].stdout:
        before += line
        if line.startswith(start):
          break
      procs[i].send_signal(sig)
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:  # a failed test leaves no process behind (one waiting for the other until its timeout)
    deadline.cancel()
    for p in procs:
      p.kill()
  return procs, [(before + outs[0][0], outs[0][1]), outs[1]]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_sample_and_evaluate_as_one_and_a_single_process_resumes(tmp_path, tfds_dir, capsys):
  """Training, then sampling (3 videos in batches of 2 spread over both hosts' devices), then
  --mode=eval, on two processes; process 0 alone prints and writes; one process alone then draws
  the same videos, computes the same features and figures, and resumes the training."""
  config_file = tiny_config_file(tmp_path, **{"data.data_dir": tfds_dir, "store_programs": True, "train.num_steps": 3,
                                              "train.checkpoint_every": 3, "train.log_every": 1,
                                              "sample.batch_size": 2, **EVAL})
  workdir = tmp_path / "run"
  outs = run_two(WORKER, [tmp_path / f"params_{i}.npz" for i in range(2)], config_file, workdir, "train_and_sample")
  # Process 0 alone prints and writes events; both trained on a 2-device mesh, one device each.
  assert "step      3/3" in outs[0] and "step" not in outs[1] and "2 processes" in outs[0]
  assert "(the step traced and stored for the next run;" in outs[0]  # jax.export holds a two-host step
  # What XLA did on each host: on CPUs process 1 compiles every time (its cache keys differ from process 0's,
  # and JAX writes the cache from process 0 alone; benchmarks/RESULTS.md, "Two hosts and one compilation cache").
  assert re.search(r"first step done in [0-9.]+ s \(the step traced and stored for the next run; (compiled in|loaded "
                   r"from the compilation cache in) [0-9.]+ s[^()]* here; the other host compiled, [0-9.]+ s at most\)",
                   outs[0]), outs[0]
  params = [np.load(tmp_path / f"params_{i}.npz") for i in range(2)]
  assert list(params[0]["devices"]) == [2, 2] and list(params[1]["devices"]) == [2, 2]
  names = [k for k in params[0].files if k != "devices"]
  for k in names:
    np.testing.assert_array_equal(params[0][k], params[1][k])
  # One checkpoint, written together; metrics from process 0 only.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3"]
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3
  # The samples: written once, by process 0; one process on one device draws the same videos.
  assert "wrote 3 videos" in outs[0] and "wrote" not in outs[1] and "sampl" not in outs[1]
  assert sorted(p.name for p in (workdir / "samples" / "step_3").glob("*.mp4")) == [
      "sample_000_label0.mp4", "sample_001_label1.mp4", "sample_002_label2.mp4"]
  npz = np.load(workdir / "samples" / "step_3" / "samples.npz")
  # Evaluation: each process runs I3D on its share, 5 real clips as 3 + 2 and the generated batches
  # (2, then 1) as 1 + 1 and 1 + 0; process 0 alone prints and writes the figures and the cache.
  outs = run_two(EVAL_WORKER, [tmp_path / f"i3d_rows_{i}.npy" for i in range(2)], config_file, workdir, "eval")
  rows = [np.load(tmp_path / f"i3d_rows_{i}.npy").tolist() for i in range(2)]
  assert rows == [[2, 1, 1, 1], [2, 1, 0]], rows
  assert "split over 2 hosts" in outs[0] and "FVD" in outs[0]
  assert not any(word in outs[1] for word in ("I3D", "FVD", "sampl", "wrote")), outs[1]
  figures = json.loads((workdir / "eval" / "step_3.json").read_text())
  cache = next((workdir / "eval_cache").iterdir())
  features = np.load(cache)["features"]
  # Ctrl-C on process 1 while sampling 40 videos: JAX's preemption service tells process 0, and both stop
  # after the same batch (one stopping alone would leave the other waiting at its next collective; SIGTERM,
  # caught by that service, was ignored), removing what they began to write.
  procs, outs = start_two(WORKER, [tmp_path / f"unused_{i}.npz" for i in range(2)], config_file, workdir, "sample",
                          120, "--config.sample.num_samples=40", signal_at=("sampling ", signal.SIGINT, 1))
  assert [p.returncode for p in procs] == [128 + signal.SIGTERM, 128 + signal.SIGINT], outs
  assert "interrupted by SIGTERM: every host stopped after the same batch;" in outs[0][1], outs[0]
  assert "SIGINT received: every host stops after the batch in flight" in outs[1][0], outs[1]
  assert "interrupted: every host stopped after the same batch;" in outs[1][1], outs[1]
  assert "40/40" not in outs[0][0] and "wrote" not in outs[0][0], outs[0]
  assert [p.name for p in (workdir / "samples").iterdir()] == ["step_3"]  # no second folder, no partial one
  # A file one host cannot read stops both at once, that host with its error, the other pointing to it (it
  # used to wait in the sampler, or in evaluation's first gather): the compilation cache's folder at set-up,
  # sampling's given embeddings, evaluation's real clips (a data_dir under a file on process 1).
  absent, not_a_dir = tmp_path / "absent.npy", tmp_path / "not_a_dir"
  not_a_dir.write_text("")
  for mode, each, said in (
      ("sample", ([], [f"--config.compilation_cache_dir={not_a_dir / 'cache'}"]),
       ("config.compilation_cache_dir=", "another host could not set up this run")),
      ("sample", ([f"--config.sample.embeddings={workdir / 'samples' / 'step_3' / 'samples.npz'}"],
                  [f"--config.sample.embeddings={absent}"]),
       ("config.sample.embeddings=", "another host could not read this run's sampling inputs")),
      ("eval", ([], [f"--config.data.data_dir={not_a_dir / 'tfds'}"]),
       ("Not a directory", "another host cannot read the real clips' dataset"))):
    procs, outs = start_two(WORKER, [tmp_path / f"unused_{i}.npz" for i in range(2)], config_file, workdir, mode, 120,
                            each=each)
    assert [p.returncode for p in procs] == [1, 1], outs
    assert said[0] in outs[1][1] and f"error: {said[1]} (its own error says why)" in outs[0][1], outs
  # Embeddings files that differ between the hosts (each reads its own copy) stop both with one error naming
  # process 1 (before: each host drew its share of the rows from its own copy; the sidecars named process 0's).
  other = tmp_path / "other.npz"
  np.savez(other, embeddings=npz["embeddings"][[1, 2, 0]])
  procs, outs = start_two(WORKER, [tmp_path / f"unused_{i}.npz" for i in range(2)], config_file, workdir, "sample",
                          120, each=([f"--config.sample.embeddings={workdir / 'samples' / 'step_3' / 'samples.npz'}"],
                                     [f"--config.sample.embeddings={other}"]))
  assert [p.returncode for p in procs] == [1, 1], outs
  assert all("error: process(es) [1] read other sampling inputs than process 0" in out[1] for out in outs), outs
  assert "Traceback" not in outs[0][1] + outs[1][1], outs
  assert [p.name for p in (workdir / "samples").iterdir()] == ["step_3"]
  # A single process restores it, samples, evaluates and continues.
  c = tiny_config(**{"data.data_dir": tfds_dir, "train.num_steps": 4, "train.checkpoint_every": 3,
                     "sample.batch_size": 2, **EVAL})
  trainer = Trainer(c, mesh=one_device(c))
  restored = trainer.restore(workdir)
  for k, leaf in zip(names, jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(np.asarray(leaf), params[0][k])
  alone = sampling.generate_videos(trainer, restored.ema_params, 3, c.sample.seed, npz["labels"])
  np.testing.assert_allclose(npz["videos"], alone, atol=1e-4)
  shutil.rmtree(workdir / "eval_cache")  # computed again, by one process
  single = evaluate.run(c, str(workdir), experiment=trainer)
  np.testing.assert_allclose(np.load(cache)["features"], features, rtol=1e-5, atol=1e-4)
  assert single["num_real"] == figures["num_real"] == 5 and single["num_generated"] == figures["num_generated"] == 3
  for k in ("fvd", "kvd", "kvd_std"):
    np.testing.assert_allclose(single[k], figures[k], rtol=1e-3, atol=1e-6)
  assert figures["fvd"] > 1.0
  state = train(c, workdir, trainer=trainer)
  assert int(state.step) == 4 and "resumed from checkpoint 3" in capsys.readouterr().out
  assert os.path.isdir(workdir / "checkpoints" / "4")


def test_a_workdir_another_run_holds_stops_both_hosts(tmp_path, tfds_dir):
  """Process 0 alone takes the workdir's lock; refused, it tells the other host, and both stop with an
  error at once (the other one used to wait at the checkpoint manager's first barrier until its timeout)."""
  config_file = tiny_config_file(tmp_path, **{"data.data_dir": tfds_dir})
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}  # a live process: this one
  (workdir / LOCK_NAME).write_text(json.dumps(lock))
  procs, outs = start_two(WORKER, [tmp_path / f"params_{i}.npz" for i in range(2)], config_file, workdir, "train",
                          timeout=120)
  assert [p.returncode for p in procs] == [1, 1], outs
  assert "error: another training run (process" in outs[0][1] and "Traceback" not in outs[0][1]
  assert f"error: process 0 could not lock {workdir / LOCK_NAME}" in outs[1][1] and "Traceback" not in outs[1][1]
  assert json.loads((workdir / LOCK_NAME).read_text()) == lock and sorted(p.name for p in workdir.iterdir()) == [
      LOCK_NAME]
  assert "compilation_cache_dir" not in outs[0][0]  # the hosts share the suite's cache (the test below: they do not)


def test_a_compilation_cache_folder_the_hosts_do_not_share_is_warned_about(tmp_path, tfds_dir):
  """JAX writes compiled programs from process 0 alone, for every host to read: a cache folder of each host's own
  (the default, under ~, on hosts without a shared home) leaves the others compiling every program on every run,
  which process 0 says once the hosts have set up (here a workdir another run holds then stops both)."""
  first, own = tmp_path / "first_cache", tmp_path / "own_cache"  # not the suite's, where other runs check theirs
  config_file = tiny_config_file(tmp_path, **{"data.data_dir": tfds_dir, "compilation_cache_dir": str(first)})
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
  procs, outs = start_two(WORKER, [tmp_path / f"params_{i}.npz" for i in range(2)], config_file, workdir, "train",
                          120, each=([], [f"--config.compilation_cache_dir={own}"]))
  assert [p.returncode for p in procs] == [1, 1], outs
  assert (f"warning: config.compilation_cache_dir={str(first)!r} ({first} on process 0) is not one folder shared by "
          "every host: process 1 does not see what process 0 writes there.") in outs[0][0], outs[0]
  assert "compilation_cache_dir" not in outs[1][0] and "error: another training run (process" in outs[0][1]
  assert not [*first.glob(".shared-by-every-host-*"), *own.glob(".shared-by-every-host-*")]  # removed
  # The cache off on process 1 (the warning's other way out): both still meet in the check, none waiting for the other.
  procs, outs = start_two(WORKER, [tmp_path / f"params_{i}.npz" for i in range(2)], config_file, workdir, "train",
                          120, each=([], ["--config.compilation_cache_dir="]))
  assert [p.returncode for p in procs] == [1, 1], outs
  assert "is not one folder shared by every host: process 1 does not see" in outs[0][0], outs[0]
  assert "error: another training run (process" in outs[0][1], outs[0]


def test_a_workdir_one_host_cannot_use_stops_every_host_at_once(tmp_path):
  """The workdir is checked on every host after they join: one host's bad workdir (here a file: its
  mount failed) stops it with its reason and the others with a pointer to it, at once (they used to
  wait for it in jax.distributed.initialize until its timeout)."""
  good, bad = tmp_path / "run", tmp_path / "not_mounted"
  bad.write_text("")
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "videofusion_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_device_env())
      for i, workdir in enumerate((good, bad))]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [1, 1], outs
  assert f"error: --workdir={bad} is a file, not a directory" in outs[1][1]
  assert f"error: --workdir={good}: another host cannot use it" in outs[0][1]
  assert not good.exists() and "Traceback" not in outs[0][1] + outs[1][1]


HOOK = "train, loop.train = loop.train, train_and_dump"  # WORKER's line after which the variants below patch

# WORKER where process 0 cannot write the workdir's lock file (a bucket without exclusive create, permissions).
LOCK_UNWRITABLE = WORKER.replace(HOOK, HOOK + """
from videofusion_jax.training import workdir
def unwritable(self):
  raise PermissionError(13, "Permission denied", str(self.path))
if sys.argv[-1] == "--process_id=0":
  workdir.WorkdirLock.acquire = unwritable""")

# WORKER where process 1 cannot open its training input (what a CLIP table missing from its disk raises).
INPUT_MISSING = WORKER.replace(HOOK, HOOK + """
from videofusion_jax.data import pipeline
def missing(*args, **kwargs):
  raise pipeline.PipelineError("no CLIP frame embeddings for this dataset yet (a stand-in)")
if sys.argv[-1] == "--process_id=1":
  pipeline.train_iterator = missing""")


# WORKER where process 1 fails alone at its third step's batch (a video it cannot decode, a bug): past every check.
FAILS_MID_RUN = WORKER.replace(HOOK, HOOK + """
from videofusion_jax.training import step
batches, global_batch = [], step.Trainer.global_batch
def failing(self, local):
  batches.append(1)
  if len(batches) == 3 and "--process_id=1" in sys.argv:
    raise RuntimeError("a stand-in for a failure on one host mid-run")
  return global_batch(self, local)
step.Trainer.global_batch = failing""")


# WORKER where process 1 gets Ctrl-C twice at its third step's batch: every host is to stop after the step in flight,
# then this host at once.
INTERRUPTED_TWICE = WORKER.replace(HOOK, HOOK + """
import os, signal, time
from videofusion_jax.training import step
batches, global_batch = [], step.Trainer.global_batch
def interrupted(self, local):
  batches.append(1)
  if len(batches) == 3 and "--process_id=1" in sys.argv:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
  return global_batch(self, local)
step.Trainer.global_batch = interrupted""")


def test_a_lock_a_dataset_or_an_input_one_host_cannot_use_stops_every_host_at_once(tmp_path, tfds_dir):
  """Process 0 failing to write the lock file (an OSError, not another run's lock), process 1 unable to read
  the dataset process 0 prepared (its data_dir lies under a file: not shared, and not buildable there),
  process 1 unable to open its training input, either host failing mid-run, and a second Ctrl-C on one host each
  stop both hosts with an error at once; the host that failed says why, the other points to it (they used to
  wait at their next collective, and at JAX's shutdown barrier, for minutes)."""
  config_file = tiny_config_file(tmp_path, **{"data.data_dir": tfds_dir})
  procs, outs = start_two(LOCK_UNWRITABLE, [tmp_path / f"lock_{i}.npz" for i in range(2)], config_file,
                          tmp_path / "locked", "train", 120)
  assert [p.returncode for p in procs] == [1, 1], outs
  assert f"error: [Errno 13] Permission denied: '{tmp_path / 'locked' / LOCK_NAME}'" in outs[0][1], outs[0]
  assert "or the lock file could not be written (process 0's error says which)" in outs[1][1], outs[1]
  not_a_dir = tmp_path / "not_a_dir"
  not_a_dir.write_text("")
  configs = []
  for i, data_dir in enumerate((tfds_dir, str(not_a_dir / "tfds"))):
    (tmp_path / f"host{i}").mkdir()
    configs.append(tiny_config_file(tmp_path / f"host{i}", **{"data.data_dir": data_dir}))
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "videofusion_jax.main", f"--config={config}", f"--workdir={tmp_path / 'run'}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_device_env())
      for i, config in enumerate(configs)]
  try:
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [1, 1], outs
  assert "error: [Errno 20] Not a directory" in outs[1][1] and str(not_a_dir) in outs[1][1], outs[1]
  assert "error: another host cannot read the dataset process 0 prepared (its own error says why)" in outs[0][1], \
      outs[0]
  assert "Traceback" not in outs[0][1] + outs[1][1]
  procs, outs = start_two(INPUT_MISSING, [tmp_path / f"input_{i}.npz" for i in range(2)], config_file,
                          tmp_path / "input", "train", 120)
  assert [p.returncode for p in procs] == [1, 1], outs
  assert "error: no CLIP frame embeddings for this dataset yet (a stand-in)" in outs[1][1], outs[1]
  assert "error: another host could not open its training input, or its first batch does not fit" in outs[0][1]
  # Past the checks, a host that fails alone tells the others, which stop at once with its error (the one that
  # failed waited 5 minutes at JAX's shutdown barrier, the other in the step's collectives; then both aborted).
  # Process 1 failing, then process 0 (which holds JAX's coordination service: it leaves last).
  for failed, other in ((1, 0), (0, 1)):
    worker = FAILS_MID_RUN.replace("--process_id=1", f"--process_id={failed}")
    procs, outs = start_two(worker, [tmp_path / f"mid{failed}_{i}.npz" for i in range(2)], config_file,
                            tmp_path / f"mid{failed}", "train", 120, "--config.train.num_steps=20",
                            "--config.train.log_every=1")
    assert [p.returncode for p in procs] == [1, 1], outs
    assert "RuntimeError: a stand-in for a failure on one host mid-run" in outs[failed][1], outs[failed]
    assert f"error: process {failed} stopped with an error (RuntimeError: a stand-in for a failure on one host " \
           "mid-run); this host stops too" in outs[other][1], outs[other]
    # Its collective cut short as the failed host left (Gloo's "Connection closed by peer") is no second error.
    assert "Traceback" not in outs[other][1], outs[other]
    assert "step      2/20" in outs[0][0] and "step      3/20" not in outs[0][0], outs[0]
  # A second Ctrl-C stops its host at once, alone: it tells the other, which stops too (it waited in the step's
  # collectives and at JAX's shutdown barrier for minutes).
  procs, outs = start_two(INTERRUPTED_TWICE, [tmp_path / f"twice_{i}.npz" for i in range(2)], config_file,
                          tmp_path / "twice", "train", 120, "--config.train.num_steps=20", "--config.train.log_every=1")
  assert [p.returncode for p in procs] == [1, 128 + signal.SIGINT], outs
  assert "(Ctrl-C again to stop every host at once without it)" in outs[1][0], outs[1]
  after = "the checkpoints saved before are intact (rerun to resume)"
  assert f"interrupted: stopped at once; {after}." in outs[1][1], outs[1]
  assert f"error: process 1 was interrupted (Ctrl-C stopped it at once; {after}); this host stops too" in outs[0][1]
  assert "Traceback" not in outs[0][1] + outs[1][1], outs


# WORKER where a source file changed on process 0's disk after the import (so it would not load stored programs).
ONE_HOST_CHANGED = WORKER.replace(HOOK, HOOK + """
import videofusion_jax
if sys.argv[-1] == "--process_id=0":
  videofusion_jax.LOADED_AT = 0.0""")


def test_hosts_agree_on_the_checkpoint_and_on_stored_programs_when_one_host_differs(tmp_path, tfds_dir):
  """A checkpoint one host cannot read is skipped by both (they restored different steps and stopped in a
  collective mismatch), and a source change seen by one host makes both trace (one loaded the stored
  program, the other traced: the same mismatch). FSDP over the two hosts: each reads its own shards."""
  settings = {"data.data_dir": tfds_dir, "store_programs": True, "train.checkpoint_every": 2, "train.log_every": 1,
              "mesh.data": 1, "mesh.fsdp": 2}
  workdir = tmp_path / "run"
  (tmp_path / "first").mkdir()
  run_two(WORKER, [tmp_path / f"first_{i}.npz" for i in range(2)],
          tiny_config_file(tmp_path / "first", **settings, **{"train.num_steps": 4}), workdir, "train")
  # The shards process 1 wrote, and reads back on the same mesh, cut short: process 0 reads none of them.
  for path in (workdir / "checkpoints" / "4" / "state").rglob("ocdbt.process_1/d/*"):
    with open(path, "r+b") as f:
      f.truncate(64)
  for i in range(2):
    assert list(np.load(tmp_path / f"first_{i}.npz")["devices"]) == [2, 2]
  # The resumed run, stopped by SIGTERM on process 1 (a preemption notice reaches any host): JAX's preemption
  # service tells process 0, and both save the same step and stop.
  (tmp_path / "resume").mkdir()
  procs, outs = start_two(ONE_HOST_CHANGED, [tmp_path / f"resumed_{i}.npz" for i in range(2)],
                          tiny_config_file(tmp_path / "resume", **settings, **{"train.num_steps": 400}), workdir,
                          "train", 400, signal_at=("step      6/", signal.SIGTERM, 1))
  assert [p.returncode for p in procs] == [0, 0], outs
  outs = [out for out, _ in outs]
  assert "skipped checkpoint 4" in outs[0] and "unreadable on another host" in outs[0], outs[0]
  assert "resumed from checkpoint 2" in outs[0] and "step      6/400" in outs[0]
  assert "warning (process 1): checkpoint 4" in outs[1] and "reading its arrays failed" in outs[1], outs[1]
  assert "a source file of videofusion_jax changed since it was loaded" in outs[0]
  stopped = [int(out.split("stopped on SIGTERM at step ")[1].split(":")[0]) for out in outs]
  assert stopped[0] == stopped[1] >= 6, outs
  assert (workdir / "checkpoints_damaged" / "4").is_dir()
  every = sorted({*range(2, stopped[0] + 1, 2), stopped[0]})  # every 2 steps and the stop's, the last 5 kept
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == every[-5:]


class _Service:
  """The coordination service's key-value store as ``sharding`` uses it (one process's client), in memory."""

  def __init__(self, values: dict[str, str]):
    self.values = dict(values)

  def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
    if key in self.values and not allow_overwrite:
      raise RuntimeError(f"ALREADY_EXISTS: {key}")
    self.values[key] = value

  def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]

  def blocking_key_value_get(self, key: str, timeout_ms: int) -> str:
    if key not in self.values:
      raise RuntimeError("DEADLINE_EXCEEDED")
    return self.values[key]


def test_a_host_failing_after_the_others_finished_goes_to_the_barrier_at_once(monkeypatch):
  """A host that fails (``sharding.report_failure``) while the other has finished its work
  (``sharding.say_finished``) stops waiting for it at once and ends through JAX's shutdown barrier, where the
  finished one is; the finished host's watcher, told of the failure, leaves it to that barrier rather than ending
  it. Control: a host that said nothing is waited for until ``wait_s``. The service and the clock are fakes (each
  process's view of them): the two-process runs above cost ~30 s each."""
  from videofusion_jax.training import sharding

  # The module's view of the clock, of JAX and of threads replaced (not the modules themselves: pytest's own
  # threads use them).
  clock, me = [0.0], [0]
  monkeypatch.setattr(sharding, "time", types.SimpleNamespace(
      time=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
  monkeypatch.setattr(sharding, "jax", types.SimpleNamespace(process_count=lambda: 2, process_index=lambda: me[0]))
  started = []
  monkeypatch.setattr(sharding, "threading", types.SimpleNamespace(
      Thread=lambda target, name: types.SimpleNamespace(start=lambda: started.append(target)),
      main_thread=threading.main_thread))
  ended = []
  monkeypatch.setattr(sharding, "os", types.SimpleNamespace(_exit=ended.append))

  def host(index: int, service: _Service):
    """Process ``index``'s module state, fresh."""
    for name in ("_failing_here", "_agreed_failure", "_stopping_here", "_finished_here", "_watching"):
      monkeypatch.setattr(sharding, name, threading.Event())
    monkeypatch.setattr(sharding, "_client", lambda: service)
    me[0] = index
    sharding._watching.set()  # joined and watching (the watcher thread itself is run below where it matters)

  for other, waited in (("finished", 0.0), (None, 15.0)):
    service = _Service({} if other is None else {"videofusion/state/0": other})
    host(1, service)
    clock[0] = 0.0
    assert sharding.report_failure("bad video", wait_s=15.0) is False  # no host stopped: the barrier
    assert clock[0] == pytest.approx(waited, abs=0.25), other
    assert service.values["videofusion/state/1"] == "failed"
    assert service.values["videofusion/failed"] == "process 1 stopped with an error (bad video)"

  # Host 0 finished, then host 1's failure reaches its watcher: it ends with the main thread, host 0 not stopped.
  service = _Service({})
  host(0, service)
  sharding.say_finished()
  assert service.values == {"videofusion/state/0": "finished"}
  service.values["videofusion/failed"] = "process 1 stopped with an error (bad video)"
  monkeypatch.setattr(sharding, "_watching", threading.Event())
  sharding.watch_for_failures(grace_s=5.0)
  started[0]()  # the watcher's body, in this thread
  assert ended == [] and service.values["videofusion/state/0"] == "finished"
  assert not sharding.stopped_by_another_host()
  # Control: a host still working is stopped by the same message (its state 'stopped', os._exit(1)).
  host(0, service := _Service({"videofusion/failed": "process 1 stopped with an error (bad video)"}))
  monkeypatch.setattr(sharding, "_watching", threading.Event())
  sharding.watch_for_failures(grace_s=5.0, wait_s=1.0)
  started[1]()
  assert ended == [1] and service.values["videofusion/state/0"] == "stopped"
  # A host already stopped or failing says nothing more.
  sharding._watching.set()
  sharding.say_finished()
  assert service.values["videofusion/state/0"] == "stopped"
