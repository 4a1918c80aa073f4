"""``--mode=eval``: FVD and KVD (I3D features) and, for UCF101, the C3D Inception Score.

Real clips come from the dataset's evaluation protocol (``pipeline.eval_plan``); their I3D
features are cached in ``workdir/eval_cache`` per dataset, split, frame count, stride,
resolution and clip count, and are computed again when the built dataset or I3D's code or weights
change. Generated clips are drawn from the latest checkpoint's EMA weights
with the ``config.sample`` settings and ``eval.seed``. Results go to ``workdir/eval/step_<N>.json``
(an earlier evaluation's file is kept: then ``step_<N>-run2.json``, ...), with the settings that
produced them.

On several hosts each runs the feature networks on its own share of the clips (real: the clips it
reads; generated: its rows of each batch, which every host holds) and the shares are gathered in
order, so every host ends with the features one host would compute, at 1/hosts of the work.
"""
from __future__ import annotations

import functools
import hashlib
import json
import zipfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from videofusion_jax.config import SYNTHETIC_DATA, ConfigError, field_or_none, recorded_config, schedule_end_warning
from videofusion_jax.data import pipeline, video_io
from videofusion_jax.evaluation.i3d import MIN_FRAMES, NUM_CLASSES
from videofusion_jax.experiment import Experiment
from videofusion_jax.sampling import (
  Progress,
  chain_steps,
  check_trained_config,
  check_trained_stride,
  describe_batch,
  fresh_file,
  generated_videos,
  next_run,
  prompt_embeddings,
  same_videos,
  sample_labels,
  sampler_settings,
  say,
  text_prior,
)
from videofusion_jax.training import preemption
from videofusion_jax.training.sharding import checked_on_every_host, same_on_every_host
from videofusion_jax.training.workdir import check_output_folders, write_new, write_whole


def frame_repeat(num_frames: int) -> int:
  """How often each frame is shown to I3D: 1, or enough for I3D's minimum clip length."""
  return -(-MIN_FRAMES // num_frames)


def protocol(config: ml_collections.ConfigDict) -> dict:
  """What the real-data statistics depend on; names the cache file."""
  d, e = config.data, config.eval
  repeat = frame_repeat(d.num_frames)
  return {"dataset": d.name, "split": e.split or d.eval_split or d.split, "num_frames": d.num_frames,
          "frame_stride": d.frame_stride, "resolution": d.image_size, "num_real": e.num_real,
          "clip_selection": "pipeline.eval_plan v2 (seed 0; each video's own visits)",
          "frames": "pipeline.decode_frames v2 (JPEG decoded accurately)",
          "features": "I3D Kinetics-400 logits, time-averaged",
          "i3d_input": "uint8 frames -> TF1 bilinear 224x224 (no half-pixel) -> [-1, 1]",
          "frame_repeat": repeat}


def for_i3d(videos: np.ndarray) -> np.ndarray:
  """``(B, N, S, S, 3)`` in [-1, 1] -> uint8, each frame repeated ``frame_repeat(N)`` times."""
  return np.repeat(video_io.to_uint8(videos), frame_repeat(videos.shape[1]), axis=1)


def _cache_path(workdir: Path, proto: dict) -> Path:
  name = (f"{proto['dataset'].replace('/', '_')}-{proto['split'].replace('+', '_')}-{proto['num_frames']}f"
          f"-stride{proto['frame_stride']}-{proto['resolution']}px-{proto['num_real']}clips.npz")
  return workdir / "eval_cache" / name


def gather_shares(local: np.ndarray, n: int) -> np.ndarray:
  """Every host's rows of ``n`` (``pipeline.eval_shares``; this one's: ``local``), in order, on
  every host."""
  if jax.process_count() == 1:
    return local
  sizes = [len(share) for share in pipeline.eval_shares(n, jax.process_count())]
  padded = np.zeros((max(sizes),) + local.shape[1:], local.dtype)  # equal shapes for the all-gather
  padded[:len(local)] = local
  every = np.asarray(multihost_utils.process_allgather(padded))  # (hosts, max share, ...)
  return np.concatenate([every[i, :size] for i, size in enumerate(sizes)])


def _cached_features(path: Path, proto: dict) -> dict | None:
  """The cache's features and labels if it holds ``proto``'s, as the first host reads them, on
  every host (the hosts must agree: the features are computed together)."""
  found = None
  if jax.process_index() == 0 and path.exists():
    try:
      with np.load(path, allow_pickle=False) as cached:
        if json.loads(str(cached["protocol"])) == proto:
          found = {"features": cached["features"].astype(np.float32), "labels": cached["labels"].astype(np.int32)}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # it is only a cache
      say(f"warning: the cached real-clip features {path} cannot be read ({type(e).__name__}: {e}); computing "
          "them again.")
  if jax.process_count() == 1:
    return found
  if not int(multihost_utils.broadcast_one_to_all(np.int32(found is not None))):
    return None
  n = proto["num_real"]
  like = found or {"features": np.zeros((n, NUM_CLASSES), np.float32), "labels": np.zeros((n,), np.int32)}
  return {k: np.asarray(v) for k, v in multihost_utils.broadcast_one_to_all(like).items()}


def real_features(config: ml_collections.ConfigDict, workdir: Path, extract, verbose: bool = True) -> dict:
  """I3D features of the protocol's real clips (and their labels), cached in the workdir under the
  protocol and the dataset they were read from (``pipeline.source_fingerprint`` with its bytes: a rebuilt
  dataset is read again) and I3D's code and weights; ``protocol`` with them. Each host reads and
  runs its share of the clips."""
  proto = protocol(config)
  proto["i3d_digest"] = i3d_digest()
  proto["source"] = checked_on_every_host(
      lambda: pipeline.source_fingerprint(config, proto["split"], content=True),
      pipeline.PipelineError("another host cannot read the real clips' dataset (its own error says why): every "
                             "host needs it at the same data_dir."))
  # Each host reads its share of the clips from its own copy: one built otherwise mixed two datasets' features.
  same_on_every_host(hashlib.sha256(json.dumps(proto["source"], sort_keys=True).encode()).digest(),
                     lambda differ: pipeline.PipelineError(
                         f"process(es) {differ} read another build of {proto['source']['builder']} [{proto['split']}] "
                         "than process 0 (other videos, frame counts or bytes): every host needs the same dataset "
                         "(copy process 0's data_dir to the others, or build it once where every host reads it)."))
  path = _cache_path(workdir, proto)
  cached = _cached_features(path, proto)
  if cached is not None:
    say(f"real-data features from the cache {path}")
    return {**cached, "protocol": proto}
  n, hosts = proto["num_real"], jax.process_count()
  say(f"I3D features of {n} real clips ({proto['dataset']} [{proto['split']}])"
      + (f", split over {hosts} hosts" if hosts > 1 else ""))
  shares = [len(share) for share in pipeline.eval_shares(n, hosts)]
  progress = Progress("real clips", shares[jax.process_index()], unit="clips", quiet=jax.process_index() > 0)
  every_host = -(-min(shares) // config.eval.batch_size)  # the batches every host runs: where they can stop together

  def my_share():  # a clip that cannot be read on one host would leave the others waiting to gather
    feats, labels, done = [np.zeros((0, NUM_CLASSES), np.float32)], [np.zeros((0,), np.int32)], 0
    with progress:  # the clock from here, the input's set-up included
      batches = pipeline.eval_iterator(config, n, config.eval.batch_size, process_index=jax.process_index(),
                                       process_count=hosts, split=proto["split"],
                                       verbose=verbose and jax.process_index() == 0)
      for i, batch in enumerate(batches):
        feats.append(extract(for_i3d(batch["video"])))
        labels.append(batch["label"].astype(np.int32))
        done += len(batch["label"])
        progress(done)
        if i < every_host:
          preemption.stop_between_batches()
    return np.concatenate(feats), np.concatenate(labels)

  feats, labels = checked_on_every_host(my_share, pipeline.PipelineError(
      "another host could not read its share of the real clips (its own error says why)."))
  out = {"features": gather_shares(feats, n), "labels": gather_shares(labels, n)}
  if jax.process_index() == 0:  # every host holds all the features; one writes them
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      write_whole(path, lambda tmp: np.savez(tmp, protocol=json.dumps(proto), **out), suffix=".npz")
    except OSError as e:  # only a cache: raised here, on process 0 alone, it left the others waiting
      say(f"warning: cannot cache the real-clip features in {path} ({e.strerror or e}); the evaluation goes on, "
          "and the next one computes them again.")
  return {**out, "protocol": proto}


@functools.lru_cache(maxsize=2)
def i3d_features(batch_size: int):
  """One I3D (weights loaded, function compiled once per clip shape) per batch size."""
  from videofusion_jax.evaluation.i3d import I3DFeatures

  return I3DFeatures(batch_size=batch_size)


def i3d_digest() -> str:
  """``i3d.features_digest``: I3D's code and weights, part of the cached real features' key."""
  from videofusion_jax.evaluation.i3d import features_digest

  return features_digest()


def eval_prompts(config: ml_collections.ConfigDict) -> list[str] | None:
  """A text model's prompt for each generated clip: the first caption of the record of real clip ``i mod
  eval.num_real``, as class-conditional clips take the real clips' labels, so that FVD compares like with
  like (one prompt against a whole captioned dataset would measure the prompt, not the model); None for
  other models. ``sample.prompt``/``prompts_file`` are not read (said, when set)."""
  if not text_prior(config):
    return None
  from videofusion_jax.data.embeddings import record_captions

  e, s = config.eval, config.sample
  if s.prompt.strip() or s.prompts_file:
    say("note: --mode=eval gives the generated clips the real clips' captions; config.sample.prompt and "
        "config.sample.prompts_file are not read.")
  split = protocol(config)["split"]
  records = np.resize(pipeline.eval_records(config, e.num_real, split), e.num_generated)
  needed = np.unique(records)  # only these records are read (WebVid's train split holds millions)
  first = {int(r): captions[0] for r, captions in zip(needed, record_captions(config, split, needed))}
  return [first[int(r)] for r in records]


def run(config: ml_collections.ConfigDict, workdir: str, experiment: Experiment | None = None) -> dict:
  """Evaluates the latest checkpoint of ``workdir``; returns and writes the figures, with the sampler's
  settings, ``eval.seed`` and the KVD subset size used."""
  from videofusion_jax.evaluation import distances

  trained = recorded_config(workdir)[1] or {}
  if SYNTHETIC_DATA in (config.data.name, trained.get("data", {}).get("name")):
    raise ConfigError(f"config.data.name={config.data.name!r}, and {workdir} was trained on "
                      f"{trained.get('data', {}).get('name', 'an unrecorded input')!r}: --mode=eval compares generated "
                      "clips with a dataset's real ones, and a run trained on the synthetic input (noise) has nothing "
                      "to be compared with. Evaluate a run trained on a dataset, with that dataset's name.")
  check_trained_stride(config, trained, workdir)  # before any work
  was = field_or_none(trained, "data.name")
  if was is not None and not same_videos(was, config.data.name):
    say(f"note: the real clips come from {config.data.name} (data.frame_stride={config.data.frame_stride}), and "
        f"{workdir} was trained on {was}: a zero-shot evaluation.")
  if config.sample.embeddings:  # before any slow work: the figures would not be of the given c
    raise ConfigError(f"config.sample.embeddings={config.sample.embeddings!r}: --mode=eval draws every clip's "
                      "content condition c from the prior (the protocol's distribution), not from given "
                      "embeddings; leave sample.embeddings unset for eval, or use --mode=sample with them.")
  if config.data.num_classes and config.sample.label != -1:  # the same: one class against the real clips' mix
    raise ConfigError(f"config.sample.label={config.sample.label}: --mode=eval gives the generated clips the real "
                      "clips' labels, so that class-conditional FVD compares like with like; one class against "
                      "every class would inflate the figures. Leave sample.label at -1 for eval (--mode=sample "
                      "draws one class).")
  experiment = experiment or Experiment(config)  # validates the config (eval fields included)
  warning = schedule_end_warning(config)
  if warning:  # a model trained so before new runs were refused it
    say(warning)
  s = config.sample
  unread = [f"config.sample.{k}={v!r}" for k, v, default in (
      ("num_clips", s.num_clips, 1), ("continuity_frames", s.continuity_frames, 0), ("control", s.control, ""))
      if v != default]
  if unread:  # said, not refused: the protocol's figures are of single clips whatever these say
    say(f"note: --mode=eval draws single clips of data.num_frames={config.data.num_frames} frames, each of its own "
        f"content and motion, as the FVD protocol compares them with the real clips; {', '.join(unread)} "
        f"{'is' if len(unread) == 1 else 'are'} not read (--mode=sample draws long videos and control grids; "
        "benchmarks/long_videos.py measures long videos' seams).")
  e = config.eval
  if frame_repeat(config.data.num_frames) > 1:
    say(f"note: I3D needs clips of at least {MIN_FRAMES} frames; each of the {config.data.num_frames} "
        f"frames is shown {frame_repeat(config.data.num_frames)} times, to real and generated clips alike "
        "(figures are comparable with each other, not with published 16-frame FVDs).")
  c3d = None
  if e.c3d_weights:
    from videofusion_jax.evaluation.c3d import C3DProbs
    c3d = checked_on_every_host(  # a wrong path fails before sampling, on every host
        lambda: C3DProbs(e.c3d_weights, batch_size=e.batch_size), ConfigError(
            "another host could not load eval.c3d_weights (its own error says why): every host needs the file at "
            "the same path."))
  workdir = Path(workdir)
  check_trained_config(config, str(workdir))
  experiment.check_config(config, "eval")
  check_output_folders(workdir, "eval", "eval_cache")
  prompts = checked_on_every_host(  # before any slow work: a dataset without captions is an error
      lambda: eval_prompts(config),
      ConfigError("another host could not read the real clips' captions (its own error says why)."))
  state = experiment.restore(workdir, ema_only=True)
  step = int(state.step)
  i3d = i3d_features(e.batch_size)
  with experiment.explain_out_of_memory("eval_real"):
    real = real_features(config, workdir, i3d)
  labels = sample_labels(config, e.num_generated)
  if labels is not None:  # the real clips' class mix (sample.label is -1: checked above)
    labels = np.resize(real["labels"], e.num_generated).astype(np.int32)
  say(f"sampling {e.num_generated} clips from checkpoint {step} (EMA weights, {config.sample.method}, "
      f"{chain_steps(config)} steps, seed eval.seed={e.seed}) on {experiment.mesh.devices.size} device(s), "
      f"{describe_batch(experiment, e.num_generated)}")
  gen_feats, probs = [], []

  def consume(videos):  # every host holds the batch and runs its rows
    mine = videos[pipeline.eval_shares(len(videos), jax.process_count())[jax.process_index()]]
    gen_feats.append(gather_shares(i3d(for_i3d(mine)), len(videos)))
    if c3d is not None:
      probs.append(gather_shares(c3d(video_io.to_uint8(mine)), len(videos)))

  text = None if prompts is None else checked_on_every_host(
      lambda: prompt_embeddings(config, prompts, verbose=jax.process_index() == 0),
      ConfigError("another host could not encode the prompts (its own error says why): every host needs the same "
                  "CLIP directory at the same path."))
  with experiment.explain_out_of_memory("eval"):
    generated_videos(experiment, state.ema_params, e.num_generated, e.seed, labels, consume, text)
  fake = np.concatenate(gen_feats)
  # Each KVD subset draws min(subset_size, N, M) clips of each side: the size recorded is that one.
  kvd_size = min(e.kvd_subset_size, len(real["features"]), len(fake))
  results = {"step": step, "num_real": int(len(real["features"])), "num_generated": int(len(fake)),
             "seed": int(e.seed), "sampler_settings": sampler_settings(config),
             "kvd_subsets": int(e.kvd_subsets), "kvd_subset_size": int(kvd_size),
             "protocol": real["protocol"],
             "prompts": None if prompts is None else "the first caption of each real clip's record",
             "fvd": distances.fvd(real["features"], fake)}
  kvd_mean, kvd_std = distances.kernel_distance(real["features"], fake, num_subsets=e.kvd_subsets,
                                                subset_size=kvd_size, seed=e.seed)
  whole = kvd_size == len(real["features"]) == len(fake)  # every subset is both sides whole: one subset
  results.update(kvd=kvd_mean, kvd_std=kvd_std, kvd_subsets=1 if whole else int(e.kvd_subsets))
  if c3d is not None:
    probs = np.concatenate(probs)
    # 10 splits: with the default 2048 clips, StyleGAN-V's isv2048_ucf (mean and std over 10 splits of ~205).
    is_splits = distances.inception_splits(*probs.shape)
    is_mean, is_std = distances.inception_score(probs, splits=is_splits)
    # One split has no spread to measure: null, not a std of 0 that looks precise.
    results.update(inception_score=is_mean, inception_score_std=is_std if is_splits > 1 else None,
                   inception_score_splits=is_splits)
  line = f"step {step}: FVD {results['fvd']:.1f}, KVD {kvd_mean:.2f}" + (
      f" ± {kvd_std:.2f}" if kvd_std is not None else " (1 subset: every clip)" if whole else " (1 subset)")
  if c3d is not None:
    spread = results["inception_score_std"]
    line += f", IS {results['inception_score']:.2f}" + (f" ± {spread:.2f}" if spread is not None else " (1 split)")
  say(f"{line} ({len(real['features'])} real / {len(fake)} generated clips)")  # before the write, which may fail
  out = base = workdir / "eval" / f"step_{step}.json"
  if jax.process_index() == 0:  # only the first host writes, so only it looks for a free name
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen = fresh_file(base)
    out = write_new(chosen, lambda tmp: tmp.write_text(json.dumps(results, indent=2)),
                    lambda: next_run(base.parent, base.stem, base.suffix))
    if out != chosen:
      say(f"note: {chosen} was written by another run while this one evaluated; this run's results are in {out}.")
  say(f"wrote {out}")
  if c3d is not None and is_splits < distances.IS_SPLITS:
    per_split = len(probs) // is_splits
    cap = (f"; a split of {per_split} clips scores at most {per_split} (fewer clips than C3D's {probs.shape[1]} "
           "classes)") if per_split < probs.shape[1] else ""
    say(f"note: the Inception Score is over {is_splits} split(s) of ~{per_split} clips, not the protocol's "
        f"{distances.IS_SPLITS} (of ~205 at eval.num_generated=2048), so that no split holds fewer clips than there "
        f"are classes where it can{cap}: compare it only with figures of as many clips.")
  if kvd_size < e.kvd_subset_size:
    said = (" Each holds every clip of both sides, so they are one: one MMD², kvd_std null." if whole
             else "")
    say(f"note: KVD's subsets hold {kvd_size} clips a side, not eval.kvd_subset_size={e.kvd_subset_size}: "
        f"no side has more (recorded as kvd_subset_size).{said}")
  return results
