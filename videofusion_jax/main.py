"""Entry point: ``python -m videofusion_jax.main --config=configs/demo.py --workdir=DIR``.

Modes: ``train`` (resumes from the latest checkpoint in the workdir), ``sample`` (EMA
weights of the latest checkpoint -> videos), ``train_and_sample``, ``eval`` (FVD, KVD and,
given C3D weights, the Inception Score of the latest checkpoint).

Several hosts: ``--multihost`` (TPU pods, SLURM: JAX finds the coordinator itself), or
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on each host.
"""
from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, events and samples go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "train_and_sample", "eval", "embed"],
                          "What to run ('embed': store the CLIP frame embeddings of model.encoder.clip_dir "
                          "beside the dataset, once, before a multi-host run; the workdir is not used).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Join the other processes of a multi-host run "
                               "(jax.distributed.initialize) before anything touches a device.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (implies --multihost); "
                                   "not needed on TPU pods and SLURM, where JAX finds it.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(  # --mode=embed writes beside the dataset, not in a workdir
    ["workdir", "mode"], lambda f: f["workdir"] is not None or f["mode"] == "embed",
    message="--workdir is required: the directory of the run's checkpoints, events and samples (only --mode=embed "
            "goes without one).")


def _flag_error(e: Exception) -> str:
  """One line for a command-line error raised while parsing flags (the config file is loaded then)."""
  text = str(e).strip()
  if "Traceback" in text:  # a config file that raised: its last line says what went wrong
    flag = text.split(":", 1)[0]
    text = f"{flag}: {[line for line in text.splitlines() if line.strip()][-1].strip()}"
  return " ".join(text.split())


def _config_argument(argv: list[str]) -> list[str]:
  """``argv`` with its config file as one ``--config=PATH[:variant]`` (absl also takes ``--config PATH``, which
  the checks below did not see), ``~`` expanded in PATH (config_flags loads the path as written, and the shell
  expands no ``~`` after ``=``); one config file at most."""
  out, given, i = [argv[0]], [], 1
  while i < len(argv):
    arg = argv[i]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      arg, i = f"--config={argv[i + 1]}", i + 1
    if arg.startswith(("--config=", "-config=")):
      path, colon, variant = arg.split("=", 1)[1].partition(":")
      given.append(arg.split("=", 1)[1])
      arg = f"--config={os.path.expanduser(path)}{colon}{variant}"
    out.append(arg)
    i += 1
  if len(given) > 1:
    _fail(f"--config is given {len(given)} times ({', '.join(given)}): give one config file (a variant as "
          "--config=FILE:VARIANT).")
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with every error as one ``error:`` line (a missing config file, a
  misspelled override) before anything slow happens."""
  argv = _config_argument(argv)
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = Path(arg[len("--config="):].split(":", 1)[0]).expanduser()
      if not path.is_file():
        found = sorted(str(p) for p in Path("configs").glob("*.py")) if Path("configs").is_dir() else []
        _fail(f"--config={path}: no such file" + (f" (configs here: {', '.join(found)})" if found else
                                                  " (run from the repository root, or give the file's full path)"))
  try:
    rest = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    name = str(e.flagname) if getattr(e, "flagname", None) else ""
    if name.startswith("config."):
      _fail(f"--{name}: the config has no such field{_suggest(name.split('.')[1:], _load_config_file(argv)) or '.'}")
    _fail(f"{_flag_error(e)} (python -m videofusion_jax.main --helpfull lists the flags)")
  except Exception as e:  # noqa: BLE001 - config files and overrides raise anything; one line each
    config = _load_config_file(argv)
    bad = _unknown_override(argv, config)
    _fail(f"--config.{'.'.join(bad)}: the config has no such field{_suggest(bad, config) or '.'}" if bad
          else _flag_error(e))
  if len(rest) > 1:  # an unquoted value with spaces, a stray word: it would be dropped without a word
    _fail(f"unexpected arguments {' '.join(rest[1:])!r}: every setting is a --flag; quote a value with spaces "
          "(--config.sample.prompt='a dog runs').")
  return rest


def _unknown_override(argv: list[str], config) -> list[str] | None:
  """The path of the first ``--config.a.b=v`` override that names no field of the loaded config."""
  for arg in argv[1:]:
    if arg.startswith("--config.") and config is not None:
      path, node = arg[len("--config."):].split("=", 1)[0].split("."), config
      for part in path:
        if not hasattr(node, "keys") or part not in node.keys():
          return path
        node = node[part]
  return None


def _load_config_file(argv: list[str]):
  """The config of ``--config=path[:variant]`` without its overrides, or None if it cannot be loaded."""
  import importlib.util
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path, _, variant = arg[len("--config="):].partition(":")
      try:
        spec = importlib.util.spec_from_file_location("_config_file", Path(path).expanduser())
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
      except Exception:  # noqa: BLE001 - its own error is reported instead
        return None
  return None


def _suggest(path: list[str], node) -> str:
  """'; did you mean --config.a.b?' for a misspelled override, from the config file's fields (``node``,
  the loaded config; None: no suggestion)."""
  import difflib
  if node is None:
    return ""
  fixed = []
  for part in path:
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=1)
      if not close:
        return f" ({'config' + ''.join('.' + p for p in fixed)} has {', '.join(sorted(keys))})." if keys else ""
      part = close[0]
    fixed.append(part)
    node = node[part]
  return f"; did you mean --config.{'.'.join(fixed)}?"


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  _exit_failed(message)


def _ignore_ctrl_c() -> None:
  """Ctrl-C ignored from here to the exit: telling the other hosts takes seconds (they wait a few for errors of
  their own), and one more Ctrl-C inside it ended the telling half done, with a traceback."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _exit_failed(message: str, code: int = 1, what: str = "stopped with an error", tell: bool = True) -> None:
  """Exit ``code``; on a run of several processes the other hosts are told first (``tell``:
  ``sharding.report_failure``, that this one ``what``), and a host whose others it stopped leaves without JAX's
  shutdown barrier, which they never reach."""
  sharding = sys.modules.get("videofusion_jax.training.sharding")  # not imported yet (a flag's error): no run
  checkpoint = sys.modules.get("videofusion_jax.training.checkpoint")  # not imported: no Orbax thread either
  _ignore_ctrl_c()
  if (tell and sharding is not None and sharding.report_failure(message, what=what)) or (
      checkpoint is not None and checkpoint.WRITING in message and _orbax_threads_waiting()):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def _orbax_threads_waiting() -> bool:
  """Whether threads of Orbax's still run: after a checkpoint write that failed (``_exit_failed`` asks only then:
  an ordinary save's threads are committing it) they wait for the folder it never made, and the interpreter would
  wait for them at its exit (5 minutes, their timeout) before ending the run."""
  return any(type(t).__module__.startswith("orbax.") and t.is_alive() and not t.daemon for t in threading.enumerate())


def _interrupted(e: KeyboardInterrupt, after: str) -> None:
  """Ctrl-C, or SIGTERM where there was no step to save (``preemption.Interrupted``): one line ending
  with ``after`` (what was kept, what to do), and the shell's code for the signal (128 + its number)."""
  from videofusion_jax.training.preemption import AT_ONCE
  name, how = getattr(e, "signal_name", "SIGINT"), getattr(e, "how", AT_ONCE)
  by = "" if name == "SIGINT" else f" by {name}"
  print(f"\ninterrupted{by}: {how}; {after}.", file=sys.stderr)
  # Stopped here alone (a second Ctrl-C), not where every host agreed to: on several hosts the others are told, as
  # of a failure, where they would wait for this one in their next collective and at JAX's shutdown barrier.
  _exit_failed(f"{'Ctrl-C' if name == 'SIGINT' else name} stopped it at once; {after}",
               128 + signal.Signals[name].value, what="was interrupted", tell=how == AT_ONCE)


def _os_error(e: OSError, config, workdir: str | None = None) -> str:
  """An OSError's line; a full disk's (or a full quota's) names the folders written to when the error
  names no file (numpy, zipfile and TFDS writes leave its filename empty)."""
  from videofusion_jax.training.checkpoint import is_checkpoint_write
  if is_checkpoint_write(e):
    return (f"{e} (writing a checkpoint; the checkpoints saved before it are intact): free space there or fix the "
            "folder's permissions, and rerun to resume.")
  if e.errno not in (errno.ENOSPC, errno.EDQUOT) or e.filename:
    return str(e)
  from videofusion_jax.data.pipeline import default_data_dir
  folders = {"the workdir": workdir, "the datasets' data_dir": config.data.get("data_dir") or default_data_dir(),
             "the compilation cache": config.get("compilation_cache_dir") or None}
  named = "; ".join(f"{what} {os.path.expanduser(str(path))}" for what, path in folders.items()
                    if path and "://" not in str(path))  # a bucket is no disk of this host's
  return f"{e}: a disk (or quota) this run writes to is full ({named}). Free space there and rerun."


def _warn_if_cache_not_shared(setting: str) -> None:
  """Process 0 warns when the compilation cache's folder is not one folder every host sees (every process
  calls this)."""
  import jax

  from videofusion_jax.experiment import hosts_not_sharing_cache
  # As enable_compilation_cache set it (~ expanded on each host); None where the cache is off.
  path = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
  missing = hosts_not_sharing_cache(path)
  if missing and jax.process_index() == 0:
    who = ("process " if len(missing) == 1 else "processes ") + ", ".join(map(str, missing[:8])) + (
        f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    print(f"warning: config.compilation_cache_dir={setting!r} ({path} on process 0) is not one folder shared by "
          f"every host: {who} {'does' if len(missing) == 1 else 'do'} not see what process 0 writes there. JAX stores "
          "compiled programs from process 0 alone, for every host to read, so the others compile each program anew "
          "on every run, and every host waits for them at its first step. Point it at a folder every host sees at "
          "the same path (NFS, a shared disk), or '' to turn the cache off.", flush=True)


def _start_distributed() -> None:
  """``jax.distributed.initialize`` with the flags given (JAX finds the rest on TPU pods and
  SLURM); on CPUs the processes talk through gloo collectives."""
  import jax
  kwargs = {k: v for k, v in (("coordinator_address", _COORDINATOR.value), ("num_processes", _NUM_PROCESSES.value),
                              ("process_id", _PROCESS_ID.value)) if v is not None}
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    _fail(f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
          f"{' '.join(str(e).split())[:400].rstrip('.')}. On TPU pods and SLURM pass --multihost alone; elsewhere give "
          "--coordinator_address=HOST:PORT (process 0's host), --num_processes and --process_id on every host.")


def _embed(config) -> None:
  """``--mode=embed``: the CLIP frame embeddings of the training split, stored beside the dataset."""
  from videofusion_jax.config import SYNTHETIC_DATA, ConfigError, validate
  from videofusion_jax.data import embeddings

  validate(config)
  if config.data.name == SYNTHETIC_DATA:
    raise ConfigError(f"--mode=embed stores the CLIP embeddings of a dataset's clips; config.data.name="
                      f"{SYNTHETIC_DATA!r} has none (its batches carry random embeddings of their own).")
  if config.model.condition != "embedding" or config.model.encoder.kind != "clip":
    raise ConfigError("--mode=embed stores CLIP frame embeddings: it needs --config.model.encoder.kind=clip (with "
                      "model.condition='embedding'; --config.model.encoder.clip_dir=DIR, or none for the project's "
                      "own CLIP).")
  split = config.data.get("split", "train")
  print(f"CLIP frame embeddings: {embeddings.compute_table(config, split)}")
  if config.model.prior.condition == "text":
    print(f"CLIP caption embeddings: {embeddings.compute_caption_table(config, split)}")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax and TFDS log every file at INFO.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from videofusion_jax.config import ConfigError, check_fields
  from videofusion_jax.data.builders import DatasetNotFoundError
  from videofusion_jax.data.pipeline import PipelineError
  from videofusion_jax.data.video_io import VideoReadError
  from videofusion_jax.experiment import DeviceMemoryError
  from videofusion_jax.models.clip import CLIPLoadError
  from videofusion_jax.training.checkpoint import CheckpointError
  from videofusion_jax.training.loop import NonFiniteLossError, Preempted
  from videofusion_jax.training.workdir import WorkdirError, check_workdir

  config = _CONFIG.value
  try:  # before any of its fields is used
    check_fields(config)
  except ConfigError as e:
    _fail(str(e))
  from videofusion_jax.experiment import enable_compilation_cache
  from videofusion_jax.training.preemption import sigterm_stops_at_once
  if _MODE.value == "embed":
    try:
      with sigterm_stops_at_once(multihost=False):
        enable_compilation_cache(config.compilation_cache_dir, config.compilation_cache_max_gb)
        _embed(config)
    except KeyboardInterrupt as e:
      _interrupted(e, "the tables stored before are intact (rerun to make the rest)")
    except (ConfigError, DatasetNotFoundError, PipelineError, CLIPLoadError, OSError) as e:
      _fail(_os_error(e, config) if isinstance(e, OSError) else str(e))
    return
  # Any of the multi-host flags means a multi-host run: a process that ran alone with --process_id=1
  # would write its checkpoints over the others' in the shared workdir.
  multihost = bool(_MULTIHOST.value or _COORDINATOR.value or _NUM_PROCESSES.value is not None
                   or _PROCESS_ID.value is not None or os.environ.get("VIDEOFUSION_MULTIHOST"))
  if multihost:
    _start_distributed()
    from videofusion_jax.training.sharding import watch_for_failures
    watch_for_failures()
  # The path checked is the path used (~ expanded: a shell leaves it in --workdir=~/run).
  check = functools.partial(check_workdir, _WORKDIR.value, must_exist=_MODE.value in ("sample", "eval"))
  try:
    if multihost:  # a host that stopped alone would leave the others waiting at their first collective
      from videofusion_jax.training.sharding import checked_on_every_host
      workdir = str(checked_on_every_host(check, WorkdirError(
          f"--workdir={_WORKDIR.value}: another host cannot use it (its own error says why); every host needs the "
          "same directory, shared and writable (a bucket mounted at the same path on each).")))
    else:
      workdir = str(check())
  except WorkdirError as e:
    _fail(str(e))
  try:
    # No step to save: SIGTERM stops it at once, as Ctrl-C does; on several processes, after an agreed batch
    # (a --multihost run of one process, a one-node SLURM job, has no other host to tell).
    import jax
    with sigterm_stops_at_once(multihost and jax.process_count() > 1):
      def set_up():
        """One experiment per run (it validates the config), shared by the modes the run performs."""
        enable_compilation_cache(config.compilation_cache_dir, config.compilation_cache_max_gb)
        if _MODE.value == "train_and_sample" and config.train.stage == "image":  # before hours of training
          raise ConfigError("--mode=train_and_sample with config.train.stage='image': the image stage trains the "
                            "base generator alone and leaves the residual generator untrained, so its videos would be "
                            "noise but for the key frame. Use --mode=train, then train the video stage from this "
                            "workdir (--config.train.init_base_from) and sample that.")
        if _MODE.value == "train_and_sample":  # what sampling will read, checked before the training, not after it
          from videofusion_jax import sampling
          sampling.sample_prompts(config, 1, note=False)
          sampling.given_embeddings(config, config.sample.num_samples)
          sampling.check_guidance_was_trained(config, config.train.label_dropout)  # the dropout it will train with
        if _MODE.value in ("train", "train_and_sample"):
          from videofusion_jax.training.step import Trainer
          return Trainer(config)
        from videofusion_jax.experiment import Experiment
        return Experiment(config)

      from videofusion_jax.training.sharding import checked_on_every_host
      # Each host reads its own disk here (the cache's folder, prompts, embeddings, a CLIP directory): one that
      # fails alone stops every host, where the others would wait at their first collective.
      experiment = checked_on_every_host(set_up, ConfigError(
          "another host could not set up this run (its own error says why): every host needs the same files at "
          "the same paths (compilation_cache_dir, sample.prompts_file, sample.embeddings, the CLIP directory)."))
      if multihost:
        _warn_if_cache_not_shared(config.compilation_cache_dir)
      if _MODE.value in ("train", "train_and_sample"):
        from videofusion_jax.training.loop import train
        train(config, workdir, trainer=experiment)
      if _MODE.value in ("sample", "train_and_sample"):
        from videofusion_jax import sampling
        sampling.run(config, workdir, experiment=experiment,
                     config_name=config_flags.get_config_filename(flags.FLAGS["config"]))
      if _MODE.value == "eval":
        from videofusion_jax.evaluation import evaluate
        evaluate.run(config, workdir, experiment=experiment)
      if multihost:  # a host failing after this one's work is done need not wait for it
        from videofusion_jax.training.sharding import say_finished
        say_finished()
  except Preempted as e:
    print(e, flush=True)
    sys.exit(0)
  except KeyboardInterrupt as e:  # the second Ctrl-C of a training run, or one (or SIGTERM) in any other work
    _interrupted(e, "the checkpoints saved before are intact (" + ("rerun to resume)" if _MODE.value.startswith("train")
                                                                    else "rerun to start it again)"))
  except (ConfigError, DatasetNotFoundError, VideoReadError, CheckpointError, NonFiniteLossError,
          PipelineError, OSError, FloatingPointError, WorkdirError, CLIPLoadError, DeviceMemoryError) as e:
    _fail(_os_error(e, config, workdir) if isinstance(e, OSError) else str(e))
  except Exception as e:  # anything else keeps its traceback; on several hosts the others are told at once
    from videofusion_jax.training.checkpoint import os_error_of
    if (error := os_error_of(e)) is not None:  # TensorStore's, raised by Orbax as a ValueError: a checkpoint's write
      _fail(_os_error(error, config, workdir))
    if multihost:
      from videofusion_jax.training import sharding
      # Unless another host's failure is stopping this one: then it is a collective cut short as that host left,
      # after the line naming it (its watcher ends this process).
      if not sharding.stopped_by_another_host():
        traceback.print_exc()
      _exit_failed(f"{type(e).__name__}: {e}")
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
