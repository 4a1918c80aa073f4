"""Sampling from a checkpoint, the written files, and the demo's figures."""
import json

import imageio.v3 as iio
import jax
import numpy as np
import pytest
from conftest import tiny_config
from test_training import batches

from videofusion_jax import sampling
from videofusion_jax.evaluation.demo_metrics import coherence, label_accuracy
from videofusion_jax.experiment import Experiment
from videofusion_jax.training.loop import train
from videofusion_jax.training.step import Trainer


def test_label_accuracy_and_coherence_against_brute_force():
  rng = np.random.default_rng(0)
  real = rng.uniform(-1, 1, (9, 3, 4, 4, 3))
  real_labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  samples = real[[0, 4, 8, 1]] + 0.01 * rng.normal(size=(4, 3, 4, 4, 3))
  labels = np.array([0, 1, 1, 0])
  # brute force: nearest real key frame (frame 1) by L2
  hits = [real_labels[np.argmin([np.sum((s[1] - r[1]) ** 2) for r in real])] == lab
          for s, lab in zip(samples, labels)]
  assert label_accuracy(samples, labels, real, real_labels) == pytest.approx(np.mean(hits)) == 0.75
  v = rng.uniform(-1, 1, (2, 5, 4, 4, 3))
  expected = np.mean([np.abs(v[b, i + 1] - v[b, i]).mean() for b in range(2) for i in range(4)])
  assert coherence(v) == pytest.approx(expected)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  config = tiny_config(**{"data.data_dir": tfds_dir, "train.num_steps": 2})
  workdir = tmp_path_factory.mktemp("run")
  trainer = Trainer(config)
  train(config, workdir, iter(batches(config, 2)), trainer=trainer, verbose=False)
  return config, workdir, trainer


def test_sample_mode_writes_videos_grid_and_figures(trained):
  config, workdir, trainer = trained
  results = sampling.run(config, str(workdir), experiment=trainer)
  out = workdir / "samples" / "step_2"
  mp4s = sorted(out.glob("sample_*.mp4"))
  assert [p.name for p in mp4s] == ["sample_000_label0.mp4", "sample_001_label1.mp4", "sample_002_label2.mp4"]
  frames = iio.imread(mp4s[0], plugin="pyav")
  assert frames.shape == (config.data.num_frames, 8, 8, 3)
  grid = iio.imread(out / "grid.png")
  assert grid.shape == (3 * 9 + 1, 4 * 9 + 1, 3)
  saved = json.loads((out / "results.json").read_text())
  assert saved == results and 0.0 <= results["label_accuracy"] <= 1.0
  assert results["coherence_real"] > 0
  videos = np.load(out / "samples.npz")["videos"]
  assert results["coherence_generated"] == pytest.approx(coherence(videos))


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


def test_guided_sampling_at_scale_zero_is_null_conditioned_sampling(trained, tfds_dir):
  """Guidance over the whole estimate through --mode=sample's path (the doubled batch): s = 0
  samples exactly as the model given the null label does. (s = 1 against the conditional
  estimate, and the mixing at other scales: test_training.test_guidance_mixes_whole_decomposed_estimates.)"""
  config, _, trainer = trained
  params = jax.tree.map(lambda p: p + 0.05, trainer.init_state(0).params)
  labels = np.array([0, 1, 2], np.int32)
  null = np.full(3, config.data.num_classes, np.int32)
  zero = Experiment(tiny_config(**{"data.data_dir": tfds_dir, "train.num_steps": 2, "sample.guidance_scale": 0.0}))
  assert sampling.guided(zero.config) and not sampling.guided(trainer.config)
  guided = sampling.generate_videos(zero, params, 3, seed=1, labels=labels)
  np.testing.assert_allclose(guided, sampling.generate_videos(trainer, params, 3, seed=1, labels=null), atol=1e-4)
  # Control: the labelled samples are far from the null-conditioned ones.
  assert np.abs(guided - sampling.generate_videos(trainer, params, 3, seed=1, labels=labels)).max() > 1e-2
