"""Orbax checkpoints: async saves, keep the last N, restore onto any mesh, skip damaged ones.

Each step holds two items: ``state`` (the TrainState) and ``data`` (a small JSON dict with the
input stream's position, so that resuming continues the stream instead of restarting it).
"""
from __future__ import annotations

import dataclasses
import functools
import logging as pylogging
import os
import re
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint._src.metadata import array_metadata_store

from videofusion_jax.training.sharding import checked_on_every_host, fail_together, first_hosts_list, on_every_host

ITEMS = ("state", "data")


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected; the message says where and what to do."""


@functools.cache
def one_process_writes_whole_arrays() -> bool:
  """In a run of one process, Orbax saves each replicated array from one device, whole (its
  default outside GPUs is "replica-parallel": a slice from each replica, one jitted slicing per
  parameter shape, 248 programs compiled at the tiny model's first save on 8 devices, 7.7 s of
  the training loop blocked there, 1.6 s at each later save; whole arrays: 0.4 s and 0.2 s,
  benchmarks/RESULTS.md). Slicing spreads the writing over hosts; one process writes everything
  anyway. Several processes keep Orbax's default. Runs once per process (the handler is global),
  before the first save; returns whether it changed the handler."""
  if jax.process_count() > 1:
    return False
  handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),  # Orbax's default
                                           use_replica_parallel=False)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns of any override of its default handler
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    logging.set_verbosity(verbosity)
  return True


def make_manager(workdir: str | Path, keep: int, async_save: bool = True, read_only: bool = False
                 ) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager; ``read_only`` for sampling and evaluation: it creates no
  folder and deletes nothing (an error when there is no checkpoint folder)."""
  if not read_only:
    one_process_writes_whole_arrays()
  directory = Path(workdir).absolute() / "checkpoints"
  if read_only and not directory.is_dir():
    raise CheckpointError(f"no checkpoint in {directory}: train first (--mode=train).")
  # A save cut off by a preemption leaves STEP.orbax-checkpoint-tmp, as large as a checkpoint; at a step off the
  # checkpoint_every grid (where a run usually stops) it is never saved again: removed when training starts.
  options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                         enable_async_checkpointing=async_save and not read_only,
                                         cleanup_tmp_directories=not read_only)
  # Named items, so that steps written before the stream position existed (one unnamed
  # item) do not lock the manager into single-item mode.
  return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)


def _state_item(step_dir: Path) -> Path:
  """The folder of a step's state: ``state``, or ``default`` for the single-item format written before
  the stream position was saved."""
  return step_dir / "default" if (step_dir / "default").is_dir() else step_dir / "state"


def _past_the_barrier(read):
  """``read()``, an Orbax restore, with a failure of this host's read raised only after the barrier that
  ends ``Checkpointer.restore`` (it reads in ``_restore``, then waits for every process): a host whose
  read failed would skip it while the others wait there, and each host's next collective would pair
  with the wrong one (``_agree``'s vote with that barrier). While it runs, a failed ``_restore`` is held
  and returns None, so that the barrier is reached."""
  failures = []
  original = ocp.Checkpointer._restore

  def held(self, directory, args):
    try:
      return original(self, directory, args)
    except Exception as e:  # noqa: BLE001 - raised below, after the barrier
      failures.append(e)
      return None

  ocp.Checkpointer._restore = held
  try:
    result = read()
  except Exception:
    if not failures:
      raise
  finally:
    ocp.Checkpointer._restore = original
  if failures:  # (what read() made of the None, e.g. a TypeError indexing it, is not the cause)
    raise failures[0]
  return result


def _restore_state(manager: ocp.CheckpointManager, step: int, abstract_state=None, fields=None):
  """The ``state`` item of ``step``, whichever format wrote it. ``fields``: the TrainState fields to read, the
  others left None (none of their arrays is read). Without ``abstract_state``: a dict of NumPy arrays (only
  ``fields``' when given), whole on each host, whatever devices wrote it (Orbax refuses to lay arrays out on
  the shardings they were saved with where the devices differ)."""
  step_dir = Path(manager.directory) / str(step)
  _hide_abandoned_reads_of(step_dir)
  item = _state_item(step_dir)
  if abstract_state is None:
    with ocp.StandardCheckpointer() as reader:
      meta = reader.metadata(item)
    target = dict(getattr(meta, "item_metadata", meta))
    if fields is not None:
      target = {f: target[f] for f in fields}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=fields is not None, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target))
    with ocp.PyTreeCheckpointer() as reader:
      return _past_the_barrier(lambda: reader.restore(item, args=args))
  if fields is not None:
    # Orbax's partial restore reads only the arrays of the subtrees named in the target.
    target = {f: getattr(abstract_state, f) for f in fields}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as reader:
      read = _past_the_barrier(lambda: reader.restore(item, args=args))
    return abstract_state.replace(**{f.name: read[f.name] if f.name in fields else None
                                     for f in dataclasses.fields(abstract_state)})
  args = ocp.args.StandardRestore(abstract_state)
  if item.name == "default":
    with ocp.CheckpointManager(manager.directory) as single_item:
      return _past_the_barrier(lambda: single_item.restore(step, args=args))
  return _past_the_barrier(lambda: manager.restore(step, args=ocp.args.Composite(state=args))["state"])


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings: restores onto this mesh, whatever
  device count wrote the checkpoint."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict | None = None) -> None:
  items = {"state": ocp.args.StandardSave(state)}
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items))


def _flat_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{path: shape}`` of a state tree or of Orbax's metadata of one; paths as strings, so that
  a saved ``'1'`` and a live ``1`` (an optimizer-state tuple index) compare equal."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {tuple(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ``_saved_shapes`` of the step folders read in this process, by their metadata file's identity: a
# resume asks twice (the compatibility check, then the restore), 2.2 s each for ucf101's 3,602 arrays
# on a 2-core CPU (Orbax opens every array's metadata). A step saved anew is a new file.
_SHAPES_READ: dict[tuple, dict] = {}


def _saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The saved state's ``{path: shape}`` from its metadata; None when unreadable or empty."""
  item = _state_item(Path(manager.directory) / str(step))
  try:
    stat = (item / "_METADATA").stat()
    identity = (str(item.absolute()), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
  except OSError:
    identity = None
  if identity in _SHAPES_READ:
    return _SHAPES_READ[identity]
  try:
    with ocp.StandardCheckpointer() as reader:
      meta = reader.metadata(item)
    tree = getattr(meta, "item_metadata", meta)
    shapes = _flat_shapes(dict(tree)) if tree else None
  except Exception:  # noqa: BLE001 - any failure to read the metadata means it is damaged
    return None
  if identity is not None and shapes is not None:
    if len(_SHAPES_READ) >= 16:
      _SHAPES_READ.clear()
    _SHAPES_READ[identity] = shapes
  return shapes


def _mismatch_error(manager, step: int, abstract_state, saved_shapes: dict) -> CheckpointError:
  """The error for a checkpoint that is intact but holds another model than the config's."""
  saved, wanted = {p[1] for p in saved_shapes if p[0] == "params" and len(p) > 1}, set(abstract_state.params)
  where = f"checkpoint {step} in {manager.directory}"
  record = f"; the run's config is in {Path(manager.directory).parent / 'config.json'}"
  if saved != wanted:
    missing, extra = sorted(wanted - saved), sorted(saved - wanted)
    if "video" in saved ^ wanted:
      kind = "vdm" if "video" in saved else "videofusion"
      hint = f"it is a{' VDM*' if kind == 'vdm' else ' VideoFusion'} checkpoint: use --config.model.kind={kind}"
    elif "prior" in missing:
      hint = ("it was trained with --config.model.condition=label (no encoder, no prior): use that, or train "
              "a model with the embedding condition")
    elif "prior" in extra:
      hint = ("it was trained with --config.model.condition=embedding (a key-frame encoder and its prior): use "
              "that")
    else:
      hint = "it was trained with another config.model.condition or config.model.encoder.kind"
    return CheckpointError(
        f"{where} has the networks {sorted(saved)} and this config needs {sorted(wanted)}"
        + (f" (missing: {', '.join(missing)})" if missing else "")
        + (f" (not used by this config: {', '.join(extra)})" if extra else "") + f"; {hint}{record}.")
  wanted_shapes = _flat_shapes(abstract_state)
  diffs = [f"{'.'.join(p)} is {saved_shapes[p]} there and {wanted_shapes[p]} here" for p in sorted(wanted_shapes)
           if p in saved_shapes and saved_shapes[p] != wanted_shapes[p]]
  absent = [".".join(p) for p in sorted(set(wanted_shapes) ^ set(saved_shapes))]
  detail = "; ".join(diffs[:3]) or f"the state trees differ at {', '.join(absent[:3])}"
  scaled_there, scaled_here = (LOSS_SCALE_PATH in shapes for shapes in (saved_shapes, wanted_shapes))
  if scaled_there != scaled_here and _subtrees(saved_shapes, WEIGHTS) == _subtrees(wanted_shapes, WEIGHTS):
    there, here = ("in float16", "does not train in float16") if scaled_there else ("not in float16",
                                                                                     "trains in float16")
    return CheckpointError(
        f"{where} was trained {there} and this config {here} (config.model.dtype): float16 training keeps a loss "
        f"scale in the optimizer state, other dtypes do not. Resume with the model.dtype it was trained in{record}; "
        "sampling and evaluation take any dtype.")
  return CheckpointError(f"{where} was trained with another model or optimizer config than this one ({detail}). "
                         f"Use the config it was trained with{record}.")


def check_compatible(manager: ocp.CheckpointManager, abstract_state) -> None:
  """Raises the CheckpointError of ``restore`` when the newest checkpoint whose metadata can be
  read holds another model than ``abstract_state``: cheap (no array is read), so a run can say
  so before its slow start."""
  wanted = _flat_shapes(abstract_state)
  for step in sorted(manager.all_steps(), reverse=True):
    saved = _saved_shapes(manager, step)
    if saved is not None:
      if (_subtrees(saved, WEIGHTS) != _subtrees(wanted, WEIGHTS)
          or (LOSS_SCALE_PATH in saved) != (LOSS_SCALE_PATH in wanted)):
        raise _mismatch_error(manager, step, abstract_state, saved)
      return


def _subtrees(shapes: dict, fields) -> dict:
  """The paths of ``shapes`` under the state's ``fields`` (None: all), those a restore of them reads."""
  return shapes if fields is None else {p: v for p, v in shapes.items() if p[0] in fields}


WEIGHTS = ("params", "ema_params")
LOSS_SCALE_PATH = ("opt_state", "skipped_steps")  # float16 training's state (optimizer.LossScaleState)


def _restore_step(manager, step: int, abstract_state, with_data: bool, fields=None):
  """``(state, data)`` of ``step``; ``_Damaged`` when it cannot be read, CheckpointError when
  it is intact but does not match ``abstract_state``. Each host reads its own shards, so the hosts
  agree after each read (``_agree``): a step damaged where one host reads is damaged for all, and
  no host goes on to a read (and its barrier) that another skipped."""
  saved, wanted = _saved_shapes(manager, step), _flat_shapes(abstract_state)
  # Another model: known before reading any array.
  if saved is not None and _subtrees(saved, WEIGHTS) != _subtrees(wanted, WEIGHTS):
    raise _mismatch_error(manager, step, abstract_state, saved)
  state, damaged = None, None
  try:
    state = _restore_state(manager, step, abstract_state, fields)
  except Exception as e:  # noqa: BLE001 - TensorStore raises plain Exceptions; classified below
    if out_of_memory_cause(e):  # the host or a device is short of memory: no fault of the checkpoint's
      damaged = out_of_memory_cause(e)
    elif saved is None:
      damaged = _Damaged("its metadata cannot be read")
    elif _subtrees(saved, fields) == _subtrees(wanted, fields):
      cause = _root_cause(e)  # Orbax's own message is the TensorStore spec of the array; the cause says what failed
      damaged = _Damaged(f"reading its arrays failed ({type(cause).__name__}: {_first_line(cause, 400)})")
    else:
      damaged = _mismatch_error(manager, step, abstract_state, saved)  # raised after the vote, as the others
  _agree(manager, step, damaged)
  data = None
  if with_data:
    try:
      data = restore_data_state(manager, step)
    except Exception as e:  # noqa: BLE001
      damaged = _Damaged(f"its input-stream position cannot be read ({type(e).__name__}: {_first_line(e)})")
    _agree(manager, step, damaged)
  return state, data


def _agree(manager, step: int, damaged: Exception | None) -> None:
  """Raises ``damaged`` (a ``_Damaged``; or what no older step mends: the CheckpointError of another model,
  running out of memory) on the hosts that met it and, on the others, a ``_Damaged`` naming another host, or
  a CheckpointError where another host met what no older step mends (no host goes on to an older step
  alone); every host calls it."""
  if on_every_host(damaged is None):
    return
  if not on_every_host(damaged is None or isinstance(damaged, _Damaged)):
    raise fail_together(damaged if damaged is not None and not isinstance(damaged, _Damaged) else CheckpointError(
        f"another host could not read checkpoint {step} in {manager.directory} (its own error says why)."))
  if isinstance(damaged, _Damaged) and jax.process_index() > 0:  # process 0 alone logs; this cause is its own
    print(f"warning (process {jax.process_index()}): checkpoint {step} in {manager.directory} is damaged "
          f"({damaged}).", flush=True)
  raise damaged or _Damaged("unreadable on another host: see its warning")


def out_of_memory_cause(error: BaseException) -> BaseException | None:
  """``error`` or the cause of it that is running out of memory, the host's (MemoryError) or a device's
  (XLA's RESOURCE_EXHAUSTED, which ``Experiment.explain_out_of_memory`` explains); None where none is. A read
  that fails so is not a damaged checkpoint (skipped, then moved aside)."""
  from videofusion_jax.experiment import out_of_memory  # (experiment imports this module)

  return next((c for c in _causes(error) if isinstance(c, MemoryError) or out_of_memory(c)), None)


# The step folders read in this process ("<checkpoints>/<step>/"): what a failed read of one leaves
# behind is not shown (``_hide_abandoned_reads_of``). Replaced, never changed in place: the hooks
# read it from other threads.
_READ_STEP_DIRS: frozenset[str] = frozenset()
# Orbax's coroutines of a read: one array's shard, and the arrays' metadata.
_READ_COROUTINES = ("_read_array_index_and_device_put", "_get_array_metadatas")


def _hide_abandoned_reads_of(step_dir: Path) -> None:
  """When a read of a damaged checkpoint fails, Orbax leaves its other reads of it unfinished: its
  event loop closes under them, and as they are collected, later and from other threads, Python
  and asyncio print a traceback for each (1,121 of them, 70,684 lines on stderr, for the tests'
  tiny model) after the one line that says the checkpoint was skipped. They say nothing more and
  nobody can catch them, so they are not shown: errors of Orbax's read coroutine, errors and
  logs that name ``step_dir``, and TensorStore's completions posted to the closed loop from its
  threads ("Event loop is closed" raised in ``call_soon_threadsafe``, which names nothing).
  Called before the read: the first of them can come before the failure reaches the caller.
  Every other unraisable exception and asyncio log is still shown."""
  global _READ_STEP_DIRS
  _READ_STEP_DIRS = _READ_STEP_DIRS | {str(step_dir.absolute()) + os.sep}
  # The reads that had not started when the loop closed. Each call: pytest's catch_warnings drops it.
  names = "|".join(_READ_COROUTINES)
  warnings.filterwarnings("ignore", message=rf"coroutine '([\w.<>]+\.)?({names})' was never awaited",
                          category=RuntimeWarning)
  # asyncio logs each read's task and future at their collection ("exception was never retrieved",
  # "Task was destroyed but it is pending!"). Also added once: these hooks stay for the process, as the
  # leftovers of a failed read surface at any later time, from other threads.
  pylogging.getLogger("asyncio").addFilter(_hide_abandoned_read_log)
  previous = sys.unraisablehook
  if getattr(previous, "hides_abandoned_reads", False):
    return

  def hook(unraisable):
    if not _safely(_is_abandoned_read, unraisable.exc_value, unraisable.object):
      previous(unraisable)
  hook.hides_abandoned_reads = True
  sys.unraisablehook = hook


def _hide_abandoned_read_log(record: pylogging.LogRecord) -> bool:
  return not _safely(_is_abandoned_read_log, record)


def _hide_missing_item_metadata(record: pylogging.LogRecord) -> bool:
  return not _safely(_is_missing_item_metadata, record)


def _is_missing_item_metadata(record: pylogging.LogRecord) -> bool:
  message = record.getMessage()
  return message.startswith("Metadata file does not exist: ") and message.endswith("_CHECKPOINT_METADATA")


# Orbax's absl warning that an item's _CHECKPOINT_METADATA does not exist (the manager writes that file for the
# step, not for each item): logged at each read of a checkpoint saved here wherever main.py's absl verbosity
# does not hide it (a program using this as a library). Nothing else of absl's is filtered.
logging.get_absl_logger().addFilter(_hide_missing_item_metadata)


_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')


def os_error_of(e: BaseException | None) -> OSError | None:
  """The operating system's error inside ``e`` (or a cause of it), else None: an OSError itself, or TensorStore's
  error of a checkpoint write or read, which Orbax raises as a ValueError such as ``RESOURCE_EXHAUSTED: Error
  writing local file "...": ... No space left on device [os_error_code='28']``."""
  for cause in _causes(e):
    if isinstance(cause, OSError):
      return cause
    if error := _os_error_in(str(cause)):
      return error
  return None


def _os_error_in(text: str) -> OSError | None:
  """The OSError a TensorStore message quotes (its ``os_error_code`` and local file), else None."""
  code = _OS_ERROR_CODE.search(text)
  if code is None:
    return None
  path = _LOCAL_FILE.search(text)
  return OSError(int(code.group(1)), os.strerror(int(code.group(1))), path.group(1) if path else None)


WRITING = ".orbax-checkpoint-tmp"  # Orbax writes a step under this suffix, renamed once whole


def is_checkpoint_write(error: OSError) -> bool:
  """Whether ``error`` is of a checkpoint's write (its file is under a step still being written)."""
  return WRITING in str(error.filename)


def _is_failed_save_log(record: pylogging.LogRecord) -> bool:
  """Orbax's error records (each with its traceback, from several of its threads) of a checkpoint write that the
  operating system refused (a full disk, a folder it cannot create): the run stops with that error, in one line,
  at its next checkpoint or its end (main.py)."""
  if record.levelno < pylogging.ERROR or not record.pathname.rsplit("/orbax/", 1)[-1].startswith("checkpoint/"):
    return False
  exc = record.exc_info[1] if record.exc_info else None
  if "Timeout waiting for key" in str(exc) and _SAVE_FAILED:  # (a TimeoutError: an OSError too)
    return True  # its other threads, left waiting for the folder the failed write never made
  error = os_error_of(exc) or _os_error_in(record.getMessage())
  if error is None or not is_checkpoint_write(error):  # a delete of an old step, say: Orbax's record stays
    return False
  if not _SAVE_FAILED:
    _SAVE_FAILED.append(error)
    print(f"warning: a checkpoint could not be written ({error}); training stops with this error at the next "
          "checkpoint or at its end. The checkpoints saved before it are intact.", file=sys.stderr, flush=True)
  return True


_SAVE_FAILED: list[OSError] = []  # the first write this process's Orbax failed (warned once)


def _hide_failed_save_log(record: pylogging.LogRecord) -> bool:
  return not _safely(_is_failed_save_log, record)


logging.get_absl_logger().addFilter(_hide_failed_save_log)


def _safely(check, *args) -> bool:
  """``check(*args)``, False if it fails: a hook that raises would print its own traceback."""
  try:
    return bool(check(*args))
  except Exception:  # noqa: BLE001
    return False


def _is_abandoned_read(exc: BaseException | None, obj=None) -> bool:
  code = getattr(obj, "cr_code", None)
  if code is not None and code.co_name in _READ_COROUTINES:
    return True
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and obj is None:
    tb = exc.__traceback__
    return tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
  return _names_a_read_step(exc)


def _names_a_read_step(exc: BaseException | None) -> bool:
  """Whether ``exc`` or one of its causes names a step folder read here (Orbax's error quotes the
  array's TensorStore spec, TensorStore's its file)."""
  dirs = _READ_STEP_DIRS
  return any(d in str(e) for e in _causes(exc) for d in dirs)


def _is_abandoned_read_log(record: pylogging.LogRecord) -> bool:
  if any(name in record.getMessage() for name in _READ_COROUTINES):
    return True
  return bool(record.exc_info) and _names_a_read_step(record.exc_info[1])


def _causes(exc: BaseException | None):
  """``exc``, its ``__cause__``, that one's, ... (a chain that loops is followed once)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__


def _root_cause(e: BaseException) -> BaseException:
  *_, last = _causes(e)
  return last


class _Damaged(Exception):
  """A checkpoint that exists but cannot be read (a truncated or missing file)."""


def _first_line(e: BaseException, limit: int = 200) -> str:
  return str(e).strip().splitlines()[0][:limit] if str(e).strip() else ""


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None, with_data: bool = False,
            log=print, fields: tuple[str, ...] | None = None):
  """The state of checkpoint ``step``, or by default of the newest one that can be read: a damaged
  checkpoint (a file truncated or deleted after its save) is skipped with a message naming it,
  and the one before is tried. Nothing is deleted. With ``with_data``, returns ``(state, data,
  step, damaged_steps)``, ``data`` being the input stream's position saved with it. ``fields``
  (e.g. ``('step', 'ema_params')``): only those TrainState fields are read, the others are None."""
  if fields is not None:  # checked before the loop, whose errors would call every checkpoint damaged
    unknown = set(fields) - {f.name for f in dataclasses.fields(abstract_state)}
    if unknown:
      raise ValueError(f"fields {sorted(unknown)} are not fields of the state")
  saved = sorted(manager.all_steps(), reverse=True)
  if not saved:
    raise CheckpointError(f"no checkpoint in {manager.directory}: train first (--mode=train).")
  # A step not saved is not a damaged one (a step's folder that Orbax does not list is read, and said damaged).
  if step is not None and step not in saved and not (Path(manager.directory) / str(step)).is_dir():
    raise CheckpointError(f"no checkpoint {step} in {manager.directory}; its saved steps: {saved[::-1]}. Ask for "
                          "one of those, or for none (the newest intact one).")
  steps = [step] if step is not None else saved
  damaged, gone = [], []
  while steps:
    s = steps.pop(0)
    try:
      state, data = _restore_step(manager, s, abstract_state, with_data, fields)
    except _Damaged as e:  # on every host together (_agree)
      # Deleted while it was read (a training run that keeps the newest few saved one since): not damaged; the
      # steps are listed again, the newest first.
      if step is None and not on_every_host((Path(manager.directory) / str(s)).is_dir()) and len(gone) < 8:
        gone.append(s)
        log(f"note: checkpoint {s} in {manager.directory} was deleted while it was read (a training run saving "
            "there keeps only its newest ones); reading the newest one now.")
        manager.reload()
        # Process 0's listing on every host: listed apart, as another run saves, they could read different steps.
        steps = first_hosts_list([t for t in sorted(manager.all_steps(), reverse=True)
                                  if t not in damaged and t not in gone])
        continue
      damaged.append(s)
      log(f"warning: skipped checkpoint {s} in {manager.directory}: it is damaged ({e}).")
      continue
    if damaged:
      log(f"restored checkpoint {s}, the newest intact one.")
    return (state, data, s, damaged) if with_data else state
  if step is not None:
    others = [t for t in saved[::-1] if t != step]
    raise CheckpointError(f"checkpoint {step} in {manager.directory} is damaged (see above); its other steps: "
                          f"{others}. Ask for one of those, or for none (the newest intact one).")
  raise CheckpointError(
      f"no intact checkpoint in {manager.directory}: {'step ' if len(damaged) == 1 else 'steps '}"
      f"{', '.join(map(str, damaged))} cannot be read (see above). Nothing was deleted: restore them from a "
      "backup, or move the checkpoints folder away to start afresh.")


def move_aside(manager: ocp.CheckpointManager, steps: list[int], log=print) -> None:
  """Moves damaged checkpoints to ``workdir/checkpoints_damaged/`` (kept, not deleted), so that
  training from an older one can save those steps again; process 0 moves, every host learns whether
  it could (one that cannot, a read-only folder, stops them all at once rather than alone)."""
  if not steps:
    return
  root = Path(manager.directory)

  def move():
    if jax.process_index() != 0:
      return
    # Beside the folder itself: workdir/checkpoints may link to another disk, where a rename cannot reach.
    real = root.resolve()
    aside = real.parent / f"{real.name}_damaged"
    for s in steps:
      target = aside / str(s)
      k = 1
      while target.exists():
        target, k = aside / f"{s}.{k}", k + 1
      try:
        aside.mkdir(exist_ok=True)
        (real / str(s)).rename(target)
      except OSError as e:
        raise CheckpointError(f"cannot move the damaged checkpoint {real / str(s)} to {target} ({e.strerror}): "
                              "move it out of the checkpoints folder yourself (or delete it), then run again; "
                              "the older checkpoints are intact.") from None
      log(f"moved the damaged checkpoint {s} to {target} (kept for inspection; training saves step {s} anew).")

  checked_on_every_host(move, CheckpointError(
      f"process 0 could not move the damaged checkpoints {steps} of {root} aside (its own error says why)."))
  manager.reload()


def restore_data_state(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The input stream's position saved with ``step``, or None for a checkpoint without one."""
  if not (Path(manager.directory) / str(step) / "data").exists():
    return None
  return dict(_past_the_barrier(lambda: manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
      "data"]))


def has_checkpoints(workdir: str | Path) -> bool:
  """Whether ``workdir/checkpoints`` holds a step's folder (read from the folder names, no checkpoint opened)."""
  directory = Path(workdir).expanduser() / "checkpoints"
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_other_run(workdir: str | Path) -> Path:
  """``workdir/checkpoints`` of another run (``train.init_base_from``), checked before any slow work:
  a CheckpointError when it holds no checkpoint."""
  directory = Path(workdir).expanduser().absolute() / "checkpoints"
  if not has_checkpoints(workdir):
    raise CheckpointError(f"no checkpoint found under {directory}: train that run first (config.train."
                          "init_base_from names its workdir).")
  return directory


def restore_raw(workdir: str | Path, log=print, fields: tuple[str, ...] | None = None):
  """The newest readable checkpoint of another run as a dict of NumPy arrays (no target tree: whatever its
  config and device count), and its step; ``fields``: only those TrainState fields read. A damaged one is
  skipped with a message, as ``restore`` does. Read only: the manager neither creates folders nor keeps a
  maximum, so nothing of that run is touched."""
  directory = check_other_run(workdir)
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(directory, item_names=ITEMS, options=options)
  cause = ""
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      fatal = None
      try:
        # (its failures reach Orbax's barrier: _past_the_barrier)
        state, error = _restore_state(manager, step, fields=fields), None
      except Exception as e:  # noqa: BLE001 - TensorStore's read errors come as plain Exceptions
        state, error = None, f"{type(_root_cause(e)).__name__}: {_first_line(_root_cause(e))}"
        fatal = out_of_memory_cause(e)  # no fault of the checkpoint's: an older one is no answer
      if on_every_host(error is None):  # the hosts start from the same step
        return state, step
      if not on_every_host(fatal is None):
        raise fail_together(fatal or CheckpointError(f"another host ran out of memory reading checkpoint {step} under "
                                                     f"{directory} (its own error says why)."))
      cause = error or "unreadable on another host"
      log(f"warning: skipped checkpoint {step} in {directory}: it cannot be read ({cause}).")
  finally:
    manager.close()
  raise CheckpointError(f"no readable checkpoint under {directory} (the last read failed with {cause}): train that "
                        "run again, or restore its checkpoints from a backup.")
