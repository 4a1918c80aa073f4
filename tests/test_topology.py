"""Topology changes (issue 11, item 4): a step on any mesh of the 8 devices equals one device's, FSDP
really splits the weights, and a checkpoint saved on one mesh restores onto another device count
and mesh shape (8 -> 4 -> 1 -> 8 devices, data parallel to FSDP and back) for training, sampling and
evaluation. Compiles dominate: each mesh's Trainer (its step, and its generator) is built once."""
import contextlib

import jax
import numpy as np
import pytest
from conftest import tiny_config
from test_training import batches

from videofusion_jax import sampling
from videofusion_jax.config import ConfigError
from videofusion_jax.experiment import Experiment
from videofusion_jax.models import factory
from videofusion_jax.training import checkpoint as ckpt
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.step import Trainer

STEPS = 5  # the chain: 2 steps on 8x1, 1 on 2x2, 1 on 1x1, 1 on 1x8


def config_on(data: int, fsdp: int):
  """The tiny config on a ``data x fsdp`` mesh; the sample batch (8) splits over every mesh here."""
  return tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp, "sample.batch_size": 8, "sample.num_samples": 8})


@pytest.fixture(scope="module")
def trainer_on():
  """``trainer_on(data, fsdp)``: the Trainer on the first ``data x fsdp`` devices, built once per mesh."""
  built = {}

  def get(data: int, fsdp: int) -> Trainer:
    if (data, fsdp) not in built:
      c = config_on(data, fsdp)
      built[data, fsdp] = Trainer(c, mesh=shd.make_mesh(c, devices=jax.devices()[:data * fsdp]))
    return built[data, fsdp]
  return get


@pytest.fixture(scope="module")
def data():
  return batches(config_on(1, 1), STEPS)


@pytest.fixture(scope="module")
def reference(trainer_on, data):
  """The uninterrupted single-device run: host copies of the state before step 0 and after each of
  the ``STEPS`` steps, and each step's metrics."""
  single = trainer_on(1, 1)
  state = single.init_state(0)
  states, metrics = [jax.device_get(state)], []
  for b in data:
    state, m = single.step(state, single.global_batch(b))
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return states, metrics


def on(trainer: Trainer, host_state):
  """A fresh copy of ``host_state`` laid out on ``trainer``'s mesh (the step donates its input)."""
  return jax.device_put(host_state, trainer.state_sharding)


def parts(state) -> dict[str, list[np.ndarray]]:
  """The state's leaves as host arrays by kind: params, EMA params, Adam's first and second moments,
  and the rest (step, rng, Adam's counts)."""
  out = {"params": jax.tree.leaves(state.params), "ema_params": jax.tree.leaves(state.ema_params),
         "mu": [], "nu": [], "rest": [state.step, state.rng]}
  for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    where = jax.tree_util.keystr(path)
    out["mu" if ".mu[" in where else "nu" if ".nu[" in where else "rest"].append(x)
  return {k: [np.asarray(x) for x in jax.device_get(v)] for k, v in out.items()}


def assert_state_close(actual, expected, rtol=1e-5):
  """Params, EMA and each Adam moment within ``rtol`` of the largest magnitude of their kind: float32
  sums in another order. (Per element it can be more: Adam's step on an element whose gradient is
  near its eps, 1e-8, depends on that gradient's low bits.) The step, rng and counts are equal."""
  a, e = parts(actual), parts(expected)
  for kind in ("params", "ema_params", "mu", "nu"):
    assert len(a[kind]) == len(e[kind]) > 0, kind
    scale = max(float(np.abs(x).max()) for x in e[kind])
    worst = max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a[kind], e[kind]))
    assert worst <= rtol * scale, (kind, worst, scale)
  for x, y in zip(a["rest"], e["rest"], strict=True):
    np.testing.assert_array_equal(x, y)


def largest_kernels(state):
  """``{where: array}`` of the largest conv kernel of the base generator in the params, the EMA
  params and both Adam moments of the optimizer state."""
  kernels = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(state.params["base"])[0] if x.ndim == 4]
  path, _ = max(kernels, key=lambda px: px[1].size)
  suffix = "['base']" + jax.tree_util.keystr(path)
  out = {"params": state.params["base"], "ema_params": state.ema_params["base"]}
  out = {k: x for k, v in out.items() for p, x in jax.tree_util.tree_flatten_with_path(v)[0] if p == path}
  for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    where = jax.tree_util.keystr(p)
    for moment in ("mu", "nu"):
      if where.endswith(suffix) and f".{moment}[" in where:
        out[moment] = x
  assert set(out) == {"params", "ema_params", "mu", "nu"}, sorted(out)
  return out


@pytest.mark.parametrize("mesh", [(8, 1), (4, 2), (1, 8)], ids=["8x1", "4x2", "1x8"])
def test_one_step_on_any_mesh_equals_one_device(trainer_on, reference, data, mesh):
  """One step past the warm-up (full learning rate) from the same state and batch: the loss, every
  metric and the updated params, EMA and Adam moments equal one device's. On the FSDP meshes the
  largest kernel and its EMA and moments are really split over 'fsdp' (each device holds a shard)."""
  states, _ = reference
  start = states[2]  # step 2 = warmup_steps: the update moves the params
  single, sharded = trainer_on(1, 1), trainer_on(*mesh)
  s1, m1 = single.step(on(single, start), single.global_batch(data[2]))
  s2, m2 = sharded.step(on(sharded, start), sharded.global_batch(data[2]))
  assert set(m1) == set(m2)
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
  assert_state_close(s2, s1)
  assert np.abs(np.asarray(s1.params["base"]["conv_in"]["kernel"])
                - np.asarray(start.params["base"]["conv_in"]["kernel"])).max() > 1e-5  # the step moved them
  for where, x in largest_kernels(s2).items():
    shard = x.addressable_shards[0].data.shape
    if mesh[1] > 1:
      assert "fsdp" in tuple(x.sharding.spec), (where, x.sharding.spec)
      assert shard[-1] * mesh[1] == x.shape[-1] and shard[:-1] == x.shape[:-1], (where, shard, x.shape)
    else:  # data parallel: every device holds the whole kernel
      assert shard == x.shape, (where, shard)


@contextlib.contextmanager
def compiles():
  """The list of the programs XLA compiles in the block (one duration each; a persistent-cache hit
  is not a compile)."""
  seen = []

  def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      seen.append(duration)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def test_checkpoint_moves_across_meshes_and_training_continues(trainer_on, reference, data, tmp_path):
  """2 steps on 8 devices (8x1, data parallel) -> save -> restore on 4 devices as 2x2 (FSDP) -> 1 step
  -> save -> restore on 1 device -> 1 step -> save -> restore on 8 devices as 1x8 (FSDP) -> 1 step. At
  every hop the restored state equals the saved one exactly and lies on the new mesh as its Trainer
  lays it out, and every step equals the uninterrupted single-device run's. Saving compiles nothing
  (one process writes each replicated array from one device, whole: Orbax's replica-parallel
  default slices it per replica, a program per parameter shape at the first save)."""
  states, metrics = reference
  hops = [((8, 1), 2), ((2, 2), 1), ((1, 1), 1), ((1, 8), 1)]
  step, saved = 0, None
  for mesh, n in hops:
    trainer = trainer_on(*mesh)
    if saved is None:
      state = on(trainer, states[0])
    else:
      state = trainer.restore(tmp_path)  # the newest checkpoint, onto this mesh
      assert int(state.step) == step
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_sharding)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (mesh, x.sharding, s)
    for _ in range(n):
      state, m = trainer.step(state, trainer.global_batch(data[step]))
      step += 1
      np.testing.assert_allclose(m["loss"], metrics[step - 1]["loss"], rtol=1e-5)
      assert_state_close(state, states[step])
    saved = jax.device_get(state)
    manager = ckpt.make_manager(tmp_path, keep=5, async_save=False)
    with compiles() as compiled:
      ckpt.save(manager, step, state)
      manager.wait_until_finished()
    assert compiled == [], (mesh, len(compiled))
    manager.close()
  assert step == STEPS


def test_samples_from_a_checkpoint_restored_on_another_mesh(trainer_on, reference, tmp_path, monkeypatch):
  """A checkpoint saved on 8 devices as 8x1 and restored on them as 1x8 (FSDP) gives the same videos
  for the same seed as the state it was saved from, and as one device does. ``--mode=eval`` restores through the same
  ``Experiment.restore`` and draws its clips through the same ``sampling.generate_videos``
  (``evaluation.evaluate.run``), so this covers evaluation's restore too. ``sample.batch_size=3`` is
  rounded up to the 8 devices, each drawing one row of a batch."""
  drawn = []  # (experiment's devices, rows, devices holding them, rows per device) per generated batch
  made = []  # the jitted chain of each draw: one per experiment, traced once
  make = sampling.make_generate_fn

  def recording(experiment):
    generate = make(experiment)
    made.append((experiment, generate))

    def run(*args):
      videos, used = generate(*args)
      drawn.append((experiment.mesh.devices.size, videos.shape[0], len(videos.sharding.device_set),
                      {s.data.shape[0] for s in videos.addressable_shards}))
      return videos, used
    return run

  monkeypatch.setattr(sampling, "make_generate_fn", recording)
  states, _ = reference
  saver, reader, single = trainer_on(8, 1), trainer_on(1, 8), trainer_on(1, 1)
  for experiment in (saver, reader, single):  # 3 rows at a time, which 8 devices round up to 8
    monkeypatch.setitem(experiment.config.sample, "batch_size", 3)
  state = on(saver, states[-1])
  manager = ckpt.make_manager(tmp_path, keep=5, async_save=False)
  ckpt.save(manager, STEPS, state)
  manager.wait_until_finished()
  manager.close()
  labels = sampling.sample_labels(saver.config, 8)
  before = sampling.generate_videos(saver, state.ema_params, 8, seed=3, labels=labels)
  restored = reader.restore(tmp_path)
  kernel = restored.ema_params["base"]["conv_in"]["kernel"]
  assert kernel.sharding.spec[-1] == "fsdp" and kernel.addressable_shards[0].data.shape[-1] * 8 == kernel.shape[-1]
  after = sampling.generate_videos(reader, restored.ema_params, 8, seed=3, labels=labels)
  other_seed = sampling.generate_videos(reader, restored.ema_params, 8, seed=4, labels=labels)
  assert before.shape == (8, 4, 8, 8, 3)
  np.testing.assert_allclose(after, before, atol=1e-4)
  # One device draws the same videos for the seed (every row's noise comes from its own keys).
  alone = sampling.generate_videos(single, jax.device_put(states[-1].ema_params, single.state_sharding.ema_params),
                                   8, seed=3, labels=labels)
  np.testing.assert_allclose(alone, before, atol=1e-4)
  assert np.abs(other_seed - before).max() > 0.1  # control: the videos depend on the seed
  # Control: the weights matter to them (the run's first EMA weights draw other videos), so a restore that
  # returned other weights would show.
  first = sampling.generate_videos(reader, on(reader, states[1]).ema_params, 8, seed=3, labels=labels)
  assert np.abs(first - before).max() > 1e-3, np.abs(first - before).max()
  # 8 rows: one batch of 8 over the 8 devices (three times), then 3 + 3 + 2 (padded to 3) on one device.
  assert drawn[:6] == [(8, 8, 8, {1})] * 3 + [(1, 3, 1, {3})] * 3
  assert sampling.describe_batch(saver) == "8 at a time (sample.batch_size=3 rounded up to a multiple of the 8 devices)"
  assert sampling.describe_batch(single) == "3 at a time"
  assert [e for e, _ in made] == [saver, reader, reader, single, reader]
  assert made[1][1] is made[2][1] is made[4][1] and made[1][1]._cache_size() == 1  # the reader's draws: one trace


def test_only_training_needs_its_batch_to_split_over_the_devices(monkeypatch):
  """A run trained with train.batch_size=4 (on 4 devices, or with 2 accumulation steps of 4 on 4) is sampled
  and evaluated on these 8: the Experiment they build ignores the training batch, and sampling rounds its own
  batch up to the devices. The Trainer, which splits that batch, refuses it before it builds any network."""
  for overrides in ({"train.batch_size": 4}, {"train.batch_size": 8, "train.grad_accum_steps": 2}):
    c = tiny_config(**overrides, **{"sample.batch_size": 3})
    experiment = Experiment(c)
    assert experiment.mesh.devices.size == 8 == len(jax.devices())
    assert sampling.sampling_batch(experiment) == 8
    assert sampling.describe_batch(experiment) == "8 at a time (sample.batch_size=3 rounded up to a multiple of " \
        "the 8 devices)"
  monkeypatch.setattr(factory, "make_networks", lambda *a: (_ for _ in ()).throw(AssertionError("networks built")))
  with pytest.raises(ConfigError, match=r"config.train.batch_size=4 does not split evenly over the 8 devices of the "
                                        r"mesh; use a multiple of 8\."):
    Trainer(tiny_config(**{"train.batch_size": 4}))
  with pytest.raises(ConfigError, match=r"config.train.batch_size=8 with grad_accum_steps=2 gives micro-batches of 4, "
                                        r"which do not split evenly over the 8 devices of the mesh; use a batch size "
                                        r"that is a multiple of 16"):
    Trainer(tiny_config(**{"train.batch_size": 8, "train.grad_accum_steps": 2}))
  # The same batches split over 4 devices: the Trainer gets as far as the networks.
  for overrides in ({"train.batch_size": 4}, {"train.batch_size": 8, "train.grad_accum_steps": 2}):
    c = tiny_config(**overrides)
    with pytest.raises(AssertionError, match="networks built"):
      Trainer(c, mesh=shd.make_mesh(c, devices=jax.devices()[:4]))
