"""The memory switches (issue 11, item 5): remat, gradient accumulation and FSDP change memory,
not the update; and the arithmetic of benchmarks/memory.py, on the tiny config (nothing here
compiles the ucf101 model)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_benchmark, tiny_config
from test_topology import assert_state_close
from test_training import batches

from videofusion_jax.config import ConfigError, validate
from videofusion_jax.experiment import Experiment
from videofusion_jax.models import factory
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.step import Trainer

bench = load_benchmark("memory")


def on_devices(config, n: int):
  return shd.make_mesh(config, devices=jax.devices()[:n])


def test_memory_switches_are_validated():
  with pytest.raises(ConfigError, match=r"config.train.remat='all': use '' \(off\), 'block'"):
    validate(tiny_config(**{"train.remat": "all"}))
  with pytest.raises(ConfigError, match="grad_accum_steps=0: must be an integer >= 1"):
    validate(tiny_config(**{"train.grad_accum_steps": 0}))
  with pytest.raises(ConfigError, match="batch_size=8 does not split into grad_accum_steps=3 micro-batches"):
    validate(tiny_config(**{"train.grad_accum_steps": 3}))
  # 8 examples in 2 micro-batches of 4 cannot keep the split over 8 devices (training's check: sampling and
  # evaluation never read train.batch_size).
  with pytest.raises(ConfigError, match="micro-batches of 4, which do not split evenly over the 8 devices.*"
                                        "multiple of 16"):
    Trainer(tiny_config(**{"train.grad_accum_steps": 2}))
  for remat in ("", "none", "block", "block_dots"):
    validate(tiny_config(**{"train.remat": remat}))


def test_remat_keeps_the_parameters_and_gradients_and_lowers_memory():
  """train.remat='block' rematerialises every block of the U-Nets the config builds: the parameter
  tree is the same (old checkpoints restore), the base generator's output and gradients are the
  same (with dropout: the recomputation replays the forward pass's masks), and XLA's temporary
  memory for the gradient is smaller. The compiles keep jax.checkpoint's barriers
  (bench.KEEP_REMAT_BARRIERS) as XLA's GPU and TPU pipelines do; the CPU pipeline drops them early
  and merges the recomputation away. (The whole step with remat: test_accumulated_gradients_...)"""
  dropout = {"model.base.dropout": 0.3, "model.residual.dropout": 0.3}
  configs = {r: tiny_config(**{"train.remat": r, **dropout}) for r in ("", "block", "block_dots")}
  experiments = {r: Experiment(c, mesh=on_devices(c, 1)) for r, c in configs.items()}
  trees = {r: factory.boxed_abstract_params(e.networks, configs[r]) for r, e in experiments.items()}
  shapes = {r: [(p, x.shape) for p, x in jax.tree_util.tree_flatten_with_path(nn.unbox(t))[0]]
            for r, t in trees.items()}
  assert shapes["block"] == shapes[""] and shapes["block_dots"] == shapes[""]

  x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
  t = jnp.arange(8) * 100
  cond = jax.random.normal(jax.random.PRNGKey(2), (8, configs[""].model.encoder.embed_dim))
  init = jax.jit(lambda key: experiments[""].networks["base"].init(key, x[:1], t[:1], condition=cond[:1]))
  params = nn.unbox(init(jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda p: p + 0.05, params["params"])  # the zero-initialised output layers too
  results, temp = {}, {}
  for r in ("", "block"):
    net = experiments[r].networks["base"]
    assert net.remat == r

    def loss(p, net=net):
      out = net.apply({"params": p}, x, t, train=True, condition=cond, rngs={"dropout": jax.random.PRNGKey(3)})
      return jnp.mean(jnp.square(out - x))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile(bench.KEEP_REMAT_BARRIERS)
    temp[r] = compiled.memory_analysis().temp_size_in_bytes
    results[r] = jax.device_get(compiled(params))
  (value, grads), (value_remat, grads_remat) = results[""], results["block"]
  np.testing.assert_allclose(value_remat, value, rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  worst = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)))
  assert scale > 0 and worst <= 1e-5 * scale, (worst, scale)
  assert temp["block"] < 0.6 * temp[""], temp


ACCUM = {"train.batch_size": 32, "train.label_dropout": 0.3}  # dropped conditions: one more random draw per example


@pytest.fixture(scope="module")
def accumulation():
  """The tiny model at batch 32: one step on the whole batch (one device), and 4 micro-batches of 8 on
  one device and on a 4x2 mesh (FSDP, with remat too); each step compiled once (the benchmark's
  ``compile_step``: lowered and compiled, then run), and a start state past the warm-up."""
  whole = tiny_config(**ACCUM)
  trainers = {"whole": Trainer(whole, mesh=on_devices(whole, 1))}
  four = tiny_config(**ACCUM, **{"train.grad_accum_steps": 4})
  trainers["accumulated"] = Trainer(four, mesh=on_devices(four, 1))
  sharded = tiny_config(**ACCUM, **{"train.grad_accum_steps": 4, "mesh.data": 4, "mesh.fsdp": 2,
                                    "train.remat": "block"})
  trainers["accumulated_4x2"] = Trainer(sharded, mesh=on_devices(sharded, 8))
  start = jax.device_get(trainers["whole"].init_state(0))
  start = start.replace(step=np.asarray(2, np.int32))  # warmup_steps = 2: the update moves the params
  compiled = {k: bench.compile_step(t)[0] for k, t in trainers.items()}
  return trainers, compiled, start, batches(whole, 1)[0]


def run(accumulation, which: str, start=None):
  trainers, compiled, default_start, batch = accumulation
  trainer = trainers[which]
  state = jax.device_put(default_start if start is None else start, trainer.state_sharding)
  return compiled[which](state, trainer.global_batch(batch))


@pytest.mark.parametrize("which", ["accumulated", "accumulated_4x2"])
def test_accumulated_gradients_give_the_update_of_the_whole_batch(accumulation, which):
  """grad_accum_steps=4: four micro-batches of 8, one optimizer update, equal the step on the batch of
  32 at once: the loss, every metric, the params, EMA and Adam's moments. Every random value
  (timesteps, noise, dropped conditions, the prior's repeats) is drawn for the whole batch, so each
  example gets the same ones however the batch is split. Control: another step rng changes the loss."""
  s_whole, m_whole = run(accumulation, "whole")
  s_acc, m_acc = run(accumulation, which)
  assert set(m_acc) == set(m_whole)
  for k in m_whole:
    np.testing.assert_allclose(m_acc[k], m_whole[k], rtol=1e-5, err_msg=k)
  assert_state_close(s_acc, s_whole)
  start = accumulation[2]
  other = start.replace(rng=np.asarray(jax.random.key_data(jax.random.PRNGKey(7)), start.rng.dtype))
  _, m_other = run(accumulation, which, other)
  assert abs(float(m_other["loss"]) - float(m_whole["loss"])) > 1e-3


def test_accumulation_runs_in_the_memory_of_a_micro_batch(accumulation):
  """XLA's temporary memory for the step: 4 micro-batches of 8 (a scan) need much less than the batch
  of 32 at once."""
  _, compiled, _, _ = accumulation
  temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  assert temp["accumulated"] < 0.5 * temp["whole"], temp


def test_fsdp_splits_the_state_and_the_benchmark_counts_it(accumulation):
  """The benchmark's per-device state bytes: with data parallelism (8x1) every device holds the whole
  state; on 4x2 (FSDP over 2) each holds less. Independent checks: the compiled step's argument
  size is that state plus one batch shard, and the arrays the step returns hold that many bytes on
  device 0."""
  trainers, compiled, _, _ = accumulation
  fsdp = trainers["accumulated_4x2"]
  dp = Experiment(tiny_config(**ACCUM, **{"mesh.data": 8, "mesh.fsdp": 1}))
  dp_bytes, fsdp_bytes = bench.state_bytes(dp), bench.state_bytes(fsdp)
  assert dp_bytes == bench.state_bytes(dp, "one_copy")  # each device a whole copy
  for part in ("params", "ema_params", "opt_state"):
    assert fsdp_bytes[part] < 0.7 * dp_bytes[part], (part, fsdp_bytes[part], dp_bytes[part])
  batch_shard = 32 // 8 * (4 * 8 * 8 * 3 * 4 + 4)  # 4 clips of (4, 8, 8, 3) float32 and their int32 labels
  assert compiled["accumulated_4x2"].memory_analysis().argument_size_in_bytes == fsdp_bytes["total"] + batch_shard
  state, _ = run(accumulation, "accumulated_4x2")
  device = jax.devices()[0]
  held = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards if s.device == device)
  assert held == fsdp_bytes["total"]


def test_benchmark_fit_and_largest_batch():
  """The line through the compiled sizes and the largest batch under a budget, on exact numbers."""
  intercept, slope = bench.fit_line([1, 2, 4], [10 + 3 * b for b in (1, 2, 4)])
  assert intercept == pytest.approx(10) and slope == pytest.approx(3)
  assert bench.largest_batch(10, 3, 41) == 10 and bench.largest_batch(10, 3, 40) == 10
  assert bench.largest_batch(10, 3, 39.9) == 9 and bench.largest_batch(50, 3, 40) == 0
  with pytest.raises(ValueError, match="does not grow"):
    bench.largest_batch(10, 0, 40)
  assert bench.parse_mesh("1x8") == (1, 8)
  for bad in ("8", "2x", "0x8", "2x2x2", "ax8"):
    with pytest.raises(ValueError, match=f"{bad!r} is not a mesh: give data x fsdp"):
      bench.parse_mesh(bad)
  c = bench.config_for(tiny_config(), (1, 8), 2, "block")
  assert (c.mesh.data, c.mesh.fsdp, c.train.batch_size, c.train.remat) == (1, 8, 16, "block")
  rows = [{"result": "fit", "mesh": "1x8", "remat": "block", "intercept_bytes": 2**30, "bytes_per_example": 2**29,
           "budget_gib": 80.0, "largest_per_device_batch": 158}]
  assert "1x8 |      block | 1.00 + 0.50 | 80.0 | 158" in bench.tables(rows)
