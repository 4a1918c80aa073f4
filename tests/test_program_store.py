"""The traced programs kept beside the compilation cache (``training.program_store``): a stored
step is the traced one, bit for bit, loads without running the step's Python and keeps its
donation; the key changes with everything the tracing reads (the config its experiment was built
from); a config or a source file changed since it was read is not stored, a damaged file is traced
again, what cannot be stored runs as the plain jit, a store that cannot be written leaves the run
going, and the store keeps the most recently used programs."""
import collections
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_device
from conftest import tiny_config as _tiny_config
from test_training import batches

import videofusion_jax
from videofusion_jax.experiment import Experiment
from videofusion_jax.models import encoder
from videofusion_jax.training import program_store
from videofusion_jax.training import step as step_module
from videofusion_jax.training.program_store import StoredJit, program_context, program_key, source_digest
from videofusion_jax.training.step import Trainer

TESTS = Path(__file__).resolve().parent


def tiny_config(**overrides):
  """The tests' tiny config with its programs stored (the suite's default does not store them)."""
  return _tiny_config(**{"store_programs": True, **overrides})


@pytest.fixture
def store(tmp_path, monkeypatch):
  """An empty store of this test's own."""
  directory = tmp_path / "programs"
  monkeypatch.setattr(program_store, "store_directory", lambda: directory)
  return directory


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_a_stored_step_is_the_traced_one_and_a_new_process_loads_it_without_tracing(store, monkeypatch):
  c = tiny_config()
  first = Trainer(c, mesh=one_device(c))
  data = [first.global_batch(b) for b in batches(c, 2)]

  def two_steps(step, trainer):
    state = trainer.init_state(0)
    for batch in data:
      before = jax.tree.leaves(state.params)
      state, metrics = step(state, batch)
      assert all(x.is_deleted() for x in before)  # the state is donated, as by the plain jit
    return state, metrics

  stored = two_steps(first.step, first)
  assert first.step.source == "traced" and len(list(store.glob("train_step-*.jaxexport"))) == 1
  plain = two_steps(first.step.plain, first)
  for a, b in zip(leaves(stored), leaves(plain)):
    np.testing.assert_array_equal(a, b)

  # A later run (a new Trainer, jax's and the store's memory cleared) must not run the step's Python.
  def not_traced(*args, **kwargs):
    raise AssertionError("the step was traced")
  monkeypatch.setattr(step_module, "train_step", not_traced)
  jax.clear_caches()
  second = Trainer(c, mesh=one_device(c))
  loaded = two_steps(second.step, second)
  assert second.step.source == "stored"
  for a, b in zip(leaves(loaded), leaves(plain)):
    np.testing.assert_array_equal(a, b)
  # The initial state's program too (a fresh run's other compile).
  assert (first.init_source, second.init_source) == ("traced", "stored")
  assert len(list(store.glob("init-*.jaxexport"))) == 1

  # A new process: none of the types of the programs' trees registered yet (the initial state's
  # come only with its output); it runs the stored programs and gets the plain jit's numbers.
  np.savez(store.parent / "data.npz", *[np.asarray(x) for b in data for x in jax.tree.leaves(b)])
  r = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(store), str(TESTS)], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.splitlines()[-1] == "stored stored", r.stdout
  fresh = np.load(store.parent / "fresh.npz")
  init = leaves(first._init.plain(jax.random.PRNGKey(0)))
  assert len(fresh.files) == len(init) + len(leaves(plain))
  for i, b in enumerate(init + leaves(plain)):
    np.testing.assert_array_equal(fresh[f"arr_{i}"], b)


# ``store`` is argv[1], the suite's XLA cache (conftest.py, inherited) is kept.
FRESH_PROCESS = """
import os, pathlib, sys
sys.path[:0] = [sys.argv[2], os.path.join(os.path.dirname(sys.argv[2]), "configs")]
import jax, numpy as np
jax.config.update("jax_compilation_cache_dir", os.environ["VIDEOFUSION_TESTS_XLA_CACHE"])
jax.config.update("jax_compilation_cache_max_size", 16 << 30)
from tiny import tiny_config
from videofusion_jax.training import program_store
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.step import Trainer
program_store.store_directory = lambda: pathlib.Path(sys.argv[1])
c = tiny_config(store_programs=True)
trainer = Trainer(c, mesh=shd.make_mesh(c, devices=jax.devices()[:1]))
saved = np.load(pathlib.Path(sys.argv[1]).parent / "data.npz")
data = [{"label": saved[f"arr_{2 * i}"], "video": saved[f"arr_{2 * i + 1}"]} for i in range(2)]
state = trainer.init_state(0)
out = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
for batch in data:
  state, metrics = trainer.step(state, trainer.global_batch(batch))
out += [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state, metrics)))]
np.savez(pathlib.Path(sys.argv[1]).parent / "fresh.npz", *out)
print(trainer.init_source, trainer.step.source)
"""


def test_the_key_follows_what_the_tracing_reads(tmp_path):
  c = tiny_config()
  mesh = one_device(c)
  x = {"a": jnp.zeros((2, 3)), "b": jnp.ones((4,), jnp.int32)}
  key = program_key("f", program_context(c), mesh, (x,))
  assert key == program_key("f", program_context(c), mesh, ({"a": jnp.ones((2, 3)), "b": x["b"]},))  # values: no
  other = c.copy_and_resolve_references()
  other.train.learning_rate *= 2
  moved = c.copy_and_resolve_references()
  moved.compilation_cache_dir = str(tmp_path)  # where the cache is: not read by any program
  assert program_context(moved) == program_context(c)
  # Nor the training loop's own fields (a rerun that trains longer, logs, saves or profiles otherwise loads its
  # programs), but for train.num_steps where the learning rate decays to it.
  loop = {"train.log_every": 7, "train.checkpoint_every": 9, "train.keep_checkpoints": 1, "train.profile_steps": (2, 3),
          "train.init_base_from": str(tmp_path), "train.num_steps": 40}
  assert program_context(tiny_config(**loop)) == program_context(c)
  assert program_context(tiny_config(**{"train.lr_decay": "cosine", "train.num_steps": 40})) != program_context(
      tiny_config(**{"train.lr_decay": "cosine"}))
  # Every other field is in the key: each changed alone changes it (a field left out by mistake, such as
  # train.ema_decay, would load a step traced under its old value).
  import ml_collections

  # What no program reads, as README.md says: the loop's own fields (num_steps too, the rate being constant here)
  # and the compilation cache's settings.
  assert c.train.lr_decay == "constant"
  unread = {("train", k) for k in ("log_every", "checkpoint_every", "keep_checkpoints", "init_base_from",
                                   "profile_steps", "num_steps")} | {
      (k,) for k in ("compilation_cache_dir", "compilation_cache_max_gb", "store_programs")}

  def leaves(d, path=()):
    for k, v in d.items():
      if isinstance(v, dict) and v:
        yield from leaves(v, path + (k,))
      else:
        yield path + (k,), v

  def changed(v):
    if isinstance(v, bool):
      return not v
    if isinstance(v, int | float):
      return v + 1.5 if isinstance(v, float) else v + 1
    if isinstance(v, tuple | list):
      return type(v)([*v, 1])
    return f"{v}x"

  base, checked = c.to_dict(), 0
  for path, value in leaves(base):
    d = copy.deepcopy(base)
    node = d
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = changed(value)
    same = program_context(ml_collections.ConfigDict(d)) == program_context(c)
    assert same == (path in unread), path
    checked += 1
  assert checked > 100
  changed = [
      program_key("g", program_context(c), mesh, (x,)),
      program_key("f", program_context(other), mesh, (x,)),
      program_key("f", program_context(c), mesh, ({**x, "a": jnp.zeros((2, 4))},)),
      program_key("f", program_context(c), mesh, ({**x, "a": jnp.zeros((2, 3), jnp.bfloat16)},)),
      program_key("f", program_context(c), mesh, ((x["a"], x["b"]),)),
      program_key("f", program_context(c), jax.sharding.Mesh(np.array(jax.devices()[1:2]), ("data",)), (x,)),
      program_key("f", program_context(c), mesh, (x,), source="0" * 64),
  ]
  assert len({key, *changed}) == 1 + len(changed)
  # The package's source: a copy hashes the same, one changed byte does not.
  package = tmp_path / "package"
  shutil.copytree(program_store.__file__.rsplit("/training/", 1)[0], package)
  assert source_digest(str(package)) == source_digest()
  losses = package / "diffusion" / "losses.py"
  losses.write_text(losses.read_text() + "\n")
  assert source_digest.__wrapped__(str(package)) != source_digest()


State = collections.namedtuple("State", "w count")


def affine(state: State, x: dict) -> tuple[State, dict]:
  y = x["v"] @ state.w
  return State(state.w * 0.5, state.count + 1), {"y": y, "mean": y.mean()}


def test_a_damaged_program_is_traced_again_and_one_that_cannot_be_stored_runs_plain(store, capsys):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  state, x = State(jnp.arange(6.0).reshape(3, 2), jnp.zeros((), jnp.int32)), {"v": jnp.ones((4, 3))}
  expected = jax.jit(affine)(state, x)

  def run(context):
    f = StoredJit(affine, "affine", context, mesh)
    out = f(state, x)
    assert type(out[0]) is State  # the tree comes back as it went in
    for a, b in zip(leaves(out), leaves(expected)):
      np.testing.assert_array_equal(a, b)
    return f.source

  assert run("ctx") == "traced"
  assert run("ctx") == "stored"
  (path,) = store.glob("affine-*.jaxexport")
  data = path.read_bytes()
  path.write_bytes(data[:-10])  # truncated
  assert run("ctx") == "traced" and path.read_bytes() == data
  path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit flipped
  assert run("ctx") == "traced" and path.read_bytes() == data

  # A tree whose static data is no Python literal cannot be written: the plain jit runs, said once.
  class Opaque:
    pass

  @jax.tree_util.register_pytree_node_class
  class Holder:
    def __init__(self, value, tag):
      self.value, self.tag = value, tag

    def tree_flatten(self):
      return (self.value,), self.tag

    @classmethod
    def tree_unflatten(cls, tag, children):
      return cls(children[0], tag)

  f = StoredJit(lambda h: h.value * 2, "holder", "ctx", mesh)
  np.testing.assert_array_equal(f(Holder(jnp.arange(3.0), Opaque())), [0.0, 2.0, 4.0])
  assert f.source == "plain" and not list(store.glob("holder-*"))
  assert "note: the holder program is not stored (ValueError" in capsys.readouterr().out


def test_the_experiment_keys_its_config_as_built_and_changed_code_is_not_stored(store, monkeypatch, capsys):
  """A program is keyed by the config its experiment was built from: another config traces anew,
  the same one loads, and a config changed after the experiment was built (its networks, schedule
  and optimizer came from the old one) or a package file changed after import is not stored."""
  c = tiny_config()
  mesh = one_device(c)
  args = (State(jnp.ones((3, 2)), jnp.zeros((), jnp.int32)), {"v": jnp.ones((4, 3))})

  def source(config, change=None):
    experiment = Experiment(config, mesh=mesh)
    if change:
      change(experiment.config)
    f = experiment.stored_jit(affine, "affine")
    f(*args)
    return f.source

  other = tiny_config()
  other.train.learning_rate *= 2
  assert [source(c), source(other), source(c)] == ["traced", "traced", "stored"]
  assert len(list(store.glob("affine-*"))) == 2

  def change(config):
    config.train.learning_rate *= 3
  assert source(tiny_config(), change) == "plain" and len(list(store.glob("affine-*"))) == 2
  monkeypatch.setattr(videofusion_jax, "LOADED_AT", 0.0)  # every file is newer than the import now
  assert source(c) == "plain"
  assert "a source file of videofusion_jax changed since it was loaded" in capsys.readouterr().out


def test_a_store_that_cannot_be_written_leaves_the_run_going(store, monkeypatch, capsys):
  def read_only(*args):
    raise OSError(30, "Read-only file system")
  monkeypatch.setattr(program_store.os, "replace", read_only)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  f = StoredJit(lambda x, s: x * s, "scale", "ctx", mesh)
  np.testing.assert_array_equal(f(jnp.ones(3), 2.0), [2.0, 2.0, 2.0])  # a Python scalar argument too
  assert f.source == "traced" and list(store.iterdir()) == []  # no program, no temporary file left
  assert "warning: cannot store the traced program" in capsys.readouterr().out


def test_a_device_platform_under_an_alias_is_exported_by_its_concrete_name(store, monkeypatch):
  """A CUDA device's platform is 'gpu', an alias of 'cuda': jax.export records the name it is given, and a
  call compares it with the concrete one, so a program exported for 'gpu' could not be called on a GPU (the
  first step of every run that stores its programs). Here the CPU under an alias of its own, as 'gpu' is
  for 'cuda': the program is exported for 'cpu', runs when traced and when loaded by a new StoredJit."""
  from jax._src import xla_bridge
  monkeypatch.setitem(xla_bridge._alias_to_platforms, "cpux", ["cpu"])
  monkeypatch.setattr(program_store, "device_platform", lambda mesh: "cpux")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  assert program_store.export_platform(mesh) == "cpu"
  for source in ("traced", "stored"):
    f = StoredJit(lambda x: jnp.sin(x) * 2.0, "alias", "ctx", mesh)
    np.testing.assert_allclose(f(jnp.ones(3)), 2.0 * np.sin(np.ones(3)), rtol=1e-6)
    assert f.source == source
  assert jax.export.deserialize(bytearray(program_store._read(next(store.iterdir())))).platforms == ("cpu",)


def test_the_stored_programs_of_a_gpu_run_export_and_lower_for_cuda(store, monkeypatch):
  """What a GPU run does with its stored programs, short of compiling (no GPU here): the initial state (on
  JAX's threefry kernel, experiment.init_lowering) and the train step, exported for 'cuda' and stored, their
  calls lowered for CUDA as a process that loads them lowers them (the platform check that stopped every
  stored program on a GPU before 8dbbf65)."""
  from conftest import load_benchmark

  from videofusion_jax.experiment import init_lowering
  monkeypatch.setattr(program_store, "device_platform", lambda mesh: "cuda")
  c = tiny_config()
  trainer = Trainer(c, mesh=one_device(c))
  key = jax.random.PRNGKey(0)
  with init_lowering():
    init = trainer._init._program((key,)).trace(key).lower(lowering_platforms=("cuda",)).as_text()
  assert init.count("cu_threefry2x32_ffi") >= 5 and trainer._init.source == "traced"
  args = (trainer.abstract_state(), load_benchmark("memory").abstract_batch(trainer))
  step = trainer.step._program(args).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.convolution" in step and trainer.step.source == "traced"
  stored = {p.name.split("-")[0]: jax.export.deserialize(bytearray(program_store._read(p))) for p in store.iterdir()}
  assert sorted(stored) == ["init", "train_step"] and all(e.platforms == ("cuda",) for e in stored.values())


def test_the_store_keeps_the_most_recently_used_programs(store, monkeypatch):
  monkeypatch.setattr(program_store, "KEEP", 2)
  paths = [store / f"p{i}.jaxexport" for i in range(3)]
  for i, path in enumerate(paths[:2]):
    program_store._write(path, b"program %d" % i)
    os.utime(path, (1000 + i, 1000 + i))
  assert program_store._read(paths[0]) == b"program 0"  # read now: the most recently used
  program_store._write(paths[2], b"program 2")
  assert sorted(p.name for p in store.iterdir()) == ["p0.jaxexport", "p2.jaxexport"]


def test_a_write_stopped_before_its_rename_leaves_no_file_and_one_killed_is_pruned(store, monkeypatch):
  """Ctrl-C between a program's write and its rename removes the half file (before: kept, program-sized, in a
  store whose pruning counts programs only); one left by a write killed outright is removed by a later write
  once it is older than STALE_TMP_S, not while it may be another process's write under way."""
  real_replace = os.replace

  def interrupted(*args):
    monkeypatch.setattr(program_store.os, "replace", real_replace)
    raise KeyboardInterrupt

  monkeypatch.setattr(program_store.os, "replace", interrupted)
  with pytest.raises(KeyboardInterrupt):
    program_store._write(store / "p0.jaxexport", b"program 0")
  assert list(store.iterdir()) == []
  killed, recent = store / ".p1.jaxexport.abc.tmp", store / ".p2.jaxexport.def.tmp"
  killed.write_bytes(b"half"), recent.write_bytes(b"half")
  old = time.time() - program_store.STALE_TMP_S - 60
  os.utime(killed, (old, old))
  program_store._write(store / "p3.jaxexport", b"program 3")
  assert sorted(p.name for p in store.iterdir()) == [recent.name, "p3.jaxexport"]


def test_a_weakly_typed_argument_gets_a_program_of_its_own(store):
  """A weakly typed float32 scalar (a Python number's) promotes to bfloat16 with a bfloat16 array, a strong one
  to float32, as jax.jit has it: the programs differ, in memory and in the store (before: the first traced was
  used for both, a new process loading it too)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  x = jnp.ones(3, jnp.bfloat16)
  weak, strong = jnp.asarray(2.0), jnp.asarray(2.0, jnp.float32)
  assert weak.weak_type and not strong.weak_type
  plain = jax.jit(lambda x, s: x * s)
  expected = [plain(x, weak).dtype, plain(x, strong).dtype]
  assert expected == [jnp.bfloat16, jnp.float32]
  f = StoredJit(lambda x, s: x * s, "scale", "ctx", mesh)
  assert [f(x, weak).dtype, f(x, strong).dtype] == expected and f.source == "traced"
  g = StoredJit(lambda x, s: x * s, "scale", "ctx", mesh)  # a new process's: from the store
  assert [g(x, strong).dtype, g(x, weak).dtype] == expected[::-1] and g.source == "stored"


def test_without_a_local_compilation_cache_nothing_is_stored(monkeypatch, tmp_path):
  assert program_store.store_directory(str(tmp_path)) == tmp_path / "programs"
  assert program_store.store_directory("") is None and program_store.store_directory("gs://bucket/xla") is None
  # config.store_programs=False: the plain jit, with a store there.
  directory = tmp_path / "programs"
  monkeypatch.setattr(program_store, "store_directory", lambda: directory)
  off = tiny_config()
  off.store_programs = False
  f = Experiment(off, mesh=one_device(off)).stored_jit(affine, "affine")
  out = f(State(jnp.ones((3, 2)), jnp.zeros((), jnp.int32)), {"v": jnp.ones((4, 3))})
  assert f.source == "plain" and float(out[1]["mean"]) == 3.0 and not directory.exists()
  # A frozen encoder registered from outside the package: its code is not in the key, so not stored.
  outside = tiny_config(**{"model.encoder.kind": "frozen", "model.encoder.frozen_name": "test_pixels",
                           "model.encoder.embed_dim": 49})
  assert Experiment(tiny_config(**{"model.encoder.kind": "frozen", "model.encoder.frozen_name": "pixels",
                                   "model.encoder.embed_dim": 49}), mesh=one_device(outside)).stores_programs()
  monkeypatch.setitem(encoder.FROZEN_ENCODERS, "test_pixels", lambda size: encoder.pixels_encoder(size))
  assert not Experiment(outside, mesh=one_device(outside)).stores_programs()
  monkeypatch.setattr(program_store, "store_directory", lambda: None)  # no cache
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  f = StoredJit(affine, "affine", "ctx", mesh)
  out = f(State(jnp.ones((3, 2)), jnp.zeros((), jnp.int32)), {"v": jnp.ones((4, 3))})
  assert f.source == "plain" and float(out[1]["mean"]) == 3.0


def test_a_run_refuses_an_experiment_its_config_no_longer_describes(tmp_path):
  """A notebook's second call: the config changed after its Trainer or Experiment was built (whose programs
  and cached samplers keep the old values while config.json and the sidecars would record the new), or
  another config handed with them that differs in what their programs read. Each is refused before
  anything is read or written; the loop's own fields, and num_steps under a constant rate, may differ."""
  from videofusion_jax import sampling
  from videofusion_jax.config import ConfigError
  from videofusion_jax.evaluation import evaluate
  from videofusion_jax.training.loop import train

  c = tiny_config()
  trainer = Trainer(c, mesh=one_device(c))
  c.train.learning_rate = 1e-5  # after the build: the optimizer has 1e-3
  with pytest.raises(ConfigError, match=r"the config of this Trainer was changed after it was built "
                                        r"\(train.learning_rate=1e-05 \(was 0.001\)\): its programs are built from "
                                        r"the old values. Build a new Trainer from the changed config."):
    train(c, tmp_path / "run", iter([]), trainer=trainer, verbose=False)
  c.train.learning_rate = 1e-3
  experiment = Experiment(c, mesh=one_device(c))
  c.sample.num_steps = 2  # the sampler of 5 steps is built and cached per experiment
  for run in (sampling.run, evaluate.run):
    with pytest.raises(ConfigError, match=r"this Experiment was changed after it was built \(sample.num_steps=2 "
                                          r"\(was 5\)\)"):
      run(c, str(tmp_path / "run"), experiment=experiment)
  c.sample.num_steps = 5
  other = tiny_config(**{"train.learning_rate": 1e-5, "diffusion.lam": 0.9})
  with pytest.raises(ConfigError, match=r"training was given a Trainer built from another config \(diffusion.lam=0.9 "
                                        r"\(was 0.5\), train.learning_rate=1e-05 \(was 0.001\)\): it would run the "
                                        r"Trainer's and record this one."):
    train(other, tmp_path / "run", iter([]), trainer=trainer, verbose=False)
  cosine = tiny_config(**{"train.lr_decay": "cosine"})
  decaying = Trainer(cosine, mesh=one_device(cosine))
  with pytest.raises(ConfigError, match=r"\(train.num_steps=8 \(was 4\)\)"):  # the rate decays to num_steps
    train(tiny_config(**{"train.lr_decay": "cosine", "train.num_steps": 8}), tmp_path / "run", iter([]),
          trainer=decaying, verbose=False)
  longer = tiny_config(**{"sample.num_steps": 7})
  with pytest.raises(ConfigError, match=r"sampling was given a Trainer built from another config "
                                        r"\(sample.num_steps=7 \(was 5\)\)"):
    trainer.check_config(longer, "sample")
  clips = tiny_config(**{"sample.num_clips": 3})  # long videos' clips are the sampler's, not evaluation's
  with pytest.raises(ConfigError, match=r"\(sample.num_clips=3 \(was 1\)\)"):
    experiment.check_config(clips, "sample")
  experiment.check_config(clips, "eval")
  # What the programs do not read, in place or in another config: the loop's fields, num_steps under a
  # constant rate, the samples' count and seed; and a config read back from config.json (lists for tuples).
  c.train.num_steps, c.sample.num_samples, c.data.data_dir = 9, 1, "/elsewhere"
  trainer.check_config(c, "train")
  experiment.check_config(c, "sample")
  import ml_collections
  trainer.check_config(ml_collections.ConfigDict(json.loads(json.dumps(c.to_dict()))), "train")
  trainer.check_config(tiny_config(**{"train.num_steps": 9, "train.log_every": 3, "sample.num_samples": 1}), "train")
  experiment.check_config(tiny_config(**{"sample.seed": 7, "sample.control": "content", "train.learning_rate": 1.0}),
                          "sample")
  assert not (tmp_path / "run").exists()
