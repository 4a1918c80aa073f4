"""TaiChi-HD (first-order-model) from mp4 files or folders of PNG frames, mixed freely."""
from __future__ import annotations

from pathlib import Path

from videofusion_jax.data.builders.common import VIDEO_EXTENSIONS, Source, SplitReport, VideoBuilder


class TaiChi(VideoBuilder):
  """Unlabelled Tai-Chi performance videos; one example per ``<split>/<name>`` file or frame folder."""

  name = "videofusion_taichi"
  DATASET = "taichi"
  DESCRIPTION = "TaiChi-HD: YouTube Tai-Chi performances cropped around the person (first-order-model)."
  HOMEPAGE = "https://github.com/AliaksandrSiarohin/first-order-model"
  SOURCE = ("AliaksandrSiarohin/first-order-model, data/taichi-loading/load_videos.py "
            "(https://github.com/AliaksandrSiarohin/first-order-model/tree/master/data/taichi-loading)")
  LAYOUT = ("  <manual_dir>/train/<name>.mp4   (a video file, or a folder <name>.mp4/ or <name>/ of PNG\n"
            "  <manual_dir>/test/<name>.mp4     frames 0000000.png, 0000001.png, ...; both kinds may mix)")
  SPLITS = ("train", "test")

  @classmethod
  def _check_layout(cls, root: Path) -> Path:
    missing = [f"{split}/" for split in cls.SPLITS if not (root / split).is_dir()]
    if missing:
      raise cls.not_found(f"{', '.join(missing)} missing. {cls._found_entries(root)}")
    return root

  def _list_sources(self, root: Path) -> dict[str, tuple[list[Source], SplitReport]]:
    out = {}
    for split in self.SPLITS:
      sources = []
      for entry in sorted((root / split).iterdir()):
        if entry.name.startswith("."):
          continue
        if entry.is_dir():
          sources.append(Source(id=f"{split}/{entry.name}", path=entry, is_frame_folder=True))
        elif entry.suffix.lower() in VIDEO_EXTENSIONS:
          sources.append(Source(id=f"{split}/{entry.name}", path=entry))
      out[split] = (sources, SplitReport())
    return out
