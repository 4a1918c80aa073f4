"""tf.data input pipelines: prepared TFDS dataset -> clips of N frames -> per-host numpy batches.

Examples are read by random access from the builders' ArrayRecord files, so the stream is a
pure function of ``(seed, position)``: host ``h`` of ``P`` owns a contiguous block of the
examples long enough for a clip, visits them in a fresh permutation seeded by ``(seed, epoch, h)``
every epoch, and draws each clip's first frame from ``(seed, position)``. Resuming at batch ``k`` therefore
rebuilds the same stream and skips ``k * B`` indices (integers, nothing is read or decoded).

Only the frames of the clip are decoded (JPEG: only the centre square of them), unless the
host's videos, decoded at the clip's size, fit in ``data.cache_mb``: then each is read and decoded
once, at the start, and clips are gathered from memory (the same values: frames are decoded and
resized one by one either way).
Batches are dicts ``{'video': (B, N, S, S, 3) float32 in [-1, 1], 'label': (B,) int32}``, and
with ``model.encoder.kind='clip'`` ``'frame_embeddings': (B, N, D)``, the stored CLIP embeddings
of the clip's frames, and for a prior on text ``'caption_embeddings': (B, D)`` (``data.embeddings``).
This module and the builders are the only ones that import TensorFlow, and only when called.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import ml_collections
import numpy as np

from videofusion_jax.data import tensorflow as _tf


class PipelineError(ValueError):
  """The dataset cannot feed this config (split, clip length, hosts); the message says what to change."""


_EPOCHS = 2**40  # an endless stream without Dataset.repeat(), whose epochs would share one order


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", str(Path.home() / "tensorflow_datasets"))


def get_builder(data: ml_collections.ConfigDict, build: bool = True, verbose: bool | None = None):
  """The prepared TFDS builder for ``data.name`` (e.g. ``ucf101/64``); builds it on first use
  from ``data.manual_dir`` (the raw files), or from the bundled clips for the demo.
  ``build=False`` only checks that it is prepared or could be built (``builders.prepare``);
  ``verbose`` (default: ``build``) says which dataset is used. Either way the dataset must fit
  ``data`` (``check_fits``: its labels and stored frame size, known before it is built)."""
  from videofusion_jax.data import builders

  name, _, builder_config = data.name.partition("/")
  prepare = functools.partial(builders.prepare, name, data.get("data_dir") or default_data_dir(),
                              manual_dir=data.get("manual_dir") or None, config=builder_config or None)
  try:
    builder = prepare(verbose=False, build=False)  # what a build would refuse first: a name, the manual_dir
    # Its labels and stored frame size are the builder's own, known before it is built: checked before a build
    # of hours (a dataset built at too small a size is no use to this config).
    check_fits(builder, data)
    say = build if verbose is None else verbose
    if say or (build and not builder.is_prepared()):  # to build it, or to say which dataset is used
      builder = prepare(verbose=say, build=build)
  except ValueError as e:  # the builders' messages name the file or value at fault
    if isinstance(e, PipelineError):
      raise
    raise PipelineError(f"cannot prepare {data.name}: {e}") from None
  return builder


def check_dataset(data: ml_collections.ConfigDict) -> None:
  """Raises what ``get_builder`` would, without building anything (hosts that wait while host 0 builds)."""
  get_builder(data, build=False)


def split_lengths(builder, split: str) -> np.ndarray:
  """Frame counts of the examples of ``split`` (``'train'`` or ``'train+test'``), in record order."""
  lengths = builder.info.metadata.get("lengths") if builder.info.metadata else None
  if not lengths:
    raise PipelineError(f"{builder.info.full_name} has no per-example lengths in its metadata; it was built "
                     "by an older version of this code: delete its folder and rebuild it.")
  parts = split.split("+")
  unknown = [p for p in parts if p not in lengths]
  if unknown:
    omitted = {p: why for p, why in (builder.info.metadata.get("omitted_splits") or {}).items() if p in unknown}
    why = "".join(f" Split {p!r} was left out when the dataset was built: {reason}." for p, reason in omitted.items())
    raise PipelineError(f"split {split!r} (config.data.split, data.eval_split or eval.split): "
                        f"{builder.info.full_name} has splits {sorted(lengths)}; combine them with '+' (slices such "
                        f"as 'train[:10%]' are not supported).{why}")
  return np.concatenate([np.asarray(lengths[p], np.int64) for p in parts])


def source_fingerprint(config: ml_collections.ConfigDict, split: str, content: bool = False) -> dict:
  """What the clips of ``split`` are read from: the built dataset's name and version, its video count and
  a digest of the videos' frame counts (a rebuild with other videos changes it); with ``content`` also
  TFDS's bytes of the split (``split_bytes``: a rebuild with other frames changes it), for what depends on
  the pixels (the evaluation's cached real-clip features), not on the videos' order and captions. Not its
  folder, which hosts may mount at different paths: they must all agree on whether a cache holds what it keys."""
  builder = get_builder(config.data, verbose=False)
  lengths = split_lengths(builder, split)
  out = {"builder": builder.info.full_name, "videos": int(len(lengths)),
         "lengths_sha256": hashlib.sha256(lengths.astype("<i8").tobytes()).hexdigest()[:16]}
  return {**out, "bytes": split_bytes(builder, split)} if content else out


def split_bytes(builder, split: str) -> int:
  """The bytes TFDS wrote for ``split``'s records (their encoded frames): a rebuild that keeps every video's
  frame count but changes its pixels (a decoder's fix) changes it."""
  return int(sum(builder.info.splits[p].num_bytes for p in split.split("+")))


def host_examples(eligible: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This host's contiguous block of the eligible record indices (neighbouring records share files)."""
  if not 0 <= process_index < process_count:
    raise PipelineError(f"process_index={process_index} is not in [0, {process_count}).")
  if len(eligible) < process_count:
    raise PipelineError(f"only {len(eligible)} examples are long enough for a clip, fewer than the "
                     f"{process_count} hosts; use fewer hosts or shorter clips (data.num_frames, data.frame_stride).")
  return np.array_split(eligible, process_count)[process_index]


@dataclasses.dataclass(frozen=True)
class _Source:
  builder: object
  split: str
  lengths: np.ndarray  # frames of every record of the split
  eligible: np.ndarray  # record indices of the examples long enough for one clip
  span: int  # frames one clip covers: (N - 1) x stride + 1


def check_classes(builder, num_classes: int) -> None:
  """``data.num_classes`` against the dataset's class labels: a label at or past ``num_classes`` would be
  read as the null label of guidance or index past the label embedding (NaN), and a dataset without
  labels would train a 'conditional' model on label 0 alone."""
  features = builder.info.features
  has = "label" in features.keys() and hasattr(features["label"], "num_classes")
  if num_classes and not has:
    raise PipelineError(f"config.data.num_classes={num_classes}: {builder.info.full_name} has no class labels; set "
                        "--config.data.num_classes=0 (unconditional).")
  if num_classes and features["label"].num_classes != num_classes:
    k = features["label"].num_classes
    raise PipelineError(f"config.data.num_classes={num_classes}: {builder.info.full_name} has {k} classes; set "
                        f"--config.data.num_classes={k} (or 0 to ignore its labels).")


def check_image_size(builder, image_size: int) -> None:
  """``data.image_size`` against the short side the dataset stores its frames at (its builder config's
  ``resolution``): a larger size would upsample every frame, silently."""
  stored = getattr(builder.builder_config, "resolution", None)
  if stored and image_size > stored:
    raise PipelineError(f"config.data.image_size={image_size}: {builder.info.full_name} stores its frames at {stored} "
                        f"px (the short side), so they would be upsampled; use --config.data.image_size <= {stored}, "
                        "or a config of the dataset built at a larger resolution (data.name=NAME/RESOLUTION).")


def check_fits(builder, data: ml_collections.ConfigDict) -> None:
  """The dataset can feed ``data`` as configured: its class labels (``check_classes``) and frame size
  (``check_image_size``)."""
  check_classes(builder, data.num_classes)
  check_image_size(builder, data.image_size)


def _source(config: ml_collections.ConfigDict, split: str, verbose: bool) -> _Source:
  d = config.data
  builder = get_builder(d, verbose=verbose)
  lengths = split_lengths(builder, split)
  span = (d.num_frames - 1) * d.frame_stride + 1
  eligible = np.flatnonzero(lengths >= span)
  short = len(lengths) - len(eligible)
  if not len(eligible):
    raise PipelineError(f"no video of {builder.info.full_name} [{split}] has the {span} frames that "
                     f"data.num_frames={d.num_frames} x data.frame_stride={d.frame_stride} need "
                     f"(longest: {lengths.max(initial=0)}); use shorter clips.")
  if short and verbose:
    print(f"{builder.info.full_name} [{split}]: {short} of {len(lengths)} videos have fewer than "
          f"{span} frames and are left out.")
  return _Source(builder, split, lengths, eligible, span)


def _reader(tf, source: _Source):
  """Maps a record index to the example's features, frames still encoded: ``video`` is ``(T,)`` strings."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import decode

  records = source.builder.as_data_source(source.split, deserialize_method=decode.DeserializeMethod.RAW_BYTES)
  features = source.builder.info.features

  def read(index):
    serialized = tf.numpy_function(lambda i: records[int(i)], [index], tf.string, stateful=False)
    serialized.set_shape(())
    return features.deserialize_example(serialized, decoders={"video": tfds.decode.SkipDecoding()})

  return read


# What TensorFlow and ArrayRecord say of a record file or a frame that is not whole.
_DAMAGED = re.compile(r"Riegeli|[Cc]orrupt|[Tt]runcat|Invalid JPEG|Not a JPEG|not a (valid )?PNG|DataLoss|"
                      r"premature end|checksum|hash mismatch|should be at least \d+ ?[KM]B")


def numpy_items(ds, source: _Source) -> Iterator:
  """``ds.as_numpy_iterator()`` of a dataset that reads ``source``'s records (``_reader``), where a record that
  cannot be read or decoded (TensorFlow's error: a file of the prepared dataset cut short by an interrupted copy
  or a full disk, a folder this host cannot read) is a PipelineError naming the dataset's folder and what to do,
  not TensorFlow's traceback."""
  tf = _tf()
  items = ds.as_numpy_iterator()
  while True:
    try:
      item = next(items)
    except StopIteration:
      return
    except tf.errors.ResourceExhaustedError:  # the host's memory, not the files
      raise
    except tf.errors.OpError as e:
      cause = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", e.message).strip().splitlines()
      cause = (cause[0] if cause else "")[:300]
      builder = source.builder
      if isinstance(e, tf.errors.DataLossError) or _DAMAGED.search(cause):
        advice = (f"a file of the prepared dataset in {builder.data_dir} is damaged, as when one was cut short (an "
                  "interrupted copy, a full disk when it was built). Delete that folder to have it prepared again on "
                  "the next run, or restore it from a backup.")
      else:  # permissions, a network mount that went away: nothing says the files are bad
        advice = (f"check that {builder.data_dir} can be read from here (its permissions; a network mount that is "
                  "still there), then run again.")
      raise PipelineError(f"cannot read {builder.info.full_name} [{source.split}] ({type(e).__name__}: {cause}): "
                          + advice) from None
    yield item


def decode_frames(tf, encoded, size: int, jpeg: bool):
  """Encoded frames ``(T,)`` -> their centre squares, area-resized: ``(T, S, S, 3)`` float32 in [-1, 1]."""
  shape = tf.io.extract_jpeg_shape(encoded[0]) if jpeg else tf.shape(tf.io.decode_png(encoded[0]))
  h, w = shape[0], shape[1]
  s = tf.minimum(h, w)
  window = tf.stack([(h - s) // 2, (w - s) // 2, s, s])

  def decode(frame):
    if jpeg:
      # Accurate, as TFDS, PIL and libjpeg's default decode: TensorFlow's own default (INTEGER_FAST) is off by up
      # to 11 levels of 255 in three pixels of four.
      return tf.io.decode_and_crop_jpeg(frame, window, channels=3, dct_method="INTEGER_ACCURATE")
    return tf.image.crop_to_bounding_box(tf.io.decode_png(frame, channels=3), window[0], window[1], s, s)

  frames = tf.map_fn(decode, encoded, fn_output_signature=tf.TensorSpec((None, None, 3), tf.uint8))
  frames = tf.image.resize(tf.cast(frames, tf.float32), (size, size), method="area", antialias=True)
  return tf.clip_by_value(frames / 127.5 - 1.0, -1.0, 1.0)


def _clip(tf, example, first, num_frames: int, stride: int, size: int, jpeg: bool):
  """Frames ``first, first + stride, ...`` of an example, centre square, resized: ``(N, S, S, 3)`` in [-1, 1]."""
  encoded = tf.gather(example["video"], tf.cast(first, tf.int64) + tf.range(num_frames, dtype=tf.int64) * stride)
  clip = decode_frames(tf, encoded, size, jpeg)
  clip.set_shape((num_frames, size, size, 3))
  return {"video": clip, "label": tf.cast(example.get("label", 0), tf.int32)}


@dataclasses.dataclass(frozen=True)
class _Decoded:
  frames: np.ndarray  # (F, S, S, 3) float32 in [-1, 1]: every frame of the host's videos, video after video
  first_row: np.ndarray  # (R,) int64: a record's first row in ``frames`` (-1: another host's record)
  labels: np.ndarray  # (R,) int32


def decoded_videos(tf, source: _Source, read, local: np.ndarray, size: int, jpeg: bool, limit_mb: float,
                   verbose: bool) -> _Decoded | None:
  """Every frame of the records ``local``, read with ``read`` (``_reader``) and decoded and resized
  once (``decode_frames``); None when they would take more than ``limit_mb`` MB."""
  num_frames = int(source.lengths[local].sum())
  mb = num_frames * size * size * 3 * 4 / 2**20
  if mb > limit_mb:
    return None
  if verbose:
    print(f"{source.builder.info.full_name} [{source.split}]: decoding the {num_frames} frames of {len(local)} "
          f"videos once and keeping them in memory ({mb:.1f} MB, at most data.cache_mb={limit_mb:g})")

  def decode(index):
    example = read(index)
    return decode_frames(tf, example["video"], size, jpeg), tf.cast(example.get("label", 0), tf.int32)

  videos = tf.data.Dataset.from_tensor_slices(tf.constant(local, tf.int64)).map(
      decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  first_row = np.full(len(source.lengths), -1, np.int64)
  labels = np.zeros(len(source.lengths), np.int32)
  chunks, row = [], 0
  for index, (frames, label) in zip(local, numpy_items(videos, source)):
    if len(frames) != source.lengths[index]:
      raise PipelineError(f"{source.builder.info.full_name} [{source.split}] record {index} has {len(frames)} "
                          f"frames, its metadata {source.lengths[index]}; delete the dataset's folder and rebuild it.")
    first_row[index], labels[index] = row, label
    chunks.append(frames)
    row += len(frames)
  return _Decoded(np.concatenate(chunks), first_row, labels)


def _is_jpeg(builder) -> bool:
  return getattr(builder.info.features["video"], "_encoding_format", "png") == "jpeg"


def record_order(local: np.ndarray, seed: int, position: int = 0, *, process_index: int, process_count: int):
  """The endless ``tf.data`` stream of record indices of host ``process_index`` of ``process_count``
  from ``position`` on: epoch ``e`` visits ``local`` in the permutation seeded by
  ``(seed, e * process_count + process_index)`` (one host: ``(seed, e)``). Skipping costs integers only."""
  tf = _tf()
  n = len(local)
  first_epoch, offset = divmod(position, n)
  local_t = tf.constant(local, tf.int64)

  def epoch_order(epoch):
    # Each host its own permutation: with one shared permutation the examples at the same offset of
    # equal blocks would always land in the same global batch.
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.stack([seed, epoch * process_count + process_index]))
    return tf.data.Dataset.from_tensor_slices(tf.gather(local_t, perm))

  return tf.data.Dataset.range(first_epoch, _EPOCHS).flat_map(epoch_order).skip(offset)


def train_iterator(config: ml_collections.ConfigDict, local_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1, start_batch: int = 0,
                   verbose: bool = True) -> Iterator[dict]:
  """Endless per-host iterator of training batches, starting at batch ``start_batch`` of the stream.

  ``train_iterator(..., start_batch=k)`` yields exactly what ``train_iterator(...)`` yields after
  its first ``k`` batches (same seed and host layout): resuming continues the stream.
  """
  tf = _tf()
  d = config.data
  source = _source(config, d.get("split", "train"), verbose)
  local = host_examples(source.eligible, process_index, process_count)
  position = start_batch * local_batch_size  # examples this host has consumed
  indices = record_order(local, seed, position, process_index=process_index, process_count=process_count)
  positions = tf.data.Dataset.range(position, 2**62)
  read = _reader(tf, source)
  jpeg = _is_jpeg(source.builder)

  clip_table = caption_table = None
  if config.model.get("condition") == "embedding" and config.model.encoder.kind == "clip":
    from videofusion_jax.data import embeddings
    embeddings.resolve_clip_dir(config, verbose, process_count)  # says which CLIP
    clip_table = embeddings.frame_table(config, source.split, process_count, verbose)
    if config.model.prior.condition == "text":
      caption_table = embeddings.caption_table(config, source.split, process_count, verbose)

  decoded = decoded_videos(tf, source, read, local, d.image_size, jpeg, d.cache_mb, verbose)
  if decoded is None:
    def video_of(index):
      """``(length, clip(first))`` of record ``index``: read, then only the clip's frames decoded."""
      example = read(index)
      return (tf.shape(example["video"], out_type=tf.int64)[0],
              lambda first: _clip(tf, example, first, d.num_frames, d.frame_stride, d.image_size, jpeg))
  else:
    frames, first_row = tf.constant(decoded.frames), tf.constant(decoded.first_row)
    lengths, labels = tf.constant(source.lengths), tf.constant(decoded.labels)
    steps = tf.range(d.num_frames, dtype=tf.int64) * d.frame_stride

    def video_of(index):
      """The same, gathered from the frames decoded once."""
      return lengths[index], lambda first: {"video": tf.gather(frames, first_row[index] + first + steps),
                                            "label": labels[index]}

  def load(pos, index):
    length, clip_at = video_of(index)
    # The clip's start depends on (seed, host, position) only, not on the order of arrival.
    first = tf.random.stateless_uniform([], seed=tf.stack([seed, pos * process_count + process_index]),
                                        maxval=tf.maximum(length - source.span, 0) + 1, dtype=tf.int64)
    clip = clip_at(first)
    if clip_table is None:
      return clip
    clip.update(record=index, first=first)
    if caption_table is not None:  # which of the record's captions: another stream of the same position
      clip["caption_draw"] = tf.random.stateless_uniform([], seed=tf.stack([pos * process_count + process_index,
                                                                             seed]), dtype=tf.float32)
    return clip

  ds = tf.data.Dataset.zip((positions, indices)).map(load, num_parallel_calls=tf.data.AUTOTUNE,
                                                      deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  if clip_table is None:
    return numpy_items(ds, source)
  return _with_clip_embeddings(numpy_items(ds, source), clip_table, caption_table, d.num_frames, d.frame_stride)


def _with_clip_embeddings(batches, frame_table, caption_table, num_frames: int, stride: int) -> Iterator[dict]:
  """Adds ``frame_embeddings`` ``(B, N, D)``, the stored CLIP embeddings of each clip's frames, and
  with a caption table ``caption_embeddings`` ``(B, D)``, one of the record's captions."""
  from videofusion_jax.data import embeddings

  for batch in batches:
    records = batch.pop("record")
    batch["frame_embeddings"] = embeddings.clip_embeddings(*frame_table, records, batch.pop("first"),
                                                           num_frames, stride)
    if caption_table is not None:
      batch["caption_embeddings"] = embeddings.chosen_caption_embeddings(*caption_table, records,
                                                                         batch.pop("caption_draw"))
    yield batch


def eval_plan(num_clips: int, eligible: np.ndarray, lengths: np.ndarray, span: int,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The evaluation protocol: which record and first frame each of ``num_clips`` real clips uses.

  Clip ``k`` comes from video ``order[p]``, ``p = k % V``, of a seeded permutation of the ``V``
  eligible videos, on that video's visit ``e = k // V`` of its ``E_p = ceil((num_clips - p) / V)``
  visits: its first frame is ``round((L - span) * (e + 0.5) / E_p)``, so one visit takes the middle
  clip and several visits spread evenly over the video (each video by its own count: where
  ``num_clips`` is not a multiple of ``V``, the videos visited once less are still centred).
  Returns ``(records, firsts)``, each ``(num_clips,)``.
  """
  v = len(eligible)
  order = np.random.default_rng(seed).permutation(eligible)
  k = np.arange(num_clips)
  records = order[k % v]
  visits = -(-(num_clips - k % v) // v)  # ceil((num_clips - p) / V)
  firsts = np.round((lengths[records] - span) * ((k // v) + 0.5) / visits).astype(np.int64)
  return records, firsts


def eval_shares(num_clips: int, process_count: int) -> list[np.ndarray]:
  """Every host's clips of ``num_clips`` (indices), contiguous and in process order: what
  ``eval_iterator`` reads on each host, and how evaluation splits its generated batches."""
  return np.array_split(np.arange(num_clips), process_count)


def eval_records(config: ml_collections.ConfigDict, num_clips: int, split: str) -> np.ndarray:
  """The record of each of the ``num_clips`` real clips of the evaluation protocol (``eval_plan``), in the
  order ``eval_iterator`` reads them, ``(num_clips,)``."""
  source = _source(config, split, verbose=False)
  return eval_plan(num_clips, source.eligible, source.lengths, source.span)[0]


def eval_iterator(config: ml_collections.ConfigDict, num_clips: int, batch_size: int,
                  process_index: int = 0, process_count: int = 1, split: str | None = None,
                  verbose: bool = True) -> Iterator[dict]:
  """This host's share of the ``num_clips`` real clips of the evaluation protocol (``eval_plan``),
  in batches of ``batch_size`` (the last one may be smaller). Deterministic."""
  tf = _tf()
  d = config.data
  split = split or d.get("eval_split") or d.get("split", "train")
  source = _source(config, split, verbose)
  records, firsts = eval_plan(num_clips, source.eligible, source.lengths, source.span)
  mine = eval_shares(num_clips, process_count)[process_index]
  read = _reader(tf, source)
  jpeg = _is_jpeg(source.builder)

  def load(index, first):
    return _clip(tf, read(index), first, d.num_frames, d.frame_stride, d.image_size, jpeg)

  ds = tf.data.Dataset.from_tensor_slices((records[mine], firsts[mine]))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return numpy_items(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE), source)


def eval_clips(config: ml_collections.ConfigDict, num_clips: int, split: str | None = None) -> dict[str, np.ndarray]:
  """All ``num_clips`` real clips of the evaluation protocol at once (single host):
  ``{'video': (M, N, S, S, 3) float32 in [-1, 1], 'label': (M,) int32}``."""
  batches = list(eval_iterator(config, num_clips, batch_size=64, split=split, verbose=False))
  return {k: np.concatenate([b[k] for b in batches]) for k in ("video", "label")}
