"""VDM* (``model.kind='vdm'``): the space-time U-Net against an oracle, what it mixes and what
VideoFusion's residual generator does not, reduction to the image U-Net, and the whole path
(train, sample, checkpoint, start from a VideoFusion base) on 8 devices."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_training import batches

from videofusion_jax import diffusion, sampling
from videofusion_jax.config import ConfigError, validate
from videofusion_jax.experiment import Experiment
from videofusion_jax.models import UNet
from videofusion_jax.models.factory import init_params, make_apply_fns, make_networks, make_video_fn
from videofusion_jax.models.unet import TemporalAttentionBlock
from videofusion_jax.training import checkpoint as ckpt
from videofusion_jax.training import loop as loop_module
from videofusion_jax.training.loop import train
from videofusion_jax.training.step import Trainer


def vdm_config(**overrides):
  return tiny_config(**{"model.kind": "vdm", "diffusion.lam": 0.0, **overrides})


def perturbed(params, seed, scale=0.1, keep=lambda path: False):
  """Every weight plus Gaussian noise (output layers start at zero), except where ``keep(path)``."""
  rng = np.random.default_rng(seed)  # numpy: jax's draws would compile a program per weight shape
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p if keep(jax.tree_util.keystr(path)) else p + scale * rng.standard_normal(p.shape, np.float32),
      params)


def unet(**kw):
  return UNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), head_dim=8,
              num_classes=3, **kw)


def test_temporal_attention_against_an_oracle():
  """Each position's frames attend to each other with softmax(q·k/√d + bias[i - j]) per head."""
  n, b, h, w, c, d = 4, 2, 3, 2, 16, 8
  block = TemporalAttentionBlock(n, d, jnp.float32, jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (b * n, h, w, c))
  params = perturbed(nn.unbox(block.init(jax.random.PRNGKey(1), x))["params"], 2, scale=0.5)
  out = np.asarray(block.apply({"params": params}, x))

  p = jax.tree.map(np.asarray, params)
  xv = np.asarray(x, np.float64).reshape(b, n, h, w, c)
  groups = np.gcd(32, c)  # GroupNorm over each video frame's (H, W, C/groups), flax's epsilon
  g = xv.reshape(b, n, h, w, groups, c // groups)
  mean, var = g.mean(axis=(2, 3, 5), keepdims=True), g.var(axis=(2, 3, 5), keepdims=True)
  y = ((g - mean) / np.sqrt(var + 1e-6)).reshape(b, n, h, w, c) * p["norm"]["scale"] + p["norm"]["bias"]
  qkv = y @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  heads = c // d
  q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, n, h, w, heads, d) for i in range(3))
  logits = np.einsum("bihwed,bjhwed->bhweij", q, k) / np.sqrt(d)
  offsets = np.arange(n)[:, None] - np.arange(n)[None, :] + n - 1
  logits = logits + p["relative_bias"][offsets].transpose(2, 0, 1)[None, None, None]
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  mixed = np.einsum("bhweij,bjhwed->bihwed", att, v).reshape(b, n, h, w, c)
  expected = xv + mixed @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(out, expected.reshape(b * n, h, w, c), atol=2e-4)
  # The bias is per offset: a table that is not constant along the offsets changes the output.
  shifted = {**params, "relative_bias": params["relative_bias"] + jnp.arange(2 * n - 1.0)[:, None]}
  assert not np.allclose(block.apply({"params": shifted}, x), out, atol=1e-3)


def test_vdm_mixes_frames_and_the_residual_generator_does_not():
  n = 4
  vdm = unet(temporal_frames=n, temporal_resolutions=(8, 4))
  x = jax.random.normal(jax.random.PRNGKey(0), (2 * n, 8, 8, 3))
  t, label = jnp.full((2 * n,), 300), jnp.repeat(jnp.array([0, 2]), n)
  params = perturbed(nn.unbox(jax.jit(vdm.init)(jax.random.PRNGKey(1), x, t, label))["params"], 2)
  apply = jax.jit(lambda xx: vdm.apply({"params": params}, xx, t, label))
  out, changed = apply(x), apply(x.at[1].add(1.0))
  diff = np.abs(np.asarray(changed - out)).reshape(2, n, -1).max(-1)
  assert np.all(diff[0] > 1e-3)  # every frame of the first video moves with its frame 1
  np.testing.assert_allclose(diff[1], 0.0, atol=1e-5)  # the other video does not

  c = tiny_config()
  networks = make_networks(c)
  vf = perturbed(nn.unbox(jax.jit(lambda r: init_params(networks, c, r))(jax.random.PRNGKey(3))), 4)
  _, residual_fn = make_apply_fns(networks, vf, jnp.array([0, 2]), condition=jnp.ones((2, c.model.encoder.embed_dim)))
  idx = diffusion.non_key_frames(c.data.num_frames)
  z = jax.random.normal(jax.random.PRNGKey(5), (2, len(idx), 8, 8, 3))
  residual = jax.jit(lambda zz: residual_fn(zz, jnp.array([300, 300]), idx))
  r, r2 = residual(z), residual(z.at[0, 1].add(1.0))
  d = np.abs(np.asarray(r2 - r)).reshape(2, len(idx), -1).max(-1)
  assert d[0, 1] > 1e-3
  np.testing.assert_allclose(np.delete(d, 1, axis=1), 0.0, atol=1e-5)  # every other frame is untouched


@pytest.mark.parametrize("num_frames", [1, 4])
def test_vdm_with_zero_temporal_projections_is_the_image_unet(num_frames):
  """VDM*'s tree is the image U-Net's plus ``*_temporal*`` layers; with their output projections
  at zero (as initialised) it computes the image U-Net on each frame, whatever else they hold."""
  n = num_frames
  vdm, image = unet(temporal_frames=n, temporal_resolutions=(8, 4)), unet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2 * n, 8, 8, 3))
  t, label = jnp.arange(2 * n) * 90, jnp.arange(2 * n) % 3
  params = nn.unbox(jax.jit(vdm.init)(jax.random.PRNGKey(1), x, t, label))["params"]
  assert {k for k in params if "temporal" in k} == {"down0_temporal0", "down1_temporal0", "mid_temporal",
                                                    "up1_temporal0", "up1_temporal1", "up0_temporal0",
                                                    "up0_temporal1"}
  params = perturbed(params, 2, keep=lambda path: "temporal" in path and "proj" in path)
  spatial = {k: v for k, v in params.items() if "temporal" not in k}
  assert jax.tree.structure(spatial) == jax.tree.structure(
      nn.unbox(jax.eval_shape(image.init, jax.random.PRNGKey(1), x, t, label))["params"])
  run_vdm = jax.jit(lambda p: vdm.apply({"params": p}, x, t, label))
  reference = jax.jit(lambda p: image.apply({"params": p}, x, t, label))(spatial)
  np.testing.assert_allclose(run_vdm(params), reference, atol=1e-5)
  live = perturbed(params, 3)  # control: non-zero projections change the output
  assert not np.allclose(run_vdm(live), reference, atol=1e-3)


def test_vdm_loss_against_the_formula():
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 3, 3, 3), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([10, 900])
  schedule = diffusion.make_schedule("linear", 1000)
  loss, terms = diffusion.video_denoising_loss(lambda z, tt: 0.5 * z, x0, t, noise, schedule)
  a = np.asarray(schedule.alphas_cumprod)[np.asarray(t)][:, None, None, None, None]
  z = np.sqrt(a) * np.asarray(x0) + np.sqrt(1 - a) * np.asarray(noise)
  err = (np.asarray(noise) - 0.5 * z) ** 2
  np.testing.assert_allclose(loss, err.mean(), rtol=1e-5)
  np.testing.assert_allclose(terms["loss_key"], err[:, 2].mean(), rtol=1e-5)
  np.testing.assert_allclose(terms["loss_residual"], err[:, [0, 1, 3]].mean(), rtol=1e-5)


def test_vdm_configs_are_checked():
  validate(vdm_config())
  validate(vdm_config(**{"model.residual.head_dim": 7}))  # VDM* builds no residual generator
  for overrides, match in [({"model.kind": "vdn"}, "model.kind="),
                           ({"model.key_frame_input": True}, "model.key_frame_input=True"),
                           ({"train.stage": "image"}, "train.init_base_from"),
                           ({"model.vdm.temporal_resolutions": (16,)}, "temporal_resolutions"),
                           ({"train.freeze_base": True}, "train.freeze_base"),
                           ({"model.key_frame_clean": True}, "model.key_frame_clean=True"),
                           ({"diffusion.lam": 0.5}, "diffusion.lam=0.5: VDM\\* is trained")]:
    with pytest.raises(ConfigError, match=match):
      validate(vdm_config(**overrides))


@pytest.fixture(scope="module")
def vdm_run(tmp_path_factory):
  """VDM* on a 4x2 mesh (data x fsdp) of 8 simulated devices, trained 4 steps (the first at a zero
  learning rate, the second moving only the zero-initialised output layer), its init and step
  programs stored and run as loaded back (the suite's one stored program on a sharded mesh)."""
  config = vdm_config(**{"mesh.data": 4, "mesh.fsdp": 2, "store_programs": True})
  trainer = Trainer(config)
  assert trainer.mesh.devices.size == 8 and set(trainer.num_params) == {"video", "encoder", "prior"}
  workdir = tmp_path_factory.mktemp("vdm")
  state = train(config, workdir, iter(batches(config, 4)), trainer=trainer, verbose=False)
  assert trainer.init_source in ("traced", "stored") and trainer.step.source in ("traced", "stored")
  return config, trainer, workdir, state


def test_vdm_trains_samples_and_restores_on_eight_devices(vdm_run):
  config, trainer, workdir, state = vdm_run
  assert int(state.step) == 4
  kernel = trainer.state_sharding.params["video"]["conv_in"]["kernel"]
  assert kernel.spec[-1] == "fsdp"
  fresh = trainer.init_state(config.seed)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params["video"], fresh.params["video"])
  for layer in ("proj", "qkv"):  # the temporal layers train, their bias included
    assert moved["mid_temporal"][layer]["kernel"] > 0
  assert moved["mid_temporal"]["relative_bias"] > 0
  restored = trainer.restore(workdir)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  labels = np.array([0, 1, 2], np.int32)
  videos = sampling.generate_videos(trainer, restored.ema_params, 3, seed=0, labels=labels)
  again = sampling.generate_videos(trainer, restored.ema_params, 3, seed=0, labels=labels)
  assert videos.shape == (3, 4, 8, 8, 3) and np.isfinite(videos).all() and np.abs(videos).max() <= 1.0
  np.testing.assert_array_equal(videos, again)
  # The same chain as VideoFusion's, with VDM*'s estimate at each step (an independent rerun of it).
  c = config
  base_keys, residual_keys, prior_keys = sampling.row_keys(0, np.arange(3), np.arange(3))
  cond = sampling.sample_condition(trainer, restored.ema_params, prior_keys, jnp.asarray(labels), 3)
  video_fn = make_video_fn(trainer.networks, restored.ema_params, None, condition=cond)
  chain = diffusion.sample_chain(video_fn, None, (3, 4, 8, 8, 3), trainer.lambdas, trainer.schedule, "ddim",
                                 c.sample.num_steps, c.sample.eta, c.sample.clip_x0,
                                 row_keys=(base_keys, residual_keys), spacing=c.sample.spacing)
  np.testing.assert_allclose(videos, np.clip(np.asarray(chain), -1, 1), atol=1e-4)


@pytest.fixture(scope="module")
def videofusion():
  """The tiny VideoFusion experiment on the same mesh."""
  return Experiment(tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2}))


def test_a_checkpoint_of_the_other_kind_is_a_clear_error(vdm_run, videofusion):
  _, _, workdir, _ = vdm_run
  other = videofusion
  with pytest.raises(ckpt.CheckpointError, match="VDM\\* checkpoint: use --config.model.kind=vdm"):
    other.restore(workdir)


def test_vdm_starts_from_a_videofusion_base(vdm_run, videofusion, tmp_path):
  """init_base_from fills VDM*'s spatial layers with the base generator (and the encoder and prior);
  the temporal ones start at the identity, so the new VDM* computes the base on every frame."""
  config, trainer, _, _ = vdm_run
  vf = videofusion
  source = vf.init_state(7)
  source = source.replace(ema_params=perturbed(source.ema_params, 8))
  manager = ckpt.make_manager(tmp_path / "vf", 1, async_save=False)
  ckpt.save(manager, 1, source)
  manager.close()
  state = loop_module.init_base_from(trainer, trainer.init_state(0), str(tmp_path / "vf"))
  src = jax.device_get(source.ema_params)
  for k, v in jax.device_get(state.params["video"]).items():
    if "temporal" not in k:
      for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(src["base"][k])):
        np.testing.assert_array_equal(a, b)
  for name in ("encoder", "prior"):
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params[name])), jax.tree.leaves(src[name])):
      np.testing.assert_array_equal(a, b)
  cond = jnp.ones((2, config.model.encoder.embed_dim))
  z = jax.random.normal(jax.random.PRNGKey(9), (2, 4, 8, 8, 3))
  t = jnp.array([100, 600])
  video = jax.jit(make_video_fn(trainer.networks, state.params, None, condition=cond))(z, t)
  base_fn, _ = make_apply_fns(vf.networks, src, None, condition=jnp.repeat(cond, 4, axis=0))
  per_frame = jax.jit(base_fn)(z.reshape(8, 8, 8, 3), jnp.repeat(t, 4)).reshape(z.shape)
  np.testing.assert_allclose(video, per_frame, atol=1e-4)
  assert float(jnp.abs(per_frame).mean()) > 1e-2  # the base really computes something


def test_guided_vdm_estimate_mixes_the_conditioned_and_null_passes(vdm_run):
  """Sampling's VDM* estimate under guidance: ε̂_∅ + s (ε̂_c − ε̂_∅), from the doubled batch."""
  config, trainer, _, state = vdm_run
  guided_config = vdm_config(**{"mesh.data": 4, "mesh.fsdp": 2, "sample.guidance_scale": 2.5})
  experiment = types.SimpleNamespace(config=guided_config, networks=trainer.networks, lambdas=trainer.lambdas,
                                     schedule=trainer.schedule)
  params = perturbed(jax.device_get(state.params), 11)
  cond = jax.random.normal(jax.random.PRNGKey(1), (2, config.model.encoder.embed_dim))
  labels, doubled = sampling.network_conditions(guided_config, None, cond)
  assert labels is None and doubled.shape == (4, cond.shape[1]) and not np.any(doubled[2:])
  z = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 8, 8, 3))
  t = jnp.array([200, 700])
  guided = jax.jit(lambda p: sampling.video_eps_fn(experiment, p, labels, doubled)(z, t))(params)
  run = jax.jit(lambda p, c: make_video_fn(trainer.networks, p, None, condition=c)(z, t))
  with_c, null = run(params, cond), run(params, jnp.zeros_like(cond))
  assert float(jnp.abs(with_c - null).max()) > 1e-3
  np.testing.assert_allclose(guided, null + 2.5 * (with_c - null), atol=1e-4)
