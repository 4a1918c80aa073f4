"""Training: stop-gradient, two learning rates, sharding, checkpoints, resume, NaN handling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from videofusion_jax import diffusion
from videofusion_jax.training import checkpoint as ckpt
from videofusion_jax.training import sharding as shd
from videofusion_jax.training import train as train_module
from videofusion_jax.training.state import make_apply_fns
from videofusion_jax.training.train import NonFiniteLossError, Trainer, resume_position, train


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
  return Trainer(c, mesh=shd.make_mesh(c, devices=jax.devices()[:1]))


def _allclose_trees(a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


def test_stop_gradient_isolates_the_base_generator(trainer):
  c = trainer.config
  state = trainer.init_state(0)
  # Perturb the zero-initialised output layers so that both networks depend on their inputs.
  params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), state.params)
  b = batches(c, 1)[0]
  x0, label = jnp.asarray(b["video"]), jnp.asarray(b["label"])
  t = jnp.array([10, 200, 400, 600, 800, 900, 950, 999])
  noise = diffusion.decomposed_noise(jax.random.PRNGKey(0), x0.shape, trainer.lambdas)

  def terms(p):
    base_fn, residual_fn = make_apply_fns(trainer.networks, p, label)
    return diffusion.joint_loss(base_fn, residual_fn, x0, t, noise, trainer.lambdas, trainer.schedule)[1]

  def residual_term_without_sg(p):
    base_fn, residual_fn = make_apply_fns(trainer.networks, p, label)
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


def test_two_learning_rates_and_metrics(trainer):
  c = trainer.config
  state = trainer.init_state(0)
  before = jax.device_get(state.params)
  for b in batches(c, 3):
    state, m = trainer.step(state, shd.global_batch(b, trainer.mesh))
  lr = c.train.learning_rate
  np.testing.assert_allclose(m["lr_residual"], lr, rtol=1e-6)  # step 2 >= warmup_steps
  np.testing.assert_allclose(m["lr_base"], lr * c.train.base_lr_scale, rtol=1e-6)
  assert float(m["grad_norm_base"]) > 0 and float(m["grad_norm_residual"]) > 0
  assert int(state.step) == 3
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
  assert max(moved) > 0


def test_batch_that_does_not_split_over_devices_is_a_clear_error():
  from videofusion_jax.config import ConfigError
  with pytest.raises(ConfigError, match="batch_size=6 does not split evenly over the 8 devices"):
    Trainer(tiny_config(**{"train.batch_size": 6}))


def test_base_learning_rate_scale_and_cosine_decay():
  from videofusion_jax.training.state import make_optimizer
  _, sched = make_optimizer(tiny_config(**{"train.base_lr_scale": 0.01, "train.lr_decay": "cosine",
                                           "train.warmup_steps": 10, "train.num_steps": 110}))
  peak = 1e-3
  for step, expected in [(0, 0.0), (5, 0.5 * peak), (10, peak), (60, 0.5 * peak), (110, 0.0)]:
    np.testing.assert_allclose(sched["residual"](step), expected, atol=1e-9)
    np.testing.assert_allclose(sched["base"](step), 0.01 * expected, atol=1e-11)


def test_sharded_step_matches_single_device(trainer):
  c = trainer.config
  assert jax.device_count() == 8 and trainer.mesh.devices.size == 1
  sharded = Trainer(tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2}))
  single = trainer
  kernel = sharded.state_sharding.params["base"]["conv_in"]["kernel"]
  assert kernel.spec[-1] == "fsdp"  # FSDP really splits the weights
  b = batches(c, 1)[0]
  s1, m1 = sharded.step(sharded.init_state(0), shd.global_batch(b, sharded.mesh))
  s2, m2 = single.step(single.init_state(0), shd.global_batch(b, single.mesh))
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  _allclose_trees(s1.params, s2.params, atol=1e-5)


def test_resume_gives_the_same_next_step(trainer, tmp_path):
  c = trainer.config
  data = batches(c, 5)
  full = train(c, tmp_path / "full", iter(data[:4]), trainer=trainer, verbose=False)
  first = tiny_config(**{"train.num_steps": 2})
  train(first, tmp_path / "split", iter(data[:2]), trainer=trainer, verbose=False)
  resumed = train(c, tmp_path / "split", iter(data[2:4]), trainer=trainer, verbose=False)
  assert int(resumed.step) == 4
  _allclose_trees(full.params, resumed.params)
  _allclose_trees(full.ema_params, resumed.ema_params)
  _allclose_trees(full.opt_state, resumed.opt_state)
  nxt = shd.global_batch(data[4], trainer.mesh)
  _, m_full = trainer.step(full, nxt)
  _, m_resumed = trainer.step(resumed, nxt)
  np.testing.assert_allclose(m_full["loss"], m_resumed["loss"], rtol=1e-6)
  assert (tmp_path / "split" / "config.json").is_file()
  assert any((tmp_path / "split" / "tensorboard").iterdir())


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
  assert ckpt.restore_data_state(manager, 4) == {
      "dataset": "demo_clips", "split": "train", "num_frames": 4, "frame_stride": 2, "seed": 0,
      "process_count": 1, "local_batch_size": 8, "batches": 4}
  train(half, tmp_path / "restart", trainer=trainer, verbose=False)
  monkeypatch.setattr(train_module, "resume_position", lambda saved, stream, step: 0)
  restarted = train(c, tmp_path / "restart", trainer=trainer, verbose=False)
  assert max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(restarted.params))) > 1e-4


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
  manager = ckpt.make_manager(tmp_path / "old", keep=5, async_save=False)
  old_state = ckpt.restore(manager, trainer.abstract_state(), step=2)
  _allclose_trees(old_state.params, state.params)


def test_resume_position_when_the_stream_layout_changes():
  stream = {"dataset": "ucf101/64", "split": "train", "num_frames": 16, "frame_stride": 2, "seed": 0,
            "process_count": 2, "local_batch_size": 8}
  assert resume_position(None, stream, 7) == 7  # a checkpoint without a position: one batch per step
  assert resume_position({**stream, "batches": 9}, stream, 7) == 9
  # 9 batches of 2 x 8 examples = 144 examples = 4 batches of 4 hosts x 8 (rounded down)
  assert resume_position({**stream, "batches": 9}, {**stream, "process_count": 4}, 7) == 4
  assert resume_position({**stream, "batches": 9}, {**stream, "frame_stride": 1}, 7) == 9 * 2 * 8 // 16


def test_non_finite_loss_stops_and_keeps_last_checkpoint(trainer, tmp_path):
  c = trainer.config
  with pytest.raises(NonFiniteLossError, match="non-finite at step 3.*step 2\\) is intact"):
    train(c, tmp_path, iter(batches(c, 4, nan_at=3)), trainer=trainer, verbose=False)
  manager = ckpt.make_manager(tmp_path, keep=5, async_save=False)
  assert manager.all_steps() == [2]
  state = ckpt.restore(manager, trainer.abstract_state())
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_image_stage_then_video_stage_with_frozen_base(tmp_path):
  image_cfg = tiny_config(**{"train.stage": "image", "train.num_steps": 2})
  image_trainer = Trainer(image_cfg)
  init = image_trainer.init_state(image_cfg.seed)
  image_state = train(image_cfg, tmp_path / "image", iter(batches(image_cfg, 2)),
                      trainer=image_trainer, verbose=False)
  _allclose_trees(image_state.params["residual"], init.params["residual"], atol=0)
  assert not np.allclose(image_state.params["base"]["conv_out"]["kernel"], init.params["base"]["conv_out"]["kernel"])

  video_cfg = tiny_config(**{"train.init_base_from": str(tmp_path / "image"),
                             "train.freeze_base": True, "train.num_steps": 2, "seed": 1})
  video_trainer = Trainer(video_cfg)
  video_init = video_trainer.init_state(1)
  video_state = train(video_cfg, tmp_path / "video", iter(batches(video_cfg, 2)), trainer=video_trainer,
                      verbose=False)
  _allclose_trees(video_state.params["base"], image_state.params["base"], atol=0)
  assert not np.allclose(video_state.params["residual"]["conv_out"]["kernel"],
                         video_init.params["residual"]["conv_out"]["kernel"])


def test_classifier_free_guidance_combines_label_and_null_estimates(trainer):
  c = trainer.config
  params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), trainer.init_state(0).params)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, c.data.num_frames - 1, c.data.image_size, c.data.image_size, 3))
  t, label = jnp.array([100, 700]), jnp.array([0, 2])
  null = jnp.full_like(label, c.data.num_classes)
  idx = diffusion.non_key_frames(c.data.num_frames)

  @jax.jit
  def run(params):
    guided = make_apply_fns(trainer.networks, params, label, guidance_scale=3.0, null_label=c.data.num_classes)
    plain = make_apply_fns(trainer.networks, params, label)
    uncond = make_apply_fns(trainer.networks, params, null)
    return [(f(z[:, 0], t), g(z[:, 0], t), u(z[:, 0], t)) for f, g, u in [(guided[0], plain[0], uncond[0])]] + [
        (guided[1](z, t, idx), plain[1](z, t, idx), uncond[1](z, t, idx))]

  for guided, cond, uncond in run(params):
    assert not np.allclose(cond, uncond, atol=1e-4)
    np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
