"""Sky Time-lapse (MDGAN, Xiong et al. CVPR 2018) from its folders of jpg frames (MDGAN/DIGAN layout)."""
from __future__ import annotations

from pathlib import Path

from videofusion_jax.data.builders.common import Source, SplitReport, VideoBuilder, list_images

SPLIT_FOLDERS = {"train": "sky_train", "test": "sky_test"}


class SkyTimelapse(VideoBuilder):
  """Unlabelled time-lapse videos of skies; each ``<long_id>/<short_id>`` frame folder is one video."""

  name = "videofusion_sky_timelapse"
  DATASET = "sky_timelapse"
  DESCRIPTION = "Sky Time-lapse: time-lapse videos of skies as 640x360 jpg frames (MDGAN)."
  HOMEPAGE = "https://github.com/weixiong-ur/mdgan"
  SOURCE = "the MDGAN project, https://github.com/weixiong-ur/mdgan (sky_timelapse.zip, unzip it)"
  LAYOUT = ("  <manual_dir>/sky_train/<long_id>/<short_id>/*.jpg   (one video per <short_id> folder,\n"
            "  <manual_dir>/sky_test/<long_id>/<short_id>/*.jpg     frames in sorted filename order)\n"
            "  (<manual_dir>/sky_timelapse/sky_train/... is accepted too)")
  SPLITS = ("train", "test")

  @classmethod
  def _check_layout(cls, root: Path) -> Path:
    if not (root / "sky_train").is_dir() and (root / "sky_timelapse" / "sky_train").is_dir():
      root = root / "sky_timelapse"  # the zip extracts into a sky_timelapse/ folder
    missing = [f"{folder}/" for folder in SPLIT_FOLDERS.values() if not (root / folder).is_dir()]
    if missing:
      raise cls.not_found(f"{', '.join(missing)} missing. {cls._found_entries(root)}")
    return root

  def _list_sources(self, root: Path) -> dict[str, tuple[list[Source], SplitReport]]:
    out = {}
    for split, folder in SPLIT_FOLDERS.items():
      sources, report = [], SplitReport()
      for long_dir in sorted(p for p in (root / folder).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if list_images(long_dir):  # frames one level up: named in the summary, not dropped without a word
          report.corrupt[f"{folder}/{long_dir.name}"] = (
              f"frames directly in {folder}/{long_dir.name}/: expected {folder}/<long_id>/<short_id>/*.jpg (move "
              "them into a folder of their own there)")
        for short_dir in sorted(p for p in long_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
          rel = f"{folder}/{long_dir.name}/{short_dir.name}"
          sources.append(Source(id=rel, path=short_dir, is_frame_folder=True))
      out[split] = (sources, report)
    return out
