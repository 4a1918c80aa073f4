"""--mode=eval on a briefly trained tiny model: FVD/KVD written, real-data features cached."""
import copy
import hashlib
import json
import pathlib

import numpy as np
import pytest
from conftest import one_device, tiny_config

from videofusion_jax.config import ConfigError
from videofusion_jax.data import pipeline, video_io
from videofusion_jax.evaluation import distances, evaluate
from videofusion_jax.experiment import Experiment
from videofusion_jax.sampling import generate_videos, sampler_settings
from videofusion_jax.training.loop import train
from videofusion_jax.training.step import Trainer


def test_eval_mode_writes_fvd_kvd_and_caches_real_features(tfds_dir, tmp_path, monkeypatch, capsys):
  c = tiny_config(**{"data.data_dir": tfds_dir, "train.num_steps": 2})
  c.eval.update(num_real=4, num_generated=4, batch_size=4, kvd_subsets=3, kvd_subset_size=3)
  c.sample.update(batch_size=4)
  trainer = Trainer(c, mesh=one_device(c))
  state = train(c, tmp_path, trainer=trainer, verbose=False)
  first = evaluate.run(c, str(tmp_path), experiment=trainer)
  assert first == json.loads((tmp_path / "eval" / "step_2.json").read_text())
  assert first["num_real"] == first["num_generated"] == 4 and first["protocol"]["frame_repeat"] == 3
  # The file says what produced it: the sampler's settings (as sample mode's sidecars), the seed, KVD's subsets.
  assert first["sampler_settings"] == sampler_settings(c) and first["sampler_settings"]["steps"] == 5
  assert (first["seed"], first["kvd_subsets"], first["kvd_subset_size"]) == (c.eval.seed, 3, 3)
  # The cached real features are I3D's logits of the protocol's clips, computed independently here.
  cache = np.load(next((tmp_path / "eval_cache").iterdir()))
  clips = pipeline.eval_clips(c, 4)["video"]
  expected = evaluate.i3d_features(4)(np.repeat(video_io.to_uint8(clips), 3, axis=1))
  np.testing.assert_allclose(cache["features"], expected, rtol=1e-5, atol=1e-4)
  # The figures are those of the EMA model's samples (one batch, seed eval.seed, the real clips'
  # labels) against those features, recomputed here.
  videos = generate_videos(trainer, state.ema_params, 4, c.eval.seed, cache["labels"])
  fake = evaluate.i3d_features(4)(np.repeat(video_io.to_uint8(videos), 3, axis=1))
  np.testing.assert_allclose(first["fvd"], distances.fvd(expected, fake), rtol=1e-3)
  kvd = distances.kernel_distance(expected, fake, num_subsets=3, subset_size=3, seed=c.eval.seed)
  np.testing.assert_allclose([first["kvd"], first["kvd_std"]], kvd, rtol=1e-3, atol=1e-6)
  assert first["fvd"] > 1.0
  # A second run reads the cache instead of the dataset, and the same seeds give the same figures. Its
  # KVD subsets of 10 hold the 4 clips there are (recorded so); it writes beside the first run's file, kept.
  monkeypatch.setattr(pipeline, "eval_iterator", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
  capsys.readouterr()
  wider = copy.deepcopy(c)
  wider.eval.kvd_subset_size = 10
  second = evaluate.run(wider, str(tmp_path), experiment=trainer)
  printed = capsys.readouterr().out
  assert "from the cache" in printed
  np.testing.assert_allclose(second["fvd"], first["fvd"], rtol=1e-6)
  kept, rerun = tmp_path / "eval" / "step_2.json", tmp_path / "eval" / "step_2-run2.json"
  assert f"{kept} holds an earlier run's results, which are kept; this run writes to {rerun}" in printed
  assert f"wrote {rerun}" in printed
  assert json.loads(kept.read_text()) == first and json.loads(rerun.read_text()) == second
  assert second["kvd_subset_size"] == 4 and second["sampler_settings"] == first["sampler_settings"]
  # Subsets of every clip of both sides are one subset: one MMD², its std null, printed without a ± 0.00.
  kvd = distances.kernel_distance(expected, fake, num_subsets=3, subset_size=4, seed=c.eval.seed)
  np.testing.assert_allclose(second["kvd"], kvd[0], rtol=1e-3, atol=1e-6)
  assert kvd[1] is None and second["kvd_std"] is None and second["kvd_subsets"] == 1
  assert f"KVD {second['kvd']:.2f} (1 subset: every clip)" in printed and "one MMD², kvd_std null" in printed
  # The log gives the chain's steps (DDPM: all T, not sample.num_steps) and where the seed comes from.
  ddpm = copy.deepcopy(c)
  ddpm.sample.method = "ddpm"
  with pytest.raises(ConfigError, match=r"evaluation was given a Trainer built from another config "
                                        r"\(sample.method='ddpm' \(was 'ddim'\)\): it would run the Trainer's"):
    evaluate.run(ddpm, str(tmp_path), experiment=trainer)  # it sampled with DDIM and recorded DDPM
  ddpm_experiment = Experiment(ddpm, mesh=trainer.mesh)
  sample = evaluate.generated_videos
  monkeypatch.setattr(evaluate, "generated_videos", lambda *a: (_ for _ in ()).throw(AssertionError("sampled")))
  with pytest.raises(AssertionError, match="sampled"):
    evaluate.run(ddpm, str(tmp_path), experiment=ddpm_experiment)
  assert f"(EMA weights, ddpm, 1000 steps, seed eval.seed={c.eval.seed})" in capsys.readouterr().out
  assert c.diffusion.num_timesteps == 1000 != c.sample.num_steps
  monkeypatch.setattr(evaluate, "generated_videos", sample)
  # The cache is of the dataset it was read from: the same dataset rebuilt with other videos (other frame
  # counts) is read again, not served the old features.
  source = first["protocol"]["source"]
  assert source["builder"] == "videofusion_demo_clips/64/1.0.0" and source["videos"] == 3
  lengths = pipeline.split_lengths
  monkeypatch.setattr(pipeline, "split_lengths", lambda *a: lengths(*a) + 1)
  with pytest.raises(AssertionError, match="re-read"):
    evaluate.run(c, str(tmp_path), experiment=trainer)
  monkeypatch.setattr(pipeline, "split_lengths", lengths)
  # Rebuilt with the same frame counts but other frames (a decoder's fix): TFDS's bytes for the split differ.
  splits = pipeline.get_builder(c.data).info.splits
  assert source["bytes"] == sum(splits[p].num_bytes for p in first["protocol"]["split"].split("+")) > 0
  split_bytes = pipeline.split_bytes
  monkeypatch.setattr(pipeline, "split_bytes", lambda *a: split_bytes(*a) + 1)
  with pytest.raises(AssertionError, match="re-read"):
    evaluate.run(c, str(tmp_path), experiment=trainer)
  monkeypatch.setattr(pipeline, "split_bytes", split_bytes)
  # Features of another I3D (its code or weights changed) are not compared with this one's.
  from videofusion_jax.evaluation import i3d
  with open(i3d.i3d_weights_path(), "rb") as f:
    digest = hashlib.sha256(pathlib.Path(i3d.__file__).read_bytes() + f.read()).hexdigest()[:16]
  assert first["protocol"]["i3d_digest"] == digest
  monkeypatch.setattr(evaluate, "i3d_digest", lambda: "another")
  with pytest.raises(AssertionError, match="re-read"):
    evaluate.run(c, str(tmp_path), experiment=trainer)
  monkeypatch.setattr(evaluate, "i3d_digest", i3d.features_digest)
  # A damaged cache (a copy cut short) is only a cache: said, and computed again, not a traceback.
  cache = next((tmp_path / "eval_cache").iterdir())
  cache.write_bytes(cache.read_bytes()[:5000])
  with pytest.raises(AssertionError, match="re-read"):
    evaluate.run(c, str(tmp_path), experiment=trainer)
  assert f"warning: the cached real-clip features {cache} cannot be read (BadZipFile" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    ({"sample.embeddings": "c.npy"},
     r"config.sample.embeddings='c.npy': --mode=eval draws every clip's content condition c from the prior"),
    # One class against the real clips' mix (the generated clips took that class, silently).
    ({"sample.label": 1},
     r"config.sample.label=1: --mode=eval gives the generated clips the real clips' labels")])
def test_eval_refuses_sampling_settings_it_would_not_follow_before_any_work(tmp_path, monkeypatch, overrides,
                                                                            message):
  """Eval draws every clip's c from the prior and gives the clips the real clips' labels: given embeddings or
  one class would be ignored or skew the figures, so they are refused before the model is built or anything
  is read."""
  c = tiny_config(**overrides)
  assert c.data.num_classes > 0
  monkeypatch.setattr(evaluate, "Experiment", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
  with pytest.raises(ConfigError, match=message):
    evaluate.run(c, str(tmp_path))
  assert not any(tmp_path.iterdir())


def test_eval_refuses_a_stride_other_than_training_on_its_dataset_and_notes_another_dataset(tmp_path, monkeypatch,
                                                                                            capsys):
  """No weight's shape tells the clip stride a model was trained at: its clips move at that one, and the real clips
  would be read at the eval config's, so FVD/KVD would compare unlike motion. On the training run's own dataset
  another stride is refused before any work; another dataset (a zero-shot evaluation) is said, with its stride."""
  c = tiny_config()
  (tmp_path / "config.json").write_text(json.dumps(tiny_config(**{"data.frame_stride": 4}).to_dict()))
  monkeypatch.setattr(evaluate, "Experiment", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
  with pytest.raises(ConfigError, match=rf"^config.data.frame_stride=2 \({tmp_path} was trained on {c.data.name} "
                                        r"with 4\): the generated clips move .* pass --config.data.frame_stride=4\.$"):
    evaluate.run(c, str(tmp_path))
  with pytest.raises(AssertionError, match="built"):  # the same stride: on to the work
    evaluate.run(tiny_config(**{"data.frame_stride": 4}), str(tmp_path))
  assert "zero-shot" not in capsys.readouterr().out
  other = tiny_config(**{"data.name": "ucf101"})
  with pytest.raises(AssertionError, match="built"):
    evaluate.run(other, str(tmp_path))
  assert capsys.readouterr().out == (f"note: the real clips come from ucf101 (data.frame_stride=2), and {tmp_path} was "
                                     f"trained on {c.data.name}: a zero-shot evaluation.\n")
  # The same videos at another stored resolution are the same dataset: its stride is checked, nothing is "zero-shot".
  (tmp_path / "config.json").write_text(json.dumps(tiny_config(**{"data.frame_stride": 4,
                                                                  "data.name": "ucf101/64"}).to_dict()))
  with pytest.raises(ConfigError, match=rf"^config.data.frame_stride=2 \({tmp_path} was trained on ucf101/64 with 4"):
    evaluate.run(tiny_config(**{"data.name": "ucf101/128"}), str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_eval_says_it_does_not_read_the_long_video_and_control_settings(tmp_path, monkeypatch, capsys):
  """sample.num_clips, continuity_frames and control shape --mode=sample's videos; eval draws single clips of
  data.num_frames, as the protocol compares them with the real clips. A value set says so before the checkpoint
  or any data is read (stopped here at the trained-config check, the first thing that reads the workdir);
  defaults say nothing."""
  monkeypatch.setattr(evaluate, "check_trained_config", lambda *a: (_ for _ in ()).throw(AssertionError("read")))
  for overrides, named in (
      ({"sample.num_clips": 3, "sample.continuity_frames": 1, "sample.control": "content"},
       "config.sample.num_clips=3, config.sample.continuity_frames=1, config.sample.control='content' are not read"),
      ({"sample.control": "motion"}, "config.sample.control='motion' is not read"),
      ({}, None)):
    c = tiny_config(**overrides)
    with pytest.raises(AssertionError, match="read"):
      evaluate.run(c, str(tmp_path), experiment=object())
    out = capsys.readouterr().out
    if named is None:
      assert "not read" not in out and "single clips" not in out
      continue
    assert f"note: --mode=eval draws single clips of data.num_frames={c.data.num_frames} frames" in out
    assert named in out and "--mode=sample draws long videos and control grids" in out
  assert not any(tmp_path.iterdir())


def _stand_in_networks_and_i3d(monkeypatch, c, real_labels, seen: dict):
  """``evaluate.run`` with the networks, I3D and the real clips' features stood in for (random features of the
  right width; ``real_labels`` the real clips'): the sampler's labels and text go to ``seen``. Returns the
  experiment to pass."""
  import types

  monkeypatch.setattr(evaluate, "real_features", lambda *a, **k: {
      "features": np.random.default_rng(0).normal(size=(len(real_labels), 400)), "labels": real_labels,
      "protocol": {}})
  monkeypatch.setattr(evaluate, "i3d_features",
                      lambda b: lambda v: np.random.default_rng(len(v)).normal(size=(len(v), 400)))
  monkeypatch.setattr(evaluate, "describe_batch", lambda *a: "one batch")

  def generated(experiment, params, num, seed, labels, consume, text):
    seen["labels"], seen["text"] = labels, text
    consume(np.zeros((num, c.data.num_frames, 8, 8, 3), np.float32))

  monkeypatch.setattr(evaluate, "generated_videos", generated)
  monkeypatch.setattr(evaluate, "check_trained_config", lambda *a: None)
  fake = object.__new__(Experiment)  # its methods (the out-of-memory message's), none of its networks
  fake.config, fake.mesh = c, one_device(c)
  fake.restore = lambda *a, **k: types.SimpleNamespace(step=1, ema_params=None)
  fake.check_config = lambda *a: None
  return fake


def test_a_text_models_clips_take_the_real_clips_captions(tfds_dir, tmp_path, monkeypatch, capsys):
  """A text model's generated clip i takes the first caption of real clip (i mod num_real)'s record, as
  class-conditional clips take the real labels: all of them from one prompt (what eval did, from
  sample.prompt) measured the prompt against the whole captioned set. The networks are stood in for:
  what is checked is which text reaches the sampler, and what the results file says of it."""

  from videofusion_jax.data.builders.demo_clips import CAPTIONS, CLASS_NAMES

  c = tiny_config(**{"data.data_dir": tfds_dir, "data.num_classes": 0, "model.encoder.kind": "clip",
                     "model.prior.condition": "text", "sample.prompt": "a dog"})
  c.eval.update(num_real=4, num_generated=6, batch_size=4, kvd_subsets=2, kvd_subset_size=3)
  # The demo's record r is clip r, label r: the real clips' labels name their records, read here independently.
  real = pipeline.eval_clips(c, 4)["label"]
  expected = [CAPTIONS[CLASS_NAMES[r]][0] for r in np.resize(real, 6)]
  assert len(set(expected)) > 1
  seen = {}
  monkeypatch.setattr(evaluate, "prompt_embeddings", lambda config, prompts, verbose=True: seen.setdefault(
      "prompts", prompts) and np.arange(len(prompts), dtype=np.float32)[:, None] * np.ones((1, 4), np.float32))
  fake = _stand_in_networks_and_i3d(monkeypatch, c, real, seen)
  from videofusion_jax.data import embeddings
  read = embeddings.record_captions

  def captions_of(config, split, records=None):
    seen["read"] = records
    return read(config, split, records)

  monkeypatch.setattr(embeddings, "record_captions", captions_of)
  results = evaluate.run(c, str(tmp_path), experiment=fake)
  assert seen["prompts"] == expected
  # Only the real clips' own records are read (WebVid's train split holds millions): each once.
  assert seen["read"] is not None and sorted(seen["read"].tolist()) == sorted(set(real.tolist()))
  assert len(set(real.tolist())) < 4
  np.testing.assert_array_equal(seen["text"][:, 0], np.arange(6))  # the embeddings of those prompts, in order
  assert results["prompts"] == "the first caption of each real clip's record"
  assert "config.sample.prompt and config.sample.prompts_file are not read" in capsys.readouterr().out


def test_short_clips_show_each_frame_to_i3d_often_enough_in_place():
  """I3D needs 9 frames: a clip of N frames shows each frame ceil(9 / N) times (once from 9 frames on), each
  repeated in place (frames 0, 0, 0, 1, 1, 1, ...: the clip's motion slowed, not the clip looped), as uint8
  round((x + 1) x 127.5)."""
  for n, k in ((1, 9), (2, 5), (3, 3), (4, 3), (5, 2), (8, 2), (9, 1), (16, 1)):
    assert evaluate.frame_repeat(n) == k, n
  videos = np.random.default_rng(0).uniform(-1, 1, (2, 4, 3, 3, 3)).astype(np.float32)
  shown = evaluate.for_i3d(videos)
  assert shown.dtype == np.uint8 and shown.shape == (2, 12, 3, 3, 3)
  for t in range(12):
    np.testing.assert_array_equal(shown[:, t], np.round((videos[:, t // 3] + 1) * np.float32(127.5)))


def test_hosts_with_other_builds_of_the_real_clips_dataset_stop_together(tfds_dir, tmp_path, monkeypatch):
  """Two hosts whose copies of the dataset differ (here process 1's digest of it, as the all-gather returns it):
  every host stops with one error naming process 1, before any clip is read (before: each host ran I3D on its
  share of its own copy, and the features of two builds were gathered into one FVD)."""
  import jax
  from jax.experimental import multihost_utils

  def gathered(x, tiled=False):  # process 1's copy of whatever is gathered, its bytes flipped where a digest
    x = np.asarray(x)
    return np.stack([x, x ^ 1 if x.dtype == np.uint8 else x])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", gathered)
  monkeypatch.setattr(pipeline, "eval_iterator", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
  c = tiny_config(**{"data.data_dir": tfds_dir})
  with pytest.raises(pipeline.PipelineError, match=r"process\(es\) \[1\] read another build of "
                                                   r"videofusion_demo_clips/\S+ \[train\] than process 0"):
    evaluate.real_features(c, tmp_path, extract=None, verbose=False)
  assert not (tmp_path / "eval_cache").exists()


def test_the_real_clips_come_from_eval_split_else_data_eval_split_else_data_split():
  """The split of the protocol's real clips (read, cached and recorded under it): config.eval.split when
  set, else data.eval_split, else data.split."""
  assert evaluate.protocol(tiny_config())["split"] == "train"
  assert evaluate.protocol(tiny_config(**{"data.eval_split": "test"}))["split"] == "test"
  both = tiny_config(**{"data.eval_split": "test", "eval.split": "train+test"})
  assert evaluate.protocol(both)["split"] == "train+test"


def test_a_class_models_clips_take_the_real_clips_labels_in_turn(tmp_path, monkeypatch):
  """Class-conditional eval: generated clip i takes the label of real clip (i mod num_real), the real clips'
  class mix, not the classes in turn (sample.label=-1's 0, 1, 2, ...): the briefly trained model of
  test_eval_mode_writes_fvd_kvd_and_caches_real_features hardly depends on its label, so its figures cannot
  tell. The networks are stood in for: what is checked is which labels reach the sampler."""

  c = tiny_config()
  c.eval.update(num_real=4, num_generated=6, batch_size=4, kvd_subsets=2, kvd_subset_size=3)
  real = np.array([2, 2, 0, 1], np.int32)
  seen = {}
  evaluate.run(c, str(tmp_path), experiment=_stand_in_networks_and_i3d(monkeypatch, c, real, seen))
  np.testing.assert_array_equal(seen["labels"], [2, 2, 0, 1, 2, 2])


def test_figures_are_printed_before_their_file_and_a_failed_write_leaves_none(tmp_path, monkeypatch, capsys):
  """The figures an evaluation took hours for are printed before eval/step_N.json is written; a write that
  fails (a full disk) leaves no half file, which a rerun took for an earlier run's results and wrote beside."""
  import errno
  from pathlib import Path

  c = tiny_config()
  c.eval.update(num_real=4, num_generated=4, batch_size=4, kvd_subsets=2, kvd_subset_size=3)
  fake = _stand_in_networks_and_i3d(monkeypatch, c, np.array([0, 1, 2, 0], np.int32), {})
  write_text = Path.write_text

  def full_disk(self, text, *args, **kwargs):
    write_text(self, text[:10])  # the part a full disk took
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(Path, "write_text", full_disk)
  with pytest.raises(OSError, match="No space left"):
    evaluate.run(c, str(tmp_path), experiment=fake)
  assert "step 1: FVD " in capsys.readouterr().out
  assert list((tmp_path / "eval").iterdir()) == []
  monkeypatch.setattr(Path, "write_text", write_text)
  evaluate.run(c, str(tmp_path), experiment=fake)
  assert [p.name for p in (tmp_path / "eval").iterdir()] == ["step_1.json"]
  assert "earlier run" not in capsys.readouterr().out


def test_two_evaluations_of_one_checkpoint_at_once_keep_both_results(tmp_path, monkeypatch, capsys):
  """Another evaluation (another seed) writes eval/step_N.json after this one chose that name: this one's results
  go to step_N-run2.json, said in a note (before: its file replaced the other's, both saying they wrote it)."""
  import json

  from videofusion_jax.training import workdir

  c = tiny_config()
  c.eval.update(num_real=4, num_generated=4, batch_size=4, kvd_subsets=2, kvd_subset_size=3)
  fake = _stand_in_networks_and_i3d(monkeypatch, c, np.array([0, 1, 2, 0], np.int32), {})
  real_write_new = workdir.write_new

  def the_other_finishes_first(path, *args):
    (tmp_path / "eval" / "step_1.json").write_text(json.dumps({"seed": 7}))
    return real_write_new(path, *args)

  monkeypatch.setattr(evaluate, "write_new", the_other_finishes_first)
  results = evaluate.run(c, str(tmp_path), experiment=fake)
  said = capsys.readouterr().out
  assert json.loads((tmp_path / "eval" / "step_1.json").read_text()) == {"seed": 7}
  assert json.loads((tmp_path / "eval" / "step_1-run2.json").read_text()) == results
  assert (f"note: {tmp_path / 'eval' / 'step_1.json'} was written by another run while this one evaluated; this "
          f"run's results are in {tmp_path / 'eval' / 'step_1-run2.json'}.") in said
  assert f"wrote {tmp_path / 'eval' / 'step_1-run2.json'}" in said
  assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step_1-run2.json", "step_1.json"]


@pytest.mark.parametrize("where", ["real_features", "generated_videos"])
def test_an_evaluation_the_device_cannot_hold_names_the_batch_of_that_stage(tmp_path, monkeypatch, xla_out_of_memory,
                                                                             where):
  """XLA's out-of-memory error in the real clips' features is one message naming eval.batch_size; in the
  generated clips' chain and features, one naming sample.batch_size and eval.batch_size. Nothing is written."""
  from videofusion_jax.experiment import DeviceMemoryError

  c = tiny_config(**{"sample.batch_size": 6})
  c.eval.update(num_real=4, num_generated=4, batch_size=4, kvd_subsets=2, kvd_subset_size=3)
  fake = _stand_in_networks_and_i3d(monkeypatch, c, np.array([0, 1, 2, 0], np.int32), {})
  monkeypatch.setattr(evaluate, where, lambda *a, **k: (_ for _ in ()).throw(xla_out_of_memory))
  with pytest.raises(DeviceMemoryError) as e:
    evaluate.run(c, str(tmp_path), experiment=fake)
  assert str(e.value).startswith("the device ran out of memory in evaluation (XLA: Out of memory allocating ")
  if where == "real_features":
    assert str(e.value).endswith("; device: cpu). The real clips' I3D features are computed config.eval.batch_size=4 "
                                 "clips at a time: lower it, then run it again."), str(e.value)
  else:
    assert str(e.value).endswith(
        "; device: cpu). config.sample.batch_size=6 draws up to 6 video(s) of 4 x 8x8 frames on each of the 1 "
        "device(s) at a time; their I3D features config.eval.batch_size=4 at a time (lower it too). Lower it (each "
        "video's noise is its own: the videos do not depend on it), or compute in bfloat16 (--config.model.dtype="
        "bfloat16); then run it again."), str(e.value)
  assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_file_where_the_results_go_stops_eval_and_sample_before_their_work(tmp_path, monkeypatch):
  """eval/, eval_cache/ or samples/ in the workdir a file (or not writable): said before any clip is read,
  sampled or run through I3D, not when the results are written at the end (the figures were lost)."""
  from videofusion_jax import sampling
  from videofusion_jax.training.workdir import WorkdirError

  c = tiny_config()
  c.eval.update(num_real=4, num_generated=4, batch_size=4, kvd_subsets=2, kvd_subset_size=3)
  seen = {}
  fake = _stand_in_networks_and_i3d(monkeypatch, c, np.array([0, 1, 2, 0], np.int32), seen)
  for name in ("eval", "eval_cache"):
    (tmp_path / name).write_text("")
    with pytest.raises(WorkdirError, match=rf"^{tmp_path / name} is a file, where this run writes its {name} "
                                           r"folder: move it away\.$"):
      evaluate.run(c, str(tmp_path), experiment=fake)
    (tmp_path / name).unlink()
  assert seen == {}  # nothing sampled
  (tmp_path / "samples").write_text("")
  monkeypatch.setattr(fake, "restore", lambda *a, **k: (_ for _ in ()).throw(AssertionError("restored")), raising=False)
  with pytest.raises(WorkdirError, match=rf"^{tmp_path / 'samples'} is a file"):
    sampling.run(c, str(tmp_path), experiment=fake)


def test_real_clip_features_that_cannot_be_cached_are_warned_and_the_evaluation_goes_on(tmp_path, monkeypatch,
                                                                                          capsys):
  """Process 0 alone caches the real clips' features: a write that fails there (a full disk) is a warning and
  the features are returned (raised on process 0 alone, it left the other hosts waiting in the generated clips'
  sampling), with no half file left. The dataset and I3D are stood in for (clips of known labels, features that
  count the batch's clips)."""
  import errno

  from videofusion_jax.evaluation.i3d import NUM_CLASSES

  c = tiny_config()
  c.eval.update(num_real=4, batch_size=2)
  monkeypatch.setattr(pipeline, "source_fingerprint", lambda *a, **k: "stand-in")
  monkeypatch.setattr(pipeline, "eval_iterator", lambda config, n, batch_size, **k: (
      {"video": np.zeros((2, 4, 8, 8, 3), np.float32), "label": np.array([i, i + 1], np.int32)} for i in (0, 2)))

  def full_disk(file, *args, **kwargs):  # a part of the file written, then the disk full
    with open(file, "wb") as f:
      f.write(b"PK\x03\x04 a part")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np, "savez", full_disk)
  out = evaluate.real_features(c, tmp_path, lambda v: np.full((len(v), NUM_CLASSES), v.shape[1], np.float32))
  np.testing.assert_array_equal(out["labels"], [0, 1, 2, 3])
  np.testing.assert_array_equal(out["features"], np.full((4, NUM_CLASSES), 4 * evaluate.frame_repeat(4)))
  printed = capsys.readouterr().out
  assert "warning: cannot cache the real-clip features in " in printed and "No space left on device" in printed
  assert "the evaluation goes on, and the next one computes them again" in printed
  assert not [p for p in tmp_path.rglob("*") if p.is_file()]
