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

    clip_embeddings/<fingerprint>/<split>.captions.npy         (captions, D) float16: CLIP text embeddings,
                                                               each record's captions in turn
    clip_embeddings/<fingerprint>/<split>.captions.counts.npy  (records,) int64: captions per record
    clip_embeddings/<fingerprint>/<split>.captions.json        the CLIP directory, the captions, their source
                                                               and a digest of the tokenizer files

The fingerprint hashes the CLIP directory's config and weight files (names and sizes) and the
frame size, so another CLIP or size gets its own table. The tokenizer does not enter it (it
does not touch the frames): a caption table whose recorded source (the built dataset, for the
demo clips the repository's captions) or tokenizer differ from the current ones is computed again
in place, and said. A table is written under a temporary
name and renamed when complete: an interrupted run leaves no partial table behind. A damaged
table is an error that names it (deleting it makes the next run compute it again).

Captions come from the dataset's ``caption`` feature (WebVid) or, for the demo clips, from the
captions written for them in the repository (several per clip). Without ``model.encoder.clip_dir``
the project's own small CLIP is used (``models.project_clip``: its vocabulary learned from the
captions, trained contrastively on the dataset's frames and captions), made once and saved beside
the dataset as ``project_clip_d<D>/``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import ml_collections
import numpy as np

from videofusion_jax.data import pipeline
from videofusion_jax.data.video_io import to_uint8  # the pipeline's [-1, 1] frames as CLIP's uint8 input

# The frames' preprocessing, in the tables' key: "v2", resized to the preprocessor's size.shortest_edge before the
# crop (2026-12-05); "v3", JPEG frames decoded accurately (pipeline.decode_frames) and a size of height and width
# resized to exactly that (2026-12-07). Earlier ones ("" before v2) are still the same CLIP in a run's record.
PREPROCESSING = "v3"
EARLIER_PREPROCESSING = ("v2", "")


def fingerprint(clip_dir: str | Path, image_size: int, preprocessing: str = PREPROCESSING) -> str:
  """12 hex digits identifying a CLIP directory's config and weights (every byte: weights fine-tuned
  in part and saved over the same directory get other tables), the frame size and the ``preprocessing``
  of the frames (``PREPROCESSING``; an earlier one gives the fingerprint recorded then)."""
  directory = Path(clip_dir).expanduser()
  h = hashlib.sha256(f"frame size {image_size}{f', preprocessing {preprocessing}' if preprocessing else ''}".encode())
  for name in ("config.json", "preprocessor_config.json"):
    if (directory / name).is_file():
      h.update((directory / name).read_bytes())
  if preprocessing == "v3" and _resizes_to_height_and_width(directory / "preprocessor_config.json"):
    h.update(b"size height x width: v3")
  for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("pytorch_model*.bin")):
    stat = path.stat()
    h.update(f"{path.name} {stat.st_size}".encode())
    h.update(_file_digest(str(path.absolute()), stat.st_size, stat.st_mtime_ns))
  return h.hexdigest()[:12]


def is_recorded_clip(clip_dir: str | Path, image_size: int, recorded: str) -> bool:
  """Whether ``recorded`` (a run's ``clip_fingerprint``) is the fingerprint of the CLIP in ``clip_dir``, as
  recorded under this preprocessing or an earlier one: a new preprocessing makes new tables, not another CLIP
  (a run recorded before it still resumes, samples and is taken by ``init_base_from``)."""
  return any(fingerprint(clip_dir, image_size, p) == recorded for p in (PREPROCESSING, *EARLIER_PREPROCESSING))


def _resizes_to_height_and_width(path: Path) -> bool:
  """Whether the preprocessor config at ``path`` gives its size as height and width (``clip.CLIPConfig.resize_hw``)."""
  try:
    size = json.loads(path.read_text()).get("size")
  except (OSError, ValueError, AttributeError):  # none, or one clip.load refuses with its own message
    return False
  return isinstance(size, dict) and "shortest_edge" not in size and {"height", "width"} <= size.keys()


# The files a CLIP tokenizer may read (clip_tokenizer.CLIPTokenizer.from_directory).
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")


def tokenizer_digest(clip_dir: str | Path) -> str:
  """16 hex digits identifying what the tokenizer of a CLIP directory reads (its vocabulary, merges and pad
  token, from whichever files hold them): what the caption table depends on besides the captions and the
  weights. Files it does not read, or a re-save that changes only their layout, leave it as it was. Parsed
  once per process while its files stay as they are (every start asks for it more than once)."""
  directory = Path(clip_dir).expanduser().absolute()
  stats = tuple((name, p.stat().st_size, p.stat().st_mtime_ns) for name in _TOKENIZER_FILES
                if (p := directory / name).is_file())
  return _tokenizer_digest(str(directory), stats)


@functools.lru_cache(maxsize=4)
def _tokenizer_digest(directory: str, stats: tuple) -> str:
  from videofusion_jax.models.clip import CLIPLoadError
  from videofusion_jax.models.clip_tokenizer import CLIPTokenizer

  del stats  # the cache's key: files saved anew are read again
  try:
    tok = CLIPTokenizer.from_directory(directory, context_length=2)
  except (OSError, ValueError) as e:
    raise CLIPLoadError(str(e)) from None
  h = hashlib.sha256(b"tokenizer")
  h.update(json.dumps([sorted(tok.vocab.items()), tok.merges, tok.pad_id]).encode())
  return h.hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
  """sha256 of a file's bytes, once per process for each (path, size, modification time): a released
  CLIP's 600 MB take about a second."""
  del size, mtime_ns  # the cache's key: a file saved anew is read again
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(2**23):
      h.update(chunk)
  return h.digest()


def table_path(builder, split: str, clip_dir: str | Path, image_size: int, kind: str = "frames") -> Path:
  """Where the frame (``kind='frames'``) or caption (``'captions'``) embeddings of ``split`` go."""
  name = f"{split}.npy" if kind == "frames" else f"{split}.captions.npy"
  return Path(builder.data_dir) / "clip_embeddings" / fingerprint(clip_dir, image_size) / name


def record_captions(config: ml_collections.ConfigDict, split: str, records: np.ndarray | None = None,
                    first: int | None = None) -> list[tuple[str, ...]]:
  """The captions of each of ``records`` (default: every record of ``split``, or its ``first`` ones, in order):
  the dataset's ``caption`` feature, or the repository's captions of the demo clips."""
  source = pipeline._source(config, split, verbose=False)
  features = source.builder.info.features
  tf = pipeline._tf()
  read = pipeline._reader(tf, source)
  if records is None:  # a record is read whole (its video too): no more of them than asked for
    records = tf.data.Dataset.range(len(source.lengths) if first is None else min(first, len(source.lengths)))
  else:
    records = tf.data.Dataset.from_tensor_slices(np.asarray(records, np.int64))
  if "caption" in features:
    return [(c.decode("utf-8"),) for c in pipeline.numpy_items(records.map(lambda i: read(i)["caption"]), source)]
  if config.data.name == "demo_clips":
    from videofusion_jax.data.builders.demo_clips import CAPTIONS, CLASS_NAMES
    return [CAPTIONS[CLASS_NAMES[int(label)]]
            for label in pipeline.numpy_items(records.map(lambda i: read(i)["label"]), source)]
  raise pipeline.PipelineError(f"{source.builder.info.full_name} [{split}] has no captions, so a prior on text "
                               "(model.prior.condition='text') has none to learn from or to be evaluated on; use a "
                               "captioned dataset "
                               "(webvid, or demo_clips with the repository's captions), or model.prior.condition="
                               "'label'.")


def _frames_per_record(config: ml_collections.ConfigDict, split: str, per_record: int = 32,
                       max_records: int = 2000) -> tuple[np.ndarray, np.ndarray]:
  """Up to ``per_record`` evenly spaced frames of each of the first ``max_records`` records, as the
  pipeline decodes them (uint8 ``(M, S, S, 3)``), and each frame's record ``(M,)``."""
  d = config.data
  source = pipeline._source(config, split, verbose=False)
  tf = pipeline._tf()
  read = pipeline._reader(tf, source)
  jpeg = pipeline._is_jpeg(source.builder)

  def pick(i):
    encoded = read(i)["video"]
    n = tf.shape(encoded, out_type=tf.int64)[0]
    index = tf.unique(tf.cast(tf.linspace(0.0, tf.cast(n - 1, tf.float32), per_record), tf.int64))[0]
    return pipeline.decode_frames(tf, tf.gather(encoded, index), d.image_size, jpeg), i

  frames, records = [], []
  for f, i in pipeline.numpy_items(tf.data.Dataset.range(min(len(source.lengths), max_records)).map(pick), source):
    frames.append(to_uint8(f))
    records.append(np.full(len(f), i))
  return np.concatenate(frames), np.concatenate(records)


def make_project_clip(config: ml_collections.ConfigDict, directory: Path, verbose: bool = True,
                      max_records: int = 2000) -> None:
  """The project's own CLIP for the training split, its vocabulary learned from and its weights
  trained on the frames and captions of the first ``max_records`` records when the dataset has
  captions (else initialised), saved to ``directory`` in Hugging Face's layout (atomically; when
  another process got there first, its copy is kept)."""
  from videofusion_jax.models import clip as clip_lib
  from videofusion_jax.models import project_clip

  split = config.data.get("split", "train")
  try:
    per_record = record_captions(config, split, first=max_records)
  except pipeline.PipelineError:
    per_record = None  # an image-only dataset: the text tower is never used
  captions = [c for caps in per_record or [] for c in caps]
  clip = project_clip.project_clip(config.model.encoder.embed_dim, captions)
  if per_record:
    frames, frame_records = _frames_per_record(config, split, max_records=max_records)
    caption_records = np.repeat(np.arange(len(per_record)), [len(c) for c in per_record])
    start = time.time()
    clip, figures = project_clip.train(clip, clip.preprocess(frames), frame_records, captions, caption_records)
    figures.update(frames=len(frames), captions=len(captions), seconds=round(time.time() - start, 1))
    if verbose:
      print(f"Trained the project's own CLIP on {len(frames)} frames and {len(captions)} captions in "
            f"{time.time() - start:.0f} s: contrastive loss {figures['loss_first']:.2f} -> {figures['loss_last']:.2f}, "
            f"{100 * figures['retrieval']:.0f}% of the frames nearest to a caption of their own video.", flush=True)
  partial = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
  try:
    clip_lib.save_pretrained(clip, partial)
    (partial / "project_clip.json").write_text(json.dumps({"trained": bool(per_record), **(figures if per_record
                                                                                             else {})}))
    try:
      os.replace(partial, directory)
    except OSError:
      if not (directory / "model.safetensors").is_file():
        raise
  finally:  # renamed: nothing left; another process's made first (one CLIP kept), or stopped: this one's part
    shutil.rmtree(partial, ignore_errors=True)


def project_clip_dir(config: ml_collections.ConfigDict) -> Path:
  """Where the project's own CLIP for the training dataset goes: beside the dataset, one per width."""
  builder = pipeline.get_builder(config.data, verbose=False)
  return Path(builder.data_dir) / f"project_clip_d{config.model.encoder.embed_dim}"


def resolve_clip_dir(config: ml_collections.ConfigDict, verbose: bool = True, process_count: int = 1) -> Path:
  """``model.encoder.clip_dir``, or the project's own CLIP beside the training dataset (made once, by
  a single process: a multi-host run asks for ``--mode=embed`` beforehand)."""
  if config.model.encoder.clip_dir:
    directory = Path(config.model.encoder.clip_dir).expanduser()
    if verbose:
      print(f"CLIP: {directory} (model.encoder.clip_dir)", flush=True)
    return directory
  directory = project_clip_dir(config)
  if not (directory / "model.safetensors").is_file():
    if process_count > 1:
      builder = pipeline.get_builder(config.data, verbose=False)
      raise pipeline.PipelineError(
          f"the project's own CLIP for {builder.info.full_name} is not made yet ({directory}); make it and the "
          "embedding tables once on one host with the same flags and --mode=embed, then start the multi-host run.")
    make_project_clip(config, directory, verbose)
  if verbose:
    trained = json.loads((directory / "project_clip.json").read_text()).get("trained")
    how = "trained on this dataset's frames and captions" if trained else "initialised, not trained: no captions"
    print(f"CLIP: the project's own small CLIP ({directory}: {how}; no model.encoder.clip_dir was given).",
          flush=True)
  return directory


def load_clip(config: ml_collections.ConfigDict, verbose: bool = True, process_count: int = 1):
  """The CLIP of ``model.encoder.clip_dir``, or the project's own; says which when ``verbose``.
  Loaded once per directory and process (again when its files change)."""
  return _load_clip(str(resolve_clip_dir(config, verbose, process_count)))


def _load_clip(directory: str):
  # Keyed on the files too: a tokenizer or weights saved anew in the same directory are read again.
  return _load_clip_files(directory, fingerprint(directory, 0), tokenizer_digest(directory))


@functools.lru_cache(maxsize=2)
def _load_clip_files(directory: str, weights: str, tokenizer: str):
  from videofusion_jax.models import clip as clip_lib

  del weights, tokenizer  # the cache's key
  return clip_lib.load(directory)


def _open_table(path: Path, mmap: bool = True) -> np.ndarray:
  """A stored table (memory-mapped when ``mmap``); a damaged one is a PipelineError that names it."""
  try:
    return np.load(path, mmap_mode="r" if mmap else None)
  except (OSError, ValueError, EOFError) as e:  # truncated (EOFError: to nothing), overwritten, not .npy
    raise pipeline.PipelineError(f"{path} is damaged or unreadable ({e}); delete it and the next run (or --mode=embed) "
                                 "computes it again.") from None


def compute_table(config: ml_collections.ConfigDict, split: str, batch_size: int = 128, verbose: bool = True) -> Path:
  """Embeds every frame of ``split`` with the CLIP of ``model.encoder.clip_dir`` and writes the table
  (see the module docstring). Returns its path; an existing table is kept as it is."""
  d, clip_dir = config.data, resolve_clip_dir(config, verbose=False)
  source = pipeline._source(config, split, verbose=False)
  path = table_path(source.builder, split, clip_dir, d.image_size)
  if path.is_file():
    _check_frame_table(path, _open_table(path), source, split)  # a damaged or stale table: said, not "computed"
    return path
  clip = _load_clip(str(clip_dir))
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
    for batch in pipeline.numpy_items(frames, source):
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
         "dataset": source.builder.info.full_name, "lengths": source.lengths.tolist(),
         "bytes": pipeline.split_bytes(source.builder, split)}))
    os.replace(partial, path)
  finally:
    if partial.exists():
      partial.unlink()
  return path


def _ensure_table(config: ml_collections.ConfigDict, split: str, kind: str, process_count: int, verbose: bool):
  """``(source, path)`` of the ``kind`` table of ``split``, computed first if missing (by a single
  process; a multi-host run asks for ``--mode=embed`` beforehand)."""
  source = pipeline._source(config, split, verbose=False)
  path = table_path(source.builder, split, resolve_clip_dir(config, False, process_count), config.data.image_size,
                    kind)
  if not path.is_file():
    if process_count > 1:
      what = "frame" if kind == "frames" else "caption"
      raise pipeline.PipelineError(
          f"no CLIP {what} embeddings for {source.builder.info.full_name} [{split}] yet ({path}); compute them "
          "once on one host with the same flags and --mode=embed, then start the multi-host run.")
    (compute_table if kind == "frames" else compute_caption_table)(config, split, verbose=verbose)
  return source, path


def frame_table(config: ml_collections.ConfigDict, split: str, process_count: int = 1,
                verbose: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """``(table (frames, D) float16, memory-mapped; offsets (records,))`` for ``split`` (``_ensure_table``)."""
  source, path = _ensure_table(config, split, "frames", process_count, verbose)
  table = _check_frame_table(path, _open_table(path), source, split)
  offsets = np.concatenate([[0], np.cumsum(source.lengths)[:-1]]).astype(np.int64)
  return table, offsets


def _check_frame_table(path: Path, table: np.ndarray, source, split: str) -> np.ndarray:
  """``table`` when it is of the dataset as built now: as many rows as frames, and the videos' frame counts
  and TFDS's bytes of the split (``pipeline.split_bytes``) its record (``<split>.json``) gives; a
  PipelineError otherwise. The same total from other videos, the same ones in another order or with other
  pixels (a dataset rebuilt, a table copied in beside it) put other frames' rows under each clip, silently."""
  rows, name = int(source.lengths.sum()), f"{source.builder.info.full_name} [{split}]"
  try:
    stat = path.with_suffix(".json").stat()
    recorded = _frame_table_record(str(path.with_suffix(".json")), stat.st_size, stat.st_mtime_ns)
  except (OSError, ValueError, AttributeError):  # a table without its record (an older version): rows alone
    recorded = {}
  if table.shape[0] != rows:
    why = f"has {table.shape[0]} rows but {name} has {rows} frames"
  elif ((recorded.get("lengths") is not None and recorded["lengths"] != source.lengths.tolist())
        or (recorded.get("bytes") is not None and recorded["bytes"] != pipeline.split_bytes(source.builder, split))):
    why = (f"was computed from another build of {name} (its videos' frame counts, order or encoded frames differ "
           f"from {path.with_suffix('.json')})")
  else:
    return table
  raise pipeline.PipelineError(f"{path} {why}: the dataset was rebuilt. Delete {path.parent} to recompute it.")


@functools.lru_cache(maxsize=4)
def _frame_table_record(path: str, size: int, mtime_ns: int) -> dict:
  """The frame counts and bytes a frame table's record gives, read once per process for each (path, size,
  modification time), as ``_file_digest``: a start checks the table twice (before training and as the input
  opens), and WebVid's record holds ~10M counts."""
  del size, mtime_ns  # the cache's key: a record written anew is read again
  record = json.loads(Path(path).read_text())
  return {k: record.get(k) for k in ("lengths", "bytes")}


def clip_embeddings(table: np.ndarray, offsets: np.ndarray, records: np.ndarray, firsts: np.ndarray,
                    num_frames: int, stride: int) -> np.ndarray:
  """The embeddings of the frames of clips ``(record, first frame)``: ``(B, N, D)`` float32."""
  rows = offsets[records][:, None] + firsts[:, None] + stride * np.arange(num_frames)
  return np.asarray(table[rows], np.float32)


def _caption_source(config: ml_collections.ConfigDict, split: str, clip_dir: Path) -> dict:
  """What a caption table of ``split`` is computed from, known without reading a record (a start must not read
  WebVid's millions): the built dataset (``pipeline.source_fingerprint``), for the demo clips a digest of the
  repository's captions, and a digest of the tokenizer's files."""
  source = dict(pipeline.source_fingerprint(config, split))
  if config.data.name == "demo_clips":
    from videofusion_jax.data.builders.demo_clips import CAPTIONS, CLASS_NAMES
    text = json.dumps([list(CLASS_NAMES), {k: list(v) for k, v in CAPTIONS.items()}], sort_keys=True)
    source["repository_captions"] = hashlib.sha256(text.encode()).hexdigest()[:16]
  return {"source": source, "tokenizer": tokenizer_digest(clip_dir)}


def _caption_table_stale(path: Path, current: dict) -> str | None:
  """Why the caption table at ``path`` is not that of ``current`` (``_caption_source``), or None when it is; a
  record without one of its keys (a table of an older version) is not compared on it. Damaged files are a
  PipelineError that names them."""
  meta_file, counts_file = path.with_suffix(".json"), path.with_suffix(".counts.npy")
  if not meta_file.is_file() or not counts_file.is_file():
    return f"unrecorded captions ({meta_file.name} or {counts_file.name} is missing: an interrupted run)"
  try:
    meta = json.loads(meta_file.read_text())
  except (OSError, ValueError) as e:
    meta = f"unreadable ({e})"
  if not isinstance(meta, dict):
    raise pipeline.PipelineError(f"{meta_file} is damaged: {meta if isinstance(meta, str) else 'not a JSON object'}; "
                                 f"delete {path} and the next run (or --mode=embed) computes the caption embeddings "
                                 "again.")
  was = meta.get("source")
  if isinstance(was, dict):
    differ = sorted(k for k in set(was) | set(current["source"]) if was.get(k) != current["source"].get(k))
    if differ:
      return f"other captions (the dataset or the repository's captions changed: {', '.join(differ)})"
  if meta.get("tokenizer") not in (None, current["tokenizer"]):
    return "captions tokenized by another tokenizer (its files were saved anew)"
  counts = _open_table(counts_file, mmap=False)
  if _open_table(path).shape[:1] != (int(counts.sum()),):
    return "another number of captions than its record"
  return None


def compute_caption_table(config: ml_collections.ConfigDict, split: str, batch_size: int = 256,
                          verbose: bool = True) -> Path:
  """Embeds every caption of ``split`` (``record_captions``) with CLIP's text tower and writes the
  caption table (see the module docstring). Returns its path; an existing table is kept when it was
  computed from the current captions with the current tokenizer, else computed again in place (said)."""
  clip_dir = resolve_clip_dir(config, verbose=False)
  source = pipeline._source(config, split, verbose=False)
  path = table_path(source.builder, split, clip_dir, config.data.image_size, kind="captions")
  current = _caption_source(config, split, clip_dir)
  if path.is_file():
    stale = _caption_table_stale(path, current)
    if stale is None:
      return path
    if verbose:
      print(f"{path} holds the embeddings of {stale}; computing it again.", flush=True)
  per_record = record_captions(config, split)
  captions = [c for caps in per_record for c in caps]
  clip = _load_clip(str(clip_dir))
  if verbose:
    print(f"Embedding the {len(captions)} captions of {source.builder.info.full_name} [{split}] with CLIP's text "
          f"tower, once; the table goes to {path}.", flush=True)
  path.parent.mkdir(parents=True, exist_ok=True)
  partials = {suffix: path.with_name(f".{path.stem}.{os.getpid()}.partial{suffix}")
              for suffix in (".npy", ".counts.npy", ".json")}
  try:
    table = np.lib.format.open_memmap(partials[".npy"], mode="w+", dtype=np.float16,
                                      shape=(len(captions), clip.embed_dim))
    for i in range(0, len(captions), batch_size):
      table[i:i + batch_size] = np.asarray(clip.encode_text(clip.tokenize(captions[i:i + batch_size])))
    table.flush()
    del table
    np.save(partials[".counts.npy"], np.array([len(caps) for caps in per_record], np.int64))
    partials[".json"].write_text(json.dumps({"clip_dir": str(clip_dir), "captions": captions, **current}))
    # The old record first, the new one last: a replacement interrupted midway leaves no record (recomputed),
    # never new embeddings under the old captions' record.
    path.with_suffix(".json").unlink(missing_ok=True)
    os.replace(partials[".counts.npy"], path.with_suffix(".counts.npy"))
    os.replace(partials[".npy"], path)
    os.replace(partials[".json"], path.with_suffix(".json"))
  finally:
    for partial in partials.values():
      if partial.exists():
        partial.unlink()
  return path


def caption_table(config: ml_collections.ConfigDict, split: str, process_count: int = 1,
                  verbose: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(table (captions, D) float16, first caption of each record, caption count of each record)``
  for ``split``: computed first when missing or stale (``compute_caption_table``), by a single process (a
  multi-host run asks for ``--mode=embed`` beforehand)."""
  if process_count > 1:
    source, path = _ensure_table(config, split, "captions", process_count, verbose)
    stale = _caption_table_stale(path, _caption_source(config, split, resolve_clip_dir(config, False, process_count)))
    if stale is not None:
      raise pipeline.PipelineError(
          f"{path} holds the embeddings of {stale}; compute them again once on one host with the same flags and "
          "--mode=embed, then start the multi-host run.")
  else:
    source = pipeline._source(config, split, verbose=False)
    path = compute_caption_table(config, split, verbose=verbose)
  counts = _open_table(path.with_suffix(".counts.npy"), mmap=False)
  if len(counts) != len(source.lengths):
    raise pipeline.PipelineError(f"{path} has captions for {len(counts)} records but {source.builder.info.full_name} "
                                 f"[{split}] has {len(source.lengths)}: the dataset was rebuilt. Delete {path} to "
                                 "recompute the caption embeddings.")
  firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return _open_table(path), firsts, counts


def chosen_caption_embeddings(table: np.ndarray, firsts: np.ndarray, counts: np.ndarray, records: np.ndarray,
                              draws: np.ndarray) -> np.ndarray:
  """One caption's embedding per clip, ``(B, D)`` float32: caption ``⌊u·count⌋`` of the record for the
  clip's uniform draw ``u`` in [0, 1) (drawn from the stream's position, so resuming repeats it)."""
  pick = np.minimum((np.asarray(draws) * counts[records]).astype(np.int64), counts[records] - 1)
  return np.asarray(table[firsts[records] + pick], np.float32)
