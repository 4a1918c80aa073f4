"""Faults a pod run meets: preemption (SIGTERM, Ctrl-C), damaged checkpoints, a second run in the
same workdir, and bad input that must end in one line and change nothing on disk."""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import one_device, tiny_config
from tiny import tiny_config_file

from videofusion_jax.training import checkpoint as ckpt
from videofusion_jax.training.loop import _drop_metrics_after, train
from videofusion_jax.training.step import Trainer
from videofusion_jax.training.workdir import LOCK_NAME, WorkdirError, WorkdirLock

ROOT = Path(__file__).resolve().parents[1]


def one_device_env() -> dict:
  """The environment of a CLI run on one CPU device (the suite's 8 simulated ones are not needed),
  with conftest.py's unoptimised XLA CPU backend (runs compared with each other all use it)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  return env


def main_cmd(config_file, workdir, *args):
  return [sys.executable, "-u", "-m", "videofusion_jax.main", f"--config={config_file}", f"--workdir={workdir}", *args]


def run_main(config_file, workdir, *args, timeout=300):
  return subprocess.run(main_cmd(config_file, workdir, *args), cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=one_device_env())


def snapshot(directory: Path) -> dict:
  """Every file and folder under ``directory`` with a hash of its bytes."""
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(directory.rglob("*"))}


def losses(workdir: Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tfds_dir):
  """The tiny config as a file for the command line: a log line every step, no periodic checkpoint,
  the traced programs stored (a resumed run loads them)."""
  return tiny_config_file(tmp_path_factory.mktemp("config"), **{
      "data.data_dir": tfds_dir, "store_programs": True, "train.num_steps": 400, "train.checkpoint_every": 1000,
      "train.log_every": 1})


def interrupt(config_file, workdir, sig, after_step, num_steps=400):
  """Starts training, sends ``sig`` once step ``after_step`` is logged; returns (rc, output, seconds to exit)."""
  proc = subprocess.Popen(main_cmd(config_file, workdir, f"--config.train.num_steps={num_steps}"), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=one_device_env())
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(f"step {after_step:>6}/"):
      break
  t = time.time()
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, "".join(lines) + out, time.time() - t


def test_sigterm_and_ctrl_c_save_the_step_and_resume_exactly(config_file, tmp_path):
  workdir = tmp_path / "run"
  rc, out, seconds = interrupt(config_file, workdir, signal.SIGINT, after_step=3)
  assert rc == 0, out
  assert "Traceback" not in out and "SIGINT received" in out
  stopped = int(out.split("stopped on SIGINT at step ")[1].split(":")[0])
  assert stopped >= 3 and (workdir / "checkpoints" / str(stopped)).is_dir()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [stopped]
  assert seconds < 60 and not (workdir / LOCK_NAME).exists()
  # The first log line's rate leaves the compile out; its time is said once, the initial state's before.
  assert re.search(r"initial state made in [0-9.]+ s \((its traced program loaded from the store|its program traced "
                   r"and stored for the next run); (compiled in|loaded from the compilation cache in) [0-9.]+ s[^()]*, "
                   r"and run\)", out), out
  assert "first step done in" in out and "left" not in out.split(f"step {1:>6}/")[1].splitlines()[0]
  # SIGTERM (preemption) on the resumed run: it resumes from the step it stopped at.
  rc, out, seconds = interrupt(config_file, workdir, signal.SIGTERM, after_step=stopped + 2)
  assert rc == 0 and f"resumed from checkpoint {stopped}" in out and "Traceback" not in out, out
  # The first run stored the traced step and XLA's compile of it (a small program beside it, too quick to be
  # stored then, may take 1 s or more on a busy machine now and count as compiled).
  assert re.search(r"\(the step's traced program loaded from the store; (loaded from the compilation cache in "
                   r"[0-9.]+ s|compiled in [0-9.]+ s, [0-9]+ programs? loaded from the compilation cache)\)", out), out
  second = int(out.split("stopped on SIGTERM at step ")[1].split(":")[0])
  assert second >= stopped + 2 and seconds < 60
  # An uninterrupted run of the same steps, saving its last: the resumed run's next loss is the
  # same number, and the checkpoint saved on SIGTERM holds the same state as its step's.
  straight = tmp_path / "straight"
  r = run_main(config_file, straight, f"--config.train.num_steps={second}",
               f"--config.train.checkpoint_every={second}")
  assert r.returncode == 0, r.stderr
  assert losses(workdir)[stopped + 1] == pytest.approx(losses(straight)[stopped + 1], rel=1e-6)
  (saved, step), (expected, expected_step) = ckpt.restore_raw(workdir), ckpt.restore_raw(straight)
  assert step == expected_step == second
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # Sampling has no step to finish: SIGTERM stops it at once as Ctrl-C does (its `finally` blocks run), with one
  # line and the shell's code for the signal, where Python's default ended it silently (code -15).
  rc, out = sigterm_once_sampling(main_cmd(config_file, straight, "--mode=sample"))
  assert rc == 128 + signal.SIGTERM, out
  assert "interrupted by SIGTERM: stopped at once; the checkpoints saved before are intact (rerun to start it " \
         "again)." in out and "Traceback" not in out, out
  # The same under the multi-host flags with one process (a one-node SLURM job): JAX's preemption service,
  # started by jax.distributed.initialize, took the SIGTERM and sampling ran on.
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  rc, out = sigterm_once_sampling(main_cmd(config_file, straight, "--mode=sample", "--config.sample.num_samples=60",
                                           f"--coordinator_address=localhost:{port}", "--num_processes=1",
                                           "--process_id=0"))
  assert rc == 128 + signal.SIGTERM and "interrupted by SIGTERM: stopped at once" in out, out


def sigterm_once_sampling(cmd: list[str]) -> tuple[int, str]:
  """Runs ``cmd`` (a --mode=sample run), sends SIGTERM once it says it is sampling; (exit code, output)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=one_device_env())
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("sampling "):
        break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
  finally:
    proc.kill()
  return proc.returncode, out


def test_a_ctrl_c_after_either_signal_stops_at_once_as_the_message_says(capsys):
  """SIGTERM or a first Ctrl-C asks for a checkpoint and says "Ctrl-C again to stop at once": that Ctrl-C
  raises, after a SIGTERM too (it took a second one); another SIGTERM (a preemption repeating it) does not."""
  from videofusion_jax.training.preemption import StopRequest

  for first in (signal.SIGTERM, signal.SIGINT):
    stop = StopRequest()
    stop._on_signal(first, None)
    if first == signal.SIGTERM:
      stop._on_signal(signal.SIGTERM, None)
    assert stop.signal_name == first.name
    assert f"{first.name} received: finishing the step in flight, then saving a checkpoint and exiting (Ctrl-C " \
           "again to stop at once without it)." in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
      stop._on_signal(signal.SIGINT, None)


def test_a_signal_before_the_first_step_stops_a_dataset_build_at_once(trainer, tmp_path, monkeypatch):
  """A first-use dataset build takes minutes, longer than a preemption's grace period: SIGTERM or Ctrl-C
  there stops it at once, as an exception raised in the build (a stand-in here; TFDS removes its temporary
  folder on one), with nothing to save, the lock released and the handlers as they were; not after the
  build, the initial state and a first step."""
  from videofusion_jax.training import loop
  from videofusion_jax.training.preemption import Interrupted

  for sig in (signal.SIGTERM, signal.SIGINT):
    def build(config, sig=sig):
      os.kill(os.getpid(), sig)
      for _ in range(200):  # a long build; the handler runs between two of its Python lines
        time.sleep(0.05)
      raise RuntimeError("the build ran to its end: the signal did not stop it")
    monkeypatch.setattr(loop, "prepare_dataset", build)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    t = time.time()
    with pytest.raises(Interrupted) as e:
      train(trainer.config, tmp_path / sig.name, trainer=trainer, verbose=False)
    assert e.value.signal_name == sig.name and isinstance(e.value, KeyboardInterrupt)
    assert time.time() - t < 5
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert not (tmp_path / sig.name / LOCK_NAME).exists()
    assert not list((tmp_path / sig.name / "checkpoints").glob("*"))


def test_hosts_stop_between_batches_at_the_point_the_preemption_service_sets(monkeypatch):
  """On several hosts JAX's preemption service sets the sync point, on a notice, to the highest id any host
  gave it plus one, 0 before the first (its C++ rule; a stand-in here, for one host). The ids count the
  process's calls, training's steps and then the batches of other work: a notice during the batches after
  training stops them at the next one, and a notice before a resumed run's first step (point 1) stops it at
  that step (with step numbers as ids, as before, the first would never have stopped: 401 after 1..400 is
  met, 5 never equals 1). A Ctrl-C forwarded before training makes training's next Ctrl-C stop at once. One
  process never asks the service."""
  from videofusion_jax.training import preemption
  from videofusion_jax.training.preemption import Interrupted, StopRequest, stop_between_batches

  given, point = [], [None]
  def reached(call):
    given.append(call)
    return call == point[0]
  monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point", reached)
  monkeypatch.setattr(preemption, "_calls", 0)
  monkeypatch.setattr(preemption, "_sigint_here", False)
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  stop = StopRequest()
  assert not any(stop.reached(step) for step in range(1, 401))  # training's steps 1..400
  stop_between_batches()
  stop_between_batches()  # two batches of sampling
  point[0] = max(given) + 1  # SIGTERM on a host now
  with pytest.raises(Interrupted) as e:
    stop_between_batches()
  assert given[-3:] == [401, 402, 403] and e.value.signal_name == "SIGTERM"
  assert e.value.how == "every host stopped after the same batch"
  # A new process resumed at step 5, the notice during its start: the point is 0 + 1.
  monkeypatch.setattr(preemption, "_calls", 0)
  point[0] = 1
  assert StopRequest().reached(5) and given[-1] == 1
  # Ctrl-C forwarded before training: the next one, in training, stops this host at once.
  monkeypatch.setattr(preemption, "_sigint_here", True)
  with pytest.raises(KeyboardInterrupt):
    StopRequest()._on_signal(signal.SIGINT, None)
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 1)
  stop_between_batches()
  assert len(given) == 404 and StopRequest().signal_name is None  # one process: a Ctrl-C raised already
  # The Ctrl-C that stopped a run is not the next run's (a notebook's second run in the same process).
  with preemption.sigterm_stops_at_once(multihost=True):
    assert preemption._sigint_here
  assert not preemption._sigint_here


@pytest.fixture(scope="module")
def trainer():
  c = tiny_config()
  return Trainer(c, mesh=one_device(c))


def fake_batches(config, n=8, seed=0):
  rng = np.random.default_rng(seed)
  c = config.data
  for _ in range(n):
    yield {"video": rng.uniform(-1, 1, (config.train.batch_size, c.num_frames, c.image_size, c.image_size, 3)
                                ).astype(np.float32),
           "label": rng.integers(0, c.num_classes, config.train.batch_size).astype(np.int32)}


def damage(step_dir: Path, how: str) -> None:
  """'truncate': every data file of the step cut to 64 bytes (which arrays share a file varies from
  run to run; the EMA-only read must meet the damage too); 'delete': the manifest removed."""
  if how == "truncate":
    for path in (step_dir / "state").rglob("ocdbt.process_0/d/*"):
      with open(path, "r+b") as f:
        f.truncate(64)
  elif how == "delete":
    (step_dir / "state" / "manifest.ocdbt").unlink()


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_checkpoint_is_skipped_and_training_resumes_from_the_one_before(trainer, tmp_path, how, capsys):
  c = trainer.config
  train(c, tmp_path / "run", batches=fake_batches(c), trainer=trainer, verbose=False)  # checkpoints 2 and 4
  damage(tmp_path / "run" / "checkpoints" / "4", how)
  before = snapshot(tmp_path / "run" / "checkpoints" / "4")
  # Sampling and evaluation read the newest intact one and move nothing.
  state = trainer.restore(tmp_path / "run")
  assert int(state.step) == 2 and snapshot(tmp_path / "run" / "checkpoints" / "4") == before
  out = capsys.readouterr().out
  assert f"skipped checkpoint 4 in {tmp_path / 'run' / 'checkpoints'}: it is damaged" in out
  # Sampling's read (EMA weights only) skips it the same way and reads the same weights, nothing else.
  ema = trainer.restore(tmp_path / "run", ema_only=True)
  assert "skipped checkpoint 4" in capsys.readouterr().out
  assert int(ema.step) == 2 and ema.params is None and ema.opt_state is None and ema.rng is None
  assert jax.tree.structure(ema.ema_params) == jax.tree.structure(state.ema_params)
  for a, b in zip(jax.tree.leaves(ema.ema_params), jax.tree.leaves(state.ema_params)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Another run starting from this one (train.init_base_from) reads the newest readable one, the same weights.
  raw, raw_step = ckpt.restore_raw(tmp_path / "run")
  assert raw_step == 2 and "skipped checkpoint 4" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(raw["ema_params"]), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Training resumes from 2 and gives what an uninterrupted run gives (the same batches 3 and 4). Asked for
  # the damaged checkpoint's own step (4), it does not stop at "nothing to train": step 4 is not there intact.
  last = 4 if how == "delete" else 6
  c_last = tiny_config(**{"train.num_steps": last})
  batches = list(fake_batches(c))
  resumed = train(c_last, tmp_path / "run", batches=iter(batches[2:]), trainer=trainer)
  out = capsys.readouterr().out
  assert "skipped checkpoint 4" in out and "resumed from checkpoint 2" in out and "nothing to train" not in out
  assert int(resumed.step) == last
  # Kept, out of the way: the run saves step 4 anew.
  assert snapshot(tmp_path / "run" / "checkpoints_damaged" / "4") == before
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == list(range(2, last + 1, 2))
  straight = train(c_last, tmp_path / "straight", batches=iter(batches), trainer=trainer, verbose=False)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # The curve has each step once: steps 3 and 4 as the resumed run logged them (the first run's lines of
  # them are gone), and TensorBoard is told to hide the first run's events from step 3 on.
  assert "metrics.jsonl: 2 line(s) past step 2 removed" in out
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, last + 1))
  assert {r["step"]: r["loss"] for r in rows} == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
  assert purge_steps(tmp_path / "run" / "tensorboard") == [1, 3]  # each run marks where it started


def purge_steps(logdir: Path) -> list[int]:
  """The steps of the session-start events in ``logdir``'s TensorBoard files (TensorBoard hides the
  events an earlier writer logged at and after such a step), read with TensorFlow's own reader."""
  import tensorflow as tf
  return [e.step for f in sorted(logdir.glob("events.out.tfevents.*"))
          for e in tf.compat.v1.train.summary_iterator(str(f)) if e.session_log.status == e.session_log.START]


def test_a_step_the_device_cannot_hold_says_the_batch_per_device_and_what_lowers_it(trainer, tmp_path, monkeypatch,
                                                                                       xla_out_of_memory):
  """XLA's out-of-memory error (at the step's compile or run) is one message: what XLA was asked for, the
  clips per device, the settings that lower the memory; the checkpoints before it are intact. Another
  runtime error passes unchanged."""
  from videofusion_jax.experiment import DeviceMemoryError

  c = tiny_config(**{"train.num_steps": 2})
  train(c, tmp_path, batches=fake_batches(c), trainer=trainer, verbose=False)
  before = snapshot(tmp_path / "checkpoints")
  monkeypatch.setattr(trainer, "step", lambda *a: (_ for _ in ()).throw(xla_out_of_memory))
  c4 = tiny_config(**{"train.num_steps": 4})
  with pytest.raises(DeviceMemoryError) as e:
    train(c4, tmp_path, batches=fake_batches(c4), trainer=trainer, verbose=False)
  asked = re.search(r"allocating (\d+) bytes", str(xla_out_of_memory)).group(1)
  b, d = c.train.batch_size, c.data
  assert str(e.value) == (
      f"the device ran out of memory in training (XLA: Out of memory allocating {int(asked) / 1e9:.2f} GB; device: "
      f"cpu). config.train.batch_size={b} puts {b} clip(s) of {d.num_frames} x {d.image_size}x{d.image_size} frames "
      "on each of the 1 device(s). Lower it, or split each step into micro-batches (--config.train.grad_accum_steps"
      "=K, the same update), or recompute activations in the backward pass (--config.train.remat=block), or compute "
      "in bfloat16 (--config.model.dtype=bfloat16); benchmarks/memory.py gives a setting's memory without running "
      "it. No checkpoint was changed: rerun to resume from the last one, if any.")
  assert e.value.__cause__ is xla_out_of_memory
  assert snapshot(tmp_path / "checkpoints") == before and not (tmp_path / LOCK_NAME).exists()
  other = jax.errors.JaxRuntimeError("INTERNAL: something else")
  monkeypatch.setattr(trainer, "step", lambda *a: (_ for _ in ()).throw(other))
  with pytest.raises(jax.errors.JaxRuntimeError) as e:
    train(c4, tmp_path, batches=fake_batches(c4), trainer=trainer, verbose=False)
  assert e.value is other


@pytest.mark.parametrize("kind", ["out_of_memory", "checkpoint_write"])
def test_out_of_memory_or_a_refused_checkpoint_write_on_the_command_line_is_one_error_line(config_file, tmp_path,
                                                                                          xla_out_of_memory, kind):
  """The command line's side of the message above: XLA's error where the state is made is one `error:` line,
  exit 1, no traceback, no checkpoint, the workdir's lock released. So is TensorStore's error of a checkpoint's
  write the disk refused, which Orbax raises as a ValueError (test_a_checkpoint_write_the_disk_refuses_is_one_line)."""
  path = f"{tmp_path}/run/checkpoints/6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/_sharding"
  error = (str(xla_out_of_memory) if kind == "out_of_memory" else
           f'RESOURCE_EXHAUSTED: Error writing local file "{path}": Failed to write 286975 bytes to file 8: No space '
           "left on device [os_error_code='28']")
  worker = tmp_path / "worker.py"
  worker.write_text(
      "import sys\n"
      "import jax\n"
      "from absl import app\n"
      "from videofusion_jax import main\n"
      "from videofusion_jax.training import loop\n"
      "def fails(*args, **kwargs):\n"
      f"  raise {'jax.errors.JaxRuntimeError' if kind == 'out_of_memory' else 'ValueError'}(sys.argv[1])\n"
      "loop._start = fails\n"
      "app.run(main.main, argv=[sys.argv[0]] + sys.argv[2:], flags_parser=main._parse_flags)\n")
  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, str(worker), error, f"--config={config_file}",
                      f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=one_device_env())
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]  # beside a first build's progress
  assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr
  if kind == "out_of_memory":
    assert errors[0].startswith("error: the device ran out of memory in training (XLA: Out of memory allocating ")
    assert "config.train.batch_size=" in errors[0]
  else:
    assert errors[0].startswith(f"error: [Errno 28] No space left on device: '{path}' (writing a checkpoint; the "
                                "checkpoints saved before it are intact)"), errors[0]
  assert not list((workdir / "checkpoints").glob("*")) and not (workdir / LOCK_NAME).exists()


def test_metrics_of_a_crashed_run_past_its_checkpoint_are_dropped_and_a_torn_line_too(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
  path.write_text("".join(rows) + '{"step": 6, "lo')  # the crash cut the last write short
  assert _drop_metrics_after(path, 3) == 3
  assert path.read_text() == "".join(rows[:3]) and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
  assert _drop_metrics_after(path, 3) == 0 and path.read_text() == "".join(rows[:3])
  assert _drop_metrics_after(tmp_path / "absent.jsonl", 3) == 0 and not (tmp_path / "absent.jsonl").exists()


def test_a_checkpoints_metadata_is_read_once_until_the_step_is_saved_anew(tmp_path, monkeypatch):
  """A resume reads the shapes twice (compatibility check, restore): the second comes from memory,
  but a step saved again (after its damaged one was moved aside) is read again."""
  manager = ckpt.make_manager(tmp_path, keep=5, async_save=False)
  ckpt.save(manager, 1, {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)})
  assert ckpt._saved_shapes(manager, 1) == {("w",): (2, 3), ("b",): (3,)}
  with monkeypatch.context() as m:
    m.setattr(ckpt.ocp, "StandardCheckpointer", None)  # reading the metadata again would fail: None
    assert ckpt._saved_shapes(manager, 1) == {("w",): (2, 3), ("b",): (3,)}
  ckpt.move_aside(manager, [1], log=lambda *_: None)
  ckpt.save(manager, 1, {"w": np.zeros((4,), np.float32)})
  assert ckpt._saved_shapes(manager, 1) == {("w",): (4,)}
  manager.close()


def test_a_run_keeps_its_newest_checkpoints_only(tmp_path):
  """train.keep_checkpoints=N (``make_manager(keep=N)``): of steps 1..4 saved, the newest 2 stay, with
  their own arrays; the older ones are deleted."""
  manager = ckpt.make_manager(tmp_path, keep=2, async_save=False)
  for step in range(1, 5):
    ckpt.save(manager, step, {"w": np.full(3, step, np.float32)})
  manager.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 4]
  reader = ckpt.make_manager(tmp_path, keep=2, read_only=True)
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  np.testing.assert_array_equal(np.asarray(ckpt.restore(reader, abstract, step=3)["w"]), np.full(3, 3.0))
  reader.close()


def test_a_step_moved_aside_again_keeps_every_earlier_copy(tmp_path):
  """``move_aside`` never replaces what an earlier move kept: step 1 saved and moved aside three times is
  kept as 1, 1.1 and 1.2 in checkpoints_damaged, each with the arrays it held."""
  import orbax.checkpoint as ocp

  manager = ckpt.make_manager(tmp_path, keep=5, async_save=False)
  for value in range(3):
    ckpt.save(manager, 1, {"w": np.full(2, value, np.float32)})
    ckpt.move_aside(manager, [1], log=lambda *_: None)
  manager.close()
  aside = tmp_path / "checkpoints_damaged"
  assert sorted(p.name for p in aside.iterdir()) == ["1", "1.1", "1.2"]
  for name, value in (("1", 0), ("1.1", 1), ("1.2", 2)):
    with ocp.StandardCheckpointer() as reader:
      np.testing.assert_array_equal(np.asarray(reader.restore((aside / name / "state").absolute())["w"]),
                                    np.full(2, value, np.float32))


def test_the_last_step_is_logged_and_steps_per_sec_counts_the_steps_since_the_last_log(trainer, tmp_path,
                                                                                      monkeypatch, capsys):
  """log_every=3 over 7 steps: steps 3, 6 and the last, 7, are in metrics.jsonl, once each; a logged
  steps/s is the steps since the previous log over the wall time between the two logs, measured here as
  each line is written (batches arrive 0.1 s apart: the time is the input's, not the measurement's). The
  printed line names each network's gradient norm, as metrics.jsonl holds it."""
  from videofusion_jax.training import loop

  written, scalars = [], loop._Writer.scalars

  def timed(self, step, metrics):
    written.append((step, time.time()))
    return scalars(self, step, metrics)

  def slow(batches):
    for batch in batches:
      time.sleep(0.1)
      yield batch

  monkeypatch.setattr(loop._Writer, "scalars", timed)
  c = tiny_config(**{"train.num_steps": 7, "train.log_every": 3, "train.checkpoint_every": 1000})
  capsys.readouterr()
  train(c, tmp_path, batches=slow(fake_batches(c, n=7)), trainer=trainer)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [s for s, _ in written] == [3, 6, 7]
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
  assert len(lines) == 3
  for line, row in zip(lines, rows):
    norms = " ".join(f"{k}={row[f'grad_norm_{k}']:.2f}" for k in ("base", "residual", "encoder", "prior"))
    assert f"  |g| {norms}  " in line, line
  for (s0, t0), (s1, t1), row in zip(written, written[1:], rows[1:]):
    assert row["steps_per_sec"] == pytest.approx((s1 - s0) / (t1 - t0), rel=0.05), (s1, row)  # 1e-4 seen


def test_no_intact_checkpoint_is_an_error_that_deletes_nothing(trainer, tmp_path):
  c = trainer.config
  train(c, tmp_path, batches=fake_batches(c), trainer=trainer, verbose=False)
  for step in (2, 4):
    damage(tmp_path / "checkpoints" / str(step), "truncate")
  before = snapshot(tmp_path)
  with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint .* steps 4, 2 cannot be read .* Nothing "
                     "was deleted"):
    train(tiny_config(**{"train.num_steps": 6}), tmp_path, batches=fake_batches(c), trainer=trainer, verbose=False)
  assert snapshot(tmp_path) == before


def tiny_checkpoints(workdir: Path, steps=(2,)) -> dict:
  """Checkpoints of a two-array state at ``steps`` in ``workdir``; returns the abstract state that restores them."""
  manager = ckpt.make_manager(workdir, keep=5, async_save=False)
  for step in steps:
    ckpt.save(manager, step, {"w": np.full(3, step, np.float32)})
  manager.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=device)}


def test_a_step_that_was_not_saved_is_named_with_the_saved_steps_not_called_damaged(trainer, tmp_path, capsys):
  """``restore(step=7)`` where only step 2 was saved: one line naming the saved steps, no "damaged"
  warning, no "nothing was deleted" alarm; a saved step is still restored by its number."""
  abstract = tiny_checkpoints(tmp_path, steps=(2, 4))
  before = snapshot(tmp_path)
  directory = tmp_path / "checkpoints"
  manager = ckpt.make_manager(tmp_path, keep=5, read_only=True)
  with pytest.raises(ckpt.CheckpointError) as error:
    ckpt.restore(manager, abstract, step=7)
  assert str(error.value) == (f"no checkpoint 7 in {directory}; its saved steps: [2, 4]. Ask for one of those, or "
                              "for none (the newest intact one).")
  np.testing.assert_array_equal(np.asarray(ckpt.restore(manager, abstract, step=2)["w"]), np.full(3, 2.0))
  manager.close()
  # The library's entry (Experiment.restore, sampling's and evaluation's) says the same, before reading anything.
  with pytest.raises(ckpt.CheckpointError, match=re.escape(f"no checkpoint 7 in {directory}; its saved steps: "
                                                           "[2, 4].")):
    trainer.restore(tmp_path, step=7, ema_only=True)
  assert "damaged" not in capsys.readouterr().out
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("short", ["host", "device"])
def test_running_out_of_memory_while_reading_is_no_damaged_checkpoint(tmp_path, monkeypatch, short, capsys):
  """A read of the newest step that runs out of memory (the host's, or XLA's on a device, inside Orbax's error)
  raises that error, which the run explains, and changes nothing (before: the step was called damaged, the one
  before restored and the newest moved aside, or every step called damaged)."""
  abstract = tiny_checkpoints(tmp_path, steps=(2, 4))
  before = snapshot(tmp_path)
  error = (MemoryError("Unable to allocate 1.00 GiB") if short == "host" else
           jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 805306368 bytes."))
  real = ckpt._restore_state

  def short_of_memory(manager, step, *args, **kwargs):
    if step == 4:
      raise RuntimeError("reading the arrays failed") from error
    return real(manager, step, *args, **kwargs)

  monkeypatch.setattr(ckpt, "_restore_state", short_of_memory)
  manager = ckpt.make_manager(tmp_path, keep=5, read_only=True)
  with pytest.raises(type(error)) as raised:
    ckpt.restore(manager, abstract, with_data=True)
  manager.close()
  assert raised.value is error and "damaged" not in capsys.readouterr().out and snapshot(tmp_path) == before
  # Another run's checkpoint read whole (train.init_base_from) likewise.
  with pytest.raises(type(error)) as raised:
    ckpt.restore_raw(tmp_path)
  assert raised.value is error and "cannot be read" not in capsys.readouterr().out and snapshot(tmp_path) == before


def test_a_checkpoint_deleted_while_it_is_read_is_no_damaged_one(tmp_path, monkeypatch):
  """A training run keeping one checkpoint saves step 6, deleting 2 and 4, as a sampling run reads 4: the reader
  lists the steps again and restores 6, with a note (before: 4 and 2 were called damaged, and no intact
  checkpoint was the error, telling the user to move the folder away)."""
  abstract = tiny_checkpoints(tmp_path, steps=(2, 4))
  real = ckpt._restore_state

  def training_saves_meanwhile(manager, step, *args, **kwargs):
    if step == 4:
      writer = ckpt.make_manager(tmp_path, keep=1, async_save=False)
      ckpt.save(writer, 6, {"w": np.full(3, 6, np.float32)})
      writer.close()
    return real(manager, step, *args, **kwargs)

  monkeypatch.setattr(ckpt, "_restore_state", training_saves_meanwhile)
  reader, logged = ckpt.make_manager(tmp_path, keep=5, read_only=True), []
  state = ckpt.restore(reader, abstract, log=logged.append)
  reader.close()
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full(3, 6.0))
  assert logged == [f"note: checkpoint 4 in {tmp_path / 'checkpoints'} was deleted while it was read (a training "
                    "run saving there keeps only its newest ones); reading the newest one now."], logged


def test_the_hosts_go_on_from_process_0s_listing(monkeypatch):
  """``first_hosts_list`` on process 1 of 2: process 0's list (its length, then its values, broadcast), not this
  host's own, which another run's save between the two listings could make differ."""
  from jax.experimental import multihost_utils

  from videofusion_jax.training import sharding

  sent = []

  def from_process_0(x):
    sent.append(np.asarray(x).copy())
    return np.int32(3) if np.ndim(x) == 0 else np.array([9, 7, 5], np.int32)

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", from_process_0)
  assert sharding.first_hosts_list([7, 5]) == [9, 7, 5]
  assert int(sent[0]) == 2 and sent[1].shape == (3,)  # this host's length sent; an array of process 0's length


def test_a_damaged_step_asked_for_by_number_names_the_others(tmp_path, monkeypatch):
  """``restore(step=4)`` of a damaged step 4 beside an intact 2: the error names the other steps (before: no
  intact checkpoint, and advice to move the checkpoints folder away)."""
  abstract = tiny_checkpoints(tmp_path, steps=(2, 4))
  real = ckpt._restore_state
  monkeypatch.setattr(ckpt, "_restore_state", lambda manager, step, *a, **k: (
      (_ for _ in ()).throw(ValueError("checksum mismatch")) if step == 4 else real(manager, step, *a, **k)))
  manager = ckpt.make_manager(tmp_path, keep=5, read_only=True)
  with pytest.raises(ckpt.CheckpointError) as error:
    ckpt.restore(manager, abstract, step=4, log=lambda *_: None)
  manager.close()
  assert str(error.value) == (f"checkpoint 4 in {tmp_path / 'checkpoints'} is damaged (see above); its other steps: "
                              "[2]. Ask for one of those, or for none (the newest intact one).")


def test_damaged_checkpoints_on_a_linked_disk_are_moved_aside_there(tmp_path, monkeypatch):
  """workdir/checkpoints a link to another disk: a damaged step goes to a folder beside the linked one, on its
  disk (before: to workdir/checkpoints_damaged, a rename across disks that failed on every resume); a step that
  cannot be moved at all is one error saying what to do."""
  import errno
  import shutil

  disk = tmp_path / "disk2"
  tiny_checkpoints(tmp_path / "staging", steps=(2, 4))
  disk.mkdir()
  shutil.move(tmp_path / "staging" / "checkpoints", disk / "ckpts")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").symlink_to(disk / "ckpts")
  real_rename = Path.rename

  def across_disks(self, target):
    if not str(Path(target).absolute()).startswith(str(disk)):
      raise OSError(errno.EXDEV, "Invalid cross-device link")
    return real_rename(self, target)

  monkeypatch.setattr(Path, "rename", across_disks)
  manager, logged = ckpt.make_manager(workdir, keep=5), []
  ckpt.move_aside(manager, [4], log=logged.append)
  assert logged == [f"moved the damaged checkpoint 4 to {disk / 'ckpts_damaged' / '4'} (kept for inspection; "
                    "training saves step 4 anew)."]
  assert (disk / "ckpts_damaged" / "4" / "state").is_dir() and not (disk / "ckpts" / "4").exists()
  assert manager.all_steps() == [2]

  def refused(self, target):
    raise PermissionError(errno.EACCES, "Permission denied")

  monkeypatch.setattr(Path, "rename", refused)
  with pytest.raises(ckpt.CheckpointError, match=re.escape(
      f"cannot move the damaged checkpoint {disk / 'ckpts' / '2'} to {disk / 'ckpts_damaged' / '2'} (Permission "
      "denied): move it out of the checkpoints folder yourself (or delete it), then run again; the older "
      "checkpoints are intact.")):
    ckpt.move_aside(manager, [2], log=logged.append)
  manager.close()


def test_the_coroutines_a_failed_read_leaves_unawaited_are_not_shown_and_others_are(tmp_path):
  """A failed read of a damaged checkpoint leaves Orbax's shard reads and metadata reads never awaited
  (Python warns as they are collected, at any later time); those warnings are hidden, another's is not."""
  import gc
  import warnings

  class Store:  # Orbax's names: the warning quotes the qualified name
    async def _get_array_metadatas(self):
      pass

  async def _read_array_index_and_device_put():
    pass

  async def another_coroutine():
    pass

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ckpt._hide_abandoned_reads_of(tmp_path / "checkpoints" / "4")
    for make in (Store()._get_array_metadatas, _read_array_index_and_device_put, another_coroutine):
      make()  # made and dropped, never awaited: Python warns as it collects it
      gc.collect()
  shown = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  assert shown == [f"coroutine '{another_coroutine.__qualname__}' was never awaited"], shown


def test_restores_do_not_stack_hooks_and_hide_orbaxs_missing_item_metadata_warning(tmp_path, caplog, monkeypatch):
  """A second restore leaves sys.unraisablehook, the warnings filters and the asyncio logger's filters as the
  first left them (each restore used to add another asyncio filter, for good), and Orbax's absl warning that
  the item's _CHECKPOINT_METADATA (never written for an item) does not exist is not logged, while absl's
  other warnings are."""
  import logging as pylogging
  import warnings

  from absl import logging

  abstract = tiny_checkpoints(tmp_path)
  monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: sys.__unraisablehook__(unraisable))  # this test's own
  hooks = lambda: (sys.unraisablehook, list(warnings.filters), list(pylogging.getLogger("asyncio").filters))  # noqa: E731
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)  # a library user's default (main.py's ERROR would hide the warning)
  try:
    with caplog.at_level(pylogging.WARNING):
      after = []
      for _ in range(2):
        manager = ckpt.make_manager(tmp_path, keep=5, read_only=True)
        np.testing.assert_array_equal(np.asarray(ckpt.restore(manager, abstract)["w"]), np.full(3, 2.0))
        manager.close()
        after.append(hooks())
      logging.warning("Metadata file does not exist: elsewhere")  # absl still logs, other messages too
  finally:
    logging.set_verbosity(verbosity)
  assert after[1][0] is after[0][0] and after[1][1:] == after[0][1:]
  messages = [r.getMessage() for r in caplog.records]
  assert messages == ["Metadata file does not exist: elsewhere"], messages


# A run restoring a damaged checkpoint (absl's verbosity as main.py sets it): Orbax's abandoned reads
# surface, from other threads, while the run goes on.
RESTORE_DAMAGED = """
import gc, sys, time
import jax, numpy as np
from absl import logging
from videofusion_jax.training import checkpoint as ckpt
logging.set_verbosity(logging.ERROR)
device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
abstract = {f"layer{i}": {"kernel": jax.ShapeDtypeStruct((32, 32), np.float32, sharding=device),
                          "bias": jax.ShapeDtypeStruct((32,), np.float32, sharding=device)} for i in range(100)}
state = ckpt.restore(ckpt.make_manager(sys.argv[1], keep=5, read_only=True), abstract)
print("restored sum", sum(float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(state)))
for _ in range(30):
  gc.collect()
  time.sleep(0.1)
"""


def test_a_damaged_checkpoint_is_one_line_in_a_plain_process(tmp_path):
  """What the user's terminal shows: the skipped checkpoint and why, in one line, not a traceback for
  each of Orbax's reads left unfinished (1,121 of them for the tiny model before) nor asyncio's
  log of each."""
  rng = np.random.default_rng(0)
  states = [{f"layer{i}": {"kernel": rng.standard_normal((32, 32), np.float32),
                           "bias": rng.standard_normal(32, np.float32)} for i in range(100)} for _ in range(2)]
  manager = ckpt.make_manager(tmp_path, keep=5, async_save=False)
  for step, state in enumerate(states, 1):
    ckpt.save(manager, step, state)
  manager.close()
  damage(tmp_path / "checkpoints" / "2", "truncate")
  r = subprocess.run([sys.executable, "-c", RESTORE_DAMAGED, str(tmp_path)], cwd=ROOT, capture_output=True,
                     text=True, timeout=120, env=one_device_env())
  assert r.returncode == 0, r.stderr
  assert r.stderr == "", r.stderr[:3000]  # no traceback, no asyncio log, no warning
  skipped, restored, total = r.stdout.splitlines()
  # The cause, not Orbax's dump of the array's TensorStore spec.
  assert skipped.startswith(f"warning: skipped checkpoint 2 in {tmp_path / 'checkpoints'}: it is damaged (reading "
                            "its arrays failed (ValueError: OUT_OF_RANGE: Error reading "), skipped
  assert "is not valid for value of size 64" in skipped and "TensorStore" not in skipped, skipped
  assert restored == "restored checkpoint 1, the newest intact one."
  assert float(total.split()[-1]) == pytest.approx(sum(x.sum(dtype=np.float64) for x in jax.tree.leaves(states[0])),
                                                  rel=1e-12)


def test_workdir_lock(tmp_path, capsys, monkeypatch):
  lock = WorkdirLock(tmp_path).__enter__()
  with pytest.raises(WorkdirError, match=rf"another training run \(process {os.getpid()} on host "
                     rf"{socket.gethostname()}, started .*\) holds {tmp_path / LOCK_NAME}"):
    WorkdirLock(tmp_path).acquire()
  lock.__exit__()
  assert not (tmp_path / LOCK_NAME).exists()
  # A lock left by a process of this host that is gone is taken over.
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
  with WorkdirLock(tmp_path):
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
  assert "was left by process" in capsys.readouterr().out
  # So is one naming this very process (a restarted container reuses ids and host names) that it does not hold.
  (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
  with WorkdirLock(tmp_path):
    assert json.loads((tmp_path / LOCK_NAME).read_text())["started"]  # this run's own record now
  assert f"was left by process {os.getpid()}" in capsys.readouterr().out and not (tmp_path / LOCK_NAME).exists()
  # A SLURM job requeued after a node failure (the same job id, the next restart count, other nodes) takes over
  # its earlier attempt's lock; another attempt's live lock of the same count (a second srun) is refused.
  earlier = {"pid": 4242, "host": "gpu01-gone", "started": "x", "slurm_job": "77", "slurm_restart": "0"}
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
  (tmp_path / LOCK_NAME).write_text(json.dumps(earlier))
  with pytest.raises(WorkdirError, match="another training run \\(process 4242 on host gpu01-gone"):
    WorkdirLock(tmp_path).acquire()
  monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
  with WorkdirLock(tmp_path):
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and (held["slurm_job"], held["slurm_restart"]) == ("77", "1")
  assert "was left by attempt 0 of this SLURM job (77, now attempt 1: requeued)" in capsys.readouterr().out
  monkeypatch.delenv("SLURM_JOB_ID")  # outside SLURM a foreign host's lock stays refused
  (tmp_path / LOCK_NAME).write_text(json.dumps(earlier))
  with pytest.raises(WorkdirError, match="another training run"):
    WorkdirLock(tmp_path).acquire()


def test_two_runs_taking_over_one_stale_lock_at_once_leave_one_holder(tmp_path, monkeypatch):
  """Two runs started together on a workdir whose lock a dead process left: each judged it stale, and the later
  deleted, by name, the lock the earlier had just made, so both held the workdir. Now the stale record is moved
  aside first and deleted only if it is still that record: the later run finds the earlier's, puts it back and
  is refused. A run's release deletes its own record only."""
  from videofusion_jax.training import workdir

  path = tmp_path / LOCK_NAME
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  path.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
  first, second = WorkdirLock(tmp_path), WorkdirLock(tmp_path)
  alive = workdir._alive

  def judged_gone(pid):
    """The second run judges the lock stale; before it acts, the first takes the lock over."""
    monkeypatch.setattr(workdir, "_alive", alive)
    first.acquire()
    return False

  monkeypatch.setattr(workdir, "_alive", judged_gone)
  with pytest.raises(WorkdirError, match="another run took it at the same moment"):
    second.acquire()
  assert first.held and not second.held
  assert json.loads(path.read_text())["token"] == first._token  # the earlier run's record, back in place
  assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing left aside
  first.release()
  assert not path.exists()
  # A lock another run took over (this one judged gone) stays that run's when this one releases.
  first.acquire()
  path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "theirs"}))
  first.release()
  assert json.loads(path.read_text())["token"] == "theirs"


def test_a_lock_file_whose_write_failed_is_removed(tmp_path, monkeypatch):
  """A full disk after the lock file's exclusive create: the error goes up and no empty lock file is left
  (read as another run's, it refused every later run until deleted by hand)."""
  import errno

  from videofusion_jax.training import workdir as wd

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(wd.json, "dump", full_disk)
  with pytest.raises(OSError, match="No space left"):
    wd.WorkdirLock(tmp_path).acquire()
  assert not (tmp_path / LOCK_NAME).exists()


def test_any_failure_in_a_check_is_told_to_the_other_hosts(monkeypatch):
  """``checked_on_every_host``: a failure outside its listed errors (TensorFlow's, XLA's) still votes no, so
  that the other hosts raise at once instead of waiting at their next collective; then it goes on up as it
  is. The vote stands in for the all-gather of several hosts."""
  from videofusion_jax.training import sharding

  votes = []
  monkeypatch.setattr(sharding, "on_every_host", lambda ok: votes.append(ok) or ok)

  def broken():
    raise RuntimeError("a TensorFlow or XLA error")
  with pytest.raises(RuntimeError, match="a TensorFlow or XLA error"):
    sharding.checked_on_every_host(broken, ValueError("elsewhere"))
  assert votes == [False]
  assert sharding.checked_on_every_host(lambda: 7, ValueError("elsewhere")) == 7 and votes[-1]


def test_config_json_and_moving_damaged_checkpoints_aside_are_agreed_on_by_every_host(trainer, tmp_path,
                                                                                       monkeypatch):
  """What process 0 alone writes before the steps, config.json and the move of damaged checkpoints aside, is
  voted on: where it fails (a read-only folder), process 0 raises its error after voting no, and the other
  hosts, told by the vote, raise at once (they went on to their next collective and waited there). The vote
  stands in for the all-gather of several hosts; nothing saved is lost."""
  from videofusion_jax.training import loop, sharding

  votes = []
  monkeypatch.setattr(sharding, "on_every_host", lambda ok: votes.append(ok) or ok)

  def read_only(*args, **kwargs):
    raise PermissionError(13, "Permission denied", "config.json")

  c = trainer.config
  with monkeypatch.context() as m:
    m.setattr(loop, "save_config", read_only)
    with pytest.raises(PermissionError, match="Permission denied"):
      train(c, tmp_path / "run", batches=fake_batches(c), trainer=trainer, verbose=False)
  assert votes[-1:] == [False] and not (tmp_path / "run" / "metrics.jsonl").exists()
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())

  manager = ckpt.make_manager(tmp_path / "moved", keep=5, async_save=False)
  ckpt.save(manager, 1, {"w": np.zeros(2, np.float32)})
  votes.clear()
  with monkeypatch.context() as m:
    m.setattr(Path, "rename", read_only)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot move the damaged checkpoint .* \(Permission denied\)"):
      ckpt.move_aside(manager, [1], log=lambda *_: None)
  assert votes == [False]
  # Another host (process 1 here, the vote no): it moves nothing and says which host to read.
  with monkeypatch.context() as m:
    m.setattr(ckpt.jax, "process_index", lambda: 1)
    m.setattr(sharding, "on_every_host", lambda ok: votes.append(ok) or False)
    with pytest.raises(ckpt.CheckpointError, match=r"process 0 could not move the damaged checkpoints \[1\] of .* "
                                                   r"aside \(its own error says why\)"):
      ckpt.move_aside(manager, [1], log=lambda *_: None)
  assert votes == [False, True]
  manager.close()
  assert [p.name for p in (tmp_path / "moved" / "checkpoints").iterdir()] == ["1"]


@pytest.mark.parametrize("links", [True, False])
def test_write_new_never_writes_over_a_file(tmp_path, monkeypatch, links):
  """``write_new`` writes a free name whole, and where a file is there (another run's, written since the name was
  chosen) the next free one; on a file system without hard links too. No temporary file is left."""
  import errno

  from videofusion_jax.training import workdir

  if not links:
    monkeypatch.setattr(workdir.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "not permitted")))
  names = iter(tmp_path / f"r{k}.json" for k in range(2, 9))
  (tmp_path / "r.json").write_text("another run's")
  (tmp_path / "r2.json").write_text("a third run's")
  written = workdir.write_new(tmp_path / "r.json", lambda tmp: tmp.write_text("this run's"), lambda: next(names))
  assert written == tmp_path / "r3.json" and written.read_text() == "this run's"
  assert (tmp_path / "r.json").read_text() == "another run's" and (tmp_path / "r2.json").read_text() == "a third run's"
  assert workdir.write_new(tmp_path / "free.json", lambda tmp: tmp.write_text("x"), lambda: next(names)) == (
      tmp_path / "free.json")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["free.json", "r.json", "r2.json", "r3.json"]


def test_config_json_is_written_whole_or_not_at_all_and_a_damaged_one_is_an_error(tmp_path, monkeypatch):
  """A write of config.json the disk cuts short leaves the earlier record whole, with nothing beside it (it
  was left half written, then read as no record at all: the check of a resume's settings passed). A record
  that is there but not a JSON object is an error that names it; one that is not there is nothing to compare."""
  import errno

  from videofusion_jax.config import ConfigError, recorded_config
  from videofusion_jax.training import loop

  assert recorded_config(tmp_path) == (tmp_path / "config.json", None)
  c = tiny_config()
  loop.save_config(c, tmp_path)
  whole = (tmp_path / "config.json").read_text()
  write_text = Path.write_text

  def full_disk(self, data, *args, **kwargs):
    write_text(self, data[:100], *args, **kwargs)
    raise OSError(errno.ENOSPC, "No space left on device")

  with monkeypatch.context() as m:
    m.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
      loop.save_config(tiny_config(**{"diffusion.lam": 0.3}), tmp_path)
  assert (tmp_path / "config.json").read_text() == whole and os.listdir(tmp_path) == ["config.json"]
  assert recorded_config(tmp_path)[1] == json.loads(whole) and json.loads(whole)["diffusion"]["lam"] == c.diffusion.lam
  for damaged, problem in ((whole[:100], "JSONDecodeError: "), ("[1, 2]", "a JSON list, not an object"),
                           ("folder", "IsADirectoryError: "), ("link", "FileNotFoundError: ")):
    (tmp_path / "config.json").unlink()
    if damaged == "folder":
      (tmp_path / "config.json").mkdir()
    elif damaged == "link":  # a link to a record moved away
      (tmp_path / "config.json").symlink_to(tmp_path / "gone.json")
    else:
      (tmp_path / "config.json").write_text(damaged)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'} records the settings the "
                                                    f"checkpoints beside it were trained with, and cannot be read "
                                                    f"({problem}")):
      recorded_config(tmp_path)
    if damaged == "folder":
      (tmp_path / "config.json").rmdir()
      (tmp_path / "config.json").touch()


def test_a_metrics_line_process_0_cannot_write_is_warned_and_training_goes_on(tmp_path, capsys, monkeypatch):
  """metrics.jsonl is process 0's alone: a line it cannot write (a full disk; a write cut short) is warned
  about once and the run goes on (raised on process 0 alone, it left the other hosts waiting in the next
  step's collectives); no part of the line is left to end the file's readable part, and once lines are
  written again the missed steps are named. TensorBoard's events failing (their writes, their close) are
  warned about too, and take no line from metrics.jsonl."""
  import errno

  from videofusion_jax.training import loop

  class Disk:
    def __init__(self, real):
      self.real, self.fail = real, None

    def write(self, data):
      if self.fail == "full":
        raise OSError(errno.ENOSPC, "No space left on device")
      if self.fail == "short":
        return self.real.write(data[:7])
      return self.real.write(data)

    def flush(self):
      self.real.flush()

    def fileno(self):
      return self.real.fileno()

    def close(self):
      self.real.close()

  class Events:  # TensorBoard's writer, failing from step 5 on: metrics.jsonl keeps its lines
    def __init__(self):
      self.steps = []

    def add_scalar(self, name, value, step):
      if step >= 5:
        raise OSError(errno.ENOSPC, "No space left on device")
      self.steps.append(step)

    def flush(self):
      pass

    def close(self):
      raise OSError(errno.ENOSPC, "No space left on device")

  writer = loop._Writer(tmp_path, 0)
  writer._jsonl, writer._w = disk, events = Disk(writer._jsonl), Events()
  for step, fail in ((1, None), (2, "short"), (3, "full"), (4, None), (5, None), (6, None)):
    disk.fail = fail
    writer.scalars(step, {"loss": float(step)})
  assert losses(tmp_path) == {1: 1.0, 4: 4.0, 5: 5.0, 6: 6.0} and events.steps == [1, 2, 3, 4]
  # A part line that cannot be removed (the truncation refused too) is ended before the next line, which it
  # would otherwise spoil.
  disk.fail = "short"
  with monkeypatch.context() as m:
    m.setattr(loop.os, "ftruncate", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    writer.scalars(7, {"loss": 7.0})
  disk.fail = None
  writer.scalars(8, {"loss": 8.0})
  writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert lines[-2] == '{"step"' and json.loads(lines[-1]) == {"step": 8, "loss": 8.0}
  assert {r["step"]: r["loss"] for r in map(json.loads, lines[:-2])} == {1: 1.0, 4: 4.0, 5: 5.0, 6: 6.0}
  printed = capsys.readouterr().out
  assert "metrics.jsonl: written again from step 8; the steps 7 are missing from it" in printed
  assert printed.count("warning: cannot write the metrics") == 2  # once for steps 2-3, once for step 7
  assert printed.count("warning: cannot write TensorBoard's events (No space left on device)") == 1
  assert "warning: closing the metrics files: [Errno 28] No space left on device" in printed
  assert f"warning: cannot write the metrics of step 2 to {tmp_path / 'metrics.jsonl'} (the line was written in " \
         "part); training goes on" in printed
  assert "metrics.jsonl: written again from step 4; the steps 2, 3 are missing from it" in printed


def test_a_lock_its_holder_stopped_renewing_is_taken_over_from_another_host(tmp_path, capsys, monkeypatch):
  """The holder renews the lock's modification time every HEARTBEAT_S from a thread of its own, until it
  releases it; a lock of another host not renewed for STALE_S (its run killed past its grace period on a TPU
  slice since recreated under other host names) is taken over, with a note (it was refused until deleted by
  hand); one renewed since, or written before the heartbeat (no field), is still refused."""
  from videofusion_jax.training import workdir as workdir_lib

  monkeypatch.setattr(workdir_lib, "HEARTBEAT_S", 0.05)
  path = tmp_path / LOCK_NAME
  lock = WorkdirLock(tmp_path).__enter__()
  long_ago = time.time() - 3600
  os.utime(path, (long_ago, long_ago))
  deadline = time.time() + 10
  while path.stat().st_mtime < time.time() - 60 and time.time() < deadline:
    time.sleep(0.02)
  assert path.stat().st_mtime > time.time() - 60  # renewed
  lock.__exit__()
  assert not path.exists()
  time.sleep(0.2)  # the released hold's thread has stopped: it recreates nothing,
  assert not path.exists()
  # and touches nothing: not the lock of a run that takes the workdir next (it would keep a dead one fresh).
  path.write_text(json.dumps({"pid": 4243, "host": "another-host", "started": "x", "heartbeat": 60.0}))
  os.utime(path, (long_ago, long_ago))
  time.sleep(0.3)
  assert abs(path.stat().st_mtime - long_ago) < 1  # (filesystems keep times to the second, or finer)
  path.unlink()

  other = {"pid": 4242, "host": "tpu-slice-before-w-0", "started": "x", "heartbeat": 60.0}
  for record, idle, taken in ((other, workdir_lib.STALE_S + 60, True), (other, workdir_lib.STALE_S - 60, False),
                              ({k: v for k, v in other.items() if k != "heartbeat"}, 24 * 3600, False)):
    path.write_text(json.dumps(record))
    then = time.time() - idle
    os.utime(path, (then, then))
    if taken:
      with WorkdirLock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
      out = capsys.readouterr().out
      assert "was left by process 4242 on host tpu-slice-before-w-0, which has not renewed it for 16 minutes" in out
    else:
      with pytest.raises(WorkdirError, match="another training run \\(process 4242 on host tpu-slice-before-w-0"):
        WorkdirLock(tmp_path).acquire()
      assert json.loads(path.read_text()) == record


@pytest.fixture(scope="module")
def trained(config_file, tmp_path_factory):
  """A workdir trained 2 steps through the command line."""
  workdir = tmp_path_factory.mktemp("trained")
  r = run_main(config_file, workdir, "--config.train.num_steps=2")
  assert r.returncode == 0, r.stderr
  return workdir


@pytest.mark.parametrize("args,message", [
    (["--config.model.base.base_channels=16"], "ema_params.base.conv_in.bias is (8,) there and (16,) here). Use "
     "the config it was trained with; the run's config is in"),
    (["--config.train.nmu_steps=3"], "--config.train.nmu_steps: the config has no such field; did you mean "
     "--config.train.num_steps?"),
    (["--config.model.condition=label"], "it was trained with --config.model.condition=embedding"),
    ("lock", "another training run (process"),
    # Resuming under another λ or noise schedule (no parameter's shape shows them) trained the checkpoints on
    # under the new settings and wrote them into config.json; a split or clip length the dataset lacks failed
    # at the first batch, after the initial state, with config.json rewritten.
    (["--config.diffusion.lam=0.3", "--config.train.num_steps=3"], "config.diffusion.lam=0.3 (trained with 0.5): "
     "the checkpoints in"),
    (["--config.data.split=tset", "--config.train.num_steps=3"], "split 'tset' (config.data.split"),
    (["--config.data.frame_stride=200", "--config.train.num_steps=3"], "has the 601 frames that data.num_frames=4"),
    ("missing_config", "--config=configs/nowhere.py: no such file (configs here: configs/demo.py"),
    # config.json cut short (a full disk) was taken for no record: the resume under another λ passed, and the
    # new λ was written as the trained one.
    ("damaged_record", "config.json records the settings the checkpoints beside it were trained with, and cannot "
     "be read (JSONDecodeError: "),
])
def test_bad_input_is_one_line_and_changes_nothing(trained, config_file, args, message):
  if args == "lock":  # a live process of this host (this test) holds the workdir
    (trained / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "x"}))
  record = trained / "config.json"
  whole = record.read_text()
  if args == "damaged_record":
    record.write_text(whole[:len(whole) // 2])
  before = snapshot(trained)
  try:
    if args == "missing_config":
      r = run_main("configs/nowhere.py", trained)
    elif args == "damaged_record":
      r = run_main(config_file, trained, "--config.diffusion.lam=0.3", "--config.train.num_steps=3")
    else:
      r = run_main(config_file, trained, *([] if args == "lock" else args))
  finally:
    after = snapshot(trained)
    record.write_text(whole)  # the module's trained workdir, whole for the next case
  (trained / LOCK_NAME).unlink(missing_ok=True)
  assert r.returncode == 1, r.stdout + r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], r.stderr
  assert "Traceback" not in r.stderr + r.stdout and "Event loop is closed" not in r.stderr
  after.pop(LOCK_NAME, None)
  before.pop(LOCK_NAME, None)
  assert after == before


def test_workdir_that_is_a_file_or_a_url_and_a_finished_run(trained, config_file, tmp_path):
  (tmp_path / "a_file").write_text("x")
  r = run_main(config_file, tmp_path / "a_file")
  assert r.returncode == 1 and (tmp_path / "a_file").read_text() == "x"
  assert r.stderr.strip().splitlines()[-1] == (f"error: --workdir={tmp_path / 'a_file'} is a file, not a directory: "
                                               "give a directory (it is created when missing).")
  r = run_main(config_file, "gs://bucket/run")
  assert r.returncode == 1 and "URLs are not supported yet" in r.stderr and not (ROOT / "gs:").exists()
  before = snapshot(trained)
  r = run_main(config_file, trained, "--config.train.num_steps=1")
  assert r.returncode == 0 and "nothing to train: checkpoint 2" in r.stdout and "num_steps=1" in r.stdout
  assert snapshot(trained) == before


def test_a_signal_while_the_last_checkpoint_is_written_stops_as_announced(trainer, tmp_path, monkeypatch, capsys):
  """SIGTERM (or Ctrl-C) after the last step's check, while its checkpoint is written: it was announced as
  "saving a checkpoint and exiting", yet train() returned and --mode=train_and_sample sampled on, past a
  preemption's grace period. Now the saved last step is a stop (``Preempted``), as at any other step."""
  from videofusion_jax.training import loop

  close = ckpt.ocp.CheckpointManager.close
  signalled = []

  def close_signalled(self):
    if not signalled:
      signalled.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)  # the handler runs between two Python lines
    return close(self)

  monkeypatch.setattr(ckpt.ocp.CheckpointManager, "close", close_signalled)
  c = tiny_config(**{"train.num_steps": 2})
  with pytest.raises(loop.Preempted, match=re.escape(f"stopped on SIGTERM at step 2: checkpoint 2 is saved in "
                                                     f"{tmp_path / 'checkpoints'}")):
    train(c, tmp_path, batches=fake_batches(c, n=2), trainer=trainer, verbose=False)
  assert "SIGTERM received: finishing the step in flight, then saving a checkpoint" in capsys.readouterr().out
  assert ckpt.make_manager(tmp_path, 2, read_only=True).latest_step() == 2
  assert not (tmp_path / LOCK_NAME).exists()
  # Control: without the signal the run returns its state.
  assert int(train(c, tmp_path / "plain", batches=fake_batches(c, n=2), trainer=trainer, verbose=False).step) == 2


def test_a_checkpoint_folder_a_host_cannot_write_stops_training_before_anything(tmp_path, monkeypatch):
  """Each host writes its part of every checkpoint: a ``checkpoints`` folder it cannot write to failed at the first
  save only, in the background (the steps until the next save lost), then held the exit 5 minutes in Orbax's
  threads. It is refused before the trainer is built or the lock taken. (Permissions stood in for: the suite may
  run as root, whom they do not stop.)"""
  from videofusion_jax.training import loop, workdir

  (tmp_path / "checkpoints").mkdir()
  access = os.access
  monkeypatch.setattr(workdir.os, "access", lambda p, mode: Path(p).name != "checkpoints" and access(p, mode))
  monkeypatch.setattr(loop, "Trainer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
  with pytest.raises(WorkdirError, match=re.escape(f"{tmp_path / 'checkpoints'} is not writable by this user")):
    train(tiny_config(), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_a_checkpoint_write_the_disk_refuses_is_one_line(monkeypatch, capsys):
  """A full disk (or an uncreatable folder) under an asynchronous save reaches the run as TensorStore's error,
  which Orbax raises as a ValueError (``RESOURCE_EXHAUSTED: ... [os_error_code='28']``, not an OSError) and logs
  with its traceback from several of its threads: it fell through to the run's traceback. Now Orbax's records of
  it are one warning line, the run ends with one ``error:`` line naming the file (the checkpoints before it
  intact), and without waiting for Orbax's threads left waiting for the folder the write never made."""
  import logging
  import threading
  import types

  from videofusion_jax import main

  path = "/w/checkpoints/6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/_sharding"
  tensorstore = ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{path}": Failed writing: "{path}.__lock": '
                           "Failed to write 286975 bytes to file 8: No space left on device [os_error_code='28']")
  error = ckpt.os_error_of(tensorstore)
  assert (error.errno, error.filename) == (28, path)
  assert ckpt.os_error_of(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None
  wrapped = RuntimeError("Save Finalize thread failed")
  wrapped.__cause__ = PermissionError(13, "Permission denied", "/w/checkpoints/6.orbax-checkpoint-tmp")
  assert ckpt.os_error_of(wrapped) is wrapped.__cause__
  line = main._os_error(error, tiny_config(), "/w")
  assert line == (f"[Errno 28] No space left on device: '{path}' (writing a checkpoint; the checkpoints saved before "
                  "it are intact): free space there or fix the folder's permissions, and rerun to resume.")

  # Orbax's records: from its checkpoint modules, at ERROR, with the error in the message or the exception.
  monkeypatch.setattr(ckpt, "_SAVE_FAILED", [])
  absl = logging.getLogger("absl")
  site = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"

  def record(message, exc=None, pathname=site, level=logging.ERROR):
    return logging.LogRecord("absl", level, pathname, 387, message, None, (type(exc), exc, None) if exc else None)

  timeout = record("raised an exception: Timeout waiting for key 'signals/item_directory_creation'",
                   exc=TimeoutError("Timeout waiting for key 'signals/item_directory_creation'"))
  assert absl.filter(timeout)  # before any write failed: a timeout of Orbax's own, shown
  assert absl.filter(record("[process=0] Failed to run 4 Handler Commit operations", exc=tensorstore)) is False
  assert absl.filter(record("_SignalingThread.run() raised an exception: " + str(tensorstore))) is False
  assert absl.filter(timeout) is False  # after: its threads left waiting for the folder the write never made
  err = capsys.readouterr().err
  assert err == (f"warning: a checkpoint could not be written ([Errno 28] No space left on device: '{path}'); "
                 "training stops with this error at the next checkpoint or at its end. The checkpoints saved before "
                 "it are intact.\n")
  # Shown: another module's, a lower level's, an Orbax error without an OS error.
  assert absl.filter(record("x " + str(tensorstore), pathname="/venv/site-packages/other/mod.py"))
  assert absl.filter(record(str(tensorstore), level=logging.WARNING))
  assert absl.filter(record("Save Finalize thread (save_finalize) failed.", exc=ValueError("shape mismatch")))
  # An old step that could not be deleted (keep_checkpoints) is no write: Orbax's record, which says so, stays.
  assert absl.filter(record("Save Finalize thread (save_finalize) failed.",
                            exc=PermissionError(13, "Permission denied", "/w/checkpoints/1")))
  assert capsys.readouterr().err == ""

  # The exit: Orbax's threads still waiting (non-daemon) would hold the interpreter 5 minutes; it leaves without.
  release = threading.Event()
  waiting = type("_SignalingThread", (threading.Thread,), {"__module__": "orbax.checkpoint._src.futures.future"})(
      target=release.wait, daemon=False)
  monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(("os._exit", code))))
  monkeypatch.setattr(main.signal, "signal", lambda *a: None)
  monkeypatch.setitem(sys.modules, "videofusion_jax.training.sharding", types.SimpleNamespace(
      report_failure=lambda *a, **k: False))
  with pytest.raises(SystemExit) as plain:
    main._exit_failed(line)
  assert plain.value.code == 1  # no thread of Orbax's: the interpreter's own exit
  waiting.start()
  try:
    with pytest.raises(SystemExit) as left:
      main._exit_failed(line)
    assert left.value.code == ("os._exit", 1)
    # Another failure while a save is being committed (a second Ctrl-C in the last checkpoint's write): the
    # interpreter waits for Orbax's threads, which finish that checkpoint.
    with pytest.raises(SystemExit) as other:
      main._exit_failed("Ctrl-C stopped it at once; the checkpoints saved before are intact")
    assert other.value.code == 1
  finally:
    release.set()
    waiting.join()


def test_values_that_are_not_finite_are_left_out_of_tensorboard_as_of_metrics_jsonl(tmp_path):
  """A float16 step skipped for overflowing gradients logs gradient norms of inf: null in metrics.jsonl, and
  no point in TensorBoard (an inf there squashed the plot's scale to nothing)."""
  import tensorflow as tf

  from videofusion_jax.training.loop import _Writer

  writer = _Writer(tmp_path, 0, say=lambda *a, **k: None)
  writer.scalars(1, {"loss": np.float32(0.5), "grad_norm_base": np.float32(2.0), "update_skipped": np.float32(0)})
  writer.scalars(2, {"loss": np.float32(0.25), "grad_norm_base": np.float32(np.inf), "update_skipped": np.float32(1)})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["grad_norm_base"] for r in rows] == [2.0, None]
  points = sorted((e.step, v.tag, v.simple_value) for f in (tmp_path / "tensorboard").glob("events.out.tfevents.*")
                  for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value)
  assert points == [(1, "grad_norm_base", 2.0), (1, "loss", 0.5), (1, "update_skipped", 0.0), (2, "loss", 0.25),
                    (2, "update_skipped", 1.0)]


def test_a_run_refused_the_lock_removes_none_of_the_folders_of_the_run_that_holds_it(tmp_path, monkeypatch):
  """Two runs starting together in a new workdir: the one refused the lock leaves the folders it found missing at
  its start (it removed the other run's still empty checkpoints folder), where a run that held the lock and stopped
  before writing anything removes its own (tests/test_cli.py: a missing dataset)."""
  from videofusion_jax.training import loop

  workdir = tmp_path / "run"

  def other_run_wins(lock, path):  # the other run takes the new workdir between this one's look and its lock
    (path / "checkpoints").mkdir(parents=True)
    (path / LOCK_NAME).write_text("{}")
    raise WorkdirError("another training run holds the workdir")

  monkeypatch.setattr(loop, "_lock_on_every_host", other_run_wins)
  with pytest.raises(WorkdirError, match="another training run holds the workdir"):
    loop.train(tiny_config(), workdir, iter([]), verbose=False)
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", LOCK_NAME]
