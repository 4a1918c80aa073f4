"""The demo TFDS builder and the tf.data pipeline on the real bundled clips."""
import numpy as np
import pytest
from conftest import tiny_config

from videofusion_jax.data import pipeline, video_io


@pytest.fixture(scope="module")
def config(tfds_dir):
  return tiny_config(**{"data.data_dir": tfds_dir})


def test_builder_holds_the_three_real_clips(config):
  builder = pipeline.get_builder(config.data)
  ds = builder.as_dataset(split="train", shuffle_files=False)
  examples = {e["name"].decode(): e for e in ds.as_numpy_iterator()}
  assert sorted(examples) == sorted(video_io.DEMO_CLIPS)
  lengths = {name: e["video"].shape[0] for name, e in examples.items()}
  assert lengths == {"bigbuckbunny.mp4": 132, "bikes.mp4": 250, "carphone_pristine.mp4": 120}
  for label, name in enumerate(video_io.DEMO_CLIPS):
    assert examples[name]["label"] == label
    # The stored frames are the decoded file, centre-cropped and resized.
    frames = video_io.center_crop_resize(video_io.read_video(video_io.demo_clip_dir() / name)[:2], 64)
    np.testing.assert_array_equal(examples[name]["video"][:2], frames)


def test_train_batches_have_the_right_shape_range_and_are_seeded(config):
  it = pipeline.train_iterator(config, 6, seed=3)
  b = next(it)
  assert b["video"].shape == (6, 4, 8, 8, 3) and b["video"].dtype == np.float32
  assert b["video"].min() >= -1.0 and b["video"].max() <= 1.0 and b["video"].std() > 0.1
  assert set(b["label"].tolist()) <= {0, 1, 2}
  again = next(pipeline.train_iterator(config, 6, seed=3))
  np.testing.assert_array_equal(b["video"], again["video"])
  other = next(pipeline.train_iterator(config, 6, seed=4))
  assert not np.array_equal(b["video"], other["video"])


def test_clips_are_consecutive_real_frames(config):
  """A training clip equals frames f, f+s, ... of its source video, resized."""
  real = pipeline.eval_clips(tiny_config(**{"data.data_dir": config.data.data_dir,
                                            "data.image_size": 64}), clips_per_video=200)
  clip = next(pipeline.train_iterator(tiny_config(**{"data.data_dir": config.data.data_dir,
                                                     "data.image_size": 64}), 1, seed=0))["video"][0]
  # The same frames appear among the densely sampled evaluation clips.
  dist = np.abs(real["video"] - clip[None]).mean(axis=(1, 2, 3, 4))
  assert dist.min() < 1e-5


def test_eval_clips_are_deterministic(config):
  a = pipeline.eval_clips(config, clips_per_video=5)
  b = pipeline.eval_clips(config, clips_per_video=5)
  assert a["video"].shape == (15, 4, 8, 8, 3)
  np.testing.assert_array_equal(a["video"], b["video"])
  np.testing.assert_array_equal(a["label"], np.repeat([0, 1, 2], 5))


def test_unreadable_videos_give_clear_errors(tmp_path):
  bad = tmp_path / "corrupt.mp4"
  bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
  with pytest.raises(video_io.VideoReadError, match="cannot decode video .*corrupt.mp4"):
    video_io.read_video(bad)
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes((video_io.demo_clip_dir() / "bikes.mp4").read_bytes()[:4000])
  with pytest.raises(video_io.VideoReadError, match="truncated"):
    video_io.read_video(truncated)
  with pytest.raises(video_io.VideoReadError, match="not found"):
    video_io.read_video(tmp_path / "missing.mp4")


def test_absent_dataset_names_where_and_how(tmp_path):
  c = tiny_config(**{"data.name": "ucf101", "data.data_dir": str(tmp_path)})
  with pytest.raises(pipeline.DatasetNotFoundError, match=f"{tmp_path}.*tfds build ucf101"):
    pipeline.get_builder(c.data)
