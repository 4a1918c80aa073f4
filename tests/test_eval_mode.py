"""--mode=eval on a briefly trained tiny model: FVD/KVD written, real-data features cached."""
import json

import numpy as np
import pytest
from conftest import one_device, tiny_config

from videofusion_jax.data import pipeline, video_io
from videofusion_jax.evaluation import distances, evaluate
from videofusion_jax.sampling import generate_videos
from videofusion_jax.training.loop import train
from videofusion_jax.training.step import Trainer


def test_eval_mode_writes_fvd_kvd_and_caches_real_features(tfds_dir, tmp_path, monkeypatch, capsys):
  c = tiny_config(**{"data.data_dir": tfds_dir, "train.num_steps": 2})
  c.eval.update(num_real=4, num_generated=4, batch_size=4, kvd_subsets=3, kvd_subset_size=3)
  c.sample.update(batch_size=4)
  trainer = Trainer(c, mesh=one_device(c))
  state = train(c, tmp_path, trainer=trainer, verbose=False)
  first = evaluate.run(c, str(tmp_path), experiment=trainer)
  assert first == json.loads((tmp_path / "eval" / "step_2.json").read_text())
  assert first["num_real"] == first["num_generated"] == 4 and first["protocol"]["frame_repeat"] == 3
  # The cached real features are I3D's logits of the protocol's clips, computed independently here.
  cache = np.load(next((tmp_path / "eval_cache").iterdir()))
  clips = pipeline.eval_clips(c, 4)["video"]
  expected = evaluate.i3d_features(4)(np.repeat(video_io.to_uint8(clips), 3, axis=1))
  np.testing.assert_allclose(cache["features"], expected, rtol=1e-5, atol=1e-4)
  # The figures are those of the EMA model's samples (one batch, seed eval.seed, the real clips'
  # labels) against those features, recomputed here.
  videos = generate_videos(trainer, state.ema_params, 4, c.eval.seed, cache["labels"])
  fake = evaluate.i3d_features(4)(np.repeat(video_io.to_uint8(videos), 3, axis=1))
  np.testing.assert_allclose(first["fvd"], distances.fvd(expected, fake), rtol=1e-3)
  kvd = distances.kernel_distance(expected, fake, num_subsets=3, subset_size=3, seed=c.eval.seed)
  np.testing.assert_allclose([first["kvd"], first["kvd_std"]], kvd, rtol=1e-3, atol=1e-6)
  assert first["fvd"] > 1.0
  # A second run reads the cache instead of the dataset, and the same seeds give the same figures.
  monkeypatch.setattr(pipeline, "eval_iterator", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
  capsys.readouterr()
  second = evaluate.run(c, str(tmp_path), experiment=trainer)
  assert "from the cache" in capsys.readouterr().out
  np.testing.assert_allclose(second["fvd"], first["fvd"], rtol=1e-6)
  # The cache is of the dataset it was read from: the same dataset rebuilt with other videos (other frame
  # counts) is read again, not served the old features.
  source = first["protocol"]["source"]
  assert source["builder"] == "videofusion_demo_clips/64/1.0.0" and source["videos"] == 3
  lengths = pipeline.split_lengths
  monkeypatch.setattr(pipeline, "split_lengths", lambda *a: lengths(*a) + 1)
  with pytest.raises(AssertionError, match="re-read"):
    evaluate.run(c, str(tmp_path), experiment=trainer)
