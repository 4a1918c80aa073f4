"""Training: stop-gradient, two learning rates, sharding, checkpoints, resume, NaN handling."""
import importlib
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_benchmark, one_device, tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from videofusion_jax import diffusion
from videofusion_jax.config import ConfigError, unet_config, validate
from videofusion_jax.data.stream import resume_position
from videofusion_jax.experiment import Experiment
from videofusion_jax.models.factory import make_apply_fns
from videofusion_jax.sampling import check_trained_config
from videofusion_jax.training import checkpoint as ckpt
from videofusion_jax.training import loop as loop_module
from videofusion_jax.training import sharding
from videofusion_jax.training.loop import NonFiniteLossError, ProfileWindow, train
from videofusion_jax.training.step import Trainer


def batches(config, n, seed=0, nan_at=None):
  rng = np.random.default_rng(seed)
  c = config.data
  out = []
  for i in range(n):
    video = rng.uniform(-1, 1, (config.train.batch_size, c.num_frames, c.image_size, c.image_size, 3))
    if nan_at is not None and i + 1 == nan_at:
      video[0, 0, 0, 0, 0] = np.nan
    out.append({"video": video.astype(np.float32),
                "label": rng.integers(0, c.num_classes, config.train.batch_size).astype(np.int32)})
  return out


@pytest.fixture(scope="module")
def trainer():
  """The tiny model on one device (the sharding test compares it with a 4x2 mesh)."""
  c = tiny_config()
  return Trainer(c, mesh=one_device(c))


def abstract_batch(experiment, config):
  """Shapes, dtypes and the batch sharding of one batch, for lowering a step without data."""
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=experiment.batch_sharding)
          for k, v in batches(config, 1)[0].items()}


def embeddings(config, b, seed=0):
  """``b`` fixed key-frame embeddings ``(b, D)`` on the sphere of radius √D, as the encoder gives."""
  from videofusion_jax.models.encoder import to_sphere
  return to_sphere(jax.random.normal(jax.random.PRNGKey(seed), (b, config.model.encoder.embed_dim)))


def _allclose_trees(a, b, atol=1e-6):
  """Leaf by leaf within ``atol``; equal to the bit at atol=0 (assert_allclose's default rtol=1e-7 let an ulp by)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0 if atol == 0 else 1e-7)


def test_stop_gradient_isolates_the_base_generator(trainer):
  c = trainer.config
  state = trainer.init_state(0)
  # Perturb the zero-initialised output layers so that both networks depend on their inputs.
  params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), state.params)
  b = batches(c, 1)[0]
  x0, cond = jnp.asarray(b["video"]), embeddings(c, 8)
  t = jnp.array([10, 200, 400, 600, 800, 900, 950, 999])
  noise = diffusion.decomposed_noise(jax.random.PRNGKey(0), x0.shape, trainer.lambdas)

  def terms(p):
    base_fn, residual_fn = make_apply_fns(trainer.networks, p, None, condition=cond)
    return diffusion.joint_loss(base_fn, residual_fn, x0, t, noise, trainer.lambdas, trainer.schedule)[1]

  def residual_term_without_sg(p):
    base_fn, residual_fn = make_apply_fns(trainer.networks, p, None, condition=cond)
    z = diffusion.q_sample(x0, t, noise, trainer.schedule)
    eps_hat, _, _ = diffusion.decomposed_eps(base_fn, residual_fn, z, t, trainer.lambdas, trainer.schedule)
    return jnp.mean(jnp.square(noise[:, [0, 1, 3]] - eps_hat[:, [0, 1, 3]]))

  grads = jax.jit(lambda p: (jax.grad(lambda q: terms(q)["loss_residual"])(p),
                             jax.grad(lambda q: terms(q)["loss_key"])(p),
                             jax.grad(residual_term_without_sg)(p)))
  g_res, g_key, g_ctrl = grads(params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_res["base"]))
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_res["residual"])) > 0
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_key["base"])) > 0
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_key["residual"]))
  # Control: without the stop-gradient the residual term does reach the base parameters.
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_ctrl["base"])) > 0


def test_key_frame_input_carries_no_gradient_to_the_base():
  """model.key_frame_input: the residual generator reads x̂^k from the stop-gradient base estimate,
  so the residual term of eq. 12 still gives the base parameters zero gradient. Control: x̂^k built
  from the base estimate without stop-gradient does reach them."""
  from videofusion_jax.models.factory import init_params, make_networks

  c = tiny_config(**{"model.key_frame_input": True})
  networks = make_networks(c)
  params = nn.unbox(init_params(networks, c, jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), params)
  assert params["residual"]["conv_in"]["kernel"].shape[2] == 6  # z' and x̂^k
  lambdas = diffusion.frame_lambdas(c.data.num_frames, c.diffusion.lam)
  schedule = diffusion.make_schedule(c.diffusion.schedule, c.diffusion.num_timesteps)
  b = batches(c, 1)[0]
  x0, cond = jnp.asarray(b["video"]), embeddings(c, 8)
  t = jnp.array([10, 200, 400, 600, 800, 900, 950, 999])
  noise = diffusion.decomposed_noise(jax.random.PRNGKey(0), x0.shape, lambdas)
  idx = diffusion.non_key_frames(c.data.num_frames)

  def residual_term(p):
    base_fn, residual_fn = make_apply_fns(networks, p, None, condition=cond)
    return diffusion.joint_loss(base_fn, residual_fn, x0, t, noise, lambdas, schedule, key_frame_input=True)[1][
        "loss_residual"]

  def residual_term_x0_without_sg(p):
    base_fn, residual_fn = make_apply_fns(networks, p, None, condition=cond)
    z = diffusion.q_sample(x0, t, noise, schedule)
    base_eps = base_fn(z[:, 2], t)
    z_prime = diffusion.remove_base_noise(z, jax.lax.stop_gradient(base_eps), t, lambdas, schedule)
    r = residual_fn(z_prime[:, idx], t, idx, diffusion.predict_x0(z[:, 2], base_eps, t, schedule, clip_x0=True))
    lam = lambdas[idx][None, :, None, None, None]
    return jnp.mean(jnp.square(noise[:, idx] - jnp.sqrt(lam) * jax.lax.stop_gradient(base_eps)[:, None]
                               - jnp.sqrt(1 - lam) * r))

  g, g_ctrl = jax.jit(lambda p: (jax.grad(residual_term)(p), jax.grad(residual_term_x0_without_sg)(p)))(params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g["base"]))
  assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g["residual"])) > 0
  assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g_ctrl["base"])) > 0


def test_two_learning_rates_and_metrics(trainer):
  c = trainer.config
  state = trainer.init_state(0)
  before = jax.device_get(state.params)
  for i, b in enumerate(batches(c, 4)):
    if i == 3:
      last = jax.device_get(state)  # a host copy: the step donates the state
    state, m = trainer.step(state, trainer.global_batch(b))
  lr = c.train.learning_rate
  np.testing.assert_allclose(m["lr_residual"], lr, rtol=1e-6)  # step 2 >= warmup_steps
  np.testing.assert_allclose(m["lr_base"], lr * c.train.base_lr_scale, rtol=1e-6)
  # A norm for every network the step trains (each is clipped on its own): the encoder's and the prior's too.
  # (The encoder's is 0 for three steps: step 0's rate is 0 (warm-up), and its embedding reaches the loss through
  # two zero-initialised layers in turn, the U-Nets' output convolution and their res blocks' last ones.)
  norms = {k[len("grad_norm_"):]: float(v) for k, v in m.items() if k.startswith("grad_norm_")}
  assert set(norms) == {"base", "residual", "encoder", "prior"} and all(0 < v < np.inf for v in norms.values())
  # Each is the norm of its own network's gradient of the step's loss (its draws from the state's key at that
  # step), computed here with jax.grad; control: the four differ.
  from videofusion_jax.training.step import loss_fn
  rng = jax.random.fold_in(last.rng, last.step)
  grads = jax.grad(lambda p: loss_fn(p, trainer, trainer.global_batch(batches(c, 4)[3]), rng, last.ema_params)[0])(
      last.params)
  for name, norm in norms.items():
    expected = np.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in jax.tree.leaves(grads[name])))
    assert norm == pytest.approx(expected, rel=1e-4), name
  assert len({round(v, 6) for v in norms.values()}) == 4
  assert int(state.step) == 4
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
  assert max(moved) > 0


# What each network's first update must be, as README.md states it: in the video stage the base and its
# encoder fine-tune at base_lr_scale x the rate, the residual generator and the prior at the rate;
# freeze_base freezes the base and the encoder; the image stage trains all but the residual generator,
# the base (and encoder) at the full rate. None: frozen (no update at all).
LR_SHARES = {
    "video": {"base": 0.01, "encoder": 0.01, "residual": 1.0, "prior": 1.0},
    "freeze_base": {"base": None, "encoder": None, "residual": 1.0, "prior": 1.0},
    "image": {"base": 1.0, "encoder": 1.0, "residual": None, "prior": 1.0},
}


@pytest.mark.parametrize("setting", list(LR_SHARES))
def test_optimizer_applies_each_networks_learning_rate_and_freezes_the_rest(setting):
  """One update of make_optimizer's transformation on a toy parameter tree keyed as the state's,
  against Adam's first step computed here: m̂ = g, v̂ = g², so AdamW's update is
  -lr (g / (|g| + eps) + wd p), of magnitude lr per element up to eps and the decay. The gradients'
  norms stay below grad_clip (no clipping); the frozen networks get exactly 0 though their gradients
  are not 0."""
  from videofusion_jax.models.factory import network_names
  from videofusion_jax.training.optimizer import make_optimizer
  lr, scale, wd, eps = 1e-3, 0.01, 0.1, 1e-8
  overrides = {"train.learning_rate": lr, "train.base_lr_scale": scale, "train.warmup_steps": 0,
               "train.weight_decay": wd, "train.grad_clip": 1.0, "train.lr_decay": "constant"}
  overrides.update({"freeze_base": {"train.freeze_base": True}, "image": {"train.stage": "image"}}.get(setting, {}))
  c = tiny_config(**overrides)
  validate(c)
  shares = LR_SHARES[setting]
  assert set(network_names(c)) == set(shares)  # the toy tree has the state's top-level keys
  rng = np.random.default_rng(3)
  params, grads = {}, {}
  for name in shares:
    shapes = {"kernel": (3, 4), "bias": (5,)}
    params[name] = {k: rng.normal(size=shape).astype(np.float32) for k, shape in shapes.items()}
    # |g| in [1e-3, 1e-2] with random signs: each network's norm < 0.05, far below grad_clip.
    grads[name] = {k: (rng.choice([-1.0, 1.0], shape) * rng.uniform(1e-3, 1e-2, shape)).astype(np.float32)
                   for k, shape in shapes.items()}
  tx, schedules = make_optimizer(c)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), tx.init(params), params)
  updates = jax.device_get(updates)
  for name, share in shares.items():
    for k, u in updates[name].items():
      if share is None:
        np.testing.assert_array_equal(u, 0, err_msg=f"{setting}: {name}/{k} is frozen")
        continue
      g, p = grads[name][k].astype(np.float64), params[name][k].astype(np.float64)
      expected = -lr * share * (g / (np.abs(g) + eps) + wd * p)
      np.testing.assert_allclose(u, expected, rtol=2e-5, atol=1e-7 * lr * share, err_msg=f"{setting}: {name}/{k}")
  # With zero parameters (no decay) each element's magnitude is the network's rate, up to eps (and float32's
  # bias correction: 1 - 0.999 in float32 is 1.3e-5 off, 6.4e-6 after the square root).
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), tx.init(zeros), zeros)
  for name, share in shares.items():
    for k, u in jax.device_get(updates)[name].items():
      g = np.abs(grads[name][k].astype(np.float64))
      np.testing.assert_allclose(np.abs(u), 0 if share is None else lr * share * g / (g + eps), rtol=2e-5, atol=0)


def test_batch_that_does_not_split_over_devices_is_a_clear_error():
  from videofusion_jax.config import ConfigError
  with pytest.raises(ConfigError, match="batch_size=6 does not split evenly over the 8 devices"):
    Trainer(tiny_config(**{"train.batch_size": 6}))


def _perturbed(experiment, seed=1):
  """The initial state with N(0, 0.05²) added to every parameter: at init the U-Nets' zero output layers
  block the gradient of everything before them."""
  state = experiment.init_state(0)
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return state.replace(params=tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def test_float16_trains_behind_a_dynamic_loss_scale(trainer, tmp_path, monkeypatch):
  """float16 training (Micikevicius et al. 2018). The loss is multiplied by a stand-in factor, the tiny
  batch's 6,144 elements over a ucf101 batch's 5e7, so that its gradient is as small as a real run's mean
  makes it. Oracle: the float32 step's gradient norms times that factor. At the default scale (2^15) the
  float16 step's norms are within 0.5% of it; at scale 1 (no scaling) a fifth of the gradient rounds away
  in float16. An overflowing scale (2^60) skips the update: parameters, EMA and Adam's state are kept bit
  for bit (the learning-rate schedules' counts move on), the scale halves; after loss_scale_period (2)
  good updates it doubles. The scale is in the checkpoint: a run restored from it goes on with it; a
  float32 config is told the checkpoint is of a float16 run, and a float16 config, before the run
  starts, that a float32 checkpoint is not."""
  import optax

  from videofusion_jax.training import step as step_module
  from videofusion_jax.training.optimizer import LossScaleState, trainable_networks

  factor = (8 * 4 * 8 * 8 * 3) / (256 * 16 * 64 * 64 * 3)
  batch = trainer.global_batch(batches(trainer.config, 1)[0])
  _, m32 = trainer.step(_perturbed(trainer), batch)
  expected = {k: factor * float(v) for k, v in m32.items() if k.startswith("grad_norm_")}
  original = step_module.loss_on_draws

  def small_loss(*args, **kwargs):
    loss, terms = original(*args, **kwargs)
    return loss * factor, terms
  monkeypatch.setattr(step_module, "loss_on_draws", small_loss)
  c = tiny_config(**{"model.dtype": "float16", "train.loss_scale_period": 2})
  t16 = Trainer(c, mesh=one_device(c))

  def at_scale(scale):
    state = _perturbed(t16)
    assert isinstance(state.opt_state, LossScaleState) and float(state.opt_state.scale) == 2.0 ** 15
    # Laid out as the step's own output (replicated), so that every call runs the one compiled step.
    scale = jax.device_put(jnp.float32(scale), state.opt_state.scale.sharding)
    return state.replace(opt_state=state.opt_state._replace(scale=scale))

  state, m = t16.step(at_scale(2.0 ** 15), batch)
  for k, v in expected.items():
    assert abs(float(m[k]) / v - 1) < 5e-3, (k, float(m[k]), v)
  assert (float(m["loss_scale"]), float(m["update_skipped"]), float(m["skipped_steps"])) == (2.0 ** 15, 0, 0)
  assert (float(state.opt_state.scale), int(state.opt_state.good_steps)) == (2.0 ** 15, 1)
  state, _ = t16.step(state, batch)  # the second good update in a row: the scale doubles
  assert (float(state.opt_state.scale), int(state.opt_state.good_steps)) == (2.0 ** 16, 0)

  _, m = t16.step(at_scale(1.0), batch)
  for k, v in expected.items():
    if k != "grad_norm_prior":  # the prior computes in float32 (models/factory.py): nothing of it rounds away
      assert float(m[k]) / v < 0.9, (k, float(m[k]), v)
  assert abs(float(m["grad_norm_prior"]) / expected["grad_norm_prior"] - 1) < 5e-3

  state = at_scale(2.0 ** 60)
  before = jax.device_get(state)  # a host copy: the step donates the state
  after, m = t16.step(state, batch)
  after = jax.device_get(after)
  assert float(m["update_skipped"]) == 1 and np.isfinite(float(m["loss"]))
  for part in ("params", "ema_params"):
    for x, y in zip(jax.tree.leaves(getattr(before, part)), jax.tree.leaves(getattr(after, part))):
      np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))
  schedules = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731 - their counts move on
  kept = [(x, y) for x, y in zip(jax.tree.leaves(before.opt_state.inner, is_leaf=schedules),
                                 jax.tree.leaves(after.opt_state.inner, is_leaf=schedules))]
  assert sum(schedules(x) for x, _ in kept) == len(trainable_networks(c)) == 4  # one AdamW per network
  for x, y in kept:
    if schedules(x):
      assert int(y.count) == int(x.count) + 1
    else:
      np.testing.assert_array_equal(x, y)
  assert int(after.step) == int(before.step) + 1
  assert (float(after.opt_state.scale), int(after.opt_state.good_steps), int(after.opt_state.skipped_steps)) == (
      2.0 ** 59, 0, 1)

  trained = train(c, tmp_path, iter(batches(c, 4)), trainer=t16, verbose=False)
  manager = ckpt.make_manager(tmp_path, keep=5, async_save=False)
  restored = ckpt.restore(manager, t16.abstract_state())
  for x, y in zip(jax.tree.leaves(trained.opt_state), jax.tree.leaves(restored.opt_state)):
    np.testing.assert_array_equal(x, y)
  assert (float(trained.opt_state.scale), int(trained.opt_state.skipped_steps)) == (2.0 ** 17, 0)  # 4 = 2 x 2 good
  with pytest.raises(ckpt.CheckpointError, match=r"was trained in float16 and this config does not train in "
                                                r"float16 \(config.model.dtype\): float16 training keeps a loss scale"):
    ckpt.restore(manager, trainer.abstract_state())
  float32 = ckpt.make_manager(tmp_path / "float32", keep=5, async_save=False)
  ckpt.save(float32, 1, trainer.init_state(0))
  with pytest.raises(ckpt.CheckpointError, match=r"was trained not in float16 and this config trains in float16 "
                                                r"\(config.model.dtype\)"):
    ckpt.check_compatible(float32, t16.abstract_state())


def test_the_loss_scale_skips_keeps_bits_moves_the_schedule_on_and_stays_in_its_bounds():
  """dynamic_loss_scaling around AdamW: an applied update is AdamW's own; a skipped one (a non-finite gradient)
  adds -0.0, which leaves every parameter bit for bit (-0.0 too; + 0.0 would make it 0.0), keeps Adam's
  moments and count and moves the learning-rate schedule's count on; the scale halves down to 1, doubles
  after growth_interval good updates, up to MAX_LOSS_SCALE."""
  import optax

  from videofusion_jax.training.optimizer import MAX_LOSS_SCALE, adamw, dynamic_loss_scaling
  schedule = optax.linear_schedule(0.0, 1e-3, 10)
  tx = dynamic_loss_scaling(adamw(schedule), 8.0, 2)
  update = jax.jit(tx.update)
  params = {"w": jnp.array([-0.0, 0.0, 1.5], jnp.float32)}
  good, bad = {"w": jnp.array([0.1, -0.2, 0.3])}, {"w": jnp.array([np.inf, 0.0, 1.0])}
  state = tx.init(params)
  u, after = update(good, state, params)
  u_ref, _ = adamw(schedule).update(good, adamw(schedule).init(params), params)
  np.testing.assert_array_equal(u["w"], u_ref["w"])
  assert (float(after.scale), int(after.good_steps), int(after.skipped_steps)) == (8.0, 1, 0)
  u, skipped = update(bad, state, params)
  moved = jax.tree.map(lambda p, x: p + x, params, u)
  np.testing.assert_array_equal(np.asarray(moved["w"]).view(np.uint32), np.asarray(params["w"]).view(np.uint32))
  adam, _, scheduled = skipped.inner
  assert (int(adam.count), int(scheduled.count)) == (0, 1)
  np.testing.assert_array_equal(adam.mu["w"], 0.0)
  assert (float(skipped.scale), int(skipped.good_steps), int(skipped.skipped_steps)) == (4.0, 0, 1)
  _, twice = update(good, after, params)
  assert (float(twice.scale), int(twice.good_steps)) == (16.0, 0)
  _, floor = update(bad, state._replace(scale=jnp.float32(1.0)), params)
  _, cap = update(good, after._replace(scale=jnp.float32(MAX_LOSS_SCALE)), params)
  assert float(floor.scale) == 1.0 and float(cap.scale) == MAX_LOSS_SCALE


def test_a_skipped_float16_update_is_no_failure_unless_its_scale_was_1(tmp_path):
  """The loop's check of a step's metrics: a float16 step whose update was skipped for an overflow has
  gradient norms of inf or NaN and goes on (the scale halves); at scale 1 there was no overflow to avoid,
  and a non-finite loss stops a run whatever its scale."""
  from videofusion_jax.training.loop import non_finite
  good = {"loss": 1.0, "grad_norm_base": 0.5, "grad_norm_residual": 0.25}
  skipped = {**good, "grad_norm_base": np.inf, "grad_norm_residual": np.nan, "update_skipped": 1.0,
             "loss_scale": 2.0 ** 14}
  assert non_finite(3, good) == "" and non_finite(3, skipped) == ""
  assert non_finite(3, {**good, "grad_norm_base": np.inf}) == (
      "the loss became non-finite at step 3 (loss=1.0, grad norms base=inf, residual=0.25)")
  assert non_finite(3, {**skipped, "update_skipped": 0.0}).startswith("the loss became non-finite at step 3")
  assert non_finite(5, {**skipped, "loss_scale": 1.0}) == (
      "the gradients were not finite at step 5 even at loss scale 1, the smallest (loss=1.0, grad norms base=inf, "
      "residual=nan): no overflow that loss scaling can avoid")
  assert non_finite(3, {**skipped, "loss": np.nan}).startswith("the loss became non-finite at step 3 (loss=nan")
  writer = loop_module._Writer(tmp_path, 0, print)
  writer.scalars(3, skipped)
  writer.close()
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {  # JSON has no inf or NaN
      "step": 3, **skipped, "grad_norm_base": None, "grad_norm_residual": None}


def test_float16_attention_is_the_float32_one_rounded():
  """The U-Nets' attention in float16 (computed by models.unet.attention, as JAX's XLA path: JAX's own
  asks for a dot algorithm CPUs refuse) against jax.nn.dot_product_attention in float32, with and without a
  bias: equal within float16's rounding."""
  from videofusion_jax.models.unet import attention
  q, k, v = (jax.random.normal(key, (2, 6, 3, 8)) for key in jax.random.split(jax.random.PRNGKey(0), 3))
  bias = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 6, 6))
  for b in (None, bias):
    want = jax.nn.dot_product_attention(q, k, v, bias=b)
    got = jax.jit(attention)(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16),
                             None if b is None else b.astype(jnp.float16))
    assert got.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-2, rtol=1e-2)


def test_min_snr_weighting_weights_each_example_of_the_step_loss(trainer):
  """With train.loss_weighting='min_snr' the generators' loss of a batch is the mean of each example's
  unweighted loss times min(SNR_t, γ)/SNR_t (each example run alone); the prior's term is unweighted."""
  import copy

  from videofusion_jax.training.step import draw_randomness, loss_on_draws
  weighted = copy.copy(trainer)
  weighted.config = tiny_config(**{"train.loss_weighting": "min_snr", "train.min_snr_gamma": 2.0})
  params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), trainer.init_state(0).params)
  batch = {k: jnp.asarray(v) for k, v in batches(trainer.config, 1)[0].items()}
  draws, rng = draw_randomness(trainer, jax.random.PRNGKey(3), batch["video"].shape)
  draws["t"] = jnp.array([2, 30, 100, 300, 500, 700, 900, 999])  # both sides of SNR = 2
  w = np.asarray(diffusion.min_snr_weights(draws["t"], trainer.schedule, 2.0))
  assert (w < 1).sum() >= 2 and (w == 1).sum() >= 2
  _, terms = jax.jit(lambda *a: loss_on_draws(*a[:1], weighted, *a[1:]))(params, batch, draws, rng)
  one = jax.jit(lambda *a: loss_on_draws(*a[:1], trainer, *a[1:])[1])  # compiled once for the 8 examples
  alone = [one(params, jax.tree.map(lambda x: x[b:b + 1], batch), jax.tree.map(lambda x: x[b:b + 1], draws), rng)
           for b in range(8)]
  per_example = np.array([float(a["loss_generators"]) for a in alone])
  np.testing.assert_allclose(terms["loss_generators"], np.mean(w * per_example), rtol=1e-4)
  np.testing.assert_allclose(terms["loss_prior"], np.mean([float(a["loss_prior"]) for a in alone]), rtol=1e-4)


def test_residual_frames_take_each_examples_frames_through_the_networks(trainer):
  """train.residual_frames=1: the step draws one non-key frame per example, and the residual
  generator reads that frame's index (per example, not the batch's). Over the N-1 assignments in
  which each example takes each frame once, the mean residual term is the full one of eq. 12 with
  the same networks (as it would not be if an example were given another example's frame index)."""
  import copy

  from videofusion_jax.training.step import draw_randomness, loss_on_draws
  one_frame = copy.copy(trainer)
  one_frame.config = tiny_config(**{"train.residual_frames": 1})
  leaves, tree = jax.tree.flatten(trainer.init_state(0).params)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  table = params["residual"]["frame_embed"]["embedding"]
  params["residual"]["frame_embed"]["embedding"] = 5 * table  # so that a wrong frame index shows in the loss
  batch = {k: jnp.asarray(v) for k, v in batches(trainer.config, 1)[0].items()}
  draws, rng = draw_randomness(one_frame, jax.random.PRNGKey(3), batch["video"].shape)
  others = np.asarray(diffusion.non_key_frames(trainer.config.data.num_frames))
  assert draws["residual_frames"].shape == (8, 1) and set(np.asarray(draws["residual_frames"]).ravel()) <= set(others)
  assert "residual_frames" not in draw_randomness(trainer, jax.random.PRNGKey(3), batch["video"].shape)[0]
  every = {k: v for k, v in draws.items() if k != "residual_frames"}  # as the default config draws them
  full = jax.jit(lambda *a: loss_on_draws(*a[:1], trainer, *a[1:])[1])(params, batch, every, rng)
  sub = jax.jit(lambda *a: loss_on_draws(*a[:1], one_frame, *a[1:])[1])
  assign = [jnp.asarray(others[(np.arange(8) + s) % len(others)])[:, None] for s in range(len(others))]
  terms = [sub(params, batch, {**draws, "residual_frames": frames}, rng) for frames in assign]
  np.testing.assert_allclose(np.mean([float(o["loss_residual"]) for o in terms]), full["loss_residual"], rtol=1e-4)
  for o in terms:
    np.testing.assert_allclose(o["loss_key"], full["loss_key"], rtol=1e-5)
    np.testing.assert_allclose(o["loss_prior"], full["loss_prior"], rtol=1e-5)


def test_timestep_and_weighting_options_are_checked():
  from videofusion_jax.config import ConfigError, validate
  with pytest.raises(ConfigError, match="train.timesteps='sorted': use 'uniform' or 'stratified'"):
    validate(tiny_config(**{"train.timesteps": "sorted"}))
  with pytest.raises(ConfigError, match="train.loss_weighting='snr': use ''"):
    validate(tiny_config(**{"train.loss_weighting": "snr"}))
  with pytest.raises(ConfigError, match="min_snr_gamma=0.0: must be > 0"):
    validate(tiny_config(**{"train.loss_weighting": "min_snr", "train.min_snr_gamma": 0.0}))
  with pytest.raises(ConfigError, match=r"train.residual_frames=4: must be an integer in \[0, 3\]"):
    validate(tiny_config(**{"train.residual_frames": 4}))
  with pytest.raises(ConfigError, match="residual_frames=2 belongs to VideoFusion's residual generator"):
    validate(tiny_config(**{"train.residual_frames": 2, "model.kind": "vdm", "diffusion.lam": 0.0}))


def test_base_learning_rate_scale_and_cosine_decay():
  from videofusion_jax.training.optimizer import make_optimizer
  _, sched = make_optimizer(tiny_config(**{"train.base_lr_scale": 0.01, "train.lr_decay": "cosine",
                                           "train.warmup_steps": 10, "train.num_steps": 110}))
  peak = 1e-3
  for step, expected in [(0, 0.0), (5, 0.5 * peak), (10, peak), (60, 0.5 * peak), (110, 0.0)]:
    np.testing.assert_allclose(sched["residual"](step), expected, atol=1e-9)
    np.testing.assert_allclose(sched["base"](step), 0.01 * expected, atol=1e-11)
  # No warm-up: the first step takes the full rate (it was a one-step ramp from 0), cos((π/2) s/T) decays.
  _, sched = make_optimizer(tiny_config(**{"train.lr_decay": "cosine", "train.warmup_steps": 0,
                                           "train.num_steps": 100}))
  for step in (0, 50, 100):
    np.testing.assert_allclose(sched["residual"](step), 0.5 * peak * (1 + np.cos(np.pi * step / 100)), atol=1e-9)


@pytest.mark.parametrize("field,value,message", [
    ("train.grad_clip", float("nan"), "grad_clip=nan: must be a finite number > 0"),
    ("train.base_lr_scale", float("nan"), "base_lr_scale=nan: must be a finite number >= 0"),
    ("train.warmup_steps", -5, "warmup_steps=-5: the steps of the learning rate's linear warm-up"),
    ("train.freeze_base", True, "freeze_base=True with config.train.stage='image'"),
    ("model.dtype", "bf16", "config.model.dtype='bf16': the networks' compute type; use one of"),
    ("model.param_dtype", "bfloat16", "the EMA's decay (0.999, 0.9999) and Adam's b2 round to 1"),
    ("model.attention_implementation", "flash", "attention_implementation='flash': use ''"),
    # float32, the scale's type, rounds 1e39 to inf: every update was skipped, and the run stopped on "the loss
    # became non-finite" though the loss was finite.
    ("train.loss_scale_initial", 1e39, "loss_scale_initial=1e+39: float16 training's first loss scale; must be a "
                                       "finite number in [1, 2**64]"),
    ("train.loss_scale_initial", 0.5, "loss_scale_initial=0.5"),
])
def test_recipe_values_that_would_fail_late_are_refused(field, value, message):
  extra = {"train.stage": "image"} if field == "train.freeze_base" else {}
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(tiny_config(**{field: value, **extra}))


def test_a_run_that_ends_in_its_warm_up_is_warned():
  from videofusion_jax.training.loop import warmup_warning
  from videofusion_jax.training.optimizer import make_optimizer
  short = tiny_config(**{"train.warmup_steps": 50, "train.num_steps": 10, "train.lr_decay": "cosine"})
  _, sched = make_optimizer(short)
  # What it says is what the schedule gives at the last step (9): 9/50 of the rate, 18%.
  share = float(sched["residual"](9)) / 1e-3
  assert share == pytest.approx(9 / 50, rel=1e-5)
  assert "at 18% of the learning rate" in warmup_warning(short) and "decay never starts" in warmup_warning(short)
  assert warmup_warning(tiny_config()) is None  # warm-up 2 of 4 steps
  assert warmup_warning(short).endswith("set --config.train.warmup_steps=1 (or 0).")
  # Under 10 steps a tenth of the run is 0 warm-up steps: said once (it read "=0 (or 0)").
  assert warmup_warning(tiny_config(**{"train.num_steps": 2})).endswith("set --config.train.warmup_steps=0.")
  for name, variant in (("ucf101", "small"), ("ucf101", "vdm_small"), ("webvid", "small")):
    assert warmup_warning(importlib.import_module(name).get_config(variant)) is None, (name, variant)


def test_sharded_step_matches_single_device(trainer):
  c = trainer.config
  assert jax.device_count() == 8 and trainer.mesh.devices.size == 1
  sharded = Trainer(tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2}))
  single = trainer
  kernel = sharded.state_sharding.params["base"]["conv_in"]["kernel"]
  assert kernel.spec[-1] == "fsdp"  # FSDP really splits the weights
  assert sharded.batch_sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))  # from the rule table's 'batch'
  # The U-Net's activations are constrained to the batch split inside the step.
  lowered = sharded.step.lower(sharded.abstract_state(), abstract_batch(sharded, c))
  assert lowered.as_text().count('sharding_constraint') >= 10
  b = batches(c, 1)[0]
  fresh = sharded.init_state(0)
  # The abstract state (restores read into it) is what init gives, with the state's shardings.
  abstract = sharded.abstract_state()
  assert jax.tree.structure(abstract) == jax.tree.structure(fresh)
  for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(fresh)):
    assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
  s1, m1 = sharded.step(fresh, sharded.global_batch(b))
  s2, m2 = single.step(single.init_state(0), single.global_batch(b))
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  _allclose_trees(s1.params, s2.params, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    {"model.kind": "vdm", "diffusion.lam": 0.0},
    {"model.condition": "label"},
    {"model.encoder.kind": "frozen", "model.encoder.frozen_name": "pixels", "model.encoder.embed_dim": 49},
    {"mesh.data": 4, "mesh.fsdp": 2},
], ids=["vdm", "label", "frozen_encoder", "fsdp"])
def test_the_abstract_state_is_what_init_gives(overrides):
  """``abstract_state()`` is built from shapes, not traced from ``init_state``'s function: the two
  agree for each kind of network set, conditioning and mesh (checkpoints are read into it)."""
  e = Experiment(tiny_config(**overrides))
  traced = ckpt.abstract_like(jax.eval_shape(e._init_fn, jax.random.PRNGKey(0)), e.state_sharding)
  built = e.abstract_state()
  assert jax.tree.structure(built) == jax.tree.structure(traced)
  for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(traced)):
    assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)



def test_the_initial_state_draws_with_the_gpu_threefry_kernel(monkeypatch):
  """On a GPU the initial state's program draws with JAX's threefry kernel, not the unrolled rounds JAX
  emits there by default (experiment.init_lowering; lowered for CUDA here, which needs no GPU): each
  draw a call of the kernel and no round's rotation (shift_left: the bits' conversion to floats shifts
  right only); the default lowering holds the rounds (control). ``init_state`` traces under it."""
  import contextlib

  from jax._src import config as jax_config

  from videofusion_jax.experiment import init_lowering
  e = Experiment(tiny_config())
  key = jax.random.PRNGKey(0)

  def lowered(setting) -> str:
    with setting:
      return jax.jit(e._init_fn).trace(key).lower(lowering_platforms=("cuda",)).as_text()
  kernel, unrolled = lowered(init_lowering()), lowered(contextlib.nullcontext())
  assert kernel.count("stablehlo.custom_call @cu_threefry2x32_ffi") >= 5 and "stablehlo.shift_left" not in kernel
  assert "cu_threefry2x32_ffi" not in unrolled and unrolled.count("stablehlo.shift_left") >= 8 * 5
  assert not jax_config.threefry_gpu_kernel_lowering.value  # the setting ends with its block
  seen, init_fn = [], Experiment._init_fn

  def spy(self, rng):
    seen.append(jax_config.threefry_gpu_kernel_lowering.value)
    return init_fn(self, rng)
  monkeypatch.setattr(Experiment, "_init_fn", spy)
  c = tiny_config()
  state = Trainer(c, mesh=one_device(c)).init_state(0)
  assert seen == [True] and int(state.step) == 0 and not jax_config.threefry_gpu_kernel_lowering.value

def test_resume_gives_the_same_next_step(trainer, tmp_path):
  c = trainer.config
  data = batches(c, 5)
  full = train(c, tmp_path / "full", iter(data[:4]), trainer=trainer, verbose=False)
  first = tiny_config(**{"train.num_steps": 2})
  train(first, tmp_path / "split", iter(data[:2]), trainer=trainer, verbose=False)
  # A save a preemption cut off, at a step off the checkpoint grid (never saved again): as large as a
  # checkpoint, it stayed for good; the resumed run removes it.
  stray = tmp_path / "split" / "checkpoints" / "3.orbax-checkpoint-tmp"
  (stray / "state").mkdir(parents=True)
  (stray / "state" / "d").write_bytes(b"\0" * 4096)
  resumed = train(c, tmp_path / "split", iter(data[2:4]), trainer=trainer, verbose=False)
  assert int(resumed.step) == 4 and not stray.exists()
  _allclose_trees(full.params, resumed.params)
  _allclose_trees(full.ema_params, resumed.ema_params)
  _allclose_trees(full.opt_state, resumed.opt_state)
  nxt = trainer.global_batch(data[4])
  _, m_full = trainer.step(full, nxt)
  _, m_resumed = trainer.step(resumed, nxt)
  np.testing.assert_allclose(m_full["loss"], m_resumed["loss"], rtol=1e-6)
  assert (tmp_path / "split" / "config.json").is_file()
  assert any((tmp_path / "split" / "tensorboard").iterdir())


def _profiled_steps(directory) -> tuple[list[str], list[dict]]:
  """The step numbers of the ``train`` annotations in each Perfetto trace under ``directory`` (one list per
  trace, in order of writing), and the last trace's events."""
  import gzip
  steps, events = [], []
  for path in sorted(directory.glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime):
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    steps.append([e["args"]["step_num"] for e in events if e.get("name") == "train"])
  return steps, events


def test_a_profile_window_traces_its_steps_and_never_stops_training(trainer, tmp_path, capsys):
  """config.train.profile_steps=(3, 4) traces steps 3 and 4 alone, the step's program run in each, XLA's kernels;
  a resumed run past the window traces nothing; a run that fails inside it writes the steps so far; a profiler
  already running is said, and the window's steps run unprofiled."""
  c = tiny_config(**{"train.profile_steps": (3, 4)})  # the run's last two steps (a checkpoint save at 4)
  data = batches(c, 6)
  state = train(c, tmp_path / "run", iter(data[:4]), trainer=trainer)
  out = capsys.readouterr().out
  directory = tmp_path / "run" / "profile" / "process_0"
  assert int(state.step) == 4 and f"profile of step(s) 3-4 written to {directory}: " in out, out
  (steps,), events = _profiled_steps(directory)
  assert steps == ["3", "4"]
  spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "train"]
  runs = [e["ts"] for e in events if e.get("name") == "CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice"]
  assert all(any(a <= t <= b for t in runs) for a, b in spans), (spans, runs)  # each step's program ran in its span
  # XLA's kernels, on its own threads (their names depend on the CPU's libraries: YNNPACK's, oneDNN's, XLA's).
  figures = load_benchmark("train_profile").summarize_file(str(directory))  # what benchmarks/ makes of it
  assert [row["step"] for row in figures["steps"]] == [3, 4] and 0 < figures["device_busy_share"] <= 1
  assert all(row["host_before_dispatch_ms"] is not None for row in figures["steps"]), figures
  # A resumed run past the window traces nothing, and says so.
  said = []
  say = lambda message, **kwargs: said.append(message)  # noqa: E731 - print's flush=True
  assert ProfileWindow((2, 3), 4, 6, tmp_path / "run", say).steps is None
  assert said == ["config.train.profile_steps=(2, 3): this run trains steps 5-6, none of them; nothing is profiled."]
  assert ProfileWindow((2, 9), 4, 6, tmp_path / "run", say).steps == (5, 6)  # what is left of it
  # A run that fails inside its window (its input, at step 3): steps 2 and 3 written, the error as it was.
  failing = tiny_config(**{"train.profile_steps": (2, 4)})

  def stream():
    yield from data[:2]
    raise OSError("a stand-in for a clip that cannot be read")

  with pytest.raises(OSError, match="a stand-in"):
    train(failing, tmp_path / "failed", stream(), trainer=trainer)
  assert "profile of step(s) 2-3 written to" in capsys.readouterr().out
  assert _profiled_steps(tmp_path / "failed" / "profile" / "process_0")[0] == [["2", "3"]]
  # Another trace running (a notebook's): said, and the window closed (its steps run unprofiled).
  window = ProfileWindow((1, 2), 0, 2, tmp_path / "busy", say)
  jax.profiler.start_trace(str(tmp_path / "mine"))
  try:
    for step in (1, 2):
      window.begin(step)
      assert window.end(step, data[0]) == 0.0
    window.close()
  finally:
    jax.profiler.stop_trace()
  assert capsys.readouterr().err.startswith("warning: config.train.profile_steps: the profiler did not start (Profile "
                                           "has already been started") and window.steps is None
  assert not (tmp_path / "busy").exists()


def test_the_synthetic_input_trains_and_resumes_without_a_dataset_or_tensorflow(trainer, tmp_path, monkeypatch):
  """config.data.name='synthetic': batches of what the step reads (labels; a CLIP encoder's frame embeddings and a
  text prior's caption embeddings too), in range, a function of (seed, host, position); training reads no dataset
  and imports neither TensorFlow nor the pipeline, and a run stopped at step 2 and resumed trains as one that was
  not; evaluation refuses it, and real training refuses its checkpoints (to resume, or as a base)."""
  import webvid

  from videofusion_jax.config import SYNTHETIC_DATA
  from videofusion_jax.evaluation import evaluate
  from videofusion_jax.training.step import check_batch, synthetic_batches

  text = webvid.get_config("small")
  text_keys = ["caption_embeddings", "frame_embeddings", "video"]
  for config, keys in ((tiny_config(), ["label", "video"]), (text, text_keys)):
    stream = synthetic_batches(config, 4, seed=3, process_index=0)
    first = [next(stream) for _ in range(3)]
    assert sorted(first[0]) == keys
    for batch in first:
      check_batch(config, batch, 4)  # the shapes, dtypes and values the step reads
      assert -1 <= batch["video"].min() < -0.9 and 0.9 < batch["video"].max() <= 1
      for k in ("frame_embeddings", "caption_embeddings"):
        if k in batch:
          np.testing.assert_allclose(np.linalg.norm(batch[k], axis=-1), 1.0, rtol=1e-5)
    assert not np.array_equal(first[0]["video"], first[1]["video"])
    np.testing.assert_array_equal(first[2]["video"], first[0]["video"])  # two distinct batches, in turn
    resumed = next(synthetic_batches(config, 4, seed=3, process_index=0, start_batch=1))
    other_host = next(synthetic_batches(config, 4, seed=3, process_index=1))
    np.testing.assert_array_equal(resumed["video"], first[1]["video"])
    assert not np.array_equal(other_host["video"], first[0]["video"])
  labels = np.concatenate([next(synthetic_batches(tiny_config(**{"train.batch_size": 3000}), 3000, seed=s,
                                                  process_index=0))["label"] for s in range(2)])
  assert set(np.unique(labels)) == {0, 1, 2}  # the tiny config's three classes, each about a third
  np.testing.assert_allclose(np.bincount(labels) / len(labels), 1 / 3, atol=0.02)
  # No dataset, no TensorFlow: importing either (or the pipeline, which reads them) fails here (the package's
  # attributes too: `from videofusion_jax.data import pipeline` would find an imported one there).
  import videofusion_jax.data
  for module in ("tensorflow", "tensorflow_datasets", "videofusion_jax.data.pipeline", "videofusion_jax.data.builders"):
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delattr(videofusion_jax.data, module.rsplit(".", 1)[-1], raising=False)
  c = tiny_config(**{"data.name": SYNTHETIC_DATA, "data.data_dir": str(tmp_path / "absent")})
  full = train(c, tmp_path / "full", trainer=trainer, verbose=False)
  train(tiny_config(**{"data.name": SYNTHETIC_DATA, "train.num_steps": 2}), tmp_path / "split", trainer=trainer,
        verbose=False)
  resumed = train(c, tmp_path / "split", trainer=trainer, verbose=False)
  assert int(full.step) == int(resumed.step) == 4 and not (tmp_path / "absent").exists()
  _allclose_trees(full.params, resumed.params)
  with pytest.raises(ConfigError, match="config.data.name='synthetic', and .* was trained on 'synthetic': --mode=eval"):
    evaluate.run(c, str(tmp_path / "full"), experiment=trainer)
  # Nor with the dataset's name given: the workdir says what its checkpoints learnt; and no resume or base across.
  real = tiny_config(**{"train.num_steps": 6})
  with pytest.raises(ConfigError, match="config.data.name='demo_clips', and .* was trained on 'synthetic'"):
    evaluate.run(real, str(tmp_path / "full"), experiment=trainer)
  with pytest.raises(ConfigError, match=f"config.data.name='demo_clips': the checkpoints in {tmp_path / 'full'}.* "
                                        "were trained on 'synthetic'; synthetic and real input do not mix"):
    train(real, tmp_path / "full", iter(batches(real, 2)), trainer=trainer, verbose=False)
  with pytest.raises(ConfigError, match="the networks in config.train.init_base_from=.* were trained on 'synthetic'"):
    train(tiny_config(**{"train.init_base_from": str(tmp_path / "full")}), tmp_path / "fresh", iter(batches(real, 2)),
          trainer=trainer, verbose=False)
  assert int(ckpt.make_manager(tmp_path / "full", keep=5, async_save=False).latest_step()) == 4  # nothing trained


def test_a_resume_under_another_learning_rate_schedule_is_warned(tmp_path):
  """A run resumed at step 12 of 12 with num_steps raised to 24 under a cosine decay: the rate at step 12
  (optax's schedules of both configs, 2 warm-up steps) goes from near 0 back up, and the warning gives
  both rates; the same schedule, or a constant decay whose rate at the step is the same, says nothing."""
  import optax

  from videofusion_jax.training.loop import save_config, schedule_change_warning

  recorded = tiny_config(**{"train.num_steps": 12, "train.lr_decay": "cosine"})
  save_config(recorded, tmp_path)
  longer = tiny_config(**{"train.num_steps": 24, "train.lr_decay": "cosine"})
  cosine = lambda n: optax.join_schedules(  # noqa: E731 - the formula, from optax's parts
      [optax.linear_schedule(0.0, 1e-3, 2), optax.cosine_decay_schedule(1e-3, n - 2)], [2])
  was, now = float(cosine(12)(12)), float(cosine(24)(12))
  assert was < 1e-9 and now > 4e-4
  warning = schedule_change_warning(longer, tmp_path, 12)
  assert f"at step 12 the rate is {now:.2e} (x the network's scale) where it was {was:.2e}, up" in warning
  assert "num_steps=24 (was 12)" in warning
  assert schedule_change_warning(recorded, tmp_path, 12) is None
  assert schedule_change_warning(longer, tmp_path / "nowhere", 12) is None  # nothing recorded
  save_config(tiny_config(**{"train.num_steps": 12}), tmp_path)  # constant after the warm-up: the same rate
  assert schedule_change_warning(tiny_config(**{"train.num_steps": 24}), tmp_path, 12) is None
  warning = schedule_change_warning(tiny_config(**{"train.num_steps": 24, "train.warmup_steps": 20}), tmp_path, 12)
  assert "warmup_steps=20 (was 2)" in warning and ", down 1.7x at once" in warning  # back on a longer ramp


def test_resume_continues_the_input_stream(trainer, tmp_path, tfds_dir, monkeypatch):
  """2 + 2 steps through the real pipeline equal 4 uninterrupted steps: the checkpoint holds the
  stream position. Control: restarting the stream at batch 0 on resume gives other weights."""
  c = tiny_config(**{"data.data_dir": tfds_dir})
  half = tiny_config(**{"data.data_dir": tfds_dir, "train.num_steps": 2})
  full = train(c, tmp_path / "full", trainer=trainer, verbose=False)
  train(half, tmp_path / "split", trainer=trainer, verbose=False)
  resumed = train(c, tmp_path / "split", trainer=trainer, verbose=False)
  _allclose_trees(full.params, resumed.params)
  manager = ckpt.make_manager(tmp_path / "split", keep=5, async_save=False)
  from videofusion_jax.data import pipeline
  source = pipeline.source_fingerprint(c, "train")  # the built dataset's videos: a rebuild is told apart
  assert ckpt.restore_data_state(manager, 4) == {
      "dataset": "demo_clips", "split": "train", "num_frames": 4, "frame_stride": 2, "seed": 0,
      "process_count": 1, "local_batch_size": 8, "order_version": 2, "batches": 4,
      "source": f"{source['builder']}, {source['videos']} videos, frame counts {source['lengths_sha256']}"}
  train(half, tmp_path / "restart", trainer=trainer, verbose=False)
  monkeypatch.setattr(loop_module, "resume_position", lambda saved, stream, step: 0)
  restarted = train(c, tmp_path / "restart", trainer=trainer, verbose=False)
  assert max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(restarted.params))) > 1e-4
  # Restarted at batch 0, the stream's position is saved as it is: batch 0 and the 2 batches read since, not
  # the step; and metrics.jsonl holds each of steps 1..4 once (trimmed at the step resumed, not the batch).
  manager = ckpt.make_manager(tmp_path / "restart", keep=5, async_save=False)
  assert ckpt.restore_data_state(manager, 4)["batches"] == 2
  rows = (tmp_path / "restart" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(row)["step"] for row in rows] == [1, 2, 3, 4]


def test_checkpoints_of_the_single_item_format_still_restore_and_resume(trainer, tmp_path):
  """Steps written as one unnamed item (before the stream position was saved) restore, resume,
  and the run then writes named-item steps beside them."""
  import orbax.checkpoint as ocp

  c = trainer.config
  data = batches(c, 4)
  reference = train(c, tmp_path / "ref", iter(data), trainer=trainer, verbose=False)
  half = tiny_config(**{"train.num_steps": 2})
  state = train(half, tmp_path / "new", iter(data[:2]), trainer=trainer, verbose=False)
  old = tmp_path / "old" / "checkpoints"
  with ocp.CheckpointManager(old.absolute()) as legacy:
    legacy.save(2, args=ocp.args.StandardSave(state))
  assert (old / "2" / "default").is_dir()
  resumed = train(c, tmp_path / "old", iter(data[2:]), trainer=trainer, verbose=False)
  _allclose_trees(reference.params, resumed.params)
  assert (old / "4" / "state").is_dir() and (old / "4" / "data").is_dir()
  restored, step = ckpt.restore_raw(tmp_path / "old")
  assert step == 4
  with pytest.raises(ckpt.CheckpointError, match="no checkpoint found"):
    ckpt.restore_raw(tmp_path / "nothing")
  assert not (tmp_path / "nothing").exists()  # reading another run never creates or deletes anything
  # A fresh run told to start from a run that is not there stops before anything: no state made, no folder.
  c_from = tiny_config(**{"train.init_base_from": str(tmp_path / "nothing")})
  with pytest.raises(ckpt.CheckpointError, match=f"no checkpoint found under {tmp_path / 'nothing' / 'checkpoints'}"):
    train(c_from, tmp_path / "fresh", iter(data), trainer=None, verbose=False)
  assert not (tmp_path / "fresh").exists()
  manager = ckpt.make_manager(tmp_path / "old", keep=5, async_save=False)
  old_state = ckpt.restore(manager, trainer.abstract_state(), step=2)
  _allclose_trees(old_state.params, state.params)
  ema = ckpt.restore(manager, trainer.abstract_state(), step=2, fields=("step", "ema_params"))  # sampling's read
  assert int(ema.step) == 2 and ema.params is None
  _allclose_trees(ema.ema_params, state.ema_params)
  with pytest.raises(ValueError, match=r"fields \['ema'\] are not fields of the state"):  # not "damaged"
    ckpt.restore(manager, trainer.abstract_state(), step=2, fields=("step", "ema"))


def test_resume_position_when_the_stream_layout_changes():
  stream = {"dataset": "ucf101/64", "split": "train", "num_frames": 16, "frame_stride": 2, "seed": 0,
            "process_count": 2, "local_batch_size": 8}
  assert resume_position(None, stream, 7) == 7  # a checkpoint without a position: one batch per step
  assert resume_position({**stream, "batches": 9}, stream, 7) == 9
  # 9 batches of 2 x 8 examples = 144 examples = 4 batches of 4 hosts x 8 (rounded down)
  assert resume_position({**stream, "batches": 9}, {**stream, "process_count": 4}, 7) == 4
  assert resume_position({**stream, "batches": 9}, {**stream, "frame_stride": 1}, 7) == 9 * 2 * 8 // 16


@pytest.mark.parametrize("log_every", [1, 1000])
def test_non_finite_loss_stops_and_keeps_last_checkpoint(trainer, tmp_path, log_every):
  """A step whose loss is not finite stops the run with the checkpoint before it intact; with log_every=1000 the
  checkpoint steps are no log steps (as in real configs), and a checkpoint is still written only after its
  step's loss was checked: the NaN at step 4 of 6, a save step but no log step, leaves no step-4 checkpoint."""
  c = tiny_config(**{"train.log_every": log_every, "train.num_steps": 6})
  nan_at = 3 if log_every == 1 else 4
  with pytest.raises(NonFiniteLossError, match=f"non-finite at step {nan_at}.*step 2\\) is intact"):
    train(c, tmp_path, iter(batches(c, 6, nan_at=nan_at)), trainer=trainer, verbose=False)
  manager = ckpt.make_manager(tmp_path, keep=5, async_save=False)
  assert manager.all_steps() == [2]
  state = ckpt.restore(manager, trainer.abstract_state())
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def _bad_first_batch(how):
  """One of the tiny config's batches (8 x 4 frames of 8x8, labels in [0, 3)) spoilt as ``how`` says."""
  def spoil(b):
    v = b["video"]
    return {"uint8": lambda: {**b, "video": np.round((v + 1) * 127.5).astype(np.uint8)},
            "0..255": lambda: {**b, "video": np.round((v + 1) * 127.5).astype(np.float32)},
            "nan": lambda: {**b, "video": np.where(np.arange(v.size).reshape(v.shape) == 5, np.nan, v)},
            "16x16": lambda: {**b, "video": np.repeat(np.repeat(v, 2, axis=2), 2, axis=3)},
            "6 frames": lambda: {**b, "video": np.concatenate([v, v[:, :2]], axis=1)},
            "4 examples": lambda: {k: x[:4] for k, x in b.items()},
            "no label": lambda: {"video": v},
            "labels 0..9": lambda: {**b, "label": np.arange(8, dtype=np.int32) % 10 + 2},
            "float labels": lambda: {**b, "label": b["label"].astype(np.float32)},
            "a list": lambda: [v, b["label"]]}[how]()
  return spoil


@pytest.mark.parametrize("how, message", [pytest.param(*case, id=case[0]) for case in [
    ("uint8", r"^batch\['video'\] is uint8; give float32 in \[-1, 1\]: video / 127.5 - 1"),
    ("0..255", r"^batch\['video'\] holds values in \[0, 25\d\]; the model trains on frames in \[-1, 1\]: "
               r"give video / 127.5 - 1 for frames in \[0, 255\]"),
    ("nan", r"^batch\['video'\] holds NaN or infinite values"),
    ("16x16", r"^batch\['video'\] has shape \(8, 4, 16, 16, 3\), where this config needs \(8, 4, 8, 8, 3\) .*: axis 2 "
              r"\(16\) is not config.data.image_size=8; axis 3 \(16\) is not config.data.image_size=8\.$"),
    ("6 frames", r"^batch\['video'\] has shape \(8, 6, 8, 8, 3\), .*: axis 1 \(6\) is not config.data.num_frames=4\.$"),
    ("4 examples", r"^batch\['video'\] has shape \(4, 4, 8, 8, 3\), .*: axis 0 \(4\) is not "
                   r"config.train.batch_size=8\.$"),
    ("no label", r"^the training batch has no 'label' \(its keys: \['video'\]\); this config needs it "
                 r"\(config.data.num_classes=3: the model is class-conditional"),
    ("labels 0..9", r"^batch\['label'\] holds labels 2..9, outside \[0, 3\) \(config.data.num_classes=3\); give "
                    r"0-based class ids below 3 \(not 1-based ones, nor -1 for none\), or set "
                    r"--config.data.num_classes to the class count\.$"),
    ("float labels", r"^batch\['label'\] is float32; give the class ids as integers \(int32\) in \[0, 3\)"),
    ("a list", r"^a training batch is a dict of arrays \('video', 'label'\), not a list\.$"),
]])
def test_a_batch_that_does_not_fit_the_config_is_refused_before_the_step(trainer, tmp_path, how, message):
  """``train(batches=...)``: a caller's batch is checked on the host against the config before the step
  traces or runs (a uint8 or 0..255 video trained silently, labels past data.num_classes gave a NaN loss
  blamed on the learning rate, a missing label a KeyError inside the trace, a wrong shape a Chex traceback
  naming no field). One line naming the array and the config field; nothing trained, no checkpoint."""
  c = trainer.config
  first, *rest = batches(c, 2)
  with pytest.raises(ConfigError, match=message):
    train(c, tmp_path, iter([_bad_first_batch(how)(first), *rest]), trainer=trainer, verbose=False)
  assert not ckpt.make_manager(tmp_path, keep=5, async_save=False).all_steps()


def test_every_batch_keys_shapes_and_labels_are_checked_not_only_the_first(trainer, tmp_path):
  """Past the first batch the check is the cheap one (keys, shapes, dtypes, labels; no pass over the video,
  whose NaN the loss check catches): batch 2 of 6 frames stops at step 2, with step 1 trained."""
  c = trainer.config
  first, second = batches(c, 2)
  with pytest.raises(ConfigError, match=r"^batch\['video'\] has shape \(8, 6, 8, 8, 3\), .*config.data.num_frames=4"):
    train(c, tmp_path, iter([first, _bad_first_batch("6 frames")(second)]), trainer=trainer, verbose=False)
  assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1


def test_the_batch_check_asks_for_what_each_condition_reads():
  """``check_batch`` asks for the arrays the step reads (``batch_keys``): the stored CLIP frame embeddings
  for a 'clip' encoder, the caption embeddings (and no label) for a prior on text, no label for an
  unconditional model; an unread label passes, as the pipeline's does. The pipeline's batch shapes pass."""
  from videofusion_jax.training.step import batch_keys, check_batch

  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, (8, 4, 8, 8, 3)).astype(np.float32)
  label = np.zeros(8, np.int32)
  clip = tiny_config(**{"model.encoder.kind": "clip", "model.prior.condition": "text"})
  width = clip.model.encoder.embed_dim
  frames, captions = np.zeros((8, 4, width), np.float32), np.zeros((8, width), np.float32)
  assert set(batch_keys(clip)) == {"video", "frame_embeddings", "caption_embeddings"}
  with pytest.raises(ConfigError, match=r"^the training batch has no 'frame_embeddings' .*config.model.encoder."
                                        r"kind='clip'\): frame_embeddings \(B, N, D\)"):
    check_batch(clip, {"video": video, "label": label, "caption_embeddings": captions}, 8)
  with pytest.raises(ConfigError, match=rf"^batch\['caption_embeddings'\] has shape \(8, 5\), .*axis 1 \(5\) is not "
                                        rf"config.model.encoder.embed_dim={width}\.$"):
    check_batch(clip, {"video": video, "frame_embeddings": frames, "caption_embeddings": captions[:, :5]}, 8)
  check_batch(clip, {"video": video, "label": label, "frame_embeddings": frames, "caption_embeddings": captions}, 8)
  unconditional = tiny_config(**{"data.num_classes": 0})
  assert set(batch_keys(unconditional)) == {"video"}
  check_batch(unconditional, {"video": video, "label": label}, 8)
  check_batch(unconditional, {"video": video}, 8)
  with pytest.raises(ConfigError, match=r"^batch\['label'\] has shape \(4,\): every array of a batch holds one row"):
    check_batch(unconditional, {"video": video, "label": label[:4]}, 8)
  assert set(batch_keys(tiny_config(**{"model.condition": "label"}))) == {"video", "label"}


def test_image_stage_then_video_stage_with_frozen_base(tmp_path, monkeypatch):
  image_cfg = tiny_config(**{"train.stage": "image", "train.num_steps": 2})
  image_trainer = Trainer(image_cfg, mesh=one_device(image_cfg))
  init = image_trainer.init_state(image_cfg.seed)
  image_state = train(image_cfg, tmp_path / "image", iter(batches(image_cfg, 2)),
                      trainer=image_trainer, verbose=False)
  _allclose_trees(image_state.params["residual"], init.params["residual"], atol=0)
  assert not np.allclose(image_state.params["base"]["conv_out"]["kernel"], init.params["base"]["conv_out"]["kernel"])

  video_cfg = tiny_config(**{"train.init_base_from": str(tmp_path / "image"),
                             "train.freeze_base": True, "train.num_steps": 2, "seed": 1})
  video_trainer = Trainer(video_cfg, mesh=one_device(video_cfg))
  video_init = video_trainer.init_state(1)
  video_state = train(video_cfg, tmp_path / "video", iter(batches(video_cfg, 2)), trainer=video_trainer,
                      verbose=False)
  # Started with the image run's seed, the video stage still draws its own timesteps and noise: its state's
  # key is not the image run's (with the same key it replayed the image stage's draws step for step).
  from videofusion_jax.training.loop import init_base_from
  same_seed = video_trainer.init_state(image_cfg.seed)
  assert np.array_equal(same_seed.rng, init.rng)
  started = init_base_from(video_trainer, same_seed, str(tmp_path / "image"))
  assert not np.array_equal(started.rng, init.rng)
  # Every network the runs share starts at the image run's EMA weights exactly, the prior too (controls: the
  # fresh state's prior and residual generator are not those).
  for name in ("base", "encoder", "prior"):
    _allclose_trees(started.params[name], image_state.ema_params[name], atol=0)
    _allclose_trees(started.ema_params[name], image_state.ema_params[name], atol=0)
  assert not np.allclose(video_init.params["prior"]["dense_in"]["kernel"],  # another seed's fresh prior
                         image_state.ema_params["prior"]["dense_in"]["kernel"])
  _allclose_trees(started.params["residual"], same_seed.params["residual"], atol=0)
  # The base starts from the image run's EMA weights (what a released pretrained model is), with
  # its encoder (frozen with it); the prior starts there too and trains on.
  _allclose_trees(video_state.params["base"], image_state.ema_params["base"], atol=0)
  _allclose_trees(video_state.params["encoder"], image_state.ema_params["encoder"], atol=0)
  assert not np.allclose(video_state.params["prior"]["dense_out"]["kernel"],
                         image_state.ema_params["prior"]["dense_out"]["kernel"])
  _allclose_trees(video_state.ema_params["base"], image_state.ema_params["base"], atol=0)
  assert not np.allclose(image_state.ema_params["base"]["conv_out"]["kernel"],
                         image_state.params["base"]["conv_out"]["kernel"])
  assert not np.allclose(video_state.params["residual"]["conv_out"]["kernel"],
                         video_init.params["residual"]["conv_out"]["kernel"])

  # The image-stage run's residual generator is untrained: sampling or evaluating that workdir is refused.
  with pytest.raises(ConfigError, match="holds an image-stage run .* its residual generator is untrained"):
    check_trained_config(video_cfg, str(tmp_path / "image"))
  check_trained_config(video_cfg, str(tmp_path / "video"))
  # A video run whose noise schedule is not the one the base learned (no weight's shape tells) is refused
  # before its workdir is touched or its model built.
  for key, value in (("diffusion.num_timesteps", 500), ("model.prior.schedule", "linear")):
    other = tiny_config(**{"train.init_base_from": str(tmp_path / "image"), key: value})
    message = re.escape(f"config.{key}={value!r} (that run's") + ".* trained the networks this run takes from it"
    with pytest.raises(ConfigError, match=message):
      train(other, tmp_path / "other", iter([]))
    assert not (tmp_path / "other").exists()
  # On several hosts, a host whose check passed stops too when another's failed (it would wait at its first
  # collective): on_every_host, the hosts' vote, stood in for by "another host said no".
  monkeypatch.setattr(sharding, "on_every_host", lambda ok: False)
  with pytest.raises(ConfigError, match="init_base_from: another host cannot use that run"):
    train(video_cfg, tmp_path / "other", iter([]))
  assert not (tmp_path / "other").exists()
  # Sampling's and evaluation's check of the training run's settings too (before: each host alone).
  with pytest.raises(ConfigError, match="another host refused this run's settings against the training run's"):
    check_trained_config(video_cfg, str(tmp_path / "video"))


def test_guidance_mixes_whole_decomposed_estimates(trainer):
  """Eqs. 10-11 run once with the condition c and once with the null condition (zeros), each as in
  training, then mixed: s = 1 is the conditional estimate, s = 0 the null one, and one call per
  network serves both passes. Control: guiding each network on its own gives another estimate."""
  c = trainer.config
  params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), trainer.init_state(0).params)
  shape = (2, c.data.num_frames, c.data.image_size, c.data.image_size, 3)
  z = jax.random.normal(jax.random.PRNGKey(0), shape)
  t, emb = jnp.array([100, 700]), embeddings(c, 2)
  null = jnp.zeros_like(emb)
  lam, sched = trainer.lambdas, trainer.schedule

  def fns(params, cond):
    return make_apply_fns(trainer.networks, params, None, condition=cond)

  @jax.jit
  def run(params):
    doubled = fns(params, jnp.concatenate([emb, null]))
    cond = diffusion.decomposed_eps(*fns(params, emb), z, t, lam, sched)[0]
    uncond = diffusion.decomposed_eps(*fns(params, null), z, t, lam, sched)[0]
    guided = {s: diffusion.guided_decomposed_eps(*doubled, z, t, lam, sched, s) for s in (0.0, 1.0, 3.0)}
    # Per-network guidance: the residual passes see frames without the *guided* base estimate.
    (bc, rc), (bu, ru) = (fns(params, x) for x in (emb, null))
    per_network = diffusion.decomposed_eps(
        lambda x, tt: bu(x, tt) + 3.0 * (bc(x, tt) - bu(x, tt)),
        lambda x, tt, i: ru(x, tt, i) + 3.0 * (rc(x, tt, i) - ru(x, tt, i)), z, t, lam, sched)[0]
    return cond, uncond, guided, per_network

  cond, uncond, guided, per_network = run(params)
  assert not np.allclose(cond, uncond, atol=1e-4)
  np.testing.assert_allclose(guided[1.0], cond, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guided[0.0], uncond, rtol=1e-5, atol=1e-5)
  # s = 3 is linear in the two whole estimates of the same call; against the separate calls, their differences
  # above (each within 1e-5, XLA's convolutions ordered by batch size) enter 2x and 3x: 5x the tolerance.
  np.testing.assert_allclose(guided[3.0], guided[0.0] + 3.0 * (guided[1.0] - guided[0.0]), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(guided[3.0], uncond + 3.0 * (cond - uncond), rtol=5e-5, atol=5e-5)
  assert np.abs(np.asarray(per_network) - np.asarray(guided[3.0])).max() > 1e-3


def test_image_stage_trains_the_base_at_the_full_learning_rate(tmp_path, capsys):
  from videofusion_jax.training.loop import base_from_scratch_warning
  from videofusion_jax.training.optimizer import make_optimizer

  lr = 1e-3
  _, image = make_optimizer(tiny_config(**{"train.stage": "image", "train.base_lr_scale": 0.01}))
  _, video = make_optimizer(tiny_config(**{"train.base_lr_scale": 0.01}))
  np.testing.assert_allclose(image["base"](10), lr, rtol=1e-6)
  np.testing.assert_allclose(video["base"](10), 0.01 * lr, rtol=1e-6)
  # A video run whose base starts from scratch at a fine-tuning rate (or frozen) is warned.
  scratch = tiny_config(**{"train.base_lr_scale": 0.1, "train.num_steps": 1})
  for cfg in (scratch, tiny_config(**{"train.freeze_base": True})):
    assert "train the image stage first" in base_from_scratch_warning(cfg).lower()
  for cfg in (tiny_config(), tiny_config(**{"train.base_lr_scale": 0.1, "train.init_base_from": "/x"}),
              tiny_config(**{"train.base_lr_scale": 0.1, "train.stage": "image"})):
    assert base_from_scratch_warning(cfg) is None
  # train() says it before the first step, whose compile (a program of this rate alone) the test stops short of.
  def no_batch():
    raise StopAsked
    yield

  with pytest.raises(StopAsked):
    train(scratch, tmp_path, no_batch(), trainer=Trainer(scratch, mesh=one_device(scratch)), verbose=True)
  assert "base_lr_scale=1" in capsys.readouterr().out


class StopAsked(Exception):
  """Raised by a test's batch iterator to end a run before its first step."""


def test_each_generator_is_clipped_by_its_own_norm():
  from videofusion_jax.training.optimizer import clip_each_by_global_norm

  rng = np.random.default_rng(0)
  grads = {"base": {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))},
           "residual": {"w": jnp.asarray(rng.normal(size=(5,)))}}
  grads["base"] = jax.tree.map(lambda g: 10.0 * g / np.sqrt(sum(float(jnp.sum(x**2)) for x in
                                                               jax.tree.leaves(grads["base"]))), grads["base"])
  grads["residual"] = jax.tree.map(lambda g: 0.5 * g / float(jnp.linalg.norm(g)), grads["residual"])
  tx = clip_each_by_global_norm(1.0)
  out, _ = tx.update(grads, tx.init(grads))
  # The base (norm 10) is scaled to norm 1; the residual (norm 0.5) is left as it is, whereas one
  # global norm (about 10.01) would have shrunk it 20-fold.
  for g, o in zip(jax.tree.leaves(grads["base"]), jax.tree.leaves(out["base"])):
    np.testing.assert_allclose(o, g / 10.0, rtol=1e-5)
  np.testing.assert_allclose(out["residual"]["w"], grads["residual"]["w"], rtol=1e-6)


def test_adamw_matches_optax_and_keeps_its_state_layout():
  """The step's AdamW (one jitted function per parameter, cheap to trace) gives optax.adamw's
  updates and state over several steps of a warm-up schedule with weight decay, inside the
  per-network masks of make_optimizer, and its state has optax's layout (checkpoints of either
  restore)."""
  import optax

  from videofusion_jax.training.optimizer import adamw, global_norm

  rng = np.random.default_rng(0)
  params = {"base": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4)},
            "residual": {"w": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)}}
  schedule = optax.linear_schedule(0.0, 1e-2, 3)

  def labelled(make):
    return optax.multi_transform({"base": make(schedule, b1=0.9, b2=0.999, weight_decay=0.05),
                                  "residual": optax.set_to_zero()}, {"base": "base", "residual": "residual"})

  ours, ref = labelled(adamw), labelled(optax.adamw)
  s_ours, s_ref = ours.init(params), ref.init(params)
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
  p_ours = p_ref = params
  for step in range(5):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 10 ** (step - 2), jnp.float32), params)
    u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, p_ours)
    u_ref, s_ref = ref.update(grads, s_ref, p_ref)
    assert jax.tree.structure((u_ours, s_ours)) == jax.tree.structure((u_ref, s_ref))
    for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_ref, s_ref)), strict=True):
      assert a.dtype == b.dtype and a.shape == b.shape
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-12)
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
  assert float(jnp.abs(p_ours["base"]["w"] - params["base"]["w"]).max()) > 1e-3  # it did move the base
  np.testing.assert_allclose(global_norm(grads), optax.global_norm(grads), rtol=1e-6)
  with pytest.raises(ValueError, match="needs the parameters"):
    adamw(schedule).update(grads["base"], adamw(schedule).init(params["base"]))
  # A constant learning rate, no weight decay: one step as optax's.
  u, _ = adamw(1e-3).update(grads["base"], adamw(1e-3).init(params["base"]), params["base"])
  expected, _ = optax.adamw(1e-3, weight_decay=0.0).update(grads["base"], optax.adamw(1e-3).init(params["base"]),
                                                          params["base"])
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6)


def test_ema_follows_its_formula_with_warm_up():
  """ema ← d·ema + (1-d)·params, d = min(decay, (1+step)/(10+step)), leaf by leaf, dtype kept."""
  from videofusion_jax.training.state import ema_update

  rng = np.random.default_rng(1)
  ema = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
  params = jax.tree.map(lambda x: x + 1.0, ema)
  for step, d in [(0, 0.1), (5, 6 / 15), (10_000, 0.999)]:
    out = jax.jit(ema_update, static_argnums=2)(ema, params, 0.999, jnp.int32(step))
    for o, e, p in zip(jax.tree.leaves(out), jax.tree.leaves(ema), jax.tree.leaves(params), strict=True):
      assert o.dtype == e.dtype
      np.testing.assert_allclose(o, d * np.asarray(e) + (1 - d) * np.asarray(p), rtol=1e-6)
  # bfloat16 parameters: d = 0.999 is 1 in bfloat16, so 1 - d must come from float32 (else the EMA stops).
  e16, p16 = jnp.full((4,), 0.001, jnp.bfloat16), jnp.ones((4,), jnp.bfloat16)
  out = ema_update(e16, p16, 0.999, jnp.int32(100_000))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), 0.999 * 0.001 + 0.001, rtol=1e-2)


def test_frozen_base_costs_no_backward_pass(trainer):
  """XLA's cost analysis of the compiled step: freezing the base removes its backward pass."""
  frozen = Trainer(tiny_config(**{"train.freeze_base": True}), mesh=trainer.mesh)

  def flops(t):
    cost = t.step.lower(t.abstract_state(), abstract_batch(t, t.config)).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])

  joint, only_residual = flops(trainer), flops(frozen)
  assert only_residual < 0.9 * joint, (only_residual, joint)


def test_a_frozen_base_runs_without_dropout_and_the_residual_with_it():
  """With train.freeze_base the base is a fixed function, as in sampling: the z' the residual generator learns
  from carried the base's dropout noise (ucf101's dropout 0.1), which sampling never has. The same draws under
  two dropout keys: the frozen base's loss is the same, the residual's is not; unfrozen, both differ."""
  from videofusion_jax.training.step import draw_randomness, loss_on_draws

  losses = {}
  for freeze in (True, False):
    c = tiny_config(**{"model.base.dropout": 0.5, "model.residual.dropout": 0.5, "train.freeze_base": freeze})
    e = Experiment(c, mesh=one_device(c))
    params = e.init_state(0).params
    leaves, tree = jax.tree.flatten(params)  # away from the zero-initialised output layers, so dropout shows
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    batch = {k: jnp.asarray(v) for k, v in batches(c, 1)[0].items()}
    draws, _ = draw_randomness(e, jax.random.PRNGKey(1), batch["video"].shape)
    terms = jax.jit(lambda rng, e=e, p=params, b=batch, d=draws: loss_on_draws(p, e, b, d, rng)[1])
    losses[freeze] = [jax.device_get(terms(jax.random.PRNGKey(k))) for k in (2, 3)]
  (a, b), (x, y) = losses[True], losses[False]
  assert a["loss_key"] == b["loss_key"]
  assert abs(a["loss_residual"] - b["loss_residual"]) > 1e-4
  assert abs(x["loss_key"] - y["loss_key"]) > 1e-4 and abs(x["loss_residual"] - y["loss_residual"]) > 1e-4


def test_checkpoint_written_before_the_restructuring_restores_and_resumes(trainer, tmp_path):
  """tests/data/checkpoint_before_issue8 was written by the code before the modules moved and the
  optimizer changed (the tiny config with the label condition, 2 steps): it restores with the same
  values and trains on. The embedding condition's config names what the checkpoint lacks."""
  import json
  import shutil
  from pathlib import Path

  src = Path(__file__).parent / "data" / "checkpoint_before_issue8"
  shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")  # the run writes into its workdir
  expected = json.loads((src / "params_summary.json").read_text())["leaf_sum_and_sum_of_squares"]
  # The tiny config of that time had a residual generator two levels deep (tests/tiny.py: one now).
  then = {"model.residual": unet_config(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                        attention_resolutions=(), head_dim=8)}
  with pytest.raises(ckpt.CheckpointError, match=r"missing: encoder, prior\).*--config.model.condition=label"):
    Trainer(tiny_config(**then), mesh=trainer.mesh).restore(tmp_path)
  c = tiny_config(**{"train.num_steps": 3, "model.condition": "label", **then})
  trainer = Trainer(c, mesh=trainer.mesh)
  state = trainer.restore(tmp_path)
  assert int(state.step) == 2
  leaves = jax.tree_util.tree_flatten_with_path({"params": state.params, "ema_params": state.ema_params})[0]
  assert len(leaves) == len(expected)
  for path, x in leaves:
    x = np.asarray(x, np.float64)
    np.testing.assert_allclose([x.sum(), np.square(x).sum()], expected[jax.tree_util.keystr(path)],
                               rtol=1e-6, atol=1e-9)
  resumed = train(c, tmp_path, iter(batches(c, 1)), trainer=trainer, verbose=False)
  assert int(resumed.step) == 3
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(resumed.params))


def test_each_step_draws_from_its_own_key_and_the_ema_follows_the_updated_parameters(trainer):
  """Two steps from the initial state (the first at the warm-up's zero rate leaves the parameters as they
  are): the second step's loss is loss_fn's on its input state with the key fold_in(state.rng, step) (each
  step draws new timesteps and noise), and its EMA is d·ema + (1-d)·params after the update, with
  d = min(ema_decay, (1 + step)/(10 + step)) = 2/11 at step 1 (computed here in NumPy)."""
  from videofusion_jax.training.step import loss_fn

  c = trainer.config
  b = batches(c, 2, seed=3)
  state, _ = trainer.step(trainer.init_state(0), trainer.global_batch(b[0]))
  before = jax.device_get(state)  # the step donates its input state
  assert int(before.step) == 1
  state, m = trainer.step(state, trainer.global_batch(b[1]))
  after = jax.device_get(state)
  rng = jax.random.fold_in(before.rng, 1)
  loss = jax.jit(lambda p, e: loss_fn(p, trainer, {k: jnp.asarray(v) for k, v in b[1].items()}, rng, e)[0])
  np.testing.assert_allclose(m["loss"], loss(before.params, before.ema_params), rtol=1e-5)
  d = min(c.train.ema_decay, 2 / 11)
  moved = 0.0
  for e0, p0, p1, e1 in zip(*(jax.tree.leaves(x) for x in (before.ema_params, before.params, after.params,
                                                           after.ema_params)), strict=True):
    np.testing.assert_allclose(e1, d * np.asarray(e0, np.float64) + (1 - d) * np.asarray(p1, np.float64),
                               rtol=1e-5, atol=1e-7)
    moved = max(moved, float(np.abs(np.asarray(p1) - np.asarray(p0)).max()))
  assert moved > 1e-4  # control: the update moved the parameters, so the EMA of the old ones differs


def test_clipping_scales_to_grad_clip_and_sums_squares_in_float32():
  """clip_each_by_global_norm(c) scales a generator whose gradient norm exceeds c to norm c exactly, for
  c = 2.5 and 0.3 (not 1), and leaves one under c as it is; global_norm of float16 gradients of 300
  (300² overflows float16) is their norm, in float32, and their clipped update is finite, of norm c."""
  from videofusion_jax.training.optimizer import clip_each_by_global_norm, global_norm

  rng = np.random.default_rng(4)
  base = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
  norm = np.sqrt(sum(np.sum(v**2) for v in base.values()))
  for c in (2.5, 0.3):
    grads = {"base": {k: jnp.asarray(4 * c * v / norm, jnp.float32) for k, v in base.items()},  # norm 4c
             "residual": {"w": jnp.asarray(np.full(5, 0.5 * c / np.sqrt(5)), jnp.float32)}}  # norm c/2
    tx = clip_each_by_global_norm(c)
    out, _ = tx.update(grads, tx.init(grads))
    for k, v in base.items():
      np.testing.assert_allclose(out["base"][k], c * v / norm, rtol=1e-5)
    np.testing.assert_array_equal(out["residual"]["w"], grads["residual"]["w"])
  big = {"residual": {"w": jnp.full((4,), 300.0, jnp.float16)}}
  np.testing.assert_allclose(global_norm(big), 600.0, rtol=1e-6)
  tx = clip_each_by_global_norm(1.0)
  out, _ = tx.update(big, tx.init(big))
  w = np.asarray(out["residual"]["w"], np.float32)
  assert out["residual"]["w"].dtype == jnp.float16 and np.isfinite(w).all()
  np.testing.assert_allclose(w, 0.5, rtol=1e-3)


# Reads the checkpoint of the run in argv[1] as train.init_base_from does, in a process of one device; saves what it
# read, whole and ema_params alone, flattened to 'field/name' keys.
_RAW_READER = """
import sys
import numpy as np
from videofusion_jax.training import checkpoint as ckpt
for name, fields in (("all", None), ("ema", ("ema_params",))):
  state, step = ckpt.restore_raw(sys.argv[1], fields=fields)
  assert step == 3, step
  flat = {"/".join(part for part in (field, key) if part): np.asarray(value, np.float32)
          for field, tree in state.items() for key, value in (tree.items() if isinstance(tree, dict) else [("", tree)])}
  np.savez(f"{sys.argv[1]}/{name}.npz", **flat)
"""


def test_another_runs_checkpoint_is_read_whatever_devices_wrote_it(tmp_path):
  """``train.init_base_from`` reads another run's checkpoint (``checkpoint.restore_raw``) as NumPy arrays, whatever
  devices wrote it: a state sharded over this suite's 8 devices, read back by a process with one (an image stage
  trained on a pod slice, its video stage elsewhere). Orbax's restore without a target lays the arrays out on the
  shardings they were saved with, and refused ("The available devices are different ..."). ``fields`` reads
  those fields alone."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  rng = np.random.default_rng(0)
  host = {"step": np.int32(3), "params": {"w": rng.normal(size=(8, 6)).astype(np.float32)},
          "ema_params": {"w": rng.normal(size=(4, 8)).astype(np.float32),
                         "b": rng.normal(size=(4,)).astype(jnp.bfloat16)}}
  layout = {"step": P(), "params": {"w": P("data", "fsdp")}, "ema_params": {"w": P("fsdp", "data"), "b": P("data")}}
  state = jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), host, layout)
  manager = ckpt.make_manager(tmp_path / "image", keep=2, async_save=False)
  ckpt.save(manager, 3, state, {"position": 3})
  manager.close()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", _RAW_READER, str(tmp_path / "image")], env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  every = dict(np.load(tmp_path / "image" / "all.npz"))
  assert sorted(every) == ["ema_params/b", "ema_params/w", "params/w", "step"]
  for key, value in every.items():
    field, _, name = key.partition("/")
    np.testing.assert_array_equal(value, np.asarray(host[field][name] if name else host[field], np.float32))
  assert set(np.load(tmp_path / "image" / "ema.npz")) == {"ema_params/b", "ema_params/w"}
