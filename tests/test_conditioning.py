"""The paper's conditioning: the key-frame embedding c shared by both generators, its encoders,
and the prior that samples it."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import one_device, tiny_config
from test_models import np_conv3x3, np_group_norm

from videofusion_jax import diffusion
from videofusion_jax.models.encoder import frozen_encoder
from videofusion_jax.models.prior import EmbeddingPrior
from videofusion_jax.models.unet import UNet
from videofusion_jax.training.step import loss_fn


def test_prior_samples_each_class_of_a_gaussian_mixture():
  """Trained on a known 3-class Gaussian mixture in 2-D (10% of the labels dropped to the null
  label), the prior's DDIM samples (η = 1, 100 steps) of each class have that class's mean
  within 0.1 (the classes' standard deviations are 0.3 to 0.6; 2000 samples give a standard
  error under 0.015) and its covariance within 20% (relative Frobenius error); the null label
  samples the whole mixture (its mean within 0.15, and every class about a third of the samples)."""
  d, k, n = 2, 3, 2000
  means = np.array([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]], np.float32)
  chol = np.array([[[0.5, 0.0], [0.2, 0.3]], [[0.3, 0.0], [0.0, 0.6]], [[0.4, 0.0], [-0.3, 0.2]]], np.float32)
  covs = chol @ chol.transpose(0, 2, 1)
  schedule = diffusion.make_schedule("cosine", 1000)
  net = EmbeddingPrior(d, width=64, num_layers=2, num_classes=k)
  one = jnp.zeros((1,), jnp.int32)
  params = nn.unbox(net.init(jax.random.PRNGKey(0), jnp.zeros((1, d)), one, one)["params"])
  steps, batch = 2000, 256
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  @jax.jit
  def train(params):
    def step(carry, rng):
      params, opt = carry
      r_lab, r_x, r_t, r_n, r_drop = jax.random.split(rng, 5)
      lab = jax.random.randint(r_lab, (batch,), 0, k)
      x = jnp.asarray(means)[lab] + jnp.einsum("bij,bj->bi", jnp.asarray(chol)[lab], jax.random.normal(r_x, (batch, d)))
      lab = jnp.where(jax.random.bernoulli(r_drop, 0.1, (batch,)), k, lab)
      t = diffusion.sample_timesteps(r_t, batch, schedule.num_timesteps)
      loss, g = jax.value_and_grad(lambda p: diffusion.denoising_loss(
          lambda z, tt: net.apply({"params": p}, z, tt, lab), x, t, jax.random.normal(r_n, x.shape), schedule))(params)
      updates, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, updates), opt), loss
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.PRNGKey(1), steps))
    return params, losses

  params, losses = train(params)
  assert abs(float(losses[0]) - 1.0) < 0.2 and float(losses[-200:].mean()) < 0.4  # ε̂ = 0 at first: E[ε²] = 1

  @jax.jit
  def sample(rng, label):
    return diffusion.sample_embeddings(lambda z, t: net.apply({"params": params}, z, t, jnp.full((n,), label)),
                                       rng, (n, d), schedule, num_steps=100, eta=1.0)

  for c in range(k):
    s = np.asarray(sample(jax.random.PRNGKey(10 + c), c))
    assert np.all(np.abs(s.mean(0) - means[c]) < 0.1), (c, s.mean(0), means[c])
    rel = np.linalg.norm(np.cov(s.T) - covs[c]) / np.linalg.norm(covs[c])
    assert rel < 0.2, (c, np.cov(s.T), covs[c])
  s = np.asarray(sample(jax.random.PRNGKey(20), k))  # the null label: the mixture
  assert np.all(np.abs(s.mean(0) - means.mean(0)) < 0.15), s.mean(0)
  nearest = np.argmin(((s[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.all(np.abs(np.bincount(nearest, minlength=k) / n - 1 / k) < 0.08)


@pytest.fixture(scope="module")
def embedding_setup():
  from videofusion_jax.experiment import Experiment

  c = tiny_config(**{"train.label_dropout": 0.5})
  e = Experiment(c, mesh=one_device(c))
  params = e.init_state(0).params
  # Random perturbations: the zero-initialised output layers then pass every input through (a
  # constant shift of all weights would make the encoder's output the same for every frame).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  batch = {"video": jnp.asarray(rng.uniform(-1, 1, (8, 4, 8, 8, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
  return e, params, batch


def test_both_generators_receive_the_same_key_frame_embedding(embedding_setup):
  """In the training loss, the base generator gets c = encoder(clean key frame) for each clip, the
  residual generator the same c for each of that clip's frames, and the rows dropped for guidance
  (label_dropout = 0.5) are the null condition, zeros, in both."""
  e, params, batch = embedding_setup
  c = e.config

  @jax.jit
  def captured(params):
    seen = {}

    def spy(next_fun, args, kwargs, context):
      if isinstance(context.module, UNet) and context.method_name == "__call__":
        seen["residual" if context.module.num_frames else "base"] = kwargs["condition"]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
      loss_fn(params, e, batch, jax.random.PRNGKey(3))
    return seen, e.encode(params, batch["video"][:, 2])

  seen, c_key = captured(params)
  base, residual = np.asarray(seen["base"]), np.asarray(seen["residual"])
  c_key = np.asarray(c_key)
  assert base.shape == (8, c.model.encoder.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(c_key, axis=1), np.sqrt(c.model.encoder.embed_dim), rtol=1e-5)
  dropped = np.all(base == 0, axis=1)
  assert 0 < dropped.sum() < 8  # some rows of each kind at this seed
  np.testing.assert_allclose(base[~dropped], c_key[~dropped], rtol=1e-6)
  np.testing.assert_array_equal(residual, np.repeat(base, 3, axis=0))  # N - 1 = 3 frames per clip


def test_the_condition_changes_both_generators_and_zeros_are_the_null_output(embedding_setup):
  """Each generator's output depends on c (two clips' embeddings give different outputs), and the
  dropped condition gives exactly the output of the null condition."""
  from videofusion_jax.models.factory import make_apply_fns
  from videofusion_jax.training.step import condition_with_dropout

  e, params, batch = embedding_setup
  c = e.config
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8, 3))
  t = jnp.array([300, 600])
  cs = e.encode(params, batch["video"][:2, 2])
  dropped = condition_with_dropout(cs, tiny_config(**{"train.label_dropout": 1.0}), jax.random.PRNGKey(0))

  def outputs(cond):
    base_fn, residual_fn = make_apply_fns(e.networks, params, None, condition=cond)
    return base_fn(z[:, 2], t), residual_fn(z[:, :3], t, jnp.arange(3))

  (b1, r1), (b2, r2), (bd, rd), (b0, r0) = (outputs(x) for x in (cs, cs[::-1], dropped, jnp.zeros_like(cs)))
  assert np.abs(np.asarray(b1 - b2)).max() > 1e-3 and np.abs(np.asarray(r1 - r2)).max() > 1e-3
  np.testing.assert_array_equal(bd, b0)
  np.testing.assert_array_equal(rd, r0)
  assert np.abs(np.asarray(b1 - b0)).max() > 1e-3 and c.data.num_classes == 3


def test_the_pixels_encoder_puts_every_frame_on_the_sphere_and_uniform_greys_apart():
  """A black or grey frame (fades, flat frames) has its own embedding of norm √D, not the null
  condition's zeros nor a direction of rounding noise; the embedding is the 4x4 pooled frame and
  a 1, scaled, computed here with NumPy."""
  encode, width = frozen_encoder("pixels", 8)
  assert width == 3 * 16 + 1
  rng = np.random.default_rng(0)
  frames = np.concatenate([np.stack([np.full((8, 8, 3), v, np.float32) for v in (-1.0, 0.0, 0.3, 1.0)]),
                           rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)])
  got = np.asarray(encode(jnp.asarray(frames)))
  pooled = frames.reshape(6, 4, 2, 4, 2, 3).mean(axis=(2, 4)).reshape(6, -1)
  want = np.concatenate([pooled, np.ones((6, 1))], axis=1)
  want *= np.sqrt(width) / np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.sqrt(width), rtol=1e-5)
  gaps = np.linalg.norm(got[:, None] - got[None], axis=-1)[np.triu_indices(6, 1)]
  assert gaps.min() > 0.5, gaps  # no two of the frames share an embedding


def test_the_learned_encoder_against_numpy():
  """The learned key-frame encoder two levels deep (the tiny model's is one; the demo's two) against NumPy:
  conv_in, then per level GroupNorm (gcd(32, C) groups, epsilon 1e-6), SiLU, a 3x3 conv, SiLU and a stride-2
  3x3 conv ('SAME': padded 1 before and after, or 0 before and 1 after at stride 2 on an even size) that widens
  to base_channels x mult; GroupNorm, SiLU, the mean over the pixels, a dense layer, scaled to norm √D."""
  from videofusion_jax.models.encoder import KeyFrameEncoder

  net = KeyFrameEncoder(embed_dim=6, base_channels=8, channel_mult=(1, 2))
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  params = nn.unbox(net.init(jax.random.PRNGKey(0), jnp.asarray(x)))["params"]
  params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32), params)
  out = np.asarray(net.apply({"params": params}, jnp.asarray(x)))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  assert p["level1_down"]["kernel"].shape == (3, 3, 16, 16) and p["level1_conv"]["kernel"].shape == (3, 3, 8, 16)
  silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
  conv = lambda v, name, stride=1: np_conv3x3(v, p[name]["kernel"], p[name]["bias"], stride)  # noqa: E731
  group_norm = lambda v, name: np_group_norm(  # noqa: E731
      v, math.gcd(32, v.shape[-1]), p[name]["scale"], p[name]["bias"])
  h = conv(x.astype(np.float64), "conv_in")
  for level in range(2):
    h = conv(silu(conv(silu(group_norm(h, f"level{level}_norm")), f"level{level}_conv")), f"level{level}_down", 2)
  assert h.shape == (2, 2, 2, 16)
  v = silu(group_norm(h, "norm_out")).mean((1, 2)) @ p["dense_out"]["kernel"] + p["dense_out"]["bias"]
  np.testing.assert_allclose(out, np.sqrt(6) * v / np.linalg.norm(v, axis=1, keepdims=True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("condition", ["label", "text"])
def test_prior_network_against_numpy(condition):
  """The prior's MLP against NumPy: the sinusoidal embedding of t through two dense layers (SiLU between),
  plus the label's row of the table or the text embedding's dense projection, SiLU; then residual blocks
  h + W2 silu(W1 (LN(h)·(1 + scale) + shift)) with (scale, shift) from the embedding, and
  W_out silu(LN(h)). LayerNorm without scale or bias, epsilon 1e-6."""
  d, width = 4, 8
  net = EmbeddingPrior(d, width=width, num_layers=2, num_classes=3 if condition == "label" else 0,
                       text_dim=5 if condition == "text" else 0)
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(3, d)), jnp.float32)
  t = jnp.array([0, 37, 900])
  label = jnp.array([0, 3, 1]) if condition == "label" else None  # 3: the null label
  text = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) if condition == "text" else None
  params = nn.unbox(net.init(jax.random.PRNGKey(0), z, t, label, text))["params"]
  # Every weight perturbed: the output layers start at zero and the biases at 0.
  params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(np.float32), params)
  out = np.asarray(net.apply({"params": params}, z, t, label, text))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
  dense = lambda v, name: v @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731
  ln = lambda v: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)  # noqa: E731
  freqs = np.exp(-np.log(10000.0) * np.arange(width // 2) / (width // 2))
  args = np.asarray(t, np.float64)[:, None] * freqs
  emb = dense(silu(dense(np.concatenate([np.cos(args), np.sin(args)], axis=1), "time_dense1")), "time_dense2")
  if condition == "label":
    emb = emb + p["label_embed"]["embedding"][np.asarray(label)]
  else:
    emb = emb + dense(np.asarray(text, np.float64), "text_embed")
  emb = silu(emb)
  h = dense(np.asarray(z, np.float64), "dense_in")
  for i in range(2):
    scale_shift = dense(emb, f"block{i}_emb")
    y = ln(h) * (1 + scale_shift[:, :width]) + scale_shift[:, width:]
    h = h + dense(silu(dense(y, f"block{i}_dense1")), f"block{i}_dense2")
  np.testing.assert_allclose(out, dense(silu(ln(h)), "dense_out"), rtol=1e-4, atol=1e-4)


def test_the_prior_learns_the_ema_encoders_embeddings_under_its_dropped_labels(embedding_setup):
  """The prior's term of the loss: the ε loss (``diffusion.denoising_loss``) of the prior on the EMA encoder's
  embeddings of the key frames, each repeated train.prior_repeats times, at the drawn ``prior_t`` and
  ``prior_noise``, with the clip label replaced by the null label (num_classes) where ``prior_drop`` is set.
  The live encoder does not enter it (replacing it leaves the term as it was), the EMA one does."""
  from videofusion_jax.models.factory import make_prior_fn
  from videofusion_jax.training.step import draw_randomness, loss_on_draws

  e, params, batch = embedding_setup
  c = e.config
  draws, dropout_rng = draw_randomness(e, jax.random.PRNGKey(4), batch["video"].shape)
  repeats, num_classes = c.train.prior_repeats, c.data.num_classes
  drop = np.asarray(draws["prior_drop"]).reshape(-1)
  assert 0 < drop.sum() < drop.size  # label_dropout = 0.5: some rows of each kind
  labels = np.where(drop, num_classes, np.repeat(np.asarray(batch["label"]), repeats))
  rng = np.random.default_rng(1)
  other_encoder = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(np.float32), params["encoder"])
  ema = {**params, "encoder": other_encoder}

  @jax.jit
  def prior_terms(p, ema_params):
    return loss_on_draws(p, e, batch, draws, dropout_rng, ema_params)[1]["loss_prior"]

  @jax.jit
  def expected(p, encoder_params):
    target = jnp.repeat(e.encode({"encoder": encoder_params}, batch["video"][:, 2]), repeats, axis=0)
    return diffusion.denoising_loss(make_prior_fn(e.networks, p, jnp.asarray(labels)), target,
                                    draws["prior_t"].reshape(-1), draws["prior_noise"].reshape(-1, target.shape[1]),
                                    e.prior_schedule)

  want = float(expected(params, other_encoder))
  np.testing.assert_allclose(prior_terms(params, ema), want, rtol=1e-5)
  np.testing.assert_allclose(prior_terms({**params, "encoder": ema["encoder"]}, ema), want, rtol=1e-5)
  assert abs(float(expected(params, params["encoder"])) - want) > 1e-3 * want  # control: the encoder matters
