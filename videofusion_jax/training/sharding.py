"""The device mesh, and every sharding from the config's rule table: weights, optimizer state,
input batches and (inside jit) U-Net activations."""
from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from videofusion_jax.config import MESH_AXES  # the config checks its rule table against them

T = TypeVar("T")


def on_every_host(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (one small all-gather when there are several; one process:
  ``ok``). Every process must call it: hosts that decide alike run the same collectives after."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def first_hosts_list(values: list[int]) -> list[int]:
  """Process 0's ``values`` (integers) on every host: what the hosts go on from where each read its own (a folder
  listed while another run writes it). Every process must call it; with one process, ``values``."""
  if jax.process_count() == 1:
    return list(values)
  from jax.experimental import multihost_utils
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
  mine = np.asarray(values if jax.process_index() == 0 else np.zeros(n), np.int32)
  return [int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(mine))]


def fail_together(error: Exception) -> Exception:
  """``error``, for every host to raise at once after a vote they all took (as ``checked_on_every_host`` does):
  none of them then tells the others of its failure, which they know."""
  _agreed_failure.set()
  return error


def same_on_every_host(digest: bytes, error: Callable[[list[int]], Exception]) -> None:
  """Raises ``error(processes)``, on every host together, where the ``digest`` of what each host read from its
  own disk differs from process 0's on those processes; nothing with one process. Every process must call it,
  with a digest of one length."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  every = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint8)))
  differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differ:
    _agreed_failure.set()
    raise error(differ)


def checked_on_every_host(check: Callable[[], T], elsewhere: Exception) -> T:
  """``check()``'s value when it passes on every host; where it raised, that error, and ``elsewhere`` on
  the hosts where it passed (they would wait at their first collective until its timeout). Every process
  must call it."""
  try:
    value = check()
  except Exception:
    on_every_host(False)
    _agreed_failure.set()
    raise
  if not on_every_host(True):
    _agreed_failure.set()
    raise elsewhere
  return value


# One host failing alone, past every agreed check (a video it cannot decode, a bug): it tells the others through
# the coordination service's key-value store, where a thread of each waits (``watch_for_failures``). Each host's
# state is one key of its own ('failed', 'stopped' or 'finished'; 'left' once it exits), so that none is counted twice.
_FAILED, _STATE, _LEFT = "videofusion/failed", "videofusion/state/", "videofusion/left/"
_failing_here = threading.Event()  # this host's main thread is failing (``report_failure``)
_agreed_failure = threading.Event()  # a check every host voted on failed: every host raises, none need stopping
_decided = threading.Lock()  # between the two ways this host can end: failing itself, or stopped by its watcher
_stopping_here = threading.Event()
_finished_here = threading.Event()  # this host's work is done (``say_finished``): it goes to JAX's shutdown barrier
_watching = threading.Event()  # the watcher runs: the service is joined, and the other hosts listen


def _client():
  """The coordination service's client of a run of several processes, else None (nothing initialised)."""
  try:
    from jax._src import distributed
    client = distributed.global_state.client
  except (ImportError, AttributeError):  # a JAX that moved it: no watching, the run as before
    return None
  return client if client is not None and jax.process_count() > 1 else None


def _leave(client, me: int, timeout_s: float) -> None:
  """Says that this host leaves; process 0 holds the service, whose end aborts every host still connected,
  so it leaves last (``timeout_s`` at most waiting for the others)."""
  if me != 0:
    client.key_value_set(f"{_LEFT}{me}", "1", allow_overwrite=True)
    return
  deadline = time.time() + timeout_s
  while time.time() < deadline and len(client.key_value_dir_get(_LEFT)) < jax.process_count() - 1:
    time.sleep(0.1)
  time.sleep(0.5)


def watch_for_failures(grace_s: float = 5.0, wait_s: float = 15.0) -> None:
  """On a run of several processes, a thread that waits for another host's ``report_failure``: unless this
  host fails too (an agreed check failing on every host at once; ``grace_s`` at most for its own error to
  reach ``report_failure``), it prints which host failed and why, and ends this process at once. Without it a
  host that failed alone waited 5 minutes at JAX's shutdown barrier while the others waited in their next
  collective, then every host aborted with a stack trace of the coordination service."""
  client = _client()
  if client is None:
    return
  me = jax.process_index()

  def watch():
    while True:
      try:
        message = client.blocking_key_value_get(_FAILED, 1_000)
        break
      except Exception as e:  # noqa: BLE001 - its timeout (then wait on), or the service gone at the run's end
        # Ends with the main thread: left in the service's call at the interpreter's exit, the thread aborted it.
        if _failing_here.is_set() or not threading.main_thread().is_alive():
          return
        if "DEADLINE_EXCEEDED" not in str(e):
          time.sleep(1.0)  # a passing error of the service: wait on
    deadline = time.time() + grace_s
    while time.time() < deadline:
      if _failing_here.is_set() or _agreed_failure.is_set() or _finished_here.is_set():
        return
      time.sleep(0.05)
    with _decided:
      if _failing_here.is_set() or _finished_here.is_set():  # finished: the failing host meets it at the barrier
        return
      _stopping_here.set()
    print(f"error: {message}; this host stops too (the other hosts would wait for it in their next collective).",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
      client.key_value_set(f"{_STATE}{me}", "stopped", allow_overwrite=True)
      _leave(client, me, wait_s + 5.0)
    except Exception:  # noqa: BLE001 - the service gone already
      pass
    os._exit(1)

  # Not a daemon: the interpreter waits for it (a second at most) instead of killing it inside the service's call.
  threading.Thread(target=watch, name="videofusion-failure-watch").start()
  _watching.set()


def stopped_by_another_host() -> bool:
  """Whether this host's watcher is ending it for another host's failure (``watch_for_failures``)."""
  return _stopping_here.is_set()


def say_finished() -> None:
  """On a run of several processes, tells the others that this host's work is done (state 'finished'), just
  before it ends through JAX's shutdown barrier: a host failing after it then goes to that barrier at once, where
  it waited for this one's watcher (``report_failure``'s ``wait_s``), which ends with the main thread. One
  process, or a host already failing or being stopped: nothing."""
  client = _client() if _watching.is_set() else None
  if client is None:
    return
  with _decided:
    if _failing_here.is_set() or _stopping_here.is_set():
      return
    _finished_here.set()
  try:
    client.key_value_set(f"{_STATE}{jax.process_index()}", "finished", allow_overwrite=True)
  except Exception:  # noqa: BLE001 - the service gone: nobody left to wait for this host
    pass


def report_failure(message: str, wait_s: float = 15.0, what: str = "stopped with an error") -> bool:
  """Tells the other hosts' ``watch_for_failures`` that this one failed or stopped alone (``message``: why; ``what``
  happened to it, in words: "process 1 {what} ({message})"), and waits until each has failed too, stopped or
  finished (``say_finished``; ``wait_s`` at most). True when this process must end without JAX's shutdown barrier
  (``os._exit``): a host stopped by its watcher never reaches it, and the barrier would hold this one for minutes.
  One process: False, nothing told."""
  client = _client() if _watching.is_set() else None  # before the watch (a failed join): nobody to tell
  if client is None:
    return False
  with _decided:
    if _failing_here.is_set():
      return False
    if not _stopping_here.is_set():
      _failing_here.set()
  if _stopping_here.is_set():  # another host's failure is ending this one already: its watcher exits
    threading.Event().wait()
  me = jax.process_index()
  try:
    client.key_value_set(f"{_STATE}{me}", "failed", allow_overwrite=True)
    try:
      client.key_value_set(_FAILED, f"process {me} {what} ({' '.join(message.split())[:1000]})")
    except Exception:  # noqa: BLE001 - another failing host told them first
      pass
    deadline, states = time.time() + wait_s, []
    while time.time() < deadline:
      states = [value for _, value in client.key_value_dir_get(_STATE)]
      if len(states) >= jax.process_count():
        break
      time.sleep(0.2)
    stopped = "stopped" in states
    if stopped:
      _leave(client, me, wait_s)
  except Exception:  # noqa: BLE001 - the service (on process 0) gone: no barrier to wait at either
    return True
  return stopped


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ``(data, fsdp)`` mesh over all devices; ``-1`` in ``config.mesh`` takes the rest."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  data, fsdp = int(config.mesh.data), int(config.mesh.fsdp)
  if data == -1:
    data = devices.size // fsdp
  if fsdp == -1:
    fsdp = devices.size // data
  if data * fsdp != devices.size:
    raise ValueError(f"config.mesh data={config.mesh.data}, fsdp={config.mesh.fsdp} does not cover "
                     f"the {devices.size} devices; make data*fsdp equal the device count.")
  return Mesh(devices.reshape(data, fsdp), MESH_AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (those stay replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def param_shardings(boxed_abstract, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree of boxed (``nn.Partitioned``) abstract parameters."""
  specs = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.unbox(boxed_abstract)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit(s, x.shape, mesh)), mesh_specs, shapes,
                      is_leaf=lambda s: isinstance(s, P))


def opt_state_shardings(opt_shapes, param_sh, mesh: Mesh):
  """Optimizer-state shardings: a moment takes the sharding of the parameter whose path ends
  its own path (``...mu['base']['conv_in']['kernel']``); counts and scalars are replicated."""
  rep = replicated(mesh)

  def keys(path):
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
  by_path = {keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}

  def pick(path, leaf):
    k = keys(path)
    for i in range(len(k)):
      if k[i:] in by_path and by_path[k[i:]] is not None:
        return by_path[k[i:]]
    return rep
  return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """The leading (batch) axis split as the rule table's ``batch`` entry says."""
  (axes,) = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """Per-host numpy batch -> global jax.Arrays with the batch ``sharding``."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def with_activation_rules(fn, mesh: Mesh, rules):
  """``fn`` traced with the mesh and the rule table in context, so that the U-Net's logical
  activation constraints (``models.unet.ACTIVATION``) become sharding constraints; pass the
  result to ``jax.jit``."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return traced
