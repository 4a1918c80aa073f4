"""Sampling from a checkpoint, the written files, and the demo's figures."""
import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import imageio.v3 as iio
import jax
import numpy as np
import pytest
from conftest import ROOT, one_device, tiny_config
from test_data import stored_videos
from test_training import _perturbed, batches

from videofusion_jax import sampling
from videofusion_jax.config import ConfigError
from videofusion_jax.data import pipeline, video_io
from videofusion_jax.evaluation.demo_metrics import (
    all_frame_accuracy,
    boundary_jump,
    demo_figures,
    key_frame_distance,
    motion,
)
from videofusion_jax.experiment import Experiment
from videofusion_jax.models.encoder import to_sphere
from videofusion_jax.training.loop import train
from videofusion_jax.training.step import Trainer


def _real_clips(rng):
  """Nine fabricated clips of 5 frames, three per label, each a slow drift of its own picture."""
  start = rng.uniform(-1, 1, (9, 1, 4, 4, 3))
  drift = np.linspace(0, 0.2, 5)[None, :, None, None, None] * rng.uniform(-1, 1, (9, 1, 4, 4, 3))
  return np.clip(start + drift, -1, 1), np.repeat(np.arange(3), 3)


def test_demo_figures_cannot_be_won_by_a_trivial_output():
  rng = np.random.default_rng(0)
  real, real_labels = _real_clips(rng)
  # A copy of the real clips: every frame is found in its own clip, and the motion is the real one.
  copy = demo_figures(real, real_labels, real, real_labels)
  assert copy["all_frame_accuracy"] == 1.0
  assert copy["motion_ratio"] == pytest.approx(1.0) and copy["key_distance_ratio"] == pytest.approx(1.0)
  # A frozen video (the real key frame held for every frame) has no motion at all.
  frozen = np.repeat(real[:, 2:3], 5, axis=1)
  figures = demo_figures(frozen, real_labels, real, real_labels)
  assert figures["motion_ratio"] == 0.0 and figures["key_distance_ratio"] == 0.0
  # Frames drawn from another label's clip score 0, whatever their motion.
  wrong = demo_figures(real, (real_labels + 1) % 3, real, real_labels)
  assert wrong["all_frame_accuracy"] == 0.0 and wrong["motion_ratio"] == pytest.approx(1.0)
  # A memorised key frame with noise elsewhere (what the old key-frame-only figure scored 100%).
  noisy = rng.uniform(-1, 1, real.shape)
  noisy[:, 2] = real[:, 2]
  assert demo_figures(noisy, real_labels, real, real_labels)["all_frame_accuracy"] < 0.7
  assert set(copy["per_sample"]) == {"motion", "key_distance", "all_frame_accuracy", "label", "copy_distance"}
  assert len(copy["per_sample"]["all_frame_accuracy"]) == 9
  # The figures above are all won by copying; the copy distance shows the copy (0), whereas the
  # real clips' distance to their nearest other clip (leave-one-out) is the brute-force minimum.
  assert copy["copy_distance_generated"] == 0.0
  loo = [min(np.abs(a - b).mean() for j, b in enumerate(real) if j != i) for i, a in enumerate(real)]
  assert copy["copy_distance_real"] == pytest.approx(np.mean(loo), rel=1e-5) and np.mean(loo) > 0.05
  # The frozen clips' distance to their nearest real clip, by brute force (each frozen clip is the key frame
  # of a real one held: never 0, since the real clips drift).
  near = [min(np.abs(f - r).mean() for r in real) for f in frozen]
  assert figures["copy_distance_generated"] == pytest.approx(np.mean(near), rel=1e-5) and np.mean(near) > 0
  # Unconditional samples are scored against the clip of their key frame's nearest real frame.
  uncond = demo_figures(real, None, real, real_labels)
  assert uncond["all_frame_accuracy"] == 1.0 and uncond["per_sample"]["label"] == real_labels.tolist()
  assert uncond["accuracy_against"] == "key frame's nearest clip"
  # ... over the frames other than the key frame, which finds its own clip whatever the rest: a real key frame
  # among another label's frames scores 0 (1/5 when the key frame counted).
  mixed = real[np.roll(np.arange(9), 3)].copy()
  mixed[:, 2] = real[:, 2]
  mixed_figures = demo_figures(mixed, None, real, real_labels)
  assert mixed_figures["all_frame_accuracy"] == 0.0 and mixed_figures["per_sample"]["label"] == real_labels.tolist()


def test_one_real_clip_gives_null_not_infinity():
  """With one real clip there is no other clip to be near: the real clips' copy distance is null, and
  the figures are strict JSON; the rest are still the brute-force values."""
  rng = np.random.default_rng(2)
  real, samples = rng.uniform(-1, 1, (1, 5, 4, 4, 3)), rng.uniform(-1, 1, (3, 5, 4, 4, 3))
  figures = demo_figures(samples, np.zeros(3, int), real, np.zeros(1, int))
  assert figures["copy_distance_real"] is None
  assert json.loads(json.dumps(figures, allow_nan=False)) == figures
  assert figures["copy_distance_generated"] == pytest.approx(np.mean([np.abs(s - real[0]).mean() for s in samples]))
  assert figures["all_frame_accuracy"] == 1.0  # every frame's nearest real frame is in the one clip


def test_demo_figures_against_brute_force():
  rng = np.random.default_rng(1)
  real, real_labels = _real_clips(rng)
  samples = rng.uniform(-1, 1, (4, 5, 4, 4, 3))
  labels = np.array([0, 1, 2, 0])
  pool = [(r[f], lab) for r, lab in zip(real, real_labels) for f in range(5)]
  hits = [[pool[int(np.argmin([np.sum((s[f] - p) ** 2) for p, _ in pool]))][1] == lab for f in range(5)]
          for s, lab in zip(samples, labels)]
  np.testing.assert_allclose(all_frame_accuracy(samples, labels, real, real_labels)[0], np.mean(hits, axis=1))
  expected = [np.mean([np.abs(v[i + 1] - v[i]).mean() for i in range(4)]) for v in samples]
  np.testing.assert_allclose(motion(samples), expected)
  expected = [np.mean([np.abs(v[i] - v[2]).mean() for i in (0, 1, 3, 4)]) for v in samples]
  np.testing.assert_allclose(key_frame_distance(samples), expected)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  config = tiny_config(**{"data.data_dir": tfds_dir, "train.num_steps": 2})
  workdir = tmp_path_factory.mktemp("run")
  trainer = Trainer(config, mesh=one_device(config))
  train(config, workdir, iter(batches(config, 2)), trainer=trainer, verbose=False)
  return config, workdir, trainer


def _uint8(videos: np.ndarray) -> np.ndarray:
  """[-1, 1] -> [0, 255] as the written files show them: round((x + 1) * 127.5), clipped (video_io.to_uint8)."""
  return np.clip(np.round((np.asarray(videos, np.float32) + 1) * np.float32(127.5)), 0, 255).astype(np.uint8)


def _assert_files_show(out: Path, names: list[str], videos: np.ndarray, upscale: int) -> None:
  """The files written for ``videos`` ``(B, N, H, W, 3)`` in [-1, 1] show their pixels: each GIF its video's
  uint8 frames exactly (a GIF of at most 256 colours a frame is lossless), grid.png those frames with a row per
  video and a column per frame, each upscaled ``upscale`` times (nearest), 1 white pixel around and between the
  cells; each mp4 (H.264, lossy) is nearer its own video than any other."""
  frames = np.repeat(np.repeat(_uint8(videos), upscale, axis=2), upscale, axis=3)
  b, n, h, w, _ = frames.shape
  for name, video in zip(names, frames):
    np.testing.assert_array_equal(iio.imread(out / f"{name}.gif", index=None), video, err_msg=name)
  grid = iio.imread(out / "grid.png")
  assert grid.shape == (b * (h + 1) + 1, n * (w + 1) + 1, 3)
  cells = grid[1:, 1:].reshape(b, h + 1, n, w + 1, 3)
  np.testing.assert_array_equal(cells[:, :h, :, :w].transpose(0, 2, 1, 3, 4), frames)
  white = np.ones(grid.shape[:2], bool)
  for i in range(b):
    for j in range(n):
      white[1 + i * (h + 1):(i + 1) * (h + 1), 1 + j * (w + 1):(j + 1) * (w + 1)] = False
  assert (grid[white] == 255).all()
  decoded = np.stack([iio.imread(out / f"{name}.mp4", plugin="pyav") for name in names]).astype(np.float64)
  assert decoded.shape == frames.shape
  dist = np.abs(decoded[:, None] - frames[None].astype(np.float64)).mean(axis=(2, 3, 4, 5))
  np.testing.assert_array_equal(np.argmin(dist, axis=1), np.arange(b), err_msg=f"mp4 x video distances {dist}")


def test_sample_mode_writes_videos_grid_and_figures(trained):
  config, workdir, trainer = trained
  results = sampling.run(config, str(workdir), experiment=trainer)
  out = workdir / "samples" / "step_2"
  mp4s = sorted(out.glob("sample_*.mp4"))
  assert [p.name for p in mp4s] == ["sample_000_label0.mp4", "sample_001_label1.mp4", "sample_002_label2.mp4"]
  frames = iio.imread(mp4s[0], plugin="pyav")
  assert frames.shape == (config.data.num_frames, 8, 8, 3)
  assert sorted(p.stem for p in out.glob("sample_*.gif")) == sorted(p.stem for p in out.glob("sample_*.json")) \
      == [p.stem for p in mp4s]
  grid = iio.imread(out / "grid.png")
  assert grid.shape == (3 * 9 + 1, 4 * 9 + 1, 3)
  saved = json.loads((out / "results.json").read_text())
  assert saved == results
  npz = np.load(out / "samples.npz")
  videos = npz["videos"]
  assert np.abs(videos).max() <= 1.0 and npz["labels"].tolist() == [0, 1, 2]
  _assert_files_show(out, [p.stem for p in mp4s], videos, config.sample.upscale)
  width = config.model.encoder.embed_dim  # the prior's samples, on the encoders' sphere
  assert npz["embeddings"].shape == (3, width)
  np.testing.assert_allclose(np.linalg.norm(npz["embeddings"], axis=1), np.sqrt(width), rtol=1e-5)
  assert results["motion_generated"] == pytest.approx(np.abs(videos[:, 1:] - videos[:, :-1]).mean(), rel=1e-5)
  assert results["per_sample"]["label"] == [0, 1, 2] and len(results["per_sample"]["motion"]) == 3
  # The figures against the real clips, rebuilt from the stored frames: the sample.num_real_clips clips of
  # the evaluation protocol (eval_plan), each frames first, first + 2, ... of its video, area-resized.
  stored, stored_labels = stored_videos(config.data, config.data.image_size)
  span = (config.data.num_frames - 1) * config.data.frame_stride + 1
  records, firsts = pipeline.eval_plan(config.sample.num_real_clips, np.arange(len(stored)),
                                       np.array([len(v) for v in stored]), span)
  real = np.stack([stored[r][f:f + span:config.data.frame_stride] for r, f in zip(records, firsts)])
  real_labels = stored_labels[records]
  # Motion: the mean |frame[n+1] - frame[n]| of the real clips.
  assert results["motion_real"] == pytest.approx(np.abs(real[:, 1:] - real[:, :-1]).mean(), rel=1e-4)
  # All-frame accuracy: the share of generated frames whose nearest (L2) real frame is in a clip of their label.
  pool, pool_labels = real.reshape(-1, *real.shape[2:]), np.repeat(real_labels, real.shape[1])
  hits = [[pool_labels[np.argmin(((pool - frame) ** 2).sum(axis=(1, 2, 3)))] == label for frame in video]
          for video, label in zip(videos.astype(np.float64), [0, 1, 2])]
  np.testing.assert_allclose(results["per_sample"]["all_frame_accuracy"], np.mean(hits, axis=1))
  assert results["all_frame_accuracy"] == pytest.approx(np.mean(hits))


def test_samples_are_reproducible_from_the_seed(trained):
  config, workdir, trainer = trained
  params = trainer.init_state(0).params
  params = jax.tree.map(lambda p: p + 0.05, params)
  labels = np.array([0, 1, 2], np.int32)
  a = sampling.generate_videos(trainer, params, 3, seed=1, labels=labels)
  b = sampling.generate_videos(trainer, params, 3, seed=1, labels=labels)
  c = sampling.generate_videos(trainer, params, 3, seed=2, labels=labels)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert a.shape == (3, 4, 8, 8, 3) and np.abs(a).max() <= 1.0


def test_float16_samples_are_the_float32_ones_within_its_rounding(trained):
  """A model sampled in float16 (any trained model: model.dtype is not a trained setting), the same
  weights, seed and labels: the videos of the float32 sampler within float16's rounding (measured: mean
  |difference| 2e-4, max 0.015; bfloat16's 0.0026 and 0.10, 3 mantissa bits fewer). Not equal: the
  networks ran in float16 (the U-Nets' attention through models.unet.attention, which the CPU lowers)."""
  config, _, trainer = trained
  params = jax.tree.map(lambda p: p + 0.05, trainer.init_state(0).params)
  labels = np.array([0, 1, 2], np.int32)
  want = sampling.generate_videos(trainer, params, 3, seed=1, labels=labels)
  half = copy.deepcopy(config)
  half.model.dtype = "float16"
  got = sampling.generate_videos(Experiment(half, mesh=one_device(half)), params, 3, seed=1, labels=labels)
  difference = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
  assert 0 < difference.mean() < 1e-3 and difference.max() < 0.05, (difference.mean(), difference.max())


def test_each_rows_keys_are_three_streams_of_the_seed_by_its_indices():
  """``row_keys``: the base noise's and the prior's keys from the row's content index, the residual noise's
  from its motion index, each index folded into its own stream of the seed (streams 0, 1, 2): a row's three
  keys are distinct (one key for two draws would repeat the base noise's numbers in the prior's), rows with
  one content index share the base and prior keys, rows with one motion index the residual key."""
  root = jax.random.PRNGKey(5)
  content, motion = np.array([0, 0, 3]), np.array([2, 4, 2])
  base, residual, prior = (np.asarray(k) for k in sampling.row_keys(5, content, motion))
  for keys, stream, index in ((base, 0, content), (residual, 1, motion), (prior, 2, content)):
    expected = [np.asarray(jax.random.fold_in(jax.random.fold_in(root, stream), int(i))) for i in index]
    np.testing.assert_array_equal(keys, np.stack(expected))
  for i in range(3):
    assert len({tuple(base[i]), tuple(residual[i]), tuple(prior[i])}) == 3


def _rows_drawn(monkeypatch) -> list[int]:
  """The batch of every call of the generator, recorded (its keys' rows)."""
  rows, make = [], sampling.make_generate_fn

  def spy(experiment):
    generate = make(experiment)

    def call(params, keys, *args):
      rows.append(keys[0].shape[0])
      return generate(params, keys, *args)
    return call
  monkeypatch.setattr(sampling, "make_generate_fn", spy)
  return rows


def test_fewer_videos_than_the_batch_draw_only_their_rows(trained, monkeypatch):
  """One video with sample.batch_size=3 runs a chain of 1 row, not 3, and it is the very video the batch
  of 3 draws first (each row's noise comes from its own keys). Evaluation's batches keep one shape,
  the last padded: one compiled chain, not a second for the remainder."""
  config, _, trainer = trained
  params = jax.tree.map(lambda p: p + 0.05, trainer.init_state(0).params)
  labels = np.array([0, 1, 2], np.int32)
  rows = _rows_drawn(monkeypatch)
  alone = sampling.generate_videos(trainer, params, 1, seed=1, labels=labels[:1])
  batch = sampling.generate_videos(trainer, params, 3, seed=1, labels=labels)
  assert rows == [1, 3] and config.sample.batch_size == 3
  np.testing.assert_allclose(alone[0], batch[0], atol=1e-5)  # the same to float rounding (3e-6 seen)
  assert sampling.describe_batch(trainer, 1) == "1 at a time (the 1 video(s) wanted, fewer than sample.batch_size=3)"
  rows.clear()
  got, drawn, generate = [], [], sampling.generate_videos

  def recorded(experiment, params, num, seed, labels, **kwargs):
    drawn.append((kwargs["first"], labels.tolist()))
    return generate(experiment, params, num, seed, labels, **kwargs)

  monkeypatch.setattr(sampling, "generate_videos", recorded)
  sampling.generated_videos(trainer, params, 4, 1, np.array([0, 1, 2, 1], np.int32), got.append)
  assert rows == [3, 3] and [len(v) for v in got] == [3, 1]
  np.testing.assert_allclose(got[0], batch, atol=1e-6)
  # The second batch is video 3 of the seed with its own label (the labels hardly change this model's videos:
  # which reach the sampler is checked), not video 0 again nor the first batch's label.
  assert drawn == [(0, [0, 1, 2]), (3, [1])]
  fourth = generate(trainer, params, 1, seed=1, labels=np.array([1], np.int32), first=3)
  np.testing.assert_allclose(got[1], fourth, atol=1e-4)  # 1.5e-5 seen
  assert np.abs(got[1][0] - batch[0]).max() > 1e-2  # control: another video


def test_guided_sampling_at_scale_zero_is_null_conditioned_sampling(trained, tfds_dir):
  """Guidance over the whole estimate through --mode=sample's path (the doubled batch): s = 0
  samples exactly as the model given the null condition does: zeros for c (the embedding
  condition, here given instead of the prior's), the null label for the label condition. (s = 1
  against the conditional estimate, and other scales: test_training.test_guidance_mixes_whole_decomposed_estimates.)"""
  config, _, trainer = trained
  params = jax.tree.map(lambda p: p + 0.05, trainer.init_state(0).params)
  labels = np.array([0, 1, 2], np.int32)
  emb = np.asarray(to_sphere(jax.random.normal(jax.random.PRNGKey(0), (3, config.model.encoder.embed_dim))))
  zero_config = tiny_config(**{"data.data_dir": tfds_dir, "sample.guidance_scale": 0.0})
  zero = Experiment(zero_config, mesh=one_device(zero_config))
  assert sampling.guided(zero.config) and not sampling.guided(trainer.config)
  guided = sampling.generate_videos(zero, params, 3, seed=1, labels=labels, condition=emb)
  np.testing.assert_allclose(guided, sampling.generate_videos(trainer, params, 3, seed=1, labels=labels,
                                                              condition=np.zeros_like(emb)), atol=1e-4)
  # Control: the conditioned samples are far from the null-conditioned ones.
  assert np.abs(guided - sampling.generate_videos(trainer, params, 3, seed=1, labels=labels,
                                                  condition=emb)).max() > 1e-2

  # The label condition: s = 0 is sampling with the null label.
  one, zero = (Experiment(c, mesh=one_device(c)) for c in (
      tiny_config(**{"data.data_dir": tfds_dir, "model.condition": "label", "sample.guidance_scale": s})
      for s in (1.0, 0.0)))
  params = jax.tree.map(lambda p: p + 0.05, one.init_state(0).params)
  guided = sampling.generate_videos(zero, params, 3, seed=1, labels=labels)
  null = np.full(3, config.data.num_classes, np.int32)
  np.testing.assert_allclose(guided, sampling.generate_videos(one, params, 3, seed=1, labels=null), atol=1e-4)
  assert np.abs(guided - sampling.generate_videos(one, params, 3, seed=1, labels=labels)).max() > 1e-2


def test_the_prior_draws_each_rows_condition_from_its_label_and_guides_on_it(trained, tfds_dir):
  """--mode=sample's path (generate_videos): the c both generators get is the prior's chain for the row's
  label with the row's prior key, computed here from the prior network and the embedding sampler; another
  label gives another c (a prior that ignored the labels passed every test before). A prior guided on the
  label (sample.prior_guidance_scale = s) estimates null + s (cond - null), the null label num_classes."""
  import jax.numpy as jnp

  from videofusion_jax import diffusion
  from videofusion_jax.models.factory import make_prior_fn

  config, _, trainer = trained
  # Every weight moved by its own N(0, 0.05²): a constant shift of all weights (p + 0.05) makes each
  # zero-initialised output layer a constant matrix, whose estimate hardly depends on its conditions.
  params = _perturbed(trainer, 5).params
  labels = np.array([0, 1, 2], np.int32)
  _, used = sampling.generate_videos(trainer, params, 3, seed=4, labels=labels, with_condition=True)
  prior_keys = sampling.row_keys(4, np.arange(3), np.arange(3))[2]
  s, width = config.sample, config.model.encoder.embed_dim

  def prior_chain(row_labels):
    prior_fn = make_prior_fn(trainer.networks, params, jnp.asarray(row_labels))
    return np.asarray(to_sphere(diffusion.sample_embeddings(
        prior_fn, None, (3, width), trainer.prior_schedule, num_steps=s.prior_num_steps, eta=s.prior_eta,
        row_keys=(prior_keys, None), spacing=s.prior_spacing)))
  np.testing.assert_allclose(used, prior_chain(labels), atol=1e-4)
  assert np.abs(prior_chain(np.zeros(3, np.int32))[1:] - used[1:]).max() > 1e-2  # control: the label matters

  g_config = tiny_config(**{"data.data_dir": tfds_dir, "sample.prior_guidance_scale": 3.0})
  guided_prior = Experiment(g_config, mesh=one_device(g_config))
  z = jax.random.normal(jax.random.PRNGKey(1), (3, width))
  t = jnp.array([10, 30, 60])
  eps = sampling.prior_eps_fn(guided_prior, params, jnp.asarray(labels))(z, t)
  cond = make_prior_fn(guided_prior.networks, params, jnp.asarray(labels))(z, t)
  null = make_prior_fn(guided_prior.networks, params, jnp.full(3, config.data.num_classes, jnp.int32))(z, t)
  np.testing.assert_allclose(eps, null + 3.0 * (cond - null), atol=1e-5)
  assert np.abs(np.asarray(cond - null)).max() > 1e-2  # control: the null label's estimate is another


def test_the_clean_key_frame_the_residual_generator_reads_is_the_videos_own(tfds_dir):
  """model.key_frame_clean through --mode=sample's path (make_generate_fn): the residual generator reads the
  clean key frame of the video it returns (the first pass's, which the full chain's key frame equals): the
  chain run again here with that frame given to the residual generator gives the same video, and another
  frame (the first) gives another."""
  import functools

  import jax.numpy as jnp

  from videofusion_jax import diffusion

  c = tiny_config(**{"data.data_dir": tfds_dir, "model.key_frame_input": True, "model.key_frame_clean": True})
  experiment = Experiment(c, mesh=one_device(c))
  params = _perturbed(experiment, 5).params
  emb = np.asarray(to_sphere(jax.random.normal(jax.random.PRNGKey(0), (3, c.model.encoder.embed_dim))))
  videos = sampling.generate_videos(experiment, params, 3, seed=2, labels=None, condition=emb)
  base_keys, residual_keys, _ = sampling.row_keys(2, np.arange(3), np.arange(3))
  s, k = c.sample, diffusion.key_frame_index(c.data.num_frames)
  chain = functools.partial(diffusion.sample_chain, rng=None, shape=videos.shape, lambdas=experiment.lambdas,
                            schedule=experiment.schedule, method=s.method, num_steps=s.num_steps, eta=s.eta,
                            clip_x0=s.clip_x0, row_keys=(base_keys, residual_keys), spacing=s.spacing,
                            variance=s.variance)

  def with_key_frame(frame):
    return np.asarray(chain(sampling.video_eps_fn(experiment, params, None, jnp.asarray(emb),
                                                  key_frame=jnp.clip(jnp.asarray(frame), -1.0, 1.0))))
  np.testing.assert_allclose(with_key_frame(videos[:, k]), videos, atol=1e-4)
  assert np.abs(with_key_frame(videos[:, 0]) - videos).max() > 1e-2  # control: another frame read, another video


def test_given_embeddings_replace_the_prior_and_a_wrong_width_is_a_clear_error(trained, tmp_path):
  """--config.sample.embeddings=FILE.npy: the generators are conditioned on those embeddings (the
  prior is not run), which samples.npz keeps; a file of another width is refused with the width."""
  config, workdir, trainer = trained
  width = config.model.encoder.embed_dim
  given = np.asarray(to_sphere(jax.random.normal(jax.random.PRNGKey(5), (width,))))
  np.save(tmp_path / "c.npy", given)
  c = tiny_config(**{"data.data_dir": config.data.data_dir, "sample.embeddings": str(tmp_path / "c.npy")})
  out = Path(sampling.run(c, str(workdir), experiment=trainer)["dir"])
  npz = np.load(out / "samples.npz")
  np.testing.assert_allclose(npz["embeddings"], np.broadcast_to(given, (3, width)), rtol=1e-6)
  state = trainer.restore(workdir)
  direct = sampling.generate_videos(trainer, state.ema_params, 3, c.sample.seed, None,
                                    condition=np.broadcast_to(given, (3, width)))
  np.testing.assert_allclose(npz["videos"], direct, atol=1e-5)
  # Put on the sphere every training embedding lies on: a unit vector (CLIP's norm) gives the same c, and
  # a zero row stays the null condition; a run's samples.npz gives back the embeddings it used.
  np.save(tmp_path / "unit.npy", np.stack([given / np.sqrt(width), np.zeros(width), 3 * given]))
  c.sample.embeddings = str(tmp_path / "unit.npy")
  np.testing.assert_allclose(sampling.given_embeddings(c, 3), np.stack([given, np.zeros(width), given]), rtol=1e-5,
                             atol=1e-6)
  # Rows far from the unit scale: squared in float32, 1e20 overflowed (to the null condition) and 1e-9 fell
  # under the norm's floor; each is the same direction, √D long.
  g64 = given.astype(np.float64)
  np.save(tmp_path / "scales.npy", np.stack([g64 * 1e20, g64 * 1e-9, g64 * 1e-300]))
  c.sample.embeddings = str(tmp_path / "scales.npy")
  np.testing.assert_allclose(sampling.given_embeddings(c, 3), np.stack([given] * 3), rtol=1e-5, atol=1e-6)
  c.sample.embeddings = str(out / "samples.npz")
  np.testing.assert_allclose(sampling.given_embeddings(c, 3), npz["embeddings"], rtol=1e-5)
  np.savez(tmp_path / "other.npz", videos=np.zeros(3))
  c.sample.embeddings = str(tmp_path / "other.npz")
  with pytest.raises(ConfigError, match=r"a \.npz without an 'embeddings' array \(it holds \['videos'\]\)") as e:
    sampling.given_embeddings(c, 3)
  assert "cannot read" not in str(e.value)
  np.savez(tmp_path / "label_model.npz", embeddings=np.zeros(0))  # a label-conditioned run's samples.npz
  c.sample.embeddings = str(tmp_path / "label_model.npz")
  with pytest.raises(ConfigError, match="holds no embeddings"):
    sampling.given_embeddings(c, 3)
  # A copy cut short (a traceback of zipfile's or numpy's before), or empty.
  whole = (tmp_path / "label_model.npz").read_bytes()
  for name, data in (("cut.npz", whole[:len(whole) // 2]), ("empty.npy", b"")):
    (tmp_path / name).write_bytes(data)
    c.sample.embeddings = str(tmp_path / name)
    with pytest.raises(ConfigError, match=rf"config.sample.embeddings='{tmp_path / name}': cannot read a .npy array "
                                          r"\((BadZipFile|EOFError): "):
      sampling.given_embeddings(c, 3)
  np.save(tmp_path / "wide.npy", np.zeros((3, width + 1), np.float32))
  c.sample.embeddings = str(tmp_path / "wide.npy")
  with pytest.raises(ConfigError, match=rf"shape \(3, {width + 1}\); this model's embeddings have width {width}"):
    sampling.run(c, str(workdir), experiment=trainer)


def test_a_rerun_keeps_the_samples_before_it(trained, capsys, monkeypatch):
  """A second --mode=sample of the same checkpoint writes beside the first run's folder, whose files
  stay as they were; no folder mixes two runs' files."""
  config, workdir, trainer = trained
  first = workdir / "samples" / "step_2"
  if not first.is_dir():
    sampling.run(config, str(workdir), experiment=trainer)
  before = {p.name: p.read_bytes() for p in first.iterdir()}
  # One video: the 1-row chain that test_fewer_videos_than_the_batch_draw_only_their_rows compiles.
  other = tiny_config(**{"data.data_dir": config.data.data_dir, "sample.seed": 7, "sample.num_samples": 1,
                         "sample.num_real_clips": 1})
  capsys.readouterr()
  out = Path(sampling.run(other, str(workdir), experiment=trainer)["dir"])
  assert out.parent == first.parent and out.name.startswith("step_2-run") and out != first
  assert f"{first} holds an earlier run's samples, which are kept; this run writes to {out}" in capsys.readouterr().out
  assert {p.name: p.read_bytes() for p in first.iterdir()} == before
  assert sorted(p.name for p in out.glob("*.mp4")) == ["sample_000_label0.mp4"]
  assert json.loads((out / "sample_000_label0.json").read_text())["seed"] == 7
  # One real clip (sample.num_real_clips=1): no other clip to be near, null in a strict results.json.
  def refuse(name):
    raise ValueError(f"results.json holds {name}, not JSON")
  results = json.loads((out / "results.json").read_text(), parse_constant=refuse)
  assert results["copy_distance_real"] is None and results["copy_distance_generated"] > 0
  # A video encoder that fails in its own way (a PyAV built without H.264): the run still writes its arrays,
  # GIFs and sidecars, leaves no half-written .mp4 and says why (it raised past the ImportError it expected).
  from av.codec.codec import UnknownCodecError  # PyAV's error for an encoder its FFmpeg build lacks

  from videofusion_jax.data import video_io

  def no_h264(path, *a, **k):
    Path(path).write_bytes(b"half")
    raise UnknownCodecError("Unknown encoder 'libx264'")

  monkeypatch.setattr(video_io, "write_video", no_h264)
  third = Path(sampling.run(other, str(workdir), experiment=trainer)["dir"])
  assert "note: no .mp4 written (UnknownCodecError: Unknown encoder 'libx264')" in capsys.readouterr().out
  assert sorted(p.name for p in third.iterdir()) == ["grid.png", "results.json", "sample_000_label0.gif",
                                                     "sample_000_label0.json", "samples.npz"]
  np.testing.assert_array_equal(np.load(third / "samples.npz")["videos"], np.load(out / "samples.npz")["videos"])
  # A full disk is no encoder's failure: the run stops with it, after the arrays and results.json are written.
  import errno

  def full_disk(path, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(video_io, "write_video", full_disk)
  before_runs = set(third.parent.iterdir())
  with pytest.raises(OSError, match="No space left on device"):
    sampling.run(other, str(workdir), experiment=trainer)
  (fourth,) = set(third.parent.iterdir()) - before_runs
  assert fourth.name.endswith(".incomplete")  # never a name a rerun takes for complete samples
  np.testing.assert_array_equal(np.load(fourth / "samples.npz")["videos"], np.load(out / "samples.npz")["videos"])
  assert json.loads((fourth / "results.json").read_text())["copy_distance_real"] is None


def test_sampling_the_device_cannot_hold_says_the_batch_per_device_and_writes_nothing(trained, monkeypatch,
                                                                                       xla_out_of_memory, capsys):
  """XLA's out-of-memory error in the chain (its compile or a batch) is one message naming
  sample.batch_size and the videos per device; no samples folder is made. (The first line names the
  experiment's devices: one here, of the suite's eight.)"""
  from videofusion_jax.experiment import DeviceMemoryError

  config, workdir, trainer = trained
  c = tiny_config(**{"data.data_dir": config.data.data_dir, "sample.control": "content"})
  monkeypatch.setattr(sampling, "long_videos", lambda *a, **k: (_ for _ in ()).throw(xla_out_of_memory))
  before = sorted((workdir / "samples").glob("*")) if (workdir / "samples").exists() else []
  with pytest.raises(DeviceMemoryError) as e:
    sampling.run(c, str(workdir), experiment=trainer)
  b, d = c.sample.batch_size, c.data
  assert str(e.value).startswith("the device ran out of memory in sampling (XLA: Out of memory allocating ")
  assert str(e.value).endswith(
      f"; device: cpu). config.sample.batch_size={b} draws up to {b} video(s) of {d.num_frames} x {d.image_size}x"
      f"{d.image_size} frames on each of the 1 device(s) at a time. Lower it (each video's noise is its own: the "
      "videos do not depend on it), or compute in bfloat16 (--config.model.dtype=bfloat16); then run it again.")
  assert e.value.__cause__ is xla_out_of_memory
  after = sorted((workdir / "samples").glob("*")) if (workdir / "samples").exists() else []
  assert after == before
  assert jax.device_count() == 8 and " on 1 device(s), " in capsys.readouterr().out


def test_a_run_stopped_while_writing_leaves_no_half_folder(trained, capsys, monkeypatch):
  """A full disk (or Ctrl-C) while the files are written: no step_N folder is left for a rerun to take for an
  earlier run's complete samples (it moved on to step_N-run2 beside a half folder); a samples.npz written
  whole is kept in step_N.incomplete, said in one note, and one cut short is not kept. A rerun writes step_N."""
  import errno

  config, workdir, trainer = trained
  # One video and one real clip (the 1-row chain other tests compile); 'motion' gives a folder of its own.
  c = tiny_config(**{"data.data_dir": config.data.data_dir, "sample.num_samples": 1, "sample.num_real_clips": 1,
                     "sample.control": "motion"})
  samples = workdir / "samples"
  final, kept = samples / "step_2_motion", samples / "step_2_motion.incomplete"

  def full_disk(path, *a, **k):
    Path(path).write_bytes(b"")  # the 0-byte GIF a full disk leaves
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(video_io, "write_gif", full_disk)
  capsys.readouterr()
  with pytest.raises(OSError, match="No space left on device"):
    sampling.run(c, str(workdir), experiment=trainer)
  printed = capsys.readouterr().out
  assert not final.exists() and not list(samples.glob(".*partial*"))
  assert [line for line in printed.splitlines() if "incomplete" in line] == [
      f"note: writing {final} stopped (OSError: [Errno 28] No space left on device); this run's samples.npz was "
      f"written whole to {kept}, an incomplete folder (not every video, sidecar or grid.png in it); a rerun writes "
      "step_2_motion again."]
  assert sorted(p.name for p in kept.iterdir()) == ["results.json", "sample_000_label0.gif", "sample_000_label0.mp4",
                                                    "samples.npz"]
  assert np.load(kept / "samples.npz")["videos"].shape == (1, c.data.num_frames, 8, 8, 3)
  # Its results.json names the folder it is in (it named step_2_motion, which the rerun below writes).
  assert json.loads((kept / "results.json").read_text())["dir"] == str(kept)
  # Ctrl-C while samples.npz is written: nothing whole to keep, so nothing is left.
  def interrupted(file, **arrays):
    Path(file).write_bytes(b"PK")
    raise KeyboardInterrupt

  monkeypatch.setattr(np, "savez_compressed", interrupted)
  before = sorted(samples.iterdir())
  with pytest.raises(KeyboardInterrupt):
    sampling.run(c, str(workdir), experiment=trainer)
  assert sorted(samples.iterdir()) == before and "note: writing" not in capsys.readouterr().out
  # The rerun: step_2_motion itself, whole, with the very videos the first run kept.
  monkeypatch.undo()
  results = sampling.run(c, str(workdir), experiment=trainer)
  printed = capsys.readouterr().out
  assert "earlier run" not in printed and f"and samples.npz to {final}\n" in printed
  assert results["dir"] == str(final) and json.loads((final / "results.json").read_text())["dir"] == str(final)
  assert sorted(p.name for p in final.iterdir()) == ["grid.png", "results.json", "sample_000_label0.gif",
                                                     "sample_000_label0.json", "sample_000_label0.mp4", "samples.npz"]
  assert not list(samples.glob("step_2_motion-run*")) and not list(samples.glob(".*partial*"))
  np.testing.assert_array_equal(np.load(final / "samples.npz")["videos"], np.load(kept / "samples.npz")["videos"])
  # A run killed while writing (no `finally`) leaves its hidden folder: the next run names it, once, and leaves
  # it as it is, one left by an earlier process with this one's id (a restarted container) too (before: taken
  # for this run's own, unnamed, and deleted with its samples.npz).
  left = samples / ".step_2_motion.999999999.partial"
  left.mkdir()
  alive = samples / f".step_2_motion.{os.getppid()}.partial"  # a live process's: still writing
  alive.mkdir()
  own_pid = samples / f".step_2_motion.{os.getpid()}.partial"
  own_pid.mkdir()
  (own_pid / "samples.npz").write_bytes(b"a killed run's")
  sampling.run(c, str(workdir), experiment=trainer)
  notes = [line for line in capsys.readouterr().out.splitlines() if ".partial" in line]
  assert sorted(notes) == sorted(f"note: {folder} was left by a sample run stopped while writing it (killed, or "
                                 "still writing on another host); no run reads it: take its samples.npz if you need "
                                 "it, then delete it." for folder in (own_pid, left)), notes
  assert (own_pid / "samples.npz").read_bytes() == b"a killed run's" and left.is_dir() and alive.is_dir()
  shutil.rmtree(left), shutil.rmtree(alive), shutil.rmtree(own_pid), shutil.rmtree(samples / "step_2_motion-run2")
  # Another run of the checkpoint writes step_2_motion while this one samples (both chose it, absent then):
  # this one's whole folder goes to the next free name, its results.json saying which, not to .incomplete.
  real_write = sampling.write_videos
  taken = [final]

  def another_run_finishes_meanwhile(out_dir, *args):
    kinds = real_write(out_dir, *args)
    taken[0].mkdir()
    (taken[0] / "samples.npz").write_bytes(b"the other run's")
    return kinds

  whole = sorted(p.name for p in final.iterdir())
  shutil.rmtree(final)  # absent when this run chooses its folder
  monkeypatch.setattr(sampling, "write_videos", another_run_finishes_meanwhile)
  results = sampling.run(c, str(workdir), experiment=trainer)
  moved = samples / "step_2_motion-run2"
  assert (final / "samples.npz").read_bytes() == b"the other run's"
  assert results["dir"] == str(moved) and json.loads((moved / "results.json").read_text())["dir"] == str(moved)
  assert sorted(p.name for p in moved.iterdir()) == whole
  assert f"and samples.npz to {moved}\n" in capsys.readouterr().out
  assert not list(samples.glob("*.incomplete2")) and not list(samples.glob(".*partial*"))
  # The same where this run had chosen step_2_motion-run3: the next free name is -run4 (before: -run3-run2).
  taken[0] = samples / "step_2_motion-run3"
  results = sampling.run(c, str(workdir), experiment=trainer)
  assert results["dir"] == str(samples / "step_2_motion-run4")
  assert sorted(p.name for p in samples.iterdir() if p.name.startswith("step_2_motion-run")) == [
      "step_2_motion-run2", "step_2_motion-run3", "step_2_motion-run4"]


def test_real_clips_the_figures_cannot_read_stop_the_run_before_the_chain(trained, monkeypatch):
  """The demo's figures read the real clips: a damaged dataset is said before the chain is drawn (before: after
  it, and the run ended writing nothing, its samples lost), and nothing is written."""
  from videofusion_jax.data import pipeline

  config, workdir, trainer = trained
  c = tiny_config(**{"data.data_dir": config.data.data_dir, "sample.num_samples": 1, "sample.num_real_clips": 1})
  drawn = []
  monkeypatch.setattr(sampling, "long_videos", lambda *a, **k: drawn.append(1))
  monkeypatch.setattr(pipeline, "eval_clips", lambda *a: (_ for _ in ()).throw(pipeline.PipelineError("damaged")))
  before = sorted(workdir.rglob("*"))
  with pytest.raises(pipeline.PipelineError, match="damaged"):
    sampling.run(c, str(workdir), experiment=trainer)
  assert drawn == [] and sorted(workdir.rglob("*")) == before


def test_settings_the_model_was_not_trained_with_are_refused_before_sampling(trained):
  """λ, the schedule or the key-frame input differ from the workdir's config.json: restoring cannot see it
  (no weight's shape changes), so sampling says which fields differ and the flags that give training's."""
  config, workdir, trainer = trained
  before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
  other = tiny_config(**{"data.data_dir": config.data.data_dir, "diffusion.lam": 0.9,
                         "diffusion.schedule": "linear"})
  with pytest.raises(ConfigError) as e:
    sampling.run(other, str(workdir), experiment=trainer)
  message = str(e.value)
  assert "config.diffusion.lam=0.9 (trained with 0.5), config.diffusion.schedule='linear' (trained with 'cosine')" \
      in message and "pass --config.diffusion.lam=0.5 --config.diffusion.schedule=cosine" in message
  assert str(workdir / "config.json") in message
  # Guidance on a model trained without the null condition (the tiny config, like the demo, drops no label).
  guided = tiny_config(**{"data.data_dir": config.data.data_dir, "sample.guidance_scale": 2.0})
  with pytest.raises(ConfigError, match=r"config.sample.guidance_scale=2.0: this model was trained with "
                     r"train.label_dropout=0 .* never learned the null condition"):
    sampling.run(guided, str(workdir), experiment=trainer)
  assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_train_and_sample_refuses_guidance_without_dropout_before_training(tmp_path, tfds_dir):
  """Guidance with train.label_dropout=0 (the demo's and the tiny config's): the model it trains never sees the
  null condition that guidance mixes in. Sampling refused it (from config.json) only after every training step;
  --mode=train_and_sample refuses it first, with the rule sampling applies to the recorded dropout."""
  from test_cli import run_main
  from tiny import tiny_config_file

  config = tiny_config_file(tmp_path, **{"data.data_dir": tfds_dir, "train.num_steps": 1,
                                         "sample.guidance_scale": 2.0})
  workdir = tmp_path / "run"
  r = run_main(f"--config={config}", "--mode=train_and_sample", workdir=workdir)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  assert ("error: config.sample.guidance_scale=2.0: --mode=train_and_sample trains the model with "
          "train.label_dropout=0 first, so it would never learn the null condition that guidance mixes in; sample "
          "at scale 1, or train with --config.train.label_dropout > 0") in r.stderr, r.stderr
  assert "step " not in r.stdout and not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
  # The rule itself: either scale (the prior's too: the tiny model draws c from a prior on the label), only at
  # dropout 0, and nothing to check where the dropout is unknown.
  check = sampling.check_guidance_was_trained
  prior = tiny_config(**{"sample.prior_guidance_scale": 3.0})
  assert sampling.prior_samples(prior)
  with pytest.raises(ConfigError, match=r"^config.sample.prior_guidance_scale=3.0: --mode=train_and_sample"):
    check(prior, 0.0)
  both = tiny_config(**{"sample.guidance_scale": 2.0, "sample.prior_guidance_scale": 3.0})
  with pytest.raises(ConfigError, match=r"^config.sample.guidance_scale=2.0 and config.sample.prior_guidance_scale="
                                        r"3.0: this model was trained with train.label_dropout=0 \(W/config.json\)"):
    check(both, 0.0, "W/config.json")
  for config, dropout in ((both, 0.1), (both, None), (tiny_config(), 0.0)):
    check(config, dropout)


def test_diverged_samples_are_an_error_not_black_videos(trained):
  """NaN weights give NaN videos: an error that says so, not frames clipped or written as black."""
  config, workdir, trainer = trained
  params = jax.tree.map(lambda p: p * np.nan, trainer.init_state(0).params)
  with pytest.raises(FloatingPointError, match="3 of 3 sampled videos hold NaN or infinite values"):
    sampling.generate_videos(trainer, params, 3, seed=1, labels=np.array([0, 1, 2], np.int32))


@pytest.mark.parametrize("kwargs, message", [pytest.param(*case, id=name) for name, case in {
    "label past the classes": ({"labels": np.array([0, 1, 9], np.int32)},
                               r"^labels hold 0..9, outside \[0, 3\]; give integers in \[0, 3\) "
                               r"\(config.data.num_classes=3; 3 is the null label\)\.$"),
    "negative label": ({"labels": np.array([0, -1, 2])}, r"^labels hold -1..2, outside \[0, 3\]"),
    "too few labels": ({"labels": np.array([0])}, r"^labels has shape \(1,\) for 3 videos; give one label per video, "
                                                  r"shape \(3,\)\.$"),
    "float labels": ({"labels": np.array([0.0, 1.0, 2.0])}, r"^labels are float64; give integers in \[0, 3\)"),
    "no labels": ({"labels": None}, r"^labels=None: this model is class-conditional \(its prior is on the label\): "
                                    r"pass labels, shape \(3,\)"),
    "condition of another width": ({"labels": None, "condition": np.ones((3, 5), np.float32)},
                                   r"^condition has shape \(3, 5\) for 3 videos; give \(3, 32\), one embedding of "
                                   r"width config.model.encoder.embed_dim=32 per video\.$"),
    "condition for fewer videos": ({"labels": None, "condition": np.ones((2, 32), np.float32)},
                                   r"^condition has shape \(2, 32\) for 3 videos"),
    "NaN condition": ({"labels": None, "condition": np.full((3, 32), np.nan, np.float32)},
                      r"^condition holds float32 values that are not all finite numbers"),
    "text for a prior on the label": ({"labels": np.arange(3), "text": np.ones((3, 32), np.float32)},
                                      r"^text was given, but this model does not read it \(it needs "
                                      r"config.model.prior.condition='text'\)\.$"),
}.items()])
def test_labels_and_conditions_that_do_not_fit_the_model_are_refused_before_sampling(trained, kwargs, message):
  """``generate_videos`` (and ``draw_videos`` under it): labels and given embeddings are checked on the host
  before anything is traced (a label past data.num_classes gave NaN videos blamed on the weights, too few
  labels an IndexError, a condition of another width a Chex traceback). Nothing is drawn: no params needed."""
  _, _, trainer = trained
  assert trainer.config.model.encoder.embed_dim == 32 and trainer.config.data.num_classes == 3
  with pytest.raises(ConfigError, match=message):
    sampling.generate_videos(trainer, None, 3, 0, **kwargs)


def test_a_label_conditioned_models_labels_are_checked_and_it_takes_no_embeddings(tfds_dir):
  """The label condition: both generators read the labels (the null label, 3, is allowed: guidance's), and
  it has no embedding condition to give; ``draw_videos`` checks the labels against its rows."""
  c = tiny_config(**{"data.data_dir": tfds_dir, "model.condition": "label"})
  experiment = Experiment(c, mesh=one_device(c))
  rows = np.arange(3)
  with pytest.raises(ConfigError, match=r"^labels=None: this model is class-conditional \(both generators are on "
                                        r"the label\)"):
    sampling.draw_videos(experiment, None, 0, rows, rows, None)
  with pytest.raises(ConfigError, match=r"^labels hold 0..4, outside \[0, 3\]"):
    sampling.draw_videos(experiment, None, 0, rows, rows, np.array([0, 4, 3]))
  with pytest.raises(ConfigError, match=r"^labels has shape \(2,\) for 3 videos"):
    sampling.draw_videos(experiment, None, 0, rows, rows, np.array([0, 1]))
  with pytest.raises(ConfigError, match=r"^condition was given, but this model does not read it \(it needs "
                                        r"config.model.condition='embedding'\)\.$"):
    sampling.draw_videos(experiment, None, 0, rows, rows, np.array([0, 1, 3]), np.ones((3, 32), np.float32))
  sampling.check_conditions(c, 3, np.array([0, 1, 3]), None, None)  # the null label passes
  # An unconditional model reads no labels: given ones (the demo's figures pass them) need only their count.
  unconditional = tiny_config(**{"data.num_classes": 0})
  sampling.check_conditions(unconditional, 3, np.array([0, 7, 2]), None, None)
  sampling.check_conditions(unconditional, 3, None, None, None)


@pytest.mark.parametrize("fps", [120, 200])
def test_gifs_above_100_fps_hold_each_frame_at_least_10_ms(tmp_path, fps):
  """Above 100 fps a frame's share of 1/100 s rounds to 0 for some frames: every delay is floored at 10 ms."""
  from PIL import Image

  n = 7
  frames = np.stack([np.full((4, 4, 3), 30 * i, np.uint8) for i in range(n)])
  with pytest.warns(UserWarning, match=f"sample.fps={fps}: GIF delays"):
    video_io.write_gif(tmp_path / "a.gif", frames, fps=fps)
  gif = Image.open(tmp_path / "a.gif")
  durations = []
  for i in range(gif.n_frames):
    gif.seek(i)
    durations.append(gif.info.get("duration"))
  assert durations == [10] * n


@pytest.mark.parametrize("fps", [8, 24, 30, 60])
def test_gifs_keep_the_frame_rate(tmp_path, fps):
  """A GIF's delays are whole 1/100 s: read back, each frame starts at i·1000/fps to 5 ms and the total is
  N/fps to 5 ms (one rounded delay for all drifts: fps 60 stored 10 ms, 6x too fast); above 50 fps a
  warning, as browsers slow delays under 20 ms."""
  from PIL import Image

  n = 7
  frames = np.stack([np.full((4, 4, 3), 30 * i, np.uint8) for i in range(n)])  # distinct: none merged
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    video_io.write_gif(tmp_path / "a.gif", frames, fps=fps)
  assert [str(w.message).startswith(f"sample.fps={fps}: GIF delays") for w in caught] == ([True] if fps > 50 else [])
  gif = Image.open(tmp_path / "a.gif")
  durations = []
  for i in range(gif.n_frames):
    gif.seek(i)
    durations.append(gif.info["duration"])
  assert len(durations) == n and all(d % 10 == 0 for d in durations)
  starts = np.cumsum([0] + durations)
  np.testing.assert_allclose(starts, np.arange(n + 1) * 1000 / fps, atol=5)


def test_boundary_jump_against_brute_force():
  rng = np.random.default_rng(3)
  videos = rng.uniform(-1, 1, (2, 9, 3, 3, 3))  # 3 clips of 3 frames
  seams = [np.abs(v[n + 1] - v[n]).mean() for v in videos for n in (2, 5)]
  inside = [np.abs(v[n + 1] - v[n]).mean() for v in videos for n in (0, 1, 3, 4, 6, 7)]
  assert boundary_jump(videos, 3) == pytest.approx(np.mean(seams) / np.mean(inside))
  smooth = np.cumsum(np.full((1, 6, 2, 2, 3), 0.1), axis=1)  # every step the same: no seam
  assert boundary_jump(smooth, 3) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="two clips or more of 4 frames"):
    boundary_jump(videos, 4)
  # Frozen clips (a model at λ = 1): nothing moves inside them, so no figure (it was NaN, written as NaN into
  # results.json, which JSON parsers refuse; with a cut between them, inf).
  frozen = np.concatenate([np.zeros((1, 3, 2, 2, 3)), np.ones((1, 3, 2, 2, 3))], axis=1)
  assert boundary_jump(frozen, 3) is None and boundary_jump(np.zeros((1, 6, 2, 2, 3)), 3) is None


@pytest.fixture(scope="module")
def long_run(trained):
  """The trained tiny model sampled as long videos: DDIM with η = 0, 2 clips, the first 2 frames of
  the second clip pulled toward the last frame of the first (one compile for every test here)."""
  config, workdir, _ = trained
  c = tiny_config(**{"data.data_dir": config.data.data_dir, "sample.eta": 0.0, "sample.num_clips": 2,
                     "sample.continuity_frames": 2, "sample.num_samples": 3, "sample.batch_size": 3})
  experiment = Experiment(c, mesh=one_device(c))
  return c, workdir, experiment, experiment.restore(workdir).ema_params


def test_clips_sharing_base_noise_share_the_key_frame_and_not_the_motion(long_run):
  """DDIM with η = 0: the key frame depends on b_T and c alone, so the clips of a long video (one
  content index) have the same key frame, and their fresh residual noise changes the other frames;
  the 'content' grid likewise, and the 'motion' grid (a b_T and c per row) changes the key frames."""
  c, _, experiment, params = long_run
  n, k = c.data.num_frames, c.data.num_frames // 2
  rows = np.arange(3)
  labels = sampling.sample_labels(c, 3)
  videos, _ = sampling.long_videos(experiment, params, 0, rows, rows, labels)
  assert videos.shape == (3, 2 * n, 8, 8, 3)
  first, second = videos[:, :n], videos[:, n:]
  np.testing.assert_allclose(first[:, k], second[:, k], atol=1e-5)
  others = [i for i in range(n) if i != k]
  assert np.abs(first[:, others] - second[:, others]).mean(axis=(2, 3, 4)).min() > 1e-2
  assert np.abs(first[0, k] - first[1, k]).mean() > 1e-2  # control: another content, another key frame
  content, motion = sampling.control_indices(tiny_config(**{"sample.control": "content"}))
  grid, _ = sampling.draw_videos(experiment, params, 0, content, motion, labels[content])
  np.testing.assert_allclose(grid[1:, k], np.broadcast_to(grid[0, k], grid[1:, k].shape), atol=1e-5)
  assert np.abs(grid[1:, others] - grid[:1, others]).mean(axis=(1, 2, 3, 4)).min() > 1e-2
  content, motion = sampling.control_indices(tiny_config(**{"sample.control": "motion"}))
  grid, _ = sampling.draw_videos(experiment, params, 0, content, motion, labels[content])
  assert np.abs(grid[1:, k] - grid[:1, k]).mean(axis=(1, 2, 3)).min() > 1e-2
  # Each row depends on its own keys: the first row of a grid is the first clip of the long video.
  np.testing.assert_allclose(grid[0], first[0], atol=1e-5)


def test_continuity_frames_shrink_the_seam_between_clips(long_run):
  """The first frames of a later clip pulled toward the last frame of the one before: the boundary
  jump (seam / neighbouring frames inside clips) falls, and the key frame is untouched."""
  c, _, experiment, params = long_run
  rows = np.arange(3)
  labels = sampling.sample_labels(c, 3)
  joined, _ = sampling.long_videos(experiment, params, 0, rows, rows, labels)
  free, _ = sampling.long_videos(experiment, params, 0, rows, rows, labels, anchored=False)
  n, k = c.data.num_frames, c.data.num_frames // 2
  np.testing.assert_allclose(joined[:, n + k], free[:, n + k], atol=1e-5)
  with_option, without = boundary_jump(joined, n), boundary_jump(free, n)
  print(f"boundary jump of the tiny model: {without:.2f} without, {with_option:.2f} with continuity_frames=2")
  assert with_option < 0.8 * without


def test_the_long_videos_benchmark_reports_the_seams_of_these_draws(long_run, tmp_path):
  """``benchmarks/long_videos.py`` on the trained run: its seam figures are those of the same videos
  drawn here (the same keys), the last place of its step profile is the seam (its ratio to the mean
  step inside clips, the boundary jump), the others average to 1, and the key frames of a video's
  clips are one."""
  from test_faults import one_device_env
  from tiny import tiny_config_file

  c, workdir, experiment, params = long_run
  rows, n = np.arange(3), c.data.num_frames
  labels = sampling.sample_labels(c, 3)
  joined, _ = sampling.long_videos(experiment, params, c.sample.seed, rows, rows, labels)
  free, _ = sampling.long_videos(experiment, params, c.sample.seed, rows, rows, labels, anchored=False)
  config_file = tiny_config_file(tmp_path, **{k: c[k.split(".")[0]][k.split(".")[1]] for k in (
      "data.data_dir", "sample.eta", "sample.num_clips", "sample.continuity_frames", "sample.num_samples",
      "sample.batch_size")})
  r = subprocess.run([sys.executable, "benchmarks/long_videos.py", f"--config={config_file}", f"--workdir={workdir}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300, env=one_device_env())
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
  result = json.loads(r.stdout.splitlines()[0])
  assert (result["step"], result["videos"], result["clips"], result["frames"]) == (2, 3, 2, 2 * n)
  for name, videos in (("with", joined), ("without", free)):
    jump = boundary_jump(videos, n)
    assert result[f"boundary_jump_{name}"] == pytest.approx(jump, abs=2e-4)
    profile = result[f"step_profile_{name}"]
    assert len(profile) == n and profile[-1] == pytest.approx(jump, abs=2e-3)
    assert np.mean(profile[:-1]) == pytest.approx(1.0, abs=2e-3)  # each inside place counted twice over 2 clips
  assert result["boundary_jump_with"] < result["boundary_jump_without"]
  assert 0 <= result["key_frame_max_difference_across_clips"] < 1e-5
  assert result["seconds_with"] > 0 and result["seconds_without"] > 0


def test_long_video_files_and_sidecars(long_run, monkeypatch, capsys):
  """--mode=sample with num_clips=2: each video is one mp4 (and GIF) of 2N frames with a sidecar of
  every setting; without a video encoder the rest is written and the fact said once."""
  c, workdir, experiment, _ = long_run
  results = sampling.run(c, str(workdir), experiment=experiment, config_name="configs/demo.py")
  out = workdir / "samples" / "step_2_2clips"
  n = 2 * c.data.num_frames
  assert iio.imread(out / "sample_001_label1.mp4", plugin="pyav").shape == (n, 8, 8, 3)
  assert iio.imread(out / "sample_001_label1.gif", index=None).shape[0] == n
  side = json.loads((out / "sample_001_label1.json").read_text())
  assert side == {"config": "configs/demo.py", "checkpoint_step": 2, "seed": 0, "sampler": "ddim",
                  "spacing": "trailing", "variance": None, "steps": 5, "eta": 0.0, "clip_x0": True,
                  "guidance_scale": 1.0, "lambda": 0.5, "model": "videofusion", "condition": "embedding",
                  "encoder": "learned", "clip": None,
                  "prior": {"steps": 64, "spacing": "leading", "eta": 1.0, "guidance_scale": 1.0},
                  "embeddings_file": None,
                  "clip_motion_indices": [2, 3],
                  "frames": n, "clips": 2, "clip_frames": 4, "continuity_frames": 2, "fps": 8, "control": "",
                  "prompt": None, "index": 1, "label": 1, "content_index": 1, "motion_index": 1, "embedding": "prior"}
  npz = np.load(out / "samples.npz")
  assert npz["videos"].shape == (3, n, 8, 8, 3) and results["frames"] == n
  assert results["boundary_jump"] == pytest.approx(boundary_jump(npz["videos"], c.data.num_frames))
  # No encoder: said once, GIFs, sidecars and the grid still written.
  def no_encoder(*args, **kwargs):
    raise ImportError("No module named 'av'")
  monkeypatch.setattr(video_io, "write_video", no_encoder)
  capsys.readouterr()
  grid_config = copy.deepcopy(c)
  grid_config.sample.control = "content"
  sampling.run(grid_config, str(workdir), experiment=experiment)
  printed = capsys.readouterr().out
  grid_dir = workdir / "samples" / "step_2_content_2clips"
  # The classes in turn (sample.label=-1) give the rows labels 0, 1, 2; one content draws label 0 alone, said.
  assert printed.count("note: config.sample.control='content' draws every video from one content, the first "
                       "video's label 0: the other 2 class(es) in turn (config.sample.label=-1; "
                       "--config.sample.label=K picks the class) are not used") == 1
  assert printed.count("no .mp4 written (ImportError: No module named 'av')") == 1
  assert not list(grid_dir.glob("*.mp4")) and len(list(grid_dir.glob("*.gif"))) == 3
  assert (grid_dir / "grid.png").is_file()
  sidecars = [json.loads((grid_dir / f"sample_00{i}_label0.json").read_text()) for i in range(3)]
  assert [(side["content_index"], side["motion_index"]) for side in sidecars] == [(0, 0), (0, 1), (0, 2)]


def test_one_content_names_the_conditions_it_leaves_unused():
  """sample.control='content' draws every row from row 0's condition: the prompts or embeddings given for the
  other rows are said to be unused; nothing is said when the rows' conditions were one, or under another control."""
  c = tiny_config(**{"sample.control": "content"})
  prompts = ["a dog", "a cat", "a dog"]
  note = sampling.one_content_note(c, None, None, prompts)
  assert note.startswith("note: config.sample.control='content' draws every video from one content, the first "
                         "video's prompt 'a dog': 1 other prompt(s) are not used")
  rows = np.eye(3, 8, dtype=np.float32)
  assert "row 0 of config.sample.embeddings): 2 other embedding(s) are not used" in sampling.one_content_note(
      c, None, rows, None)
  assert sampling.one_content_note(c, None, rows[[0, 0, 0]], None) == ""
  assert sampling.one_content_note(c, None, None, ["a dog"] * 3) == ""
  assert sampling.one_content_note(c, np.full(3, 2, np.int32), None, None) == ""
  c.sample.control = "motion"
  assert sampling.one_content_note(c, np.arange(3, dtype=np.int32), rows, prompts) == ""
