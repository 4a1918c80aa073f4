"""CLIP image embeddings of every frame of a prepared dataset, computed once, stored beside it.

The paper conditions both generators on the CLIP image embedding of the clip's middle frame (the
key frame). The frames never change, so each is embedded once instead of running CLIP's image
tower in every train step (and keeping its weights on every device). Clips start at any frame,
so every frame is embedded, exactly as the pipeline decodes it: centre square, area-resized to
``data.image_size``, rounded to uint8, then ``clip.preprocess`` and ``clip.encode_image``.

Layout, in the TFDS dataset's own folder::

    clip_embeddings/<fingerprint>/<split>.npy    (frames of the split, D) float16, record order:
                                                 record r's frame i is row offsets[r] + i
    clip_embeddings/<fingerprint>/<split>.json   the CLIP directory, D, the frame size, frame counts

The fingerprint hashes the CLIP directory's config and weight files (names and sizes) and the
frame size, so another CLIP or size gets its own table. A table is written under a temporary
name and renamed when complete: an interrupted run leaves no partial table behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import ml_collections
import numpy as np

from videofusion_jax.data import pipeline


def fingerprint(clip_dir: str | Path, image_size: int) -> str:
  """12 hex digits identifying a CLIP directory's config and weights, and the frame size."""
  directory = Path(clip_dir).expanduser()
  h = hashlib.sha256(f"frame size {image_size}".encode())
  for name in ("config.json", "preprocessor_config.json"):
    if (directory / name).is_file():
      h.update((directory / name).read_bytes())
  for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("pytorch_model*.bin")):
    h.update(f"{path.name} {path.stat().st_size}".encode())
  return h.hexdigest()[:12]


def table_path(builder, split: str, clip_dir: str, image_size: int) -> Path:
  return Path(builder.data_dir) / "clip_embeddings" / fingerprint(clip_dir, image_size) / f"{split}.npy"


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """Frames in [-1, 1] (the pipeline's) -> uint8, as CLIP's preprocessing takes them."""
  return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def compute_table(config: ml_collections.ConfigDict, split: str, batch_size: int = 128, verbose: bool = True) -> Path:
  """Embeds every frame of ``split`` with the CLIP of ``model.encoder.clip_dir`` and writes the table
  (see the module docstring). Returns its path; an existing table is kept as it is."""
  from videofusion_jax.models import clip as clip_lib

  d, clip_dir = config.data, config.model.encoder.clip_dir
  source = pipeline._source(config, split, verbose=False)
  path = table_path(source.builder, split, clip_dir, d.image_size)
  if path.is_file():
    return path
  clip = clip_lib.load(clip_dir)
  tf = pipeline._tf()
  read = pipeline._reader(tf, source)
  jpeg = pipeline._is_jpeg(source.builder)
  total = int(source.lengths.sum())
  frames = tf.data.Dataset.range(len(source.lengths)).map(
      lambda i: pipeline.decode_frames(tf, read(i)["video"], d.image_size, jpeg))
  frames = frames.unbatch().batch(batch_size).prefetch(2)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.npy")
  table = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(total, clip.embed_dim))
  if verbose:
    print(f"Embedding the {total} frames of {source.builder.info.full_name} [{split}] with CLIP ({clip_dir}), "
          f"once; the table goes to {path}.", flush=True)
  start, done, last = time.time(), 0, 0.0
  try:
    for batch in frames.as_numpy_iterator():
      emb = np.asarray(clip.encode_image(clip.preprocess(to_uint8(batch))))
      table[done:done + len(batch)] = emb
      done += len(batch)
      if verbose and (time.time() - last > 30 or done == total):
        last = time.time()
        rate = done / max(last - start, 1e-9)
        print(f"  {done}/{total} frames, {rate:.0f}/s, {(total - done) / rate / 60:.1f} min left", flush=True)
    table.flush()
    del table
    path.with_suffix(".json").write_text(json.dumps(
        {"clip_dir": str(clip_dir), "embed_dim": clip.embed_dim, "image_size": d.image_size, "split": split,
         "dataset": source.builder.info.full_name, "lengths": source.lengths.tolist()}))
    os.replace(partial, path)
  finally:
    if partial.exists():
      partial.unlink()
  return path


def frame_table(config: ml_collections.ConfigDict, split: str, process_count: int = 1,
                verbose: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """``(table (frames, D) float16, memory-mapped; offsets (records,))`` for ``split``, computed first
  if missing (by a single process; a multi-host run asks for ``--mode=embed`` beforehand)."""
  source = pipeline._source(config, split, verbose=False)
  path = table_path(source.builder, split, config.model.encoder.clip_dir, config.data.image_size)
  if not path.is_file():
    if process_count > 1:
      raise pipeline.PipelineError(
          f"no CLIP frame embeddings for {source.builder.info.full_name} [{split}] yet ({path}); compute them once "
          "on one host with the same flags and --mode=embed, then start the multi-host run.")
    compute_table(config, split, verbose=verbose)
  table = np.load(path, mmap_mode="r")
  if table.shape[0] != int(source.lengths.sum()):
    raise pipeline.PipelineError(
        f"{path} has {table.shape[0]} rows but {source.builder.info.full_name} [{split}] has "
        f"{int(source.lengths.sum())} frames: the dataset was rebuilt. Delete {path.parent} to recompute it.")
  offsets = np.concatenate([[0], np.cumsum(source.lengths)[:-1]]).astype(np.int64)
  return table, offsets


def clip_embeddings(table: np.ndarray, offsets: np.ndarray, records: np.ndarray, firsts: np.ndarray,
                    num_frames: int, stride: int) -> np.ndarray:
  """The embeddings of the frames of clips ``(record, first frame)``: ``(B, N, D)`` float32."""
  rows = offsets[records][:, None] + firsts[:, None] + stride * np.arange(num_frames)
  return np.asarray(table[rows], np.float32)
