"""CLIP as the key-frame encoder (``model.encoder.kind='clip'``): every frame of the dataset embedded
once and stored beside it (``data/embeddings.py``), the batches carrying each clip's frame
embeddings, and the train step conditioning both generators and the prior on the key frame's."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_clip import write_checkpoint

from videofusion_jax.models import clip as clip_lib
from videofusion_jax.models.clip_tokenizer import save_vocab
from videofusion_jax.models.encoder import register_frozen_encoder, to_sphere

WIDTH = 20  # the tiny CLIP's projection width (test_clip.SIZES)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("clip") / "tiny-clip"
  write_checkpoint(directory)
  return directory


def clip_config(clip_dir, **overrides):
  from conftest import tiny_config
  return tiny_config(**{"model.encoder.kind": "clip", "model.encoder.clip_dir": str(clip_dir),
                        "model.encoder.embed_dim": WIDTH, **overrides})


def test_stored_frame_embeddings_are_clip_embeddings_of_the_pipelines_frames(clip_dir, tfds_dir, tmp_path):
  from videofusion_jax.data import embeddings, pipeline

  c = clip_config(clip_dir, **{"data.data_dir": tfds_dir})
  batch = next(pipeline.train_iterator(c, 6, seed=0, verbose=False))
  video, frames = batch["video"], batch["frame_embeddings"]
  assert set(batch) == {"video", "label", "frame_embeddings"}
  assert frames.shape == (6, c.data.num_frames, WIDTH) and frames.dtype == np.float32
  # Independently: CLIP on this batch's own frames (the table was computed record by record).
  clip = clip_lib.load(clip_dir)
  flat = video.reshape((-1,) + video.shape[2:])
  expected = np.asarray(clip.encode_image(clip.preprocess(embeddings.to_uint8(flat)))).reshape(frames.shape)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(frames, expected, atol=2e-3 * scale)  # stored as float16
  # Different frames have different embeddings, so a wrong row would be caught.
  assert np.abs(frames[:, 0] - frames[:, 1]).max() > 0.05 * scale

  # The table sits beside the dataset, with its metadata, and is computed once.
  builder = pipeline.get_builder(c.data)
  path = embeddings.table_path(builder, "train", str(clip_dir), c.data.image_size)
  assert path.is_file() and path.parent.parent.parent == Path(builder.data_dir)
  meta = json.loads(path.with_suffix(".json").read_text())
  assert meta["embed_dim"] == WIDTH and sum(meta["lengths"]) == np.load(path, mmap_mode="r").shape[0]
  mtime = path.stat().st_mtime_ns
  table, offsets = embeddings.frame_table(c, "train", verbose=False)
  assert path.stat().st_mtime_ns == mtime and offsets[0] == 0
  assert not list(path.parent.glob("*.partial*"))

  # A table of the same frame total from videos in another order, or from the same videos with other pixels (a
  # rebuild, a table copied in beside it): its rows would be other frames' embeddings, served silently. Refused
  # where it is read and by --mode=embed.
  record = path.with_suffix(".json").read_text()
  assert len(set(meta["lengths"])) > 1  # reversed, the order differs
  assert meta["bytes"] == builder.info.splits["train"].num_bytes > 0
  for other in ({"lengths": meta["lengths"][::-1]}, {"bytes": meta["bytes"] + 1}):
    path.with_suffix(".json").write_text(json.dumps({**meta, **other}))
    for read in (lambda: embeddings.frame_table(c, "train", verbose=False),
                 lambda: embeddings.compute_table(c, "train", verbose=False)):
      with pytest.raises(pipeline.PipelineError, match=re.escape(
          f"{path} was computed from another build of {builder.info.full_name} [train] (its videos' frame counts, "
          f"order or encoded frames differ from {path.with_suffix('.json')}): the dataset was rebuilt. Delete "
          f"{path.parent} to recompute it.")):
        read()
  path.with_suffix(".json").write_text(record)
  # A table that no longer fits the dataset, and a multi-host run without one, get one clear message.
  with pytest.raises(pipeline.PipelineError, match="the dataset was rebuilt. Delete"):
    np.save(path, np.zeros((3, WIDTH), np.float16))
    embeddings.frame_table(c, "train", verbose=False)
  path.unlink()
  with pytest.raises(pipeline.PipelineError, match="--mode=embed"):
    embeddings.frame_table(c, "train", process_count=2, verbose=False)


@pytest.mark.parametrize("stage", ["video", "image"])
def test_the_step_conditions_on_the_stored_embedding_of_the_key_frame(clip_dir, stage):
  """The loss of the 'clip' kind, given stored frame embeddings, equals that of the frozen-encoder
  slot whose encoder returns exactly the embedding of the frame the step trains on (the key frame;
  in the image stage, the drawn frame): the generators' and the prior's terms alike. Every other
  frame's row holds a different embedding, so reading a wrong row changes the loss."""
  from videofusion_jax.experiment import Experiment
  from videofusion_jax.training import sharding as shd
  from videofusion_jax.training.step import draw_randomness, loss_fn

  rng = np.random.default_rng(0)
  b, n = 8, 4
  wanted = jnp.asarray(rng.standard_normal((b, WIDTH)), jnp.float32)
  register_frozen_encoder("test_fixed_rows", lambda size: ((lambda x: wanted), WIDTH))
  overrides = {"train.stage": stage, "train.label_dropout": 0.3}
  c_clip = clip_config(clip_dir, **overrides)
  c_frozen = clip_config(clip_dir, **{**overrides, "model.encoder.kind": "frozen", "model.encoder.clip_dir": "",
                                      "model.encoder.frozen_name": "test_fixed_rows"})
  devices = jax.devices()[:1]
  e_clip = Experiment(c_clip, mesh=shd.make_mesh(c_clip, devices=devices))
  e_frozen = Experiment(c_frozen, mesh=shd.make_mesh(c_frozen, devices=devices))
  params = e_clip.init_state(0).params
  assert jax.tree.structure(params) == jax.tree.structure(e_frozen.abstract_state().params)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  video = jnp.asarray(rng.uniform(-1, 1, (b, n, 8, 8, 3)), jnp.float32)
  key = jax.random.PRNGKey(5)
  draws, _ = draw_randomness(e_clip, key, video.shape)
  row = draws["frame"] if stage == "image" else jnp.full((b,), n // 2)
  others = jnp.asarray(rng.standard_normal((b, n, WIDTH)), jnp.float32)
  frames = others.at[jnp.arange(b), row].set(wanted)
  batch = {"video": video, "label": jnp.asarray(rng.integers(0, 3, b), jnp.int32)}

  clip_loss = jax.jit(lambda p, f: loss_fn(p, e_clip, {**batch, "frame_embeddings": f}, key))
  loss_clip, terms_clip = clip_loss(params, frames)
  loss_frozen, terms_frozen = jax.jit(lambda p: loss_fn(p, e_frozen, batch, key))(params)
  assert terms_clip["loss_prior"] > 0
  for name in ("loss_generators", "loss_prior"):
    np.testing.assert_allclose(terms_clip[name], terms_frozen[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(loss_clip, loss_frozen, rtol=1e-5)
  # Control: the same batch with another frame's row in place of the wanted one changes both terms.
  moved = others.at[jnp.arange(b), (row + 1) % n].set(wanted)
  _, terms_moved = clip_loss(params, moved)
  for name in ("loss_generators", "loss_prior"):
    assert abs(float(terms_moved[name]) - float(terms_frozen[name])) > 1e-4, name
  # The stored embedding is scaled to the sphere of radius √D, as every encoder's output.
  np.testing.assert_allclose(np.linalg.norm(to_sphere(wanted), axis=1), np.sqrt(WIDTH), rtol=1e-5)


def test_clip_encoder_config_errors(clip_dir, tmp_path):
  from videofusion_jax.config import ConfigError, validate

  validate(clip_config(""))  # no directory: the project's own CLIP, made at embed_dim
  with pytest.raises(ConfigError, match="does not exist"):
    validate(clip_config(tmp_path / "missing"))
  with pytest.raises(ConfigError, match="gives embeddings of width 20; set --config.model.encoder.embed_dim=20"):
    validate(clip_config(clip_dir, **{"model.encoder.embed_dim": 64}))


def test_mode_embed_stores_the_frame_and_caption_tables(clip_dir, tfds_dir, capsys):
  """``--mode=embed`` (main._embed): both tables of the demo clips, once; a config without the
  CLIP encoder is one clear error."""
  from videofusion_jax.config import ConfigError
  from videofusion_jax.data import embeddings, pipeline
  from videofusion_jax.main import _embed

  c = clip_config(clip_dir, **{"data.data_dir": tfds_dir, "data.num_classes": 0, "model.prior.condition": "text"})
  _embed(c)
  builder = pipeline.get_builder(c.data, verbose=False)
  frames = embeddings.table_path(builder, "train", clip_dir, c.data.image_size)
  captions = embeddings.table_path(builder, "train", clip_dir, c.data.image_size, kind="captions")
  out = capsys.readouterr().out
  assert f"CLIP frame embeddings: {frames}" in out and f"CLIP caption embeddings: {captions}" in out
  from videofusion_jax.data.builders.demo_clips import CAPTIONS
  assert np.load(captions.with_suffix(".counts.npy")).tolist() == [len(v) for v in CAPTIONS.values()]
  clip = clip_lib.load(clip_dir)
  in_order = [t for caps in CAPTIONS.values() for t in caps]  # record order = the clips' label order
  np.testing.assert_allclose(np.load(captions), clip.encode_text(clip.tokenize(in_order)), atol=2e-3)
  with pytest.raises(ConfigError, match="needs --config.model.encoder.kind=clip"):
    _embed(clip_config(clip_dir, **{"model.encoder.kind": "learned", "model.encoder.clip_dir": ""}))
  with pytest.raises(ConfigError, match="is read by a CLIP key-frame encoder alone .* add --config.model.encoder."
                                        "kind=clip"):
    _embed(clip_config(clip_dir, **{"model.encoder.kind": "learned"}))


def test_without_a_clip_directory_the_project_trains_its_own_once(tfds_dir, capsys, optimised):
  """No ``clip_dir``: the project's CLIP is trained on the demo clips' frames and captions, saved
  beside the dataset in Hugging Face's layout (``clip.load`` reads it), said, and reused."""
  from videofusion_jax.data import embeddings
  from videofusion_jax.data.builders.demo_clips import CAPTIONS

  c = clip_config("", **{"data.data_dir": tfds_dir, "data.num_classes": 0, "model.prior.condition": "text",
                         "model.encoder.embed_dim": 16})
  directory = embeddings.resolve_clip_dir(c)
  out = capsys.readouterr().out
  assert "Trained the project's own CLIP on 96 frames and 18 captions" in out
  assert "trained on this dataset's frames and captions" in out
  # Its captions are read from the records it trains on alone (it read every record's, videos and all, then kept
  # the first 2,000: a pass over the whole of WebVid's train split).
  every = embeddings.record_captions(c, "train")
  assert len(every) == 3 and embeddings.record_captions(c, "train", first=2) == every[:2]
  meta = json.loads((directory / "project_clip.json").read_text())
  assert meta["trained"] and meta["retrieval"] == 1.0 and meta["loss_last"] < meta["loss_first"]
  clip = clip_lib.load(directory)
  assert clip.embed_dim == 16 and clip.config.image_size == 32
  # Its captions' embeddings are nearer to their own clip's captions than to the others'.
  captions = [t for caps in CAPTIONS.values() for t in caps]
  text = np.array(clip.encode_text(clip.tokenize(captions)))
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  group = np.repeat(np.arange(3), 6)
  sim = text @ text.T
  np.fill_diagonal(sim, np.nan)
  own = np.array([np.nanmean(sim[i, group == group[i]]) for i in range(18)])
  other = np.array([np.nanmean(sim[i, group != group[i]]) for i in range(18)])
  assert np.all(own > other)
  mtime = (directory / "model.safetensors").stat().st_mtime_ns
  assert embeddings.resolve_clip_dir(c, verbose=False) == directory
  assert (directory / "model.safetensors").stat().st_mtime_ns == mtime


def test_each_clip_gets_one_of_its_records_captions_and_resuming_repeats_the_draws(clip_dir, tfds_dir):
  """With a prior on text, every clip of a batch carries the embedding of one caption of its own
  record (the demo: label = record), the draws cover several captions, and a stream resumed at
  batch 2 gives the caption embeddings of the uninterrupted stream's third batch."""
  from videofusion_jax.data import embeddings, pipeline

  c = clip_config(clip_dir, **{"data.data_dir": tfds_dir, "data.num_classes": 3, "model.prior.condition": "text"})
  table, firsts, counts = embeddings.caption_table(c, "train", verbose=False)
  stream = pipeline.train_iterator(c, 8, seed=3, verbose=False)
  batches = [next(stream) for _ in range(3)]
  rows = []
  for b in batches:
    assert b["caption_embeddings"].shape == (8, WIDTH)
    for emb, label in zip(b["caption_embeddings"], b["label"]):
      own = np.asarray(table[firsts[label]:firsts[label] + counts[label]], np.float32)
      match = np.flatnonzero(np.abs(own - emb).max(axis=1) == 0)
      assert len(match) == 1, label
      rows.append((int(label), int(match[0])))
  assert len(set(rows)) >= 6  # several captions per record are drawn
  resumed = next(pipeline.train_iterator(c, 8, seed=3, start_batch=2, verbose=False))
  np.testing.assert_array_equal(resumed["caption_embeddings"], batches[2]["caption_embeddings"])
  np.testing.assert_array_equal(resumed["frame_embeddings"], batches[2]["frame_embeddings"])


def test_the_tables_of_other_clip_weights_are_not_reused(tmp_path):
  """The stored tables' folder (``fingerprint``) changes with any byte of the weights (a fine-tune of one
  head saved over the same directory; the file re-read when its size or time changes), and with the frame
  size; the same bytes give the same folder."""
  from videofusion_jax.data import embeddings
  (tmp_path / "config.json").write_text("{}")
  weights = tmp_path / "model.safetensors"
  first = np.random.default_rng(0).standard_normal(2**18).astype(np.float32)  # 1 MiB
  weights.write_bytes(first.tobytes())
  before = embeddings.fingerprint(tmp_path, 32)
  tuned = first.copy()
  tuned[123_457] += 1e-3  # one weight, between any evenly spread samples of the file
  weights.write_bytes(tuned.tobytes())
  os.utime(weights, ns=(0, 10**18))  # a later save, whatever the file system's time resolution
  after = embeddings.fingerprint(tmp_path, 32)
  weights.write_bytes(first.tobytes())
  os.utime(weights, ns=(0, 2 * 10**18))
  assert after != before and embeddings.fingerprint(tmp_path, 32) == before != embeddings.fingerprint(tmp_path, 16)


def _text_config(clip_dir, tfds_dir):
  return clip_config(clip_dir, **{"data.data_dir": tfds_dir, "data.num_classes": 0, "model.prior.condition": "text"})


def test_a_signal_while_training_embeds_the_frames_stops_at_once_and_leaves_no_part(tmp_path, tfds_dir, monkeypatch):
  """Training's first use of a CLIP embeds every frame of the dataset (hours on WebVid) before its first step:
  SIGTERM there stops it at once, as it stops a dataset build, with the table's part file removed; it ran to
  the end, compiled and took a step first (a preemption's grace period ends long before), and a kill then
  left the part file, at the table's full size, for good."""
  import signal
  import time

  from videofusion_jax.data import embeddings, pipeline
  from videofusion_jax.training.loop import train
  from videofusion_jax.training.preemption import Interrupted

  write_checkpoint(tmp_path / "clip", seed=9)  # its own tables: none made yet
  c = clip_config(tmp_path / "clip", **{"data.data_dir": tfds_dir})
  to_uint8 = embeddings.to_uint8

  def embedding_for_long(frames):  # the first batch of frames: SIGTERM arrives, and the embedding goes on
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(200):
      time.sleep(0.05)
    raise AssertionError("the embedding ran on past the signal")

  monkeypatch.setattr(embeddings, "to_uint8", embedding_for_long)
  start = time.time()
  with pytest.raises(Interrupted) as e:
    train(c, tmp_path / "run", verbose=False)
  assert e.value.signal_name == "SIGTERM" and time.time() - start < 60
  table = embeddings.table_path(pipeline.get_builder(c.data, verbose=False), "train", tmp_path / "clip",
                                c.data.image_size)
  assert table.parent.is_dir() and not list(table.parent.iterdir())  # no part file, no table
  assert not list((tmp_path / "run" / "checkpoints").glob("*"))
  monkeypatch.setattr(embeddings, "to_uint8", to_uint8)
  # The project's own CLIP, stopped while it is saved: its part folder goes too (it stayed beside the dataset).
  monkeypatch.setattr(embeddings, "record_captions", lambda *a, **k: (_ for _ in ()).throw(pipeline.PipelineError("")))
  save = clip_lib.save_pretrained

  def saved_then_stopped(clip, directory):
    save(clip, directory)
    assert any(Path(directory).iterdir())
    raise KeyboardInterrupt

  monkeypatch.setattr(clip_lib, "save_pretrained", saved_then_stopped)
  (tmp_path / "own").mkdir()
  with pytest.raises(KeyboardInterrupt):
    embeddings.make_project_clip(clip_config("", **{"model.encoder.embed_dim": 16}), tmp_path / "own" / "clip")
  assert not list((tmp_path / "own").iterdir())


def test_a_damaged_table_is_one_error_naming_it(tmp_path, tfds_dir):
  """A truncated frame table, caption table, caption counts or caption record file is a PipelineError (one line on the
  command line) that names the file and says how to compute it again, not numpy's traceback; the
  damaged file is left as it is (the error says to delete it)."""
  from videofusion_jax.data import embeddings, pipeline

  write_checkpoint(tmp_path / "clip", seed=7)  # its own tables: the other tests' stay whole
  c = _text_config(tmp_path / "clip", tfds_dir)
  embeddings.frame_table(c, "train", verbose=False)
  embeddings.caption_table(c, "train", verbose=False)
  builder = pipeline.get_builder(c.data, verbose=False)
  frames = embeddings.table_path(builder, "train", tmp_path / "clip", c.data.image_size)
  captions = embeddings.table_path(builder, "train", tmp_path / "clip", c.data.image_size, kind="captions")
  counts = captions.with_suffix(".counts.npy")
  for file, read in ((frames, embeddings.frame_table), (frames, embeddings.compute_table),
                     (captions, embeddings.caption_table), (counts, embeddings.caption_table)):
    whole = file.read_bytes()
    for size in (0, 40, len(whole) - 8):  # nothing, part of the header, part of the data
      file.write_bytes(whole[:size])
      with pytest.raises(pipeline.PipelineError, match=f"^{re.escape(str(file))} is damaged.*delete it") as e:
        read(c, "train", verbose=False)
      assert "\n" not in str(e.value) and file.read_bytes() == whole[:size]
    file.write_bytes(whole)
  record = captions.with_suffix(".json")
  whole = record.read_bytes()
  for damaged in (b"[1]", whole[:-3]):
    record.write_bytes(damaged)
    message = f"^{re.escape(str(record))} is damaged.*delete {re.escape(str(captions))} and"
    with pytest.raises(pipeline.PipelineError, match=message):
      embeddings.caption_table(c, "train", verbose=False)
  record.write_bytes(whole)
  np.testing.assert_array_equal(np.asarray(embeddings.caption_table(c, "train", verbose=False)[0]), np.load(captions))


def test_stale_caption_embeddings_are_computed_again(tmp_path, tfds_dir, monkeypatch, capsys):
  """A caption table computed from other captions (the repository's demo captions edited) or with another
  tokenizer (its files saved anew over the CLIP directory) is computed again, and said; a multi-host run
  is asked for --mode=embed instead. Each time the table equals CLIP's text embeddings of the current
  captions with the current tokenizer, computed here."""
  from videofusion_jax.data import embeddings, pipeline
  from videofusion_jax.data.builders import demo_clips

  directory = tmp_path / "clip"
  write_checkpoint(directory, seed=8)
  c = _text_config(directory, tfds_dir)

  def expected():  # record order = the clips' label order
    clip = clip_lib.load(directory)
    return np.asarray(clip.encode_text(clip.tokenize([t for caps in demo_clips.CAPTIONS.values() for t in caps])))

  first = np.asarray(embeddings.caption_table(c, "train", verbose=False)[0], np.float32)
  np.testing.assert_allclose(first, expected(), atol=2e-3)
  # A replacement stopped after the table's files were replaced but before its record: the old record left
  # beside them served the new captions' embeddings as the old ones' once those came back (an edit reverted).
  original = dict(demo_clips.CAPTIONS)
  for name in original:
    monkeypatch.setitem(demo_clips.CAPTIONS, name, ("an interrupted caption",) * 4)
  replace, replaced = os.replace, []

  def stopped_before_the_record(source, target):
    if len(replaced) == 2:
      raise KeyboardInterrupt
    replaced.append(Path(target).name)
    replace(source, target)

  with monkeypatch.context() as m:
    m.setattr(embeddings.os, "replace", stopped_before_the_record)
    with pytest.raises(KeyboardInterrupt):
      embeddings.caption_table(c, "train", verbose=False)
  assert replaced == ["train.captions.counts.npy", "train.captions.npy"]
  for name, captions in original.items():
    monkeypatch.setitem(demo_clips.CAPTIONS, name, captions)
  table = embeddings.caption_table(c, "train")[0]
  assert "holds the embeddings of unrecorded captions" in capsys.readouterr().out
  np.testing.assert_allclose(np.asarray(table, np.float32), expected(), atol=2e-3)
  for i, name in enumerate(demo_clips.CAPTIONS):
    monkeypatch.setitem(demo_clips.CAPTIONS, name, tuple(f"a totally different caption {i} {j}" for j in range(4)))
  stale = re.escape("holds the embeddings of other captions (the dataset or the repository's captions changed: "
                    "repository_captions)")
  with pytest.raises(pipeline.PipelineError, match=f"{stale}; .*--mode=embed"):
    embeddings.caption_table(c, "train", process_count=2, verbose=False)
  table, firsts, counts = embeddings.caption_table(c, "train")
  assert re.search(f"{stale}; computing it again.", capsys.readouterr().out)
  assert counts.tolist() == [4, 4, 4] and firsts.tolist() == [0, 4, 8]
  new = np.asarray(table, np.float32)
  np.testing.assert_allclose(new, expected(), atol=2e-3)
  assert np.abs(new - first[:12]).max() > 0.1

  # Same captions, other words: one caption of the first record changed.
  monkeypatch.setitem(demo_clips.CAPTIONS, next(iter(demo_clips.CAPTIONS)), ("a dog",) * 4)
  np.testing.assert_allclose(np.asarray(embeddings.caption_table(c, "train", verbose=False)[0]), expected(), atol=2e-3)

  # Another tokenizer: fewer merges, so the captions split into other tokens.
  vocab = json.loads((directory / "vocab.json").read_text())
  merges = (directory / "merges.txt").read_text().splitlines()[1:]
  before = np.asarray(embeddings.caption_table(c, "train", verbose=False)[0], np.float32)
  save_vocab(directory, vocab, [tuple(m.split()) for m in merges[:10]])
  table = np.asarray(embeddings.caption_table(c, "train")[0], np.float32)
  assert "captions tokenized by another tokenizer" in capsys.readouterr().out
  np.testing.assert_allclose(table, expected(), atol=2e-3)
  assert np.abs(table - before).max() > 0.1
  # Current: kept as it is.
  path = embeddings.table_path(pipeline.get_builder(c.data, verbose=False), "train", directory, c.data.image_size,
                               kind="captions")
  mtime = path.stat().st_mtime_ns
  embeddings.caption_table(c, "train", process_count=2, verbose=False)
  embeddings.caption_table(c, "train", verbose=False)
  assert path.stat().st_mtime_ns == mtime and not list(path.parent.glob("*.partial*"))
  # A tokenizer file the tokenizer reads nothing new from (a re-download's config, the vocabulary re-saved with
  # other spacing): the same tokenizer, the table kept (on WebVid, millions of captions not embedded again).
  (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
  (directory / "vocab.json").write_text(json.dumps(json.loads((directory / "vocab.json").read_text()), indent=1))
  embeddings.caption_table(c, "train", process_count=2, verbose=False)
  embeddings.caption_table(c, "train", verbose=False)
  assert path.stat().st_mtime_ns == mtime
