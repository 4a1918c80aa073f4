"""The builders by dataset name, ``prepare()`` to build one from its manual dir, and ``summarize()``.

This module imports every builder module; the builder modules import only ``common``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from videofusion_jax.data import tensorflow
from videofusion_jax.data.builders import demo_clips, sky_timelapse, taichi, ucf101, webvid
from videofusion_jax.data.builders.common import MAX_NAMES_PRINTED, VideoBuilder, VideoConfig, config_settings

__all__ = ["BUILDERS", "FILE_FORMAT", "prepare", "summarize", "unfinished_builds"]

FILE_FORMAT = "array_record"  # the pipeline reads records by index


# Dataset name -> builder class, in the order that error messages list them.
BUILDERS: dict[str, type[VideoBuilder]] = {cls.DATASET: cls for cls in (
    demo_clips.DemoClips, ucf101.Ucf101, sky_timelapse.SkyTimelapse, taichi.TaiChi, webvid.WebVid)}


def _make_builder(cls: type[VideoBuilder], data_dir: str, config: str | VideoConfig | None) -> VideoBuilder:
  names = [c.name for c in cls.BUILDER_CONFIGS]
  if isinstance(config, str) and config not in names:
    raise ValueError(f"{cls.DATASET}: unknown config {config!r}; known configs: {', '.join(names)} "
                     "(the name is the stored short side in pixels).")
  if config is not None and not isinstance(config, str | VideoConfig):
    raise TypeError(f"config must be a config name such as {names[0]!r} or a VideoConfig, not {type(config)}.")
  kind = type(cls.BUILDER_CONFIGS[0])
  if isinstance(config, VideoConfig) and not isinstance(config, kind):  # a plain one lacks, say, UCF101's fold
    raise TypeError(f"{cls.DATASET} needs a {kind.__name__} config (it has fields a VideoConfig lacks), not a "
                    f"{type(config).__name__}.")
  return cls(data_dir=data_dir, config=config, file_format=FILE_FORMAT)


def prepare(name: str, data_dir: str, manual_dir: str | None = None, config: str | VideoConfig | None = None,
            verbose: bool = True, build: bool = True) -> VideoBuilder:
  """The prepared builder for dataset ``name``, built first from ``manual_dir`` if it is not on disk yet.

  ``build=False`` only checks: it raises what a build would raise first (unknown name or config,
  a missing or misplaced ``manual_dir``) and returns the builder, prepared or not.

  Always builds ArrayRecord files. A prepared dataset is reused, never deleted or rebuilt.
  ``manual_dir`` defaults to TFDS's ``<data_dir>/downloads/manual``; demo_clips needs none.
  ``config`` is a config name (``"64"``, ``"128"``, ``"256"``; default ``"128"``) or a ``VideoConfig``.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(BUILDERS)}.")
  cls = BUILDERS[name]
  tensorflow()
  data_dir = os.path.expanduser(os.fspath(data_dir))
  builder = _make_builder(cls, data_dir, config)
  if verbose:
    note = unfinished_builds_note(builder)
    if note:
      print(note)
  if builder.is_prepared():
    fmt = builder.info.file_format
    if fmt is not None and fmt.value != FILE_FORMAT:
      raise ValueError(
          f"{builder.info.full_name} at {builder.data_dir} was built as {fmt.value}, but the pipeline reads "
          f"{FILE_FORMAT} files by index. It is not deleted automatically: move that folder away and call "
          "prepare() again to rebuild it.")
    built = builder.info.metadata.get("config") if builder.info.metadata else None
    asked = config_settings(builder.builder_config)
    if built is not None and any(built.get(k, v) != v for k, v in asked.items()):
      # TFDS keys the folder by the config's name alone: another config of that name got these records, silently.
      raise ValueError(f"{builder.info.full_name} at {builder.data_dir} was built with {built}, and this config "
                       f"{builder.builder_config.name!r} asks for {asked}: give the new config another name, or move "
                       "that folder away to build it again.")
    if verbose:
      print(f"Using prepared {builder.info.full_name} at {builder.data_dir}.")
    return builder
  if manual_dir is None and cls.NEEDS_MANUAL_DIR:
    manual_dir = os.path.join(data_dir, "downloads", "manual")
  root = cls.find_root(manual_dir) if cls.NEEDS_MANUAL_DIR else None
  if not build:
    return builder
  download_config = tfds.download.DownloadConfig(
      manual_dir=None if root is None else str(root), try_download_gcs=False)
  builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)
  if verbose:
    print(summarize(builder))
  return builder


def unfinished_builds(builder: VideoBuilder) -> list[tuple[Path, int, float]]:
  """The folders TFDS writes a build of ``builder``'s version into (``incomplete.XXXXXX_<version>`` beside
  it), found on disk: a build killed before it finished leaves its folder (one stopped by an exception or
  Ctrl-C removes its own), and so does a build running now in another process. Each with its size in bytes
  and the seconds since anything in it was last written."""
  version_dir = Path(builder.data_dir)
  found = []
  for folder in sorted(version_dir.parent.glob(f"incomplete.*_{version_dir.name}")):
    stats = []
    for path in (folder, *folder.rglob("*")):
      try:
        stats.append(path.lstat())
      except OSError:  # removed meanwhile (by the build writing it), or unreadable: the rest still counts
        pass
    if stats:
      found.append((folder, sum(st.st_size for st in stats[1:]),
                    max(0.0, time.time() - max(st.st_mtime for st in stats))))
  return found


def unfinished_builds_note(builder: VideoBuilder) -> str:
  """A note naming ``unfinished_builds(builder)`` and their size, or ''."""
  found = unfinished_builds(builder)
  if not found:
    return ""
  size = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"  # noqa: E731
  ago = lambda s: f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"  # noqa: E731
  folders = "".join(f"\n      {folder} ({size(n)}, last written {ago(age)} ago)" for folder, n, age in found)
  return (f"note: {len(found)} unfinished build folder(s) beside {builder.data_dir}, "
          f"{size(sum(n for _, n, _ in found))} in all:{folders}\n    A build killed before it finished leaves one; "
          "nothing reads them. Delete them (rm -r) unless a build of this dataset is running now in another process.")


def _names(items: Mapping[str, Any] | list[str], with_values: bool) -> str:
  keys = list(items)
  shown = [f"{k} ({items[k]})" if with_values else k for k in keys[:MAX_NAMES_PRINTED]]
  more = f"\n      ... and {len(keys) - MAX_NAMES_PRINTED} more" if len(keys) > MAX_NAMES_PRINTED else ""
  return "".join(f"\n      {s}" for s in shown) + more


def summarize(builder: VideoBuilder) -> str:
  """A per-split summary of a build, read from ``builder.info.metadata``."""
  meta = builder.info.metadata
  min_frames = builder.builder_config.min_frames
  lines = [f"Built {builder.info.full_name} ({FILE_FORMAT}) at {builder.data_dir}"]
  for split, r in meta.get("build_report", {}).items():
    lines.append(
        f"  {split}: {r['examples']} examples written ({r['frames']} frames); skipped "
        f"{len(r['corrupt'])} corrupt/unreadable, {len(r['too_short'])} too short (< {min_frames} frames), "
        f"{r['missing']} missing; converted {r['grayscale_videos']} grayscale videos and "
        f"{r['resized_frames']} frames of a different size.")
    if r["corrupt"]:
      lines.append("    corrupt/unreadable:" + _names(r["corrupt"], True))
    if r["too_short"]:
      lines.append("    too short (frames):" + _names(r["too_short"], True))
    if r["missing"]:
      lines.append(f"    missing ({r['missing']}), e.g.:" + _names(r["missing_examples"][:5], False))
  for split, reason in meta.get("omitted_splits", {}).items():
    lines.append(f"  {split}: omitted, {reason}.")
  lines.append("  Full lists: builder.info.metadata['build_report'].")
  return "\n".join(lines)
