"""Text-to-video: the prior on a caption's CLIP text embedding, its guidance, and prompts."""
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from videofusion_jax import diffusion
from videofusion_jax.config import ConfigError, validate
from videofusion_jax.models.prior import EmbeddingPrior


def test_text_prior_learns_a_linear_map_from_text_to_image_embeddings():
  """Pairs (text t, image c) with t on a circle in 4-D (t = 2(cos θ, sin θ, 0, 0), θ uniform) and
  c = A t + 0.3 ε in 2-D, 10% of the texts dropped to the null text (zeros). The prior's DDIM
  samples (η = 1, 100 steps; 2000 each) for four texts, three of them at angles never drawn exactly
  in training, have mean A t within 0.1 (the standard error is under 0.01) and covariance 0.09 I
  within 25% (relative Frobenius error); the null text samples the marginal: mean within 0.15 of 0,
  and a spread (trace of the covariance) at least twice the conditional one."""
  d_text, d, n = 4, 2, 2000
  a = jnp.array([[1.0, 0.5, 0.3, -0.2], [-0.4, 1.2, 0.0, 0.7]])
  schedule = diffusion.make_schedule("cosine", 1000)
  net = EmbeddingPrior(d, width=64, num_layers=2, text_dim=d_text)
  params = nn.unbox(net.init(jax.random.PRNGKey(0), jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32),
                             text=jnp.zeros((1, d_text)))["params"])
  steps, batch = 2000, 256
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  def text_at(theta):
    return 2.0 * jnp.stack([jnp.cos(theta), jnp.sin(theta), 0 * theta, 0 * theta], axis=-1)

  @jax.jit
  def train(params):
    def step(carry, rng):
      params, opt = carry
      r_theta, r_c, r_t, r_n, r_drop = jax.random.split(rng, 5)
      text = text_at(jax.random.uniform(r_theta, (batch,), maxval=2 * jnp.pi))
      c = text @ a.T + 0.3 * jax.random.normal(r_c, (batch, d))
      text = jnp.where(jax.random.bernoulli(r_drop, 0.1, (batch, 1)), 0.0, text)
      t = diffusion.sample_timesteps(r_t, batch, schedule.num_timesteps)
      loss, g = jax.value_and_grad(lambda p: diffusion.denoising_loss(
          lambda z, tt: net.apply({"params": p}, z, tt, text=text), c, t, jax.random.normal(r_n, c.shape),
          schedule))(params)
      updates, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, updates), opt), loss
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.PRNGKey(1), steps))
    return params, losses

  params, losses = train(params)
  assert abs(float(losses[0]) - 1.0) < 0.2 and float(losses[-200:].mean()) < 0.5

  @jax.jit
  def sample(rng, text):
    texts = jnp.broadcast_to(text, (n, d_text))
    return diffusion.sample_embeddings(lambda z, t: net.apply({"params": params}, z, t, text=texts),
                                       rng, (n, d), schedule, num_steps=100, eta=1.0)

  spreads = []
  for i, theta in enumerate([0.0, 0.9, 2.5, 4.2]):
    text = text_at(jnp.float32(theta))
    s = np.asarray(sample(jax.random.PRNGKey(10 + i), text))
    mean = np.asarray(a @ text)
    assert np.all(np.abs(s.mean(0) - mean) < 0.1), (theta, s.mean(0), mean)
    rel = np.linalg.norm(np.cov(s.T) - 0.09 * np.eye(d)) / np.linalg.norm(0.09 * np.eye(d))
    assert rel < 0.25, (theta, np.cov(s.T))
    spreads.append(np.trace(np.cov(s.T)))
  s = np.asarray(sample(jax.random.PRNGKey(20), jnp.zeros((d_text,))))
  assert np.all(np.abs(s.mean(0)) < 0.15), s.mean(0)
  assert np.trace(np.cov(s.T)) > 2 * max(spreads)


def test_the_text_priors_term_reads_each_rows_caption_and_the_null_text_where_dropped():
  """The prior's term of the training loss for a prior on text (the step's own, not a loop of the test's): the
  ε loss of the prior given each row's caption embedding on the sphere, repeated train.prior_repeats times, and
  the null text (zeros) where ``prior_drop`` is set, on the stored CLIP embeddings of the key frames; computed
  here from the prior network and diffusion.denoising_loss. Controls: the captions moved to other rows, and no
  row dropped, each change it."""
  from conftest import one_device

  from videofusion_jax.experiment import Experiment
  from videofusion_jax.models.encoder import to_sphere
  from videofusion_jax.models.factory import make_prior_fn
  from videofusion_jax.training.step import draw_randomness, loss_on_draws

  c = tiny_config(**{"model.prior.condition": "text", "model.encoder.kind": "clip", "train.label_dropout": 0.5})
  e = Experiment(c, mesh=one_device(c))
  leaves, tree = jax.tree.flatten(e.init_state(0).params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  width, repeats, n = c.model.encoder.embed_dim, c.train.prior_repeats, c.data.num_frames
  batch = {"video": jnp.asarray(rng.uniform(-1, 1, (8, n, 8, 8, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, 8), jnp.int32),
           "frame_embeddings": jnp.asarray(rng.normal(size=(8, n, width)), jnp.float32),
           "caption_embeddings": jnp.asarray(rng.normal(size=(8, width)), jnp.float32)}
  draws, dropout_rng = draw_randomness(e, jax.random.PRNGKey(4), batch["video"].shape)
  drop = np.asarray(draws["prior_drop"]).reshape(-1)
  assert 0 < drop.sum() < drop.size  # label_dropout = 0.5: rows of each kind

  @jax.jit
  def expected(captions, dropped):
    text = jnp.where(dropped[:, None], 0.0, jnp.repeat(to_sphere(captions), repeats, axis=0))
    target = jnp.repeat(to_sphere(batch["frame_embeddings"][:, diffusion.key_frame_index(n)]), repeats, axis=0)
    return diffusion.denoising_loss(make_prior_fn(e.networks, params, None, text), target,
                                    draws["prior_t"].reshape(-1), draws["prior_noise"].reshape(-1, width),
                                    e.prior_schedule)

  got = float(jax.jit(lambda p: loss_on_draws(p, e, batch, draws, dropout_rng, p)[1]["loss_prior"])(params))
  want = float(expected(batch["caption_embeddings"], jnp.asarray(drop)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(expected(batch["caption_embeddings"][::-1], jnp.asarray(drop))) - want) > 1e-3 * want
  assert abs(float(expected(batch["caption_embeddings"], jnp.zeros_like(jnp.asarray(drop)))) - want) > 1e-3 * want


def test_guidance_scale_one_is_plain_conditional_sampling_on_text():
  """The guided estimate on a text embedding (its batch doubled with the null text) equals the
  conditional estimate at scale 1, and differs from it at scale 3; sample_condition at
  prior_guidance_scale 1 and the explicit guided path at scale 1 give the same embeddings."""
  import types

  from videofusion_jax.models.factory import make_networks, make_prior_fn
  from videofusion_jax.sampling import prior_eps_fn

  c = tiny_config(**{"data.num_classes": 0, "model.encoder.kind": "clip", "model.prior.condition": "text"})
  validate(c)
  e = types.SimpleNamespace(config=c, networks=make_networks(c))  # what prior_eps_fn reads of an experiment
  d = c.model.encoder.embed_dim
  prior = nn.unbox(e.networks["prior"].init(jax.random.PRNGKey(0), jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32),
                                            text=jnp.zeros((1, d)))["params"])
  leaves, tree = jax.tree.flatten(prior)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = {"prior": jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])}
  text = jax.random.normal(jax.random.PRNGKey(2), (5, d))
  z, t = jax.random.normal(jax.random.PRNGKey(3), (5, d)), jnp.array([10, 200, 500, 800, 999])
  plain = make_prior_fn(e.networks, params, None, text)(z, t)
  doubled = make_prior_fn(e.networks, params, None, jnp.concatenate([text, jnp.zeros_like(text)]))
  np.testing.assert_allclose(diffusion.guided_eps(doubled, z, t, scale=1.0), plain, atol=1e-5)
  null = make_prior_fn(e.networks, params, None, jnp.zeros_like(text))(z, t)
  assert np.abs(np.asarray(null - plain)).max() > 1e-3  # the text matters
  guided3 = diffusion.guided_eps(doubled, z, t, scale=3.0)
  np.testing.assert_allclose(guided3, null + 3.0 * (plain - null), atol=1e-5)
  np.testing.assert_allclose(prior_eps_fn(e, params, None, text)(z, t), plain, atol=1e-6)  # scale 1 in config
  c.sample.prior_guidance_scale = 3.0
  np.testing.assert_allclose(prior_eps_fn(e, params, None, text)(z, t), guided3, atol=1e-5)


def test_a_text_models_videos_carry_no_label_the_model_did_not_read():
  """On the demo clips a text model's videos are matched to the clip each prompt describes (the reference of the
  demo's figures): its sidecar says ``reference_clip``, not ``label``, and its file name no ``_labelL`` (both read
  as the condition of a model that reads none); a label-conditioned model's keep theirs."""
  from videofusion_jax.sampling import label_fields

  text = tiny_config(**{"data.num_classes": 0, "model.encoder.kind": "clip", "model.prior.condition": "text"})
  assert label_fields(text, 2) == ("", {"label": None, "reference_clip": 2})
  assert label_fields(tiny_config(), 2) == ("_label2", {"label": 2})
  assert label_fields(text, None) == label_fields(tiny_config(), None) == ("", {"label": None})


def test_prompt_settings_get_one_clear_message_each(tmp_path, capsys):
  from videofusion_jax.sampling import sample_prompts

  text = {"data.num_classes": 0, "model.encoder.kind": "clip", "model.prior.condition": "text"}
  with pytest.raises(ConfigError, match="does not generate from text"):
    validate(tiny_config(**{"sample.prompt": "a dog"}))
  with pytest.raises(ConfigError, match="set --config.model.encoder.kind=clip"):
    validate(tiny_config(**{"model.prior.condition": "text"}))
  with pytest.raises(ConfigError, match="use 'label' .* or 'text'"):
    validate(tiny_config(**{"model.prior.condition": "caption"}))
  with pytest.raises(ConfigError, match="give --config.sample.prompt="):
    sample_prompts(tiny_config(**text), 3)
  with pytest.raises(ConfigError, match="cannot read it"):
    sample_prompts(tiny_config(**text, **{"sample.prompts_file": str(tmp_path / "none.txt")}), 3)
  (tmp_path / "blank.txt").write_text("\n  \n")
  with pytest.raises(ConfigError, match="holds no prompt"):
    sample_prompts(tiny_config(**text, **{"sample.prompts_file": str(tmp_path / "blank.txt")}), 3)
  (tmp_path / "p.txt").write_text(" one \n\ntwo\n")
  assert sample_prompts(tiny_config(**text, **{"sample.prompts_file": str(tmp_path / "p.txt")}), 5) == \
      ["one", "two", "one", "two", "one"]
  capsys.readouterr()
  assert sample_prompts(tiny_config(**text, **{"sample.prompts_file": str(tmp_path / "p.txt")}), 1) == ["one"]
  assert "holds 2 prompts and 1 sample(s) are drawn, one prompt each in turn: the last 1 prompt(s) are not used" \
      in capsys.readouterr().out
  assert sample_prompts(tiny_config(), 3) is None
  assert json.loads(json.dumps(sample_prompts(tiny_config(**text, **{"sample.prompt": "x"}), 2))) == ["x", "x"]
  # A prompt given replaces the prompts file a config sets (configs/demo.py:text refused the README's
  # --config.sample.prompt): the file is not read, and a note says so.
  from demo import get_config as demo_config
  c = demo_config("text")
  c.sample.prompt = "a dog runs"
  validate(c)
  assert Path(c.sample.prompts_file).is_file()
  assert sample_prompts(c, 2) == ["a dog runs", "a dog runs"]
  assert "config.sample.prompts_file=" in capsys.readouterr().out
  # A file saved with a byte-order mark gives the same prompts as without it.
  (tmp_path / "bom.txt").write_bytes("\ufeffone\ntwo\n".encode("utf-8"))
  assert sample_prompts(tiny_config(**text, **{"sample.prompts_file": str(tmp_path / "bom.txt")}), 2) == \
      ["one", "two"]
  # Lines end at line ends alone (str.splitlines cut a prompt at U+2028, U+0085 or a form feed, and miscounted).
  (tmp_path / "pasted.txt").write_text("a dog runs\r\na cat sleeps\u2028on a sofa\nwaves\x0cat night\x85\n",
                                       encoding="utf-8")
  assert sample_prompts(tiny_config(**text, **{"sample.prompts_file": str(tmp_path / "pasted.txt")}), 3) == \
      ["a dog runs", "a cat sleeps\u2028on a sofa", "waves\x0cat night"]  # (U+0085 ends it: whitespace, stripped)
  # A prompt in bytes of another encoding (Latin-1 'café' on the command line, kept by Python as a surrogate): one
  # message (it was a traceback from the tokenizer, after the checkpoint was restored).
  with pytest.raises(ConfigError, match="config.sample.prompt holds bytes that are not UTF-8"):
    sample_prompts(tiny_config(**text, **{"sample.prompt": os.fsdecode(b"caf\xe9")}), 2)
