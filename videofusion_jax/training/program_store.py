"""Traced programs kept on disk beside XLA's persistent compilation cache.

XLA's cache saves the compile, not the tracing: every run still runs the step's Python (the two
U-Nets, their gradients, the optimizer) and lowers it to StableHLO before XLA finds its cached
program, host time that a warm start pays each time (the ucf101 step: 6.4 s on a 2-core CPU; on
the H200's host, beside other compiles, 21 s of VDM*'s 38.5 s warm compile). ``StoredJit`` keeps
the lowered program (``jax.export``) in ``<compilation cache>/programs/``, under a key made of
everything the tracing depends on: the package's source files, the versions of jax, jaxlib, flax
and optax, JAX's settings, the run's config, the mesh's devices and the arguments' tree, shapes,
dtypes and shardings. A later process with the same key loads the program instead of tracing it
(the ucf101 step: 1.7 s instead of 6.4 s; its sampler 0.26 s instead of 2.0 s); the first run pays
about half a tracing more, to write it and read it back. Changes made at run time (a function
replaced in a notebook) are not in the key: set ``config.store_programs=False`` when you do that
(``Experiment.stores_programs`` also keeps out a config changed after its experiment was built and
a frozen encoder registered from outside the package; a package file changed after the import is
kept out here).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import pathlib
import tempfile
import time

import jax
import numpy as np
from jax import export
from jax._src import config as jax_config  # trace_context: the settings jax.jit keys its traces by
from jax._src import xla_bridge  # canonicalize_platform: no public counterpart for a given device's platform

import videofusion_jax
from videofusion_jax.training.sharding import on_every_host

PROGRAMS = "programs"  # the store's folder inside the compilation cache
KEEP = 64  # programs kept; the least recently used go first
STALE_TMP_S = 3600  # a half-written program this old was left by a write killed outright
_VOLATILE = ("cache", "persistent", "log", "dump", "pprint", "traceback", "transfer_guard")  # settings no program reads


PACKAGE = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def source_digest(root: str = str(PACKAGE)) -> str:
  """sha256 of every ``.py`` file under ``root`` (default: this package), names and contents."""
  h = hashlib.sha256()
  for path in sorted(pathlib.Path(root).rglob("*.py")):
    h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()


def source_changed_since_loaded() -> bool:
  """Whether a source file of the package changed after it was loaded: the code running may then
  differ from the files the key's digest reads (a module imported after the edit, or before)."""
  try:
    return any(p.stat().st_mtime > videofusion_jax.LOADED_AT for p in PACKAGE.rglob("*.py"))
  except OSError:
    return True


def _settings() -> list:
  """The settings a trace reads: JAX's (global, and those set by context managers) and flax's."""
  import flax
  values = sorted((k, repr(v)) for k, v in jax.config.values.items() if not any(s in k for s in _VOLATILE))
  context = [repr(v) for v in jax_config.trace_context() if " at 0x" not in repr(v)]
  return [values, context, sorted((k, repr(v)) for k, v in getattr(flax.config, "_values", {}).items())]


def _environment(mesh) -> str:
  import flax
  import jaxlib
  import optax
  platform = mesh.devices.flat[0].client.platform_version
  return repr((jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, np.__version__,
               platform, _settings()))


def device_platform(mesh) -> str:
  """The platform ``mesh``'s devices say they are on ('cpu', 'gpu' for CUDA and ROCm, 'tpu')."""
  return mesh.devices.flat[0].platform


def export_platform(mesh) -> str:
  """The platform a program for ``mesh`` is exported for, by its concrete name: a CUDA device says 'gpu',
  which ``jax.export`` records as given, while calling the program compares it with the platform it is
  lowered for ('cuda'): a program exported for 'gpu' could not be called on a GPU."""
  return xla_bridge.canonicalize_platform(device_platform(mesh))


# The training loop's own fields of config.train: how often it logs and saves, what it profiles, where a fresh
# run's base generator comes from. No program reads them.
TRAIN_LOOP_FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints", "init_base_from", "profile_steps")


def unread_train_fields(config) -> tuple[str, ...]:
  """The fields of ``config.train`` that no program reads: the loop's, and ``num_steps`` unless the learning
  rate decays to it (``train.lr_decay='cosine'``)."""
  return TRAIN_LOOP_FIELDS + (("num_steps",) if config.train.lr_decay == "constant" else ())


def config_json(config) -> str:
  """The config as JSON, less the compilation cache's own settings (no program reads them)."""
  d = config.to_dict()
  for k in ("compilation_cache_dir", "compilation_cache_max_gb", "store_programs"):
    d.pop(k, None)
  return json.dumps(d, sort_keys=True, default=repr)


def program_context(config) -> str:
  """The config as the key's JSON: ``config_json`` less the train section's fields that no program reads
  (``unread_train_fields``), so that a rerun that trains longer, logs, saves or profiles otherwise loads the
  programs it stored."""
  d = json.loads(config_json(config))
  for k in unread_train_fields(config):
    d.get("train", {}).pop(k, None)
  return json.dumps(d, sort_keys=True)


def program_key(name: str, context: str, mesh, args: tuple, source: str | None = None) -> str:
  """The hex key of program ``name`` traced for ``args`` (arrays or ``ShapeDtypeStruct``s) in
  ``context`` (the run's config as JSON) on ``mesh``."""
  leaves, tree = jax.tree.flatten(args)
  # weak_type: a weakly typed argument promotes to the other operand's dtype, a strong one does not.
  signature = [(np.shape(x), str(getattr(x, "dtype", type(x).__name__)), getattr(x, "weak_type", False),
                repr(getattr(x, "sharding", None))) for x in leaves]
  devices = [(d.id, d.platform, d.device_kind) for d in mesh.devices.flat]
  parts = (name, context, source or source_digest(), _environment(mesh), str(mesh.shape), devices,
           jax.process_count(), str(tree), signature)
  return hashlib.sha256(repr(parts).encode()).hexdigest()


_SERIALIZABLE: set[type] = {tuple, list, dict, type(None)}  # tree nodes jax.export can already write


def _literal(aux) -> bytes:
  """``aux`` as a Python literal's text; ValueError when it is none (an object of a class)."""
  text = repr(aux)
  try:
    same = ast.literal_eval(text) == aux
  except (ValueError, SyntaxError):
    same = False
  if not same:
    raise ValueError(f"the tree's static data {text[:80]} is not a Python literal")
  return text.encode()


def make_serializable(tree) -> None:
  """Registers with ``jax.export`` the node types of ``tree`` (a pytree or a ``PyTreeDef``) it
  cannot yet write: named tuples (optax's states) by their fields, other nodes (``TrainState``)
  with their static data written as a Python literal."""
  treedef = tree if isinstance(tree, jax.tree_util.PyTreeDef) else jax.tree.structure(tree)
  data = treedef.node_data()
  if data is not None and data[0] not in _SERIALIZABLE:
    kind = data[0]
    name = f"{kind.__module__}.{kind.__qualname__}"
    try:
      if issubclass(kind, tuple) and hasattr(kind, "_fields"):
        export.register_namedtuple_serialization(kind, serialized_name=name)
      else:
        export.register_pytree_node_serialization(
            kind, serialized_name=name, serialize_auxdata=_literal,
            deserialize_auxdata=lambda b: ast.literal_eval(b.decode()))
    except ValueError:  # registered before, by us or by someone else
      pass
    _SERIALIZABLE.add(kind)
  for child in treedef.children():
    make_serializable(child)


def store_directory(root: str | None = None) -> pathlib.Path | None:
  """``<root>/programs``, ``root`` by default jax's compilation cache; None when that is off or
  not a local folder."""
  root = jax.config.jax_compilation_cache_dir if root is None else root
  if not root or "://" in root:
    return None
  return pathlib.Path(root) / PROGRAMS


def _read(path: pathlib.Path) -> bytes | None:
  """The stored program's bytes, or None when absent or damaged (its checksum does not match)."""
  try:
    data = path.read_bytes()
  except OSError:
    return None
  digest, blob = data[:64], data[64:]
  if digest != hashlib.sha256(blob).hexdigest().encode():
    return None
  try:
    os.utime(path)  # recently used: kept longest
  except OSError:  # a read-only store still serves its programs
    pass
  return blob


def _write(path: pathlib.Path, blob: bytes) -> None:
  """Stores ``blob`` atomically (hosts writing the same program replace it with the same bytes),
  then keeps the ``KEEP`` most recently used programs."""
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      f.write(hashlib.sha256(blob).hexdigest().encode() + blob)
    os.replace(tmp, path)
  except BaseException as e:  # Ctrl-C too: a program-sized file no run reads is not left behind
    if tmp is not None:
      pathlib.Path(tmp).unlink(missing_ok=True)
    if not isinstance(e, OSError):
      raise
    # A read-only or full disk: the run goes on, tracing next time too.
    if jax.process_index() == 0:
      print(f"warning: cannot store the traced program in {path.parent} ({e.strerror}); the next run traces "
            "it again.", flush=True)
    return
  used = {}
  for p in path.parent.glob("*.jaxexport"):
    try:
      used[p] = p.stat().st_mtime
    except OSError:  # removed meanwhile by another run's pruning
      pass
  for old in sorted(used, key=used.get, reverse=True)[KEEP:]:
    try:
      old.unlink()
    except OSError:
      pass
  for tmp_left in path.parent.glob(".*.jaxexport.*.tmp"):  # a write killed outright (SIGKILL, a crash)
    try:
      if time.time() - tmp_left.stat().st_mtime > STALE_TMP_S:  # not another process's write under way
        tmp_left.unlink()
    except OSError:
      pass


class StoredJit:
  """``jax.jit(fn, **jit_kwargs)`` whose traced and lowered program is kept in the store
  (``store_directory()``) under ``program_key`` and loaded from there by later processes: the
  same program, without running ``fn``'s Python. Without a store it is the plain jit.

  ``source``: how the last program was had: 'stored' (loaded), 'traced' (traced and stored),
  'plain' (no store, or the program could not be exported: traced as by ``jax.jit``)."""

  def __init__(self, fn, name: str, context: str, mesh, *, enabled=lambda: True, out_like=None, **jit_kwargs):
    """``context``: the key's text for what ``fn`` reads besides its arguments (the run's config as
    JSON, taken when the objects ``fn`` uses were built). ``enabled()``, asked once per new argument
    signature: False gives the plain jit (a config changed since, or code the key cannot see).
    ``out_like``: a pytree with the node types of ``fn``'s output, where the arguments lack some
    (a new process must register them before it can read the stored program)."""
    self.name, self.context, self.mesh, self.jit_kwargs = name, context, mesh, jit_kwargs
    self.out_like = out_like
    self.enabled = enabled
    self.plain = jax.jit(fn, **jit_kwargs)
    self.source = None
    self._calls: dict = {}  # argument signature and trace settings -> the jitted program

  def clear_cache(self) -> None:
    """Forgets the programs held in memory (as ``jax.clear_caches`` does jax's)."""
    self._calls.clear()
    self.plain.clear_cache()

  def _cache_size(self) -> int:
    """The programs held for distinct argument signatures, as ``jax.jit``'s: one per trace or load."""
    return sum(program is not self.plain for program in self._calls.values()) + self.plain._cache_size()

  def _signature(self, args):
    leaves, tree = jax.tree.flatten(args)
    avals = tuple((np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "weak_type", False),
                   getattr(x, "sharding", None)) for x in leaves)
    return tree, avals, jax_config.trace_context()

  def _plain(self, signature, why: str = ""):
    if why and jax.process_index() == 0:
      print(f"note: the {self.name} program is not stored ({why}); it is traced on every run.", flush=True)
    self.source = "plain"
    self._calls[signature] = self.plain
    return self.plain

  def _program(self, args):
    """The jitted program for ``args``: loaded, else traced and stored, else the plain jit."""
    directory = store_directory()
    if directory is None:
      self.source = "plain"
      return self.plain
    signature = self._signature(args)
    if signature in self._calls:
      return self._calls[signature]
    # Asked on every host (a source file may change on one host's disk only): all run the stored program
    # or all the plain one.
    enabled = self.enabled()
    changed = enabled and source_changed_since_loaded()
    if not on_every_host(enabled and not changed):
      why = ("a source file of videofusion_jax changed since it was loaded; rerun" if changed
             else "a source file of videofusion_jax changed on another host since it was loaded" if enabled else "")
      return self._plain(signature, why)
    path = directory / f"{self.name}-{program_key(self.name, self.context, self.mesh, args)[:40]}.jaxexport"
    make_serializable((args, self.out_like))  # reading and writing both need the node types registered
    blob, self.source, exported, failure = _read(path), "stored", None, ""
    if blob is not None:
      try:
        exported = export.deserialize(bytearray(blob))
      except Exception as e:  # noqa: BLE001 - a program that cannot be read is traced again, said once
        if jax.process_index() == 0:
          print(f"note: the stored {self.name} program could not be read ({type(e).__name__}: {str(e)[:200]}); "
                "it is traced and stored again.", flush=True)
    if exported is None:
      self.source = "traced"
      try:
        traced = export.export(self.plain, platforms=(export_platform(self.mesh),),
                               disabled_checks=[export.DisabledSafetyCheck.custom_call("ALL")])(*args)
        make_serializable(traced.out_tree)
        blob = traced.serialize()
        # What the next run will load, read back now: every process runs the stored bytes' program,
        # whether it traced or loaded it, so hosts that trace and hosts that load compile one program.
        exported = export.deserialize(bytearray(blob))
      except Exception as e:  # noqa: BLE001 - what export cannot hold still runs, traced as by jax.jit
        exported, failure = None, f"{type(e).__name__}: {str(e)[:200]}"
      else:
        _write(path, blob)
    if not on_every_host(exported is not None):  # all run the stored program or all the plain one
      return self._plain(signature, failure or "another process could not export it")
    program = jax.jit(exported.call, **self.jit_kwargs)
    self._calls[signature] = program
    return program

  def lower(self, *args):
    return self._program(args).lower(*args)

  def __call__(self, *args):
    return self._program(args)(*args)
