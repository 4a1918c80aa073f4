"""tf.data input pipelines: TFDS builder -> clips of N frames -> per-host numpy batches.

This is the only module (with the builders) that imports TensorFlow, and only when called.
Batches are dicts ``{'video': (B, N, H, W, 3) float32 in [-1, 1], 'label': (B,) int32}``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import ml_collections
import numpy as np


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not on disk; the message says where it is expected and how to get it."""


_HOW_TO_GET = {
    "ucf101": (
        "UCF101 (13,320 clips, 101 classes): prepare TFDS's `ucf101` builder once on a machine "
        "with internet (`tfds build ucf101 --data_dir=DIR`) and copy DIR here, then pass "
        "--config.data.data_dir=DIR. Source: https://www.crcv.ucf.edu/data/UCF101.php"),
    "sky_timelapse": (
        "Sky Time-lapse (MDGAN/DIGAN layout sky_train/<long>/<short>/*.jpg): download it from "
        "the MDGAN project page, then build it with the sky_timelapse builder into "
        "--config.data.data_dir (the builder is tracked in the datasets issue)."),
    "taichi": (
        "TaiChi-HD (first-order-model layout {train,test}/<name>.mp4): fetch it with the "
        "first-order-model `load_videos.py` script, then build it with the taichi builder into "
        "--config.data.data_dir (the builder is tracked in the datasets issue)."),
}


def _tf():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # silences a start-up notice; data only
  import tensorflow as tf

  # TensorFlow must leave accelerator memory to JAX.
  tf.config.set_visible_devices([], "GPU")
  return tf


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", str(Path.home() / "tensorflow_datasets"))


def get_builder(data: ml_collections.ConfigDict):
  """The prepared TFDS builder for ``data.name``; builds the demo set on first use."""
  _tf()
  import tensorflow_datasets as tfds

  data_dir = data.get("data_dir") or default_data_dir()
  if data.name == "demo_clips":
    from videofusion_jax.data.demo_clips import DemoClips

    builder = DemoClips(data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare()
    return builder
  if data.name not in _HOW_TO_GET:
    raise ValueError(f"unknown dataset {data.name!r}; known: demo_clips, {', '.join(_HOW_TO_GET)}.")
  try:
    builder = tfds.builder(data.name, data_dir=data_dir)
  except Exception as e:  # unregistered builder name
    raise DatasetNotFoundError(
        f"dataset {data.name!r} is not available in {data_dir} ({type(e).__name__}). "
        f"{_HOW_TO_GET[data.name]}") from None
  if not builder.is_prepared():
    raise DatasetNotFoundError(
        f"dataset {data.name!r} is not prepared in {data_dir}. {_HOW_TO_GET[data.name]}")
  return builder


def _clip_fn(tf, num_frames: int, stride: int, image_size: int, seed: int | None, start: str):
  """Maps an example to ``(N, S, S, 3)`` float32 in [-1, 1], taking N frames ``stride`` apart."""
  span = (num_frames - 1) * stride + 1

  def fn(index, example):
    video = example["video"]
    length = tf.shape(video)[0]
    # A clip shorter than the span repeats its last frame rather than failing.
    video = tf.concat([video, tf.repeat(video[-1:], tf.maximum(span - length, 0), axis=0)], 0)
    max_start = tf.maximum(length - span, 0)
    if start == "random":
      first = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64), index]),
                                          maxval=max_start + 1, dtype=tf.int32)
    else:  # the evaluation protocol: the middle of the video
      first = max_start // 2
    clip = video[first:first + span:stride]
    h, w = tf.shape(clip)[1], tf.shape(clip)[2]
    s = tf.minimum(h, w)
    clip = clip[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    clip = tf.image.resize(tf.cast(clip, tf.float32), (image_size, image_size), method="area",
                           antialias=True)
    clip = tf.clip_by_value(clip / 127.5 - 1.0, -1.0, 1.0)
    clip.set_shape((num_frames, image_size, image_size, 3))
    return {"video": clip, "label": tf.cast(example.get("label", 0), tf.int32)}

  return fn


def train_iterator(config: ml_collections.ConfigDict, local_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Endless per-host iterator of training batches (random clip starts, seeded shuffles)."""
  tf = _tf()
  import tensorflow_datasets as tfds

  builder = get_builder(config.data)
  split = tfds.even_splits(config.data.get("split", "train"), n=process_count)[process_index]
  ds = builder.as_dataset(split=split, shuffle_files=True,
                          read_config=tfds.ReadConfig(shuffle_seed=seed))
  if config.data.get("cache", False):
    ds = ds.cache()
  ds = ds.repeat().shuffle(config.data.get("shuffle_buffer", 256), seed=seed)
  ds = ds.enumerate().map(
      _clip_fn(tf, config.data.num_frames, config.data.frame_stride, config.data.image_size,
               seed, "random"), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def eval_clips(config: ml_collections.ConfigDict, clips_per_video: int) -> dict[str, np.ndarray]:
  """Deterministic real clips: ``clips_per_video`` evenly spaced windows from every video.

  Returns ``{'video': (M, N, S, S, 3) float32 in [-1, 1], 'label': (M,) int32}``.
  """
  tf = _tf()
  builder = get_builder(config.data)
  ds = builder.as_dataset(split=config.data.get("split", "train"), shuffle_files=False)
  n, stride, size = config.data.num_frames, config.data.frame_stride, config.data.image_size
  span = (n - 1) * stride + 1
  videos, labels = [], []
  for example in ds.as_numpy_iterator():
    frames = example["video"]
    starts = np.linspace(0, max(len(frames) - span, 0), clips_per_video).round().astype(int)
    for s in starts:
      clip = frames[s:s + span:stride]
      if len(clip) < n:
        clip = np.concatenate([clip, np.repeat(clip[-1:], n - len(clip), 0)])
      videos.append(clip)
      labels.append(example.get("label", 0))
  videos = tf.image.resize(tf.cast(np.stack(videos).reshape(-1, *videos[0].shape[1:]), tf.float32),
                           (size, size), method="area", antialias=True).numpy()
  videos = np.clip(videos / 127.5 - 1.0, -1.0, 1.0).reshape(len(labels), n, size, size, 3)
  return {"video": videos.astype(np.float32), "label": np.asarray(labels, np.int32)}
