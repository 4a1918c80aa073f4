"""UCF101 (13,320 clips of 101 human actions) from the official .avi files and split lists."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

from videofusion_jax.data.builders.common import Source, SplitReport, VideoBuilder, VideoConfig, resolution_configs

FOLDS = (1, 2, 3)
NUM_CLASSES = 101


@dataclasses.dataclass(eq=False)
class Ucf101Config(VideoConfig):
  """Adds the official train/test ``fold`` (1, 2 or 3)."""

  fold: int = 1

  def __post_init__(self):
    super().__post_init__()
    if self.fold not in FOLDS:
      raise ValueError(f"Ucf101Config {self.name!r}: fold={self.fold!r} must be one of {FOLDS}.")


def _configs() -> list[Ucf101Config]:
  configs = resolution_configs(Ucf101Config)  # "64", "128", "256": fold 1, the paper's
  for fold in FOLDS[1:]:
    configs += resolution_configs(Ucf101Config, suffix=f"_fold{fold}", fold=fold)
  return configs


def read_class_index(path: Path) -> list[str]:
  """``classInd.txt`` (lines ``1 ApplyEyeMakeup``) -> class names in index order."""
  entries = []
  for line_no, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2 or not parts[0].isdigit():
      raise ValueError(f"{path}:{line_no}: expected '<index> <ClassName>', got {line!r}.")
    entries.append((int(parts[0]), parts[1]))
  entries.sort()
  if [i for i, _ in entries] != list(range(1, len(entries) + 1)):
    raise ValueError(f"{path}: class indices must run 1..{len(entries)} without gaps.")
  return [name for _, name in entries]


def read_split_list(path: Path, class_names: list[str]) -> dict[str, int]:
  """A train/test list -> ``{relative path: label}``; the label comes from the class folder name."""
  index = {name.lower(): i for i, name in enumerate(class_names)}
  out = {}
  for line_no, line in enumerate(path.read_text().splitlines(), 1):
    parts = line.split()
    if not parts:
      continue
    rel = parts[0].replace("\\", "/")
    folder = rel.split("/")[0].lower()
    if "/" not in rel or folder not in index:
      raise ValueError(f"{path}:{line_no}: {rel!r} is not '<ClassName>/<file>.avi' with a class of classInd.txt.")
    label = index[folder]
    if len(parts) > 1 and not parts[1].isdecimal():
      raise ValueError(f"{path}:{line_no}: the label after {rel!r} is {parts[1]!r}, not a class number of "
                       f"classInd.txt (1-{len(class_names)}); the split file is damaged: unzip the split files again.")
    if len(parts) > 1 and int(parts[1]) - 1 != label:  # trainlists carry a 1-based label too
      raise ValueError(f"{path}:{line_no}: label {parts[1]} disagrees with the class folder of {rel!r} "
                       f"({label + 1} in classInd.txt); the split files do not belong together.")
    out[rel] = label
  return out


class Ucf101(VideoBuilder):
  """UCF101 action recognition videos, official split ``fold`` (1 by default)."""

  name = "videofusion_ucf101"  # TFDS registers its own "ucf101"
  DATASET = "ucf101"
  DESCRIPTION = "UCF101: 13,320 YouTube clips of 101 actions, 320x240 at 25 fps; label = action."
  HOMEPAGE = "https://www.crcv.ucf.edu/data/UCF101.php"
  SOURCE = ("https://www.crcv.ucf.edu/data/UCF101.php (UCF101.rar, unrar it; and "
            "UCF101TrainTestSplits-RecognitionTask.zip, unzip it next to it)")
  LAYOUT = ("  <manual_dir>/UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi   (13,320 .avi files)\n"
            "  <manual_dir>/ucfTrainTestlist/classInd.txt                 ('1 ApplyEyeMakeup' ...)\n"
            "  <manual_dir>/ucfTrainTestlist/trainlist0{1,2,3}.txt, testlist0{1,2,3}.txt")
  BUILDER_CONFIGS = _configs()
  SPLITS = ("train", "test")

  def _extra_features(self):
    # The names come from classInd.txt at build time; a prepared dataset reloads them from its info.
    return {"label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}

  def _supervised_keys(self):
    return ("video", "label")

  @classmethod
  def _check_layout(cls, root: Path) -> Path:
    problems = []
    if not (root / "UCF-101").is_dir():
      problems.append("UCF-101/ is missing")
    if not (root / "ucfTrainTestlist" / "classInd.txt").is_file():
      problems.append("ucfTrainTestlist/classInd.txt is missing")  # the fold's lists are checked when read
    if problems:
      raise cls.not_found(f"{'; '.join(problems)}. {cls._found_entries(root)}")
    return root

  def _list_sources(self, root: Path) -> dict[str, tuple[list[Source], SplitReport]]:
    lists = root / "ucfTrainTestlist"
    class_names = read_class_index(lists / "classInd.txt")
    if len(class_names) != NUM_CLASSES:
      raise ValueError(f"{lists / 'classInd.txt'} lists {len(class_names)} classes; UCF101 has {NUM_CLASSES}. "
                       "Use the classInd.txt of UCF101TrainTestSplits-RecognitionTask.zip.")
    self.info.features["label"].names = class_names  # written to the dataset info with the records
    fold = self.builder_config.fold
    on_disk = _case_insensitive_index(root / "UCF-101")
    out = {}
    for split, filename in (("train", f"trainlist0{fold}.txt"), ("test", f"testlist0{fold}.txt")):
      path = lists / filename
      if not path.is_file():
        raise self.not_found(f"ucfTrainTestlist/{filename} (fold {fold}) is missing.")
      report, sources = SplitReport(), []
      for rel, label in sorted(read_split_list(path, class_names).items()):
        actual = on_disk.get(rel.lower())
        if actual is None:
          report.add_missing(rel)
        else:
          sources.append(Source(id=actual, path=root / "UCF-101" / actual, features={"label": label}))
      out[split] = (sorted(sources, key=lambda s: s.id), report)
    both = sorted({s.id for s in out["train"][0]} & {s.id for s in out["test"][0]})
    if both:  # one video in both splits: the test figures would be on training videos
      raise ValueError(f"{len(both)} video(s) are in both trainlist0{fold}.txt and testlist0{fold}.txt of {lists} "
                       f"(e.g. {both[:3]}): the split lists do not belong together; use the lists of one "
                       "UCF101TrainTestSplits-RecognitionTask.zip.")
    return out


def _case_insensitive_index(videos: Path) -> dict[str, str]:
  """``{'class/file.avi' lowercased: actual relative path}``: the official lists spell some names
  differently from the files (``HandStandPushups`` vs ``HandstandPushups``)."""
  index = {}
  for folder in videos.iterdir():
    if folder.is_dir():
      for f in folder.iterdir():
        index[f"{folder.name}/{f.name}".lower()] = f"{folder.name}/{f.name}"
  return index
