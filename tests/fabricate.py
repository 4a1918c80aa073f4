"""Tiny copies of the real datasets' on-disk layouts, cut from the real demo clips, for tests.

Each ``make_<dataset>(root)`` writes the layout under ``root`` and returns a ``Layout`` saying what
a build must produce: the examples per split in record order (id, frame count, label/caption,
source path) and the files it must skip (corrupt, too short, missing) and convert (grayscale,
odd-size frames). Sources are 96x72 (so config "64" stores 86x64) and 10-28 frames long, so a
build with ``min_frames=16`` keeps the long ones and skips the 10-frame ones.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import re
from pathlib import Path

import numpy as np

from videofusion_jax.data import video_io

HEIGHT, WIDTH = 72, 96
SHORT = 10  # frames of each too-short video (< the default min_frames of 16)
FPS = 25


@dataclasses.dataclass
class Example:
  id: str
  path: Path
  num_frames: int
  is_frame_folder: bool = False
  label: int | None = None
  caption: str | None = None


@dataclasses.dataclass
class Layout:
  """What a build of the fabricated folder must produce (examples in record order)."""

  root: Path
  examples: dict[str, list[Example]]
  corrupt: dict[str, list[str]]
  too_short: dict[str, dict[str, int]]
  missing: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  grayscale: dict[str, int] = dataclasses.field(default_factory=dict)
  resized_frames: dict[str, int] = dataclasses.field(default_factory=dict)
  class_names: list[str] | None = None

  def finalize(self) -> Layout:
    for split in self.examples:
      self.examples[split].sort(key=lambda e: e.id)
      for table in (self.corrupt, self.missing):
        table.setdefault(split, [])
      self.too_short.setdefault(split, {})
      self.grayscale.setdefault(split, 0)
      self.resized_frames.setdefault(split, 0)
    return self


@functools.cache
def _clip(index: int) -> np.ndarray:
  """The first 48 frames of demo clip ``index``, centre-cropped to 4:3 and resized to 96x72."""
  import av
  from PIL import Image

  frames = []
  with av.open(str(video_io.demo_clip_dir() / video_io.DEMO_CLIPS[index])) as container:
    for frame in container.decode(video=0):
      image = frame.to_image()
      w, h = image.size
      cw = min(w, h * 4 // 3)
      ch = cw * 3 // 4
      left, top = (w - cw) // 2, (h - ch) // 2
      frames.append(np.asarray(image.crop((left, top, left + cw, top + ch)).resize((WIDTH, HEIGHT), Image.BOX)))
      if len(frames) == 48:
        break
  return np.stack(frames)


def piece(clip: int, start: int, length: int) -> np.ndarray:
  """``(length, 72, 96, 3)`` uint8 frames of demo clip ``clip`` from frame ``start`` (start + length <= 48)."""
  return _clip(clip)[start:start + length]


def write_video(path: Path, frames: np.ndarray, codec: str = "libx264", pixel_format: str = "yuv420p") -> Path:
  """Encodes frames with PyAV; the container comes from the suffix (.mp4, .avi). ``pixel_format="gray"``
  needs a codec that stores it (ffv1; this libx264 turns it into yuv420p)."""
  import imageio.v3 as iio

  path.parent.mkdir(parents=True, exist_ok=True)
  iio.imwrite(path, frames, plugin="pyav", codec=codec, fps=FPS, out_pixel_format=pixel_format)
  return path


def write_frames(folder: Path, frames: np.ndarray, ext: str = ".jpg", gray: bool = False, name_width: int = 7
                 ) -> Path:
  """One image per frame, ``0000000.jpg`` ...; ``gray`` stores single-channel (mode L) images."""
  from PIL import Image

  folder.mkdir(parents=True, exist_ok=True)
  for i, frame in enumerate(frames):
    image = Image.fromarray(frame)
    if gray:
      image = image.convert("L")
    image.save(folder / f"{i:0{name_width}d}{ext}", quality=95)
  return folder


def write_random_bytes(path: Path, size: int = 4096, seed: int = 0) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
  return path


def write_truncated(path: Path, frames: np.ndarray) -> Path:
  """A valid mp4 cut to its first third: the index (moov atom, written last) is gone."""
  write_video(path, frames)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 3])
  return path


def ucf101_class_names() -> list[str]:
  """The 101 UCF101 class names in classInd.txt order (the list TFDS ships, no download)."""
  import tensorflow_datasets as tfds

  return tfds.core.tfds_path("video/ucf101_labels.txt").read_text().split()


def make_ucf101(root: Path) -> Layout:
  """``UCF-101/<Class>/v_*.avi`` (mpeg4) + ``ucfTrainTestlist/``; one listed file is spelt like the
  official lists' ``HandStandPushups`` while the file says ``HandstandPushups``."""
  names = ucf101_class_names()
  root = Path(root)
  videos = root / "UCF-101"
  lists = root / "ucfTrainTestlist"
  lists.mkdir(parents=True, exist_ok=True)
  (lists / "classInd.txt").write_text("".join(f"{i + 1} {n}\r\n" for i, n in enumerate(names)))  # CRLF as shipped

  def avi(cls: str, group: int, frames: np.ndarray | None, file_cls: str | None = None) -> str:
    rel = f"{cls}/v_{file_cls or cls}_g{group:02d}_c01.avi"
    if frames is not None:
      write_video(videos / rel, frames, codec="mpeg4")
    return rel

  eye, hand, yoyo = names.index("ApplyEyeMakeup"), names.index("HandstandPushups"), names.index("YoYo")
  train = [(avi("ApplyEyeMakeup", 8, piece(0, 0, 20)), eye, 20),
           (avi("YoYo", 9, piece(1, 4, 24)), yoyo, 24)]
  hand_rel = avi("HandstandPushups", 8, piece(2, 2, 18))  # on disk: v_HandstandPushups_...
  train.append((hand_rel, hand, 18))
  corrupt = write_random_bytes(videos / "YoYo/v_YoYo_g10_c01.avi")
  short_rel = avi("ApplyEyeMakeup", 10, piece(1, 0, SHORT))
  test = [(avi("ApplyEyeMakeup", 1, piece(2, 10, 22)), eye, 22),
          (avi("YoYo", 1, piece(0, 20, 17)), yoyo, 17)]
  missing = "HandstandPushups/v_HandStandPushups_g01_c01.avi"

  listed_hand = hand_rel.replace("v_HandstandPushups", "v_HandStandPushups")  # the official lists' spelling
  train_lines = [f"{rel} {label + 1}" for rel, label, _ in train if rel != hand_rel]
  train_lines += [f"{listed_hand} {hand + 1}", f"YoYo/{corrupt.name} {yoyo + 1}", f"{short_rel} {eye + 1}"]
  (lists / "trainlist01.txt").write_text("\r\n".join(train_lines) + "\r\n")
  (lists / "testlist01.txt").write_text("\r\n".join([rel for rel, _, _ in test] + [missing]) + "\r\n")
  return Layout(
      root=root,
      examples={s: [Example(rel, videos / rel, n, label=label) for rel, label, n in items]
                for s, items in (("train", train), ("test", test))},
      corrupt={"train": [f"YoYo/{corrupt.name}"]}, too_short={"train": {short_rel: SHORT}},
      missing={"test": [missing]}, class_names=names).finalize()


def make_sky(root: Path) -> Layout:
  """``sky_train/<long>/<short>/*.jpg`` and ``sky_test/...``; one folder has a frame of another
  size, one a truncated jpg, one only 10 frames."""
  root = Path(root)
  ex = {"train": [], "test": []}

  def folder(split: str, long_id: str, short_id: str, frames: np.ndarray) -> tuple[str, Path]:
    rel = f"sky_{split}/{long_id}/{short_id}"
    return rel, write_frames(root / rel, frames, name_width=5)

  for split, long_id, short_id, frames in (("train", "07U1", "07U1_1", piece(0, 0, 20)),
                                           ("train", "07U1", "07U1_2", piece(1, 0, 24)),
                                           ("test", "1vN5", "1vN5_1", piece(2, 5, 21))):
    rel, path = folder(split, long_id, short_id, frames)
    ex[split].append(Example(rel, path, len(frames), is_frame_folder=True))
  # An odd-size frame: the builder resizes it to the first frame's (here: the stored) size.
  from PIL import Image

  odd = ex["train"][1].path / "00003.jpg"
  Image.open(odd).resize((80, 60), Image.BICUBIC).save(odd, quality=95)
  short_rel, _ = folder("train", "0Ab3", "0Ab3_1", piece(2, 0, SHORT))
  bad_rel, bad = folder("train", "0Ab3", "0Ab3_2", piece(0, 10, 18))
  data = (bad / "00005.jpg").read_bytes()
  (bad / "00005.jpg").write_bytes(data[:len(data) // 2])
  return Layout(root=root, examples=ex, corrupt={"train": [bad_rel]}, too_short={"train": {short_rel: SHORT}},
                resized_frames={"train": 1}).finalize()


def make_taichi(root: Path) -> Layout:
  """``{train,test}/<name>.mp4`` files mixed with FOMM-style PNG-frame folders (one grayscale) and a
  grayscale (pixel format gray) ``.avi``."""
  root = Path(root)
  ex = {"train": [], "test": []}
  for split, name, frames in (("train", "aaa#001#chunk.mp4", piece(0, 0, 24)),
                              ("test", "ddd#001.mp4", piece(1, 8, 20))):
    path = write_video(root / split / name, frames)
    ex[split].append(Example(f"{split}/{name}", path, len(frames)))
  gray = write_frames(root / "train" / "bbb#002.mp4", piece(1, 0, 18), ext=".png", gray=True)
  ex["train"].append(Example("train/bbb#002.mp4", gray, 18, is_frame_folder=True))
  rgb = write_frames(root / "test" / "eee", piece(2, 0, 19), ext=".png")
  ex["test"].append(Example("test/eee", rgb, 19, is_frame_folder=True))
  gray_video = write_video(root / "train" / "fff.avi", piece(2, 4, 17), codec="ffv1", pixel_format="gray")
  ex["train"].append(Example("train/fff.avi", gray_video, 17))
  write_truncated(root / "train" / "ccc.mp4", piece(2, 0, 20))
  write_video(root / "train" / "zzz.mp4", piece(0, 30, SHORT))
  (root / "train" / "notes.txt").write_text("not a video: ignored")
  return Layout(root=root, examples=ex, corrupt={"train": ["train/ccc.mp4"]},
                too_short={"train": {"train/zzz.mp4": SHORT}}, grayscale={"train": 2}).finalize()


WEBVID_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")


def make_webvid(root: Path, flavour: str = "10M") -> Layout:
  """``results_<flavour>_{train,val}.csv`` + ``videos/<page_dir>/<videoid>.mp4`` with rows whose
  videos were never downloaded; captions with commas, quotes, a newline and non-ASCII text; the train
  CSV's last row is cut short, as by an interrupted download (skipped as corrupt, named by its line)."""
  root = Path(root)
  rows = {"train": [], "val": []}
  ex = {"train": [], "val": []}
  missing = {"train": [], "val": []}

  def row(split, videoid, page_dir, caption, frames=None, corrupt=False):
    rows[split].append({"videoid": videoid, "contentUrl": f"https://example.invalid/{videoid}.mp4",
                        "duration": "PT00H00M10S", "page_dir": page_dir, "name": caption})
    rel = f"videos/{page_dir}/{videoid}.mp4"
    if corrupt:
      write_random_bytes(root / rel, seed=1)
    elif frames is None:
      missing[split].append(rel)
    else:
      write_video(root / rel, frames)
      if len(frames) >= 16:
        ex[split].append(Example(rel, root / rel, len(frames), caption=caption))
    return rel

  row("train", "1066655", "006001_006050", 'Sunset over the sea, "golden hour", 4k', piece(0, 0, 20))
  row("train", "21179416", "006001_006050", "Aerial view of a city\nat night", piece(1, 0, 22))
  row("train", "99000001", "006001_006050", "never downloaded")
  row("train", "1004", "000001_000050", "Café au lait – close-up of a cup ☕", piece(2, 0, 16))
  bad = row("train", "1005", "000001_000050", "corrupt download", corrupt=True)
  short = row("train", "1006", "000001_000050", "too short", piece(2, 20, SHORT))
  row("train", "1007", "000051_000100", "page folder never created")
  row("val", "31000", "000001_000050", "Val clip, with a comma", piece(1, 20, 18))
  row("val", "31001", "000001_000050", "missing val clip")
  for split, items in rows.items():
    with open(root / f"results_{flavour}_{split}.csv", "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=WEBVID_COLUMNS)
      writer.writeheader()
      writer.writerows(items)
  train_csv = root / f"results_{flavour}_train.csv"
  cut_line = train_csv.read_text(encoding="utf-8").count("\n") + 1  # the caption with a newline spans 2 lines
  with open(train_csv, "a", encoding="utf-8") as f:
    f.write("1008,https://example.invalid/1008.mp4,PT00H0")  # no page_dir, name, newline
  return Layout(root=root, examples=ex, corrupt={"train": [bad, f"{train_csv.name} line {cut_line}"]},
                too_short={"train": {short: SHORT}}, missing=missing).finalize()


def decode_independently(example: Example) -> np.ndarray:
  """The source frames ``(T, H, W, 3)`` uint8, decoded without the builders' code (PyAV / TF)."""
  if example.is_frame_folder:
    import tensorflow as tf

    # By the number in each name (frame_2 before frame_10), as a frame folder's frames are numbered.
    paths = sorted((p for p in example.path.iterdir() if p.suffix in (".jpg", ".png")),
                   key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)])
    return [tf.io.decode_image(p.read_bytes(), channels=3).numpy() for p in paths]  # list: sizes may differ
  import av

  with av.open(str(example.path)) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def resize_independently(frames, size: tuple[int, int]) -> np.ndarray:
  """Antialiased bicubic resize with TensorFlow (the builders use PIL): ``(T, h, w, 3)`` uint8."""
  import tensorflow as tf

  out = [tf.image.resize(tf.convert_to_tensor(f, tf.float32), size, method="bicubic", antialias=True) for f in frames]
  return np.clip(np.round(np.stack([o.numpy() for o in out])), 0, 255).astype(np.uint8)
