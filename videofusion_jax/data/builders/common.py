"""What every video builder shares: configs, frame decoding and build reports (``registry`` builds them).

A builder lists its sources (video files or folders of frames) in a sorted order, decodes them
one at a time, resizes the frames so that the short side equals the config's ``resolution``
(aspect kept, both sides even), and writes ArrayRecord files in that order (``disable_shuffling``),
so record ``i`` is the ``i``-th source that decoded to at least ``min_frames`` frames.
``info.metadata`` keeps ``lengths[split]`` (frames per record, in record order) and
``build_report[split]`` (what was skipped and converted, and why), filled while the splits are
generated and written by TFDS with the rest of the dataset info. A split other than train with no
usable video is left out, the reason in ``omitted_splits[split]``; a train split without one stops the build.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from videofusion_jax.data import video_io
from videofusion_jax.data.builders import DatasetNotFoundError

__all__ = [
    "BUILDERS_HINT", "DatasetNotFoundError", "Decoded", "Source", "SplitReport", "VideoBuilder", "VideoConfig",
    "decode_frame_folder", "decode_video_file", "is_gray_video", "list_images", "record_key", "resize_frame",
    "resolution_configs", "stored_size",
]

RESOLUTIONS = (64, 128, 256)
DEFAULT_RESOLUTION = 128
DEFAULT_MIN_FRAMES = 16
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
BUILDERS_HINT = "--config.data.manual_dir=DIR (raw data) and --config.data.data_dir=DIR (where TFDS writes)"
MAX_NAMES_PRINTED = 10  # in error messages and build summaries
_MISSING_EXAMPLES_KEPT = 20
_KEY_RANGE = 2**128  # TFDS's record keys are 128-bit (tensorflow_datasets.core.shuffle.HKEY_SIZE)
# Grayscale modes PIL cannot convert to RGB, and what maps each to 8 bits: the mode says the bit
# depth, not the values (a dark 16-bit frame has no value above 255 and is still 16-bit). PNG is the
# only format we read that holds them: "I;16*" is a 16-bit PNG, and so is "I" (how Pillow < 10 opens
# one); "F" (float) is taken as 0..255.
_WIDE_GRAY_DIVISORS = {"I": 257.0, "I;16": 257.0, "I;16B": 257.0, "I;16L": 257.0, "F": 1.0}
_GRAY_MODES = frozenset({"1", "L", "LA"}) | frozenset(_WIDE_GRAY_DIVISORS)


@dataclasses.dataclass(eq=False)
class VideoConfig(tfds.core.BuilderConfig):
  """Frames are stored with their short side equal to ``resolution``; shorter videos are skipped."""

  resolution: int = DEFAULT_RESOLUTION
  min_frames: int = DEFAULT_MIN_FRAMES

  def __post_init__(self):
    if not isinstance(self.resolution, int) or self.resolution < 2 or self.resolution % 2:
      raise ValueError(f"VideoConfig {self.name!r}: resolution={self.resolution!r} must be an even int >= 2 "
                       "(yuv420 video and the pipeline's crops need even sizes).")
    if not isinstance(self.min_frames, int) or self.min_frames < 1:
      raise ValueError(f"VideoConfig {self.name!r}: min_frames={self.min_frames!r} must be an int >= 1.")


def resolution_configs(config_cls: type[VideoConfig] = VideoConfig, resolutions=RESOLUTIONS, suffix: str = "",
                       **fields) -> list[VideoConfig]:
  """One config per stored short side, named ``"64"``, ``"128"``, ... (plus ``suffix``)."""
  return [config_cls(name=f"{r}{suffix}", description=f"Frames stored with short side {r} px, aspect kept.",
                     resolution=r, **fields) for r in resolutions]


def stored_size(height: int, width: int, resolution: int) -> tuple[int, int]:
  """``(h, w)`` with the short side equal to ``resolution``, the aspect kept and both sides even."""
  if height < 1 or width < 1:
    raise ValueError(f"frame size {height}x{width} is empty.")
  short, long = min(height, width), max(height, width)
  new_long = max(2, 2 * math.floor(long * resolution / short / 2 + 0.5))
  return (resolution, new_long) if height <= width else (new_long, resolution)


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """``(H, W, 3)`` uint8 -> ``(h, w, 3)`` uint8 with PIL's antialiased bicubic; a no-op at the same size."""
  from PIL import Image

  if frame.shape[:2] == tuple(size):
    return frame
  return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BICUBIC))


@dataclasses.dataclass
class Source:
  """One video to decode: a file, or a folder of frames in filename order."""

  id: str  # relative to the manual dir; stored as the example's "id"
  path: Path
  is_frame_folder: bool = False
  features: dict[str, Any] = dataclasses.field(default_factory=dict)  # label, caption, ...


@dataclasses.dataclass
class Decoded:
  """Frames ready to store, ``(T, h, w, 3)`` uint8; ``frames`` is None when the video is too short."""

  frames: np.ndarray | None
  num_frames: int
  grayscale: bool = False
  resized_frames: int = 0  # frames whose size differed from the first frame's


def config_settings(c: VideoConfig) -> dict:
  """What a build's records depend on in its config, as its metadata records them (``metadata['config']``)."""
  return {"resolution": c.resolution, "min_frames": c.min_frames, **({"fold": c.fold} if hasattr(c, "fold") else {})}


def list_images(folder: Path) -> list[Path]:
  """The image files of a frame folder in the order of their names' numbers (``frame_2`` before ``frame_10``;
  zero-padded names sort as before), hidden files ignored."""
  return sorted((p for p in folder.iterdir()
                 if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()),
                key=frame_order)


def frame_order(path: Path) -> list:
  """A frame file's sort key: its name's runs of digits as numbers, the rest as lower-case text."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", path.name)]


def decode_frame_folder(folder: Path, resolution: int, min_frames: int) -> Decoded:
  """A folder of jpg/png frames -> ``Decoded``; raises ``VideoReadError`` on an unreadable frame."""
  from PIL import Image

  paths = list_images(folder)
  if len(paths) < min_frames:  # cheap check before decoding anything
    return Decoded(None, len(paths))
  frames, gray, first_size, size, resized = [], False, None, None, 0
  for path in paths:
    try:
      with Image.open(path) as image:
        image.load()
        gray = gray or image.mode in _GRAY_MODES
        if image.mode in _WIDE_GRAY_DIVISORS:  # PIL cannot convert these to RGB directly
          array = np.asarray(image, np.float64) / _WIDE_GRAY_DIVISORS[image.mode]
          image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))
        frame = np.asarray(image.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
      raise video_io.VideoReadError(f"cannot read frame {path.name}: {type(e).__name__}: {e}") from None
    if first_size is None:
      first_size = frame.shape[:2]
      size = stored_size(*first_size, resolution)
    elif frame.shape[:2] != first_size:
      resized += 1
    frames.append(resize_frame(frame, size))
  return Decoded(np.stack(frames), len(frames), grayscale=gray, resized_frames=resized)


def is_gray_video(path: Path) -> bool:
  """Whether the first video stream of ``path`` stores gray pixels (``gray``, ``gray16le``, ``ya8``, ...).
  ``read_video`` returns RGB either way, so the build report asks the stream."""
  import av

  try:
    with av.open(str(path)) as container:
      fmt = container.streams.video[0].codec_context.pix_fmt or ""
  except Exception:  # the file decoded, so only the count is at stake
    return False
  return fmt.startswith(("gray", "ya"))


def decode_video_file(path: Path, resolution: int, min_frames: int) -> Decoded:
  """A video file -> ``Decoded``; raises ``VideoReadError`` when it cannot be decoded."""
  frames = video_io.read_video(path)  # RGB uint8; PyAV already converts gray pixel formats
  if len(frames) < min_frames:
    return Decoded(None, len(frames))
  size = stored_size(frames.shape[1], frames.shape[2], resolution)
  return Decoded(np.stack([resize_frame(f, size) for f in frames]), len(frames), grayscale=is_gray_video(path))


@dataclasses.dataclass
class SplitReport:
  """What one split's build wrote and skipped; saved in ``info.metadata``."""

  examples: int = 0
  frames: int = 0
  lengths: list[int] = dataclasses.field(default_factory=list)
  corrupt: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> reason
  too_short: dict[str, int] = dataclasses.field(default_factory=dict)  # id -> decodable frames
  missing: int = 0  # listed in an index file (split list, CSV) but absent on disk
  missing_examples: list[str] = dataclasses.field(default_factory=list)
  grayscale_videos: int = 0
  resized_frames: int = 0

  def add_missing(self, source_id: str) -> None:
    self.missing += 1
    if len(self.missing_examples) < _MISSING_EXAMPLES_KEPT:
      self.missing_examples.append(source_id)

  def add_written(self, decoded: Decoded) -> None:
    self.examples += 1
    self.frames += decoded.num_frames
    self.lengths.append(decoded.num_frames)
    self.grayscale_videos += int(decoded.grayscale)
    self.resized_frames += decoded.resized_frames

  def as_metadata(self) -> dict[str, Any]:
    """JSON-ready, without ``lengths`` (stored separately under ``metadata['lengths']``)."""
    out = dataclasses.asdict(self)
    del out["lengths"]
    return out


def record_key(index: int, count: int) -> int:
  """The key of source ``index`` of ``count``: increasing with ``index`` and spread evenly over
  ``[0, 2**128)``. With ``disable_shuffling`` TFDS orders records by key and, once a split passes
  its in-memory limit (1 GB), puts record ``k`` in temporary bucket ``floor(k * 1000 / 2**128)`` of
  1000 and sorts one bucket at a time in memory: keys ``0, 1, 2, ...`` would all land in bucket 0,
  and the build would hold the whole split in memory."""
  return index * (_KEY_RANGE // count)


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """A DatasetInfo that never looks for TFDS's public bucket: these datasets are not there, and
  TFDS's lookup leaves an empty ``tmp*tfds`` folder in the system's temporary folder for each
  builder made before its data is prepared (19 per run of the test suite)."""

  def initialize_from_bucket(self) -> None:
    pass


class VideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the video builders. Subclasses set the class constants and ``_list_sources``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: all frames, short side resized to the config's resolution."}
  BUILDER_CONFIGS = resolution_configs()
  DEFAULT_BUILDER_CONFIG_NAME = str(DEFAULT_RESOLUTION)  # TFDS's name: without it TFDS takes the first, 64
  # Record i is the i-th generated example; the pipeline shuffles. TFDS reads it from the DatasetInfo.
  disable_shuffling = True

  DATASET = ""  # the name prepare() and BUILDERS use
  DESCRIPTION = ""
  HOMEPAGE = ""
  LAYOUT = ""  # the manual dir's expected layout, shown in DatasetNotFoundError
  SOURCE = ""  # where to get the raw data
  SPLITS: tuple[str, ...] = ("train", "test")
  NEEDS_MANUAL_DIR = True

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if cls.NEEDS_MANUAL_DIR and cls.LAYOUT:
      cls.MANUAL_DOWNLOAD_INSTRUCTIONS = f"{cls.LAYOUT}\nSource: {cls.SOURCE}"

  # --- what subclasses customise -------------------------------------------------------------
  def _video_feature(self) -> tfds.features.Video:
    return tfds.features.Video(shape=(None, None, None, 3), encoding_format="jpeg")

  def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {}

  def _supervised_keys(self) -> tuple[str, str] | None:
    return None

  @classmethod
  def _check_layout(cls, root: Path) -> Path:
    """Raises ``not_found`` unless ``root`` has the expected layout; returns the root to read."""
    return root

  def _list_sources(self, root: Path) -> dict[str, tuple[list[Source], SplitReport]]:
    """Per split: the sources in generation order, and a report with listing-time counts (missing)."""
    raise NotImplementedError

  def _decode(self, source: Source) -> Decoded:
    c = self.builder_config
    if source.is_frame_folder:
      return decode_frame_folder(source.path, c.resolution, c.min_frames)
    return decode_video_file(source.path, c.resolution, c.min_frames)

  # --- shared machinery ----------------------------------------------------------------------
  @classmethod
  def not_found(cls, problem: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{cls.DATASET}: {problem}\nExpected layout of the manual dir:\n{cls.LAYOUT}\n"
        f"Get the data from: {cls.SOURCE}\nThen pass {BUILDERS_HINT}; the TFDS dataset is built from "
        "the raw folder on first use.")

  @classmethod
  def find_root(cls, manual_dir: str | os.PathLike | None) -> Path:
    """The validated manual dir; raises ``DatasetNotFoundError`` naming the expected layout."""
    if manual_dir is None or not str(manual_dir):
      raise cls.not_found("no manual dir was given.")
    root = Path(os.path.expanduser(os.fspath(manual_dir)))
    if not root.is_dir():
      raise cls.not_found(f"the manual dir {root} does not exist or is not a folder.")
    return cls._check_layout(root)

  @classmethod
  def _found_entries(cls, root: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(names[:MAX_NAMES_PRINTED])
    if len(names) > MAX_NAMES_PRINTED:
      shown += f", ... ({len(names)} entries)"
    return f"{root} holds: {shown or 'nothing'}."

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"video": self._video_feature(), "num_frames": np.int32, "id": tfds.features.Text(),
                **self._extra_features()}
    return _LocalDatasetInfo(
        builder=self, description=self.DESCRIPTION, features=tfds.features.FeaturesDict(features),
        homepage=self.HOMEPAGE, supervised_keys=self._supervised_keys(), metadata=tfds.core.MetadataDict(),
        disable_shuffling=self.disable_shuffling)

  def _split_generators(self, dl_manager):
    manual = None
    if self.NEEDS_MANUAL_DIR:
      try:
        manual = dl_manager.manual_dir
      except AssertionError as e:  # missing or empty; TFDS's message (first line: the path) lacks our layout
        raise self.not_found(str(e).splitlines()[0]) from None
    root = self.find_root(manual)
    self._omitted: dict[str, str] = {}  # split -> why it is not built; _list_sources may add to it
    # TFDS writes info.metadata with dataset_info.json once every split's generator is exhausted;
    # _generate_examples fills lengths and build_report, split by split, in generation order.
    metadata = self.info.metadata
    metadata["lengths"], metadata["build_report"] = {}, {}
    generators = {}
    for split, (sources, report) in self._list_sources(root).items():
      if not sources:
        if split == "train":
          raise self.not_found(f"no {split} videos found under {root} (missing: {report.missing}, "
                               f"e.g. {report.missing_examples[:3]}).")
        self._omitted[split] = f"no videos found (missing: {report.missing})"
        continue
      # TFDS cannot drop a split once its generator runs, so the first usable video is found here: a test
      # split without one is omitted, a train split stops the build. It is decoded again when written
      # (one video per split), not held while the splits before it are written.
      first = self._first_usable(sources, report)
      if first is None:
        problems = (f"no usable video: {len(report.corrupt)} corrupt/unreadable, {len(report.too_short)} shorter "
                    f"than min_frames={self.builder_config.min_frames}, {report.missing} missing; first problems: "
                    f"{dict(list(report.corrupt.items())[:3])} {dict(list(report.too_short.items())[:3])}")
        if split == "train":
          raise ValueError(f"{self.DATASET}: split {split!r} has {problems}. Fix the raw data or pick a config "
                           "with a smaller min_frames.")
        self._omitted[split] = problems
        continue
      generators[split] = self._generate_examples(split, sources, report, first)
    metadata["omitted_splits"] = dict(self._omitted)
    metadata["config"] = config_settings(self.builder_config)
    return generators

  def _usable(self, source: Source, report: SplitReport) -> Decoded | None:
    """``source`` decoded, or None after counting it in ``report`` as corrupt or too short."""
    try:
      decoded = self._decode(source)
    except Exception as e:  # one bad file must never stop a build: skip, count and name it
      report.corrupt[source.id] = str(e) if isinstance(e, video_io.VideoReadError) else f"{type(e).__name__}: {e}"
      return None
    if decoded.frames is None:
      report.too_short[source.id] = decoded.num_frames
      return None
    return decoded

  def _first_usable(self, sources: list[Source], report: SplitReport) -> int | None:
    """The index of the first source that decodes to ``min_frames`` frames; the ones before it are
    counted in ``report``."""
    for index, source in enumerate(sources):
      if self._usable(source, report) is not None:
        return index
    return None

  def _generate_examples(self, split: str, sources: list[Source], report: SplitReport,
                         first: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(key, example)`` of each usable source from ``first`` (``_first_usable``) on, in order."""
    for index in range(first, len(sources)):
      source = sources[index]
      decoded = self._usable(source, report)
      if decoded is None:  # the first one decoded before; a file changed since is counted as any other
        continue
      report.add_written(decoded)
      example = {"video": decoded.frames, "num_frames": decoded.num_frames, "id": source.id, **source.features}
      decoded = None  # not held while the next source decodes
      yield record_key(index, len(sources)), example
    self.info.metadata["lengths"][split] = report.lengths
    self.info.metadata["build_report"][split] = report.as_metadata()
