"""Sampling: EMA weights of a checkpoint -> videos (mp4, PNG grid, npz) and figures; the batched,
sharded generator that ``--mode=sample`` and ``--mode=eval`` share."""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from videofusion_jax import diffusion
from videofusion_jax.config import (
  TRAINED_FIELDS,
  ConfigError,
  check_against_record,
  clip_used,
  field_or_none,
  prior_samples,
  recorded_config,
  schedule_end_warning,
  text_prior,
)
from videofusion_jax.data import video_io
from videofusion_jax.experiment import CompileLog, Experiment
from videofusion_jax.models.encoder import to_sphere
from videofusion_jax.models.factory import make_apply_fns, make_prior_fn, make_video_fn
from videofusion_jax.training import preemption
from videofusion_jax.training import sharding as shd
from videofusion_jax.training.workdir import check_output_folders, write_whole


def sample_labels(config: ml_collections.ConfigDict, num: int) -> np.ndarray | None:
  """The labels to sample: ``config.sample.label``, or the classes in turn when it is -1
  (checked by ``config.validate``)."""
  n = config.data.num_classes
  if not n:
    return None
  if config.sample.label == -1:
    return np.arange(num, dtype=np.int32) % n
  return np.full((num,), config.sample.label, np.int32)


def sample_prompts(config: ml_collections.ConfigDict, num: int, note: bool = True) -> list[str] | None:
  """The prompts of ``num`` samples, taken in turn from ``sample.prompt`` or else ``sample.prompts_file``
  (one a line; a config file may set one, as ``configs/demo.py:text`` does, and a prompt given on the
  command line replaces it); None unless the prior is on text."""
  if not text_prior(config):
    return None
  s = config.sample
  if s.prompt.strip() and s.prompts_file and note:
    say(f"note: config.sample.prompt is given: config.sample.prompts_file={s.prompts_file!r} is not read.")
  if s.prompts_file and not s.prompt.strip():
    try:
      # utf-8-sig: a byte-order mark (Windows editors write one) would open the first prompt as '\ufeff...'.
      text = Path(s.prompts_file).expanduser().read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"config.sample.prompts_file={s.prompts_file!r}: cannot read it ({e}).") from None
    # Line ends alone: str.splitlines would also cut a prompt at U+2028, U+0085 or a form feed (pasted text).
    prompts = [line.strip() for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not prompts:
      raise ConfigError(f"config.sample.prompts_file={s.prompts_file!r} holds no prompt (give one a line).")
    if len(prompts) > num and note:
      say(f"note: {s.prompts_file} holds {len(prompts)} prompts and {num} sample(s) are drawn, one prompt each in "
          f"turn: the last {len(prompts) - num} prompt(s) are not used (--config.sample.num_samples={len(prompts)} "
          "uses every one).")
  elif s.prompt.strip():
    try:
      s.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding on the command line, which Python kept as surrogates
      raise ConfigError("config.sample.prompt holds bytes that are not UTF-8 (a terminal in another encoding?): "
                        "give it in UTF-8, or write it into a file for config.sample.prompts_file (read as "
                        "UTF-8).") from None
    prompts = [s.prompt.strip()]
  else:
    raise ConfigError("this model generates from text: give --config.sample.prompt='a rabbit in a meadow' or "
                      "--config.sample.prompts_file=FILE (one prompt a line).")
  return [prompts[i % len(prompts)] for i in range(num)]


def prompt_embeddings(config: ml_collections.ConfigDict, prompts: list[str], verbose: bool = True) -> np.ndarray:
  """CLIP text embeddings of ``prompts`` on the sphere of radius √D, ``(len(prompts), D)`` float32:
  what the prior on text was trained with (the caption tables of ``data.embeddings``)."""
  from videofusion_jax.data.embeddings import load_clip

  clip = load_clip(config, verbose, jax.process_count())
  if clip.embed_dim != config.model.encoder.embed_dim:
    raise ConfigError(f"the CLIP used for the prompts gives embeddings of width {clip.embed_dim}, but this model was "
                      f"trained on width {config.model.encoder.embed_dim}: give the model.encoder.clip_dir it was "
                      "trained with.")
  unique = sorted(set(prompts))
  ids = clip.tokenize(unique)
  long = [p for p in unique if len(clip.tokenizer.encode(p)) > clip.config.context_length - 2]
  if long and verbose:
    print(f"note: {len(long)} prompt(s) are longer than CLIP's {clip.config.context_length} tokens and were cut "
          f"(the first: {long[0][:60]!r}).", flush=True)
  table = np.asarray(to_sphere(clip.encode_text(ids)))
  return table[[unique.index(p) for p in prompts]]


def guided(config: ml_collections.ConfigDict) -> bool:
  """Whether sampling mixes conditional and null estimates (a conditioned model, s ≠ 1)."""
  conditioned = config.model.condition == "embedding" or bool(config.data.num_classes)
  return conditioned and config.sample.guidance_scale != 1.0


def prior_eps_fn(experiment: Experiment, params, labels: jnp.ndarray | None,
                 text: jnp.ndarray | None = None) -> Callable:
  """The prior's estimate ``eps_fn(z (B, D), t (B,))`` for ``labels`` ``(B,)`` or text embeddings
  ``text`` ``(B, D)`` (both None: a prior on nothing), guided by ``sample.prior_guidance_scale`` on
  the label or the text (doubled batch: the null label, or the null text, zeros)."""
  c = experiment.config
  s, n = c.sample, c.data.num_classes
  if s.prior_guidance_scale == 1.0 or (text is None and not n):
    return make_prior_fn(experiment.networks, params, None if text is not None else labels, text)
  if text is not None:
    doubled = make_prior_fn(experiment.networks, params, None, jnp.concatenate([text, jnp.zeros_like(text)]))
  else:
    doubled = make_prior_fn(experiment.networks, params, jnp.concatenate([labels, jnp.full_like(labels, n)]))
  return functools.partial(diffusion.guided_eps, doubled, scale=s.prior_guidance_scale)


def sample_condition(experiment: Experiment, params, rng: jax.Array, labels: jnp.ndarray | None,
                     batch: int, text: jnp.ndarray | None = None) -> jnp.ndarray:
  """The prior's embeddings ``(batch, D)`` for ``labels`` ``(batch,)`` or ``text`` ``(batch, D)``
  (``prior_eps_fn``), put on the sphere of radius √D where every encoder's embeddings lie. ``rng``:
  one key for the batch, or a key per row ``(batch, 2)`` (``row_keys``)."""
  c = experiment.config
  eps_fn = prior_eps_fn(experiment, params, labels, text)
  rows = (rng, None) if jnp.ndim(rng) == 2 else None
  return to_sphere(diffusion.sample_embeddings(eps_fn, None if rows else rng, (batch, c.model.encoder.embed_dim),
                                               experiment.prior_schedule, num_steps=c.sample.prior_num_steps,
                                               eta=c.sample.prior_eta, row_keys=rows,
                                               spacing=c.sample.prior_spacing))


def network_conditions(config: ml_collections.ConfigDict, labels: jnp.ndarray | None,
                       condition: jnp.ndarray | None) -> tuple[jnp.ndarray | None, jnp.ndarray | None]:
  """What the generators are given: ``(labels, condition)`` for the label or the embedding
  condition, each followed by its null rows (the null label ``num_classes``, or zeros) when
  sampling is guided (``2B`` rows)."""
  doubled = guided(config)
  if config.model.condition == "embedding":
    return None, jnp.concatenate([condition, jnp.zeros_like(condition)]) if doubled else condition
  if doubled:
    labels = jnp.concatenate([labels, jnp.full_like(labels, config.data.num_classes)])
  return labels, None


def video_eps_fn(experiment: Experiment, params, labels: jnp.ndarray | None, condition: jnp.ndarray | None,
                 key_frame: jnp.ndarray | None = None, residual: bool = True) -> Callable:
  """The chain's estimate ``eps_fn(z (B, N, H, W, C), t (B,)) -> (B, N, H, W, C)`` for the
  conditions of ``network_conditions``: VideoFusion's eqs. (10)-(11), or VDM*'s space-time
  network, guided over the whole estimate when ``sample.guidance_scale`` ≠ 1. ``key_frame``
  ``(B, H, W, C)``: the clean key frame the residual generator reads (``model.key_frame_clean``);
  ``residual=False``: the key frame's own chain, without the residual generator."""
  c = experiment.config
  scale = c.sample.guidance_scale if guided(c) else None
  if c.model.kind == "vdm":
    video_fn = make_video_fn(experiment.networks, params, labels, condition=condition)
    return video_fn if scale is None else functools.partial(diffusion.guided_eps, video_fn, scale=scale)
  base_fn, residual_fn = make_apply_fns(experiment.networks, params, labels, condition=condition)
  if not residual:
    residual_fn = lambda z, t, i, *key: jnp.zeros_like(z)  # noqa: E731
  return diffusion.decomposed_eps_fn(base_fn, residual_fn, experiment.lambdas, experiment.schedule, scale,
                                     c.model.key_frame_input, key_frame)


def row_keys(seed: int, content: np.ndarray, motion: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Each row's keys ``(base, residual, prior)``, ``(B, 2)`` each: the base noise and the prior's draw
  from the row's ``content`` index, the residual noise from its ``motion`` index (three streams of
  ``seed``). A video so depends on its indices alone, not on the batch, devices or hosts it is drawn
  on; rows with one content index share ``b_T`` (with DDIM η = 0, the key frame) and ``c``, rows with
  one motion index share the residual noise."""
  root = jax.random.PRNGKey(seed)
  fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
  content, motion = jnp.asarray(content, jnp.uint32), jnp.asarray(motion, jnp.uint32)
  return (fold(jax.random.fold_in(root, 0), content), fold(jax.random.fold_in(root, 1), motion),
          fold(jax.random.fold_in(root, 2), content))


def chain_steps(config: ml_collections.ConfigDict) -> int:
  """The video chain's number of steps: ``sample.num_steps`` for DDIM, all T for DDPM."""
  return config.sample.num_steps if config.sample.method == "ddim" else config.diffusion.num_timesteps


def clip_motion_indices(motion: np.ndarray, num_clips: int) -> np.ndarray:
  """The motion index of each clip of a long video, ``(R, num_clips)``: clip ``j`` of a row with
  motion index ``m`` draws its residual noise from ``m x num_clips + j``."""
  return np.asarray(motion)[:, None] * num_clips + np.arange(num_clips)


def sampling_batch(experiment: Experiment, rows: int | None = None) -> int:
  """The rows drawn at once for ``rows`` videos (None: as many as wanted): ``sample.batch_size``, or
  ``rows`` when fewer, rounded up to a multiple of the mesh's devices, so that every device takes a
  share (the extra rows are drawn and dropped; each row's noise is its own, ``row_keys``, so the
  videos kept do not change)."""
  devices = experiment.mesh.devices.size
  wanted = experiment.config.sample.batch_size if rows is None else min(experiment.config.sample.batch_size, rows)
  return -(-max(wanted, 1) // devices) * devices


@functools.lru_cache(maxsize=4)
def make_generate_fn(experiment: Experiment):
  """``generate(params, keys, labels (B,) or None, text (B, D) or None, condition (B, D) or None,
  anchor (B, H, W, C), anchor_on ()) -> (videos (B, N, H, W, C), condition)``, jitted once per
  experiment (and once more for given conditions). ``keys``: ``row_keys``; every random value of a
  row comes from its keys.

  With ``model.condition='embedding'`` and no given ``condition``, the prior samples it from the
  labels, from the prompts' text embeddings ``text``, or from nothing; both generators get it. With
  guidance (``sample.guidance_scale`` ≠ 1) each network takes the ``2B`` batch of
  ``diffusion.guided_decomposed_eps``: the condition (labels or c), then the null condition (the
  null label ``num_classes``, or zeros). VDM* (``model.kind =
  'vdm'``) runs the same chain on its space-time network's estimate. With
  ``sample.continuity_frames`` = m > 0, the first m frames are pulled toward ``anchor`` (the last
  frame of the clip before) by ``anchor_on`` (0 or 1) times ``diffusion.anchor_weights``.
  """
  c = experiment.config
  s = c.sample
  shape_tail = (c.data.num_frames, c.data.image_size, c.data.image_size, 3)
  weights = diffusion.anchor_weights(c.data.num_frames, s.continuity_frames, chain_steps(c))

  def generate(params, keys, labels, text, condition, anchor, anchor_on):
    base_keys, residual_keys, prior_keys = keys
    batch = base_keys.shape[0]
    if c.model.condition == "embedding" and condition is None:
      condition = sample_condition(experiment, params, prior_keys, labels, batch, text)
    net_labels, net_condition = network_conditions(c, labels, condition)
    chain = functools.partial(diffusion.sample_chain, rng=None, shape=(batch,) + shape_tail,
                              lambdas=experiment.lambdas, schedule=experiment.schedule, method=s.method,
                              num_steps=s.num_steps, eta=s.eta, clip_x0=s.clip_x0,
                              row_keys=(base_keys, residual_keys), spacing=s.spacing, variance=s.variance)
    key_frame = None
    if c.model.key_frame_clean:
      # The key frame's chain depends on the base generator and the base noise alone (its residual
      # share is √(1-λ^k) = 0), so a first pass with the same noise and no residual generator
      # finishes the very key frame that the full chain will; the residual generator then reads it.
      first = chain(video_eps_fn(experiment, params, net_labels, net_condition, residual=False))
      key_frame = jnp.clip(first[:, diffusion.key_frame_index(c.data.num_frames)], -1.0, 1.0)
    eps_fn = video_eps_fn(experiment, params, net_labels, net_condition, key_frame=key_frame)
    if s.continuity_frames:
      free_fn = eps_fn

      def eps_fn(z, t):
        return diffusion.anchored_eps(z, free_fn(z, t), t, anchor, anchor_on * weights, experiment.schedule,
                                      s.clip_x0)
    return chain(eps_fn), condition

  # The batch (``sampling_batch``) divides over the mesh: each device draws its share of the rows.
  return experiment.stored_jit(generate, "generate", out_shardings=experiment.batch_sharding)


def check_conditions(config: ml_collections.ConfigDict, rows: int, labels, condition, text) -> None:
  """What ``draw_videos`` is given for ``rows`` videos, on the host before anything is traced, else a
  ConfigError naming the argument and the config field: ``labels`` one per row, and where the model reads
  them (``data.num_classes`` > 0, the label condition or the prior on the label) integers in [0,
  ``num_classes``] (``num_classes``: the null label); ``condition`` ``(rows, model.encoder.embed_dim)``,
  finite, for the embedding condition only; ``text`` likewise, for a prior on text. (A label past the
  classes indexes past the label embedding: NaN videos, blamed on the weights.)"""
  m, n, width = config.model, config.data.num_classes, config.model.encoder.embed_dim
  embedding = m.condition == "embedding"
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (rows,):
      raise ConfigError(f"labels has shape {labels.shape} for {rows} videos; give one label per video, shape "
                        f"({rows},).")
  on_text = text_prior(config)
  reads_labels = n > 0 and (not embedding or (condition is None and not on_text))
  if reads_labels:
    what = f"integers in [0, {n}) (config.data.num_classes={n}; {n} is the null label)"
    if labels is None:
      whose = "its prior is" if embedding else "both generators are"
      raise ConfigError(f"labels=None: this model is class-conditional ({whose} on the label): pass labels, shape "
                        f"({rows},), {what}.")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ConfigError(f"labels are {labels.dtype}; give {what}.")
    if labels.size and (labels.min() < 0 or labels.max() > n):
      raise ConfigError(f"labels hold {labels.min()}..{labels.max()}, outside [0, {n}]; give {what}.")
  if on_text and condition is None and text is None:
    raise ConfigError(f"text=None: this model's prior is on text (config.model.prior.condition='text'): pass the "
                      f"prompts' embeddings (prompt_embeddings), shape ({rows}, {width}), or a condition.")
  for name, given, field in (("condition", condition, "model.condition='embedding'"),
                             ("text", text, "model.prior.condition='text'")):
    if given is None:
      continue
    if not (on_text if name == "text" else embedding):
      raise ConfigError(f"{name} was given, but this model does not read it (it needs config.{field}).")
    given = np.asarray(given)
    if given.shape != (rows, width):
      raise ConfigError(f"{name} has shape {given.shape} for {rows} videos; give ({rows}, {width}), one embedding "
                        f"of width config.model.encoder.embed_dim={width} per video.")
    numbers = jnp.issubdtype(given.dtype, jnp.floating) or jnp.issubdtype(given.dtype, jnp.integer)
    if not (numbers and np.all(np.isfinite(given))):
      raise ConfigError(f"{name} holds {given.dtype} values that are not all finite numbers; give float32 "
                        "embeddings.")


def draw_videos(experiment: Experiment, params, seed: int, content: np.ndarray, motion: np.ndarray,
                labels: np.ndarray | None, condition: np.ndarray | None = None,
                anchor: np.ndarray | None = None,
                progress: Callable[[int], None] | None = None,
                text: np.ndarray | None = None, batch: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """Videos in [-1, 1] for rows of ``content`` and ``motion`` indices (``row_keys``), in batches of
  ``batch`` rows (default ``sampling_batch`` of the R rows; the last one padded), gathered from every
  host: ``(R, N, H, W, C)`` and the embeddings used ``(R, D)`` (None for the label condition).
  ``labels`` ``(R,)``; ``condition`` ``(R, D)``: given embeddings instead of the prior's; ``text``
  ``(R, D)``: the prompts' text embeddings, for a prior on text (``prompt_embeddings``); ``anchor``
  ``(R, H, W, C)``: the frame each row's first frames are pulled toward (``sample.continuity_frames``).
  ``progress(rows done)`` after each batch."""
  c = experiment.config
  rows = len(content)
  check_conditions(c, rows, labels, condition, text)
  gen = make_generate_fn(experiment)
  batch = batch or sampling_batch(experiment, rows)
  frame = (c.data.image_size, c.data.image_size, 3)
  content, motion = np.asarray(content), np.asarray(motion)
  everywhere = shd.replicated(experiment.mesh)

  def put(x, dtype):  # the same values on every host: one array replicated over the whole mesh
    x = np.asarray(x, dtype)
    return jax.make_array_from_callback(x.shape, everywhere, lambda index: x[index])

  out, conds = [], []
  for start in range(0, rows, batch):
    take = np.resize(np.arange(start, min(start + batch, rows)), batch)  # pad with rows already drawn
    keys = tuple(put(k, np.uint32) for k in row_keys(seed, content[take], motion[take]))
    lab = None if labels is None else put(np.asarray(labels)[take], np.int32)
    cond = None if condition is None else put(condition[take], np.float32)
    txt = None if text is None else put(np.asarray(text)[take], np.float32)
    anc = put(np.zeros((batch,) + frame) if anchor is None else anchor[take], np.float32)
    videos, used = gen(params, keys, lab, txt, cond, anc, put(float(anchor is not None), np.float32))
    if jax.process_count() > 1:  # the batch lies on every host's devices: gather it everywhere
      videos, used = multihost_utils.process_allgather((videos, used), tiled=True)
    n = min(batch, rows - start)
    out.append(np.asarray(videos)[:n])
    if used is not None:
      conds.append(np.asarray(used)[:n])
    if progress is not None:
      progress(start + n)
    preemption.stop_between_batches()  # every host draws every batch: they stop together
  videos = np.concatenate(out)
  # Before the clip, which would turn +-inf into +-1 (and the writers NaN into black frames).
  bad = ~np.isfinite(videos.reshape(len(videos), -1)).all(axis=1)
  if bad.any():
    raise FloatingPointError(
        f"{int(bad.sum())} of {len(videos)} sampled videos hold NaN or infinite values: the weights or the "
        "sampler's settings make the chain diverge. "
        "Try an earlier checkpoint, --config.sample.clip_x0=True or a lower guidance scale; nothing was written.")
  return np.clip(videos, -1.0, 1.0), (np.concatenate(conds) if conds else None)


def generate_videos(experiment: Experiment, params, num: int, seed: int, labels: np.ndarray | None,
                    condition: np.ndarray | None = None, with_condition: bool = False, first: int = 0,
                    text: np.ndarray | None = None, batch: int | None = None):
  """Videos ``first`` .. ``first + num - 1`` of ``seed`` in [-1, 1], ``(num, N, H, W, C)``: each from
  its own content and motion index (``row_keys``), so the same whatever the batch size or devices.

  ``condition`` ``(num, D)``: given key-frame embeddings instead of the prior's (``model.condition
  ='embedding'``). With ``with_condition`` also returns the embeddings used, ``(num, D)`` (None for
  the label condition). ``text`` ``(num, D)``: the prompts' embeddings, for a prior on text.
  ``batch``: the rows drawn at once (default ``sampling_batch(experiment, num)``)."""
  index = np.arange(first, first + num)
  videos, used = draw_videos(experiment, params, seed, index, index, labels, condition, text=text, batch=batch)
  return (videos, used) if with_condition else videos


def long_videos(experiment: Experiment, params, seed: int, content: np.ndarray, motion: np.ndarray,
                labels: np.ndarray | None, condition: np.ndarray | None = None,
                progress: Callable[[int], None] | None = None,
                anchored: bool = True, text: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """Videos of ``sample.num_clips`` consecutive clips, ``(R, num_clips x N, H, W, C)``: the clips of a
  row share its content index (``b_T`` and ``c``: the paper's long videos), clip ``j`` draws fresh
  residual noise (motion index ``motion x num_clips + j``). With ``sample.continuity_frames`` each
  clip after the first is pulled toward the last frame of the one before (``anchored=False``: not, for
  comparison). ``progress(clips done)``."""
  s = experiment.config.sample
  pull = anchored and s.continuity_frames > 0
  clips, anchor, used = [], None, condition
  # Every clip passes the given condition (None: the prior's), not the first clip's c: the prior
  # redraws the same c from the same keys, and passing c would compile a second variant.
  for j, clip_motion in enumerate(clip_motion_indices(motion, s.num_clips).T):
    done = None if progress is None else (lambda rows, j=j: progress(j * len(content) + rows))
    clip, used = draw_videos(experiment, params, seed, content, clip_motion, labels, condition,
                             anchor if pull else None, done, text)
    clips.append(clip)
    anchor = clip[:, -1]
  return np.concatenate(clips, axis=1), used


def given_embeddings(config: ml_collections.ConfigDict, num: int) -> np.ndarray | None:
  """``sample.embeddings`` loaded and checked: ``(num, embed_dim)`` float32, or None when unset. A .npy,
  or a .npz with an ``embeddings`` array (a run's samples.npz). Each row is put on the sphere of radius
  √embed_dim, where every training embedding lies (an encoder's, the prior's); a zero row stays zero,
  the null condition."""
  path = config.sample.embeddings
  if not path:
    return None
  try:
    e = np.load(Path(path).expanduser())
    files = e.files if isinstance(e, np.lib.npyio.NpzFile) else None
    if files is not None and "embeddings" in files:
      e = e["embeddings"]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # a missing, truncated or damaged file
    raise ConfigError(f"config.sample.embeddings={path!r}: cannot read a .npy array ({type(err).__name__}: "
                      f"{err}).") from None
  if files is not None and "embeddings" not in files:
    raise ConfigError(f"config.sample.embeddings={path!r}: a .npz without an 'embeddings' array (it holds "
                      f"{files}); give a .npy, or a samples.npz written by --mode=sample.")
  if e.size == 0:
    raise ConfigError(f"config.sample.embeddings={path!r} holds no embeddings (a label-conditioned model's "
                      "samples.npz has none).")
  if not (np.issubdtype(e.dtype, np.floating) or np.issubdtype(e.dtype, np.integer)):
    raise ConfigError(f"config.sample.embeddings={path!r} holds {e.dtype} values, not numbers.")
  width = config.model.encoder.embed_dim
  if e.ndim == 1:
    e = e[None]
  if e.ndim != 2 or e.shape[1] != width or e.shape[0] not in (1, num):
    raise ConfigError(f"config.sample.embeddings={path!r} holds an array of shape {e.shape}; this model's "
                      f"embeddings have width {width} (config.model.encoder.embed_dim): give ({num}, {width}) "
                      f"for the {num} samples, or ({width},) for all of them.")
  if not np.all(np.isfinite(e)):
    raise ConfigError(f"config.sample.embeddings={path!r} holds NaN or infinite values.")
  # Each row divided by its largest magnitude first (in float64): squared in float32, rows of 1e20 overflowed
  # to a norm of inf (the null condition) and rows of 1e-9 fell under to_sphere's floor (short of √D).
  e = np.asarray(e, np.float64)
  peak = np.abs(e).max(axis=-1, keepdims=True)
  e = e / np.where(peak > 0, peak, 1.0)
  e = np.asarray(to_sphere(jnp.asarray(e, jnp.float32)))  # a zero row stays zero: the null condition
  return np.broadcast_to(e, (num, width)).astype(np.float32)


def check_same_inputs(given: np.ndarray | None, labels: np.ndarray | None, prompts: list[str] | None) -> None:
  """A ConfigError, on every host, where the hosts read different sampling inputs (each reads its own copy of
  the embeddings or prompts file; a row drawn on one host's devices took that host's, while process 0's went
  into the sidecars and samples.npz)."""
  h = hashlib.sha256()
  for part in (given, labels):
    h.update(b"-" if part is None else np.ascontiguousarray(part).tobytes() + str(part.shape).encode())
  h.update(json.dumps(prompts).encode())
  shd.same_on_every_host(h.digest(), lambda differ: ConfigError(
      f"process(es) {differ} read other sampling inputs than process 0 (config.sample.embeddings, "
      "config.sample.prompt or prompts_file: each host reads its own copy, and draws its share of the rows from "
      "it): give every host the same files (copy process 0's)."))


def say(*args, **kwargs) -> None:
  """``print`` on the first host only (every host runs the same sampling or evaluation)."""
  if jax.process_index() == 0:
    print(*args, **kwargs)


class Progress:
  """Prints ``what: done/total (rate/s, time left)`` at most every ``every_s`` seconds, inside a ``with``
  block. The first report (which holds the compile) sets the clock, and says what XLA did until then
  (``CompileLog``: compiled, or loaded from the compilation cache); the rate and time left count from it."""

  def __init__(self, what: str, total: int, every_s: float = 10.0, unit: str = "videos", quiet: bool = False):
    self.what, self.total, self.every_s, self.unit, self.quiet = what, total, every_s, unit, quiet
    self.t0 = self.last = time.time()
    self.first: tuple[float, int] | None = None
    self._xla: CompileLog | None = None

  def __enter__(self) -> Progress:
    self.t0 = self.last = time.time()
    if not self.quiet:
      self._xla = CompileLog().__enter__()
    return self

  def __exit__(self, *exc) -> None:
    if self._xla is not None:
      self._xla.__exit__(*exc)
      self._xla = None

  def __call__(self, done: int) -> None:
    now = time.time()
    if self.quiet:
      return
    if self.first is None:
      self.first = (now, done)
      xla = "" if self._xla is None else f"; {self._xla.describe()}"
      self.__exit__(None, None, None)  # what XLA did until the first report, no more
      print(f"  {self.what}: {done}/{self.total} ({now - self.t0:.0f} s{xla})", flush=True)
      self.last = now
      return
    if now - self.last < self.every_s and done < self.total:
      return
    self.last = now
    rate = (done - self.first[1]) / max(now - self.first[0], 1e-9)
    left = (self.total - done) / max(rate, 1e-9)
    print(f"  {self.what}: {done}/{self.total} ({rate:.2f} {self.unit}/s, {left:.0f} s left)", flush=True)


def describe_batch(experiment: Experiment, rows: int | None = None) -> str:
  """The sampling batch for ``rows`` videos in words, for the runs' first line: ``sampling_batch`` and
  why, if it is not ``sample.batch_size``."""
  asked, devices = experiment.config.sample.batch_size, experiment.mesh.devices.size
  batch = sampling_batch(experiment, rows)
  if asked == batch:
    return f"{batch} at a time"
  fewer = rows is not None and rows < asked
  wanted = f"the {rows} video(s) wanted" if fewer else f"sample.batch_size={asked}"
  if batch == (rows if fewer else asked):
    return f"{batch} at a time ({wanted}, fewer than sample.batch_size={asked})"
  return f"{batch} at a time ({wanted} rounded up to a multiple of the {devices} devices)"


def generated_videos(experiment: Experiment, params, num: int, seed: int, labels: np.ndarray | None,
                     consume: Callable[[np.ndarray], None], text: np.ndarray | None = None) -> None:
  """Draws videos 0 .. ``num - 1`` of ``seed`` in ``sampling_batch`` batches and hands each batch,
  ``(B, N, S, S, 3)`` in [-1, 1], to ``consume``. ``text`` ``(num, D)``: for a prior on text."""
  # One batch shape for every call, the last (short) batch padded: the chain compiles once, where a
  # batch of the remainder would compile a second program for a single batch's rows.
  batch = sampling_batch(experiment, num)
  with Progress("generated videos", num, quiet=jax.process_index() > 0) as progress:
    for start in range(0, num, batch):
      size = min(batch, num - start)
      lab = None if labels is None else labels[start:start + size]
      txt = None if text is None else text[start:start + size]
      consume(generate_videos(experiment, params, size, seed, lab, first=start, text=txt, batch=batch))
      progress(start + size)


def control_indices(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """The rows' ``(content, motion)`` indices for ``sample.control``: '' a new video per row;
  'content' one content (``b_T``, ``c``, label) and a residual noise per row (same content, other
  motion); 'motion' a content per row and one residual noise (other content, same motion)."""
  rows = np.arange(config.sample.num_samples)
  zero = np.zeros_like(rows)
  return {"": (rows, rows), "content": (zero, rows), "motion": (rows, zero)}[config.sample.control]


def one_content_note(config: ml_collections.ConfigDict, labels: np.ndarray | None, given: np.ndarray | None,
                     prompts: list[str] | None) -> str:
  """For ``sample.control='content'``, which draws every row from the first row's condition: a note
  naming the conditions given for the other rows and left unused ('' when they were all the same)."""
  if config.sample.control != "content":
    return ""
  if prompts is not None:
    others = len(set(prompts)) - 1
    first, what = f"prompt {prompts[0]!r}", f"{others} other prompt(s)"
  elif given is not None:
    others = len(np.unique(given, axis=0)) - 1
    first, what = "embedding (row 0 of config.sample.embeddings)", f"{others} other embedding(s)"
  elif labels is not None:
    others = len(set(labels.tolist())) - 1
    first = f"label {int(labels[0])}"
    what = (f"the other {others} class(es) in turn (config.sample.label=-1; --config.sample.label=K picks "
            "the class)")
  else:
    return ""
  if not others:
    return ""
  return (f"note: config.sample.control='content' draws every video from one content, the first video's {first}: "
          f"{what} are not used (--config.sample.control='' draws one video per condition).")


def sampler_settings(config: ml_collections.ConfigDict) -> dict:
  """What a sidecar records of the sampler."""
  s = config.sample
  ddim = s.method == "ddim"
  return {"sampler": s.method, "spacing": s.spacing if ddim else None, "variance": None if ddim else s.variance,
          "steps": chain_steps(config), "eta": s.eta if ddim else None,
          "clip_x0": s.clip_x0, "guidance_scale": s.guidance_scale, "lambda": config.diffusion.lam,
          "model": config.model.kind, "condition": config.model.condition,
          "encoder": config.model.encoder.kind if config.model.condition == "embedding" else None,
          "clip": clip_used(config),
          "prior": ({"steps": s.prior_num_steps, "spacing": s.prior_spacing, "eta": s.prior_eta,
                     "guidance_scale": s.prior_guidance_scale}
                    if prior_samples(config) else None),
          "embeddings_file": s.embeddings or None}


def check_trained_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """``_check_trained_config_here``, agreed on by every host: a host whose ``config.json`` passed
  stops too when another's did not (it would wait at the sampler's first collective). Every process
  must call it."""
  shd.checked_on_every_host(
      lambda: _check_trained_config_here(config, workdir),
      ConfigError(f"{workdir}: another host refused this run's settings against the training run's config.json "
                  "(its own error says why); every host needs the same workdir, at the same path, and the same flags."))


def _check_trained_config_here(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The settings ``TRAINED_FIELDS`` (and a 'clip' encoder's CLIP: another CLIP's text space would feed
  the prior embeddings it never saw) as the workdir's ``config.json`` records the training run's: a
  ConfigError naming each that differs and the flags that give training's; also guidance on a model
  trained without the null condition (``train.label_dropout=0``). Nothing to compare without the
  record (an older or hand-edited one: the fields it lacks)."""
  record, trained = recorded_config(workdir)
  if trained is None:
    return
  if field_or_none(trained, "train.stage") == "image":
    raise ConfigError(f"{workdir} holds an image-stage run (train.stage='image', {record}): it trained the base "
                      "generator alone, and its residual generator is untrained (every frame but the key frame would "
                      "come out as noise). Train the video stage from it with --config.train.init_base_from="
                      f"{workdir} --config.train.stage=video in a new workdir, and sample that.")
  check_against_record(config, trained, TRAINED_FIELDS, "trained with",
                       f"this model was trained with other settings ({record}), and its weights give wrong samples "
                       "under these", "the config it was trained with")
  if config.data.name == "demo_clips":  # the one dataset whose samples are measured against its real clips
    check_trained_stride(config, trained, workdir)
  try:
    dropout = float(trained["train"]["label_dropout"])
  except (KeyError, TypeError, ValueError):
    dropout = None  # not recorded: nothing to compare
  check_guidance_was_trained(config, dropout, record)


def same_videos(name: str | None, other: str) -> bool:
  """Whether the datasets ``name`` and ``other`` (``data.name``) hold the same videos: the same dataset, whatever
  resolution each names."""
  return name is not None and name.split("/")[0] == other.split("/")[0]


def check_trained_stride(config: ml_collections.ConfigDict, trained: dict, workdir: str | Path) -> None:
  """A ConfigError when ``config`` reads the clips of the dataset the model was trained on (``trained``: its
  recorded config.json) at another ``data.frame_stride``: no weight's shape tells the stride, the generated clips
  move at training's, and the real clips they are measured against (FVD and KVD, the demo's motion ratio) would
  be read at this one. Another dataset (a zero-shot evaluation) has a stride of its own; the same videos at
  another stored resolution (``ucf101/64``, ``ucf101/128``) do not."""
  was, stride = field_or_none(trained, "data.name"), field_or_none(trained, "data.frame_stride")
  if same_videos(was, config.data.name) and stride is not None and stride != config.data.frame_stride:
    raise ConfigError(f"config.data.frame_stride={config.data.frame_stride} ({workdir} was trained on {was} with "
                      f"{stride}): the generated clips move at the training run's stride and the real clips would be "
                      f"read at this one, so the figures would compare unlike motion; pass "
                      f"--config.data.frame_stride={stride}.")


def check_guidance_was_trained(config: ml_collections.ConfigDict, label_dropout: float | None,
                               record: str | None = None) -> None:
  """A ConfigError when ``config`` samples with guidance (``sample.guidance_scale``, or the prior's
  ``sample.prior_guidance_scale``, ≠ 1) from a model trained with ``label_dropout`` = 0: it never saw
  the null condition that guidance mixes in. ``record``: the config.json the dropout was read from
  (sampling a trained run); None: the dropout is this config's, of the training still to come
  (``--mode=train_and_sample``, checked before it). ``label_dropout`` None: not known, nothing to check."""
  s = config.sample
  scales = ([f"config.sample.guidance_scale={s.guidance_scale}"] if guided(config) else []) + (
      [f"config.sample.prior_guidance_scale={s.prior_guidance_scale}"]
      if prior_samples(config) and s.prior_guidance_scale != 1.0 else [])
  if not scales or label_dropout is None or float(label_dropout) != 0.0:
    return
  if record is None:
    trained = "--mode=train_and_sample trains the model with train.label_dropout=0 first, so it would never learn"
  else:
    trained = f"this model was trained with train.label_dropout=0 ({record}), so it never learned"
  raise ConfigError(f"{' and '.join(scales)}: {trained} the null condition that guidance mixes in; sample at scale "
                    "1, or train with --config.train.label_dropout > 0 (0.1 is usual).")


GRID_COLUMNS = 64  # grid.png shows at most this many frames of a video


def fresh_directory(path: Path) -> Path:
  """``path``, or, when an earlier run left files there, the first free ``path-runK`` (K = 2, 3, ...):
  a rerun (another seed, sampler or guidance) keeps the samples before it, and no folder mixes two
  runs' files. Says so when it moves on. (``run`` renames a folder to ``path`` only once it is whole:
  its hidden ``partial_directory`` and an ``incomplete_directory`` are not counted.)"""
  if not path.is_dir() or not any(path.iterdir()):
    return path
  fresh = next_run(path.parent, path.name)
  say(f"note: {path} holds an earlier run's samples, which are kept; this run writes to {fresh}.")
  return fresh


def fresh_file(path: Path) -> Path:
  """``path``, or, when an earlier run wrote it, the first free ``STEM-runK.SUFFIX`` (K = 2, 3, ...), as
  ``fresh_directory`` for a folder: a rerun keeps the results before it. Says so when it moves on."""
  if not path.exists():
    return path
  fresh = next_run(path.parent, path.stem, path.suffix)
  say(f"note: {path} holds an earlier run's results, which are kept; this run writes to {fresh}.")
  return fresh


def partial_directory(path: Path) -> Path:
  """Creates the hidden folder beside ``path`` that this run writes ``path``'s files into before renaming it
  to ``path``: ``.NAME.TOKEN.PID.partial``, a name ``fresh_directory`` never picks nor takes for a run's. The
  random token makes it this run's alone: a rerun in a restarted container has the same pid (1, say), and
  took, emptied and removed the folder a killed run had left (its whole samples.npz), or that another
  container's run on the same workdir was still writing."""
  while True:
    partial = path.with_name(f".{path.name}.{os.urandom(4).hex()}.{os.getpid()}.partial")
    try:
      partial.mkdir(parents=True)
      return partial
    except FileExistsError:
      continue


def note_left_partials(samples: Path) -> None:
  """Says which hidden ``partial_directory`` folders under ``samples`` no process of this host writes: left
  by a run killed while writing (SIGKILL, a crash: no ``finally`` ran), which no run reads or removes. Called
  before this run makes its own: one with this process's id was left by an earlier process that had it (a
  restarted container)."""
  for folder in sorted(samples.glob(".*.partial")):
    pid = folder.name.split(".")[-2]
    if pid.isdigit() and int(pid) != os.getpid() and _running(int(pid)):
      continue
    say(f"note: {folder} was left by a sample run stopped while writing it (killed, or still writing on another "
        "host); no run reads it: take its samples.npz if you need it, then delete it.")


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # no signal: whether the process exists
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    return True
  return True


def incomplete_directory(path: Path) -> Path:
  """The first free ``NAME.incomplete`` (then ``NAME.incomplete2``, ...) beside ``path``: where a run cut
  short while writing ``path`` leaves the samples it wrote whole."""
  first = path.with_name(f"{path.name}.incomplete")
  return first if not first.exists() else _first_free(lambda k: path.with_name(f"{path.name}.incomplete{k}"))


def _set_aside(partial: Path, out_dir: Path, arrays_whole: bool, error: BaseException) -> None:
  """After ``error`` stopped the writing of ``partial`` (a full disk, Ctrl-C): keeps it as
  ``incomplete_directory(out_dir)`` when samples.npz was written whole (the arrays cost a chain to draw
  again), saying where, and removes it otherwise. Never raises: the caller re-raises ``error``."""
  if not arrays_whole:
    shutil.rmtree(partial, ignore_errors=True)
    return
  kept = incomplete_directory(out_dir)
  try:
    os.replace(partial, kept)
  except OSError:
    kept = partial  # left where it is: still hidden from fresh_directory, and named below
  try:  # its results.json named out_dir, which a rerun writes
    record = json.loads((kept / "results.json").read_text())
    write_whole(kept / "results.json",
                lambda tmp: tmp.write_text(json.dumps({**record, "dir": str(kept), "incomplete": True}, indent=2)))
  except (OSError, ValueError):  # not written yet, or the disk is full: the note below still names the folder
    pass
  why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
  say(f"note: writing {out_dir} stopped ({why}); this run's samples.npz was written whole to {kept}, an "
      "incomplete folder (not every video, sidecar or grid.png in it); a rerun writes "
      f"{out_dir.name} again.", flush=True)


def _move_into_place(partial: Path, out_dir: Path, base: Path, results: dict) -> Path:
  """Renames the whole ``partial`` to ``out_dir`` (absent or empty: ``fresh_directory(base)``), or, when another
  run of the same checkpoint wrote ``out_dir`` since it was chosen (two runs at once), to the next free
  ``base-runK`` (not ``base-runK-run2``), with its results.json's ``dir`` (and ``results``) saying so. Returns
  the folder."""
  moved = out_dir
  while True:
    if moved != out_dir:
      results["dir"] = str(moved)
      (partial / "results.json").write_text(json.dumps(results, indent=2))
    try:
      os.replace(partial, moved)
      break
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
    moved = next_run(base.parent, base.name)  # taken meanwhile by yet another run: the next one
  if moved != out_dir:
    say(f"note: {out_dir} was written by another run while this one sampled; this run's samples are in {moved}.")
  return moved


def next_run(parent: Path, stem: str, suffix: str = "") -> Path:
  """The first ``parent/STEM-runK SUFFIX`` (K = 2, 3, ...) that does not exist."""
  return _first_free(lambda k: parent / f"{stem}-run{k}{suffix}")


def _first_free(name: Callable[[int], Path]) -> Path:
  """``name(k)`` for the first K = 2, 3, ... that does not exist."""
  k = 2
  while name(k).exists():
    k += 1
  return name(k)


def write_videos(out_dir: Path, videos: np.ndarray, names: list[str], sidecars: list[dict], fps: int,
                 upscale: int) -> list[str]:
  """Writes each video ``(N, H, W, 3)`` uint8 as ``NAME.mp4`` (H.264), ``NAME.gif`` and ``NAME.json`` (its
  sidecar), and ``grid.png`` (a row per video, at most ``GRID_COLUMNS`` frames). Without a video
  encoder (no PyAV, as on some GPU images) says so once and writes the rest. Returns the kinds
  written."""
  out_dir.mkdir(parents=True, exist_ok=True)
  mp4 = True
  for video, name, sidecar in zip(videos, names, sidecars):
    if mp4:
      try:
        video_io.write_video(out_dir / f"{name}.mp4", video, fps=fps, upscale=upscale)
      except (ImportError, ValueError, RuntimeError) as e:  # no PyAV, or a build without H.264 (UnknownCodecError
        mp4 = False  # is a ValueError); an OSError (a full disk) is no encoder's and stops the run
        (out_dir / f"{name}.mp4").unlink(missing_ok=True)  # a half-written file is no video
        print(f"note: no .mp4 written ({type(e).__name__}: {e}): install imageio and av (PyAV) with H.264 (libx264); "
              "the GIFs, PNG grid and samples.npz hold the same frames.", flush=True)
    video_io.write_gif(out_dir / f"{name}.gif", video, fps=fps, upscale=upscale)
    (out_dir / f"{name}.json").write_text(json.dumps(sidecar, indent=2))
  stride = -(-videos.shape[1] // GRID_COLUMNS)  # long videos: every stride-th frame
  video_io.write_png(out_dir / "grid.png", video_io.frame_grid(videos[:, ::stride], upscale=upscale))
  return (["mp4"] if mp4 else []) + ["gif", "json", "grid.png"]


def run(config: ml_collections.ConfigDict, workdir: str, experiment: Experiment | None = None,
        config_name: str = "") -> dict:
  """Loads the latest checkpoint's EMA weights and writes ``sample.num_samples`` videos of
  ``sample.num_clips`` clips (``sample.control``: the content or motion grid) under
  ``workdir/samples/step_N[_control][_Kclips]``: mp4, GIF and a JSON sidecar per video, grid.png,
  samples.npz and results.json (process 0 writes; every host draws its share). The folder appears
  whole or not at all (``partial_directory``, renamed at the end); a run stopped while writing keeps
  a whole samples.npz in ``incomplete_directory`` and re-raises."""
  experiment = experiment or Experiment(config)
  check_trained_config(config, workdir)  # first: what the config says against what the weights were trained with
  experiment.check_config(config, "sample")
  warning = schedule_end_warning(config)
  if warning:  # a model trained so before new runs were refused it
    say(warning)
  check_output_folders(workdir, "samples")
  state = experiment.restore(workdir, ema_only=True)
  step = int(state.step)
  s = config.sample
  print = say  # noqa: A001 - every host samples; the first one speaks
  content, motion = control_indices(config)

  def inputs():  # files on each host's disk: one missing on one host would leave the others in the sampler
    given = given_embeddings(config, s.num_samples)
    labels = None if given is not None else sample_labels(config, s.num_samples)
    # One content uses the first prompt alone: one_content_note says so, not sample_prompts' note on the rest.
    in_turn = (sample_prompts(config, s.num_samples, note=s.control != "content")
               if given is None and text_prior(config) else None)
    note = one_content_note(config, labels, given, in_turn)
    if note:
      say(note)
    if labels is not None:
      labels = labels[content]
    if given is not None:
      given = given[content]
    prompts = text = None
    if in_turn is not None:
      prompts = [in_turn[i] for i in content]
      text = prompt_embeddings(config, prompts, verbose=jax.process_index() == 0)
      labels = _demo_prompt_labels(config, prompts, text)
    # Read before the chain, not after it: a damaged dataset then cost the whole chain's samples.
    return given, labels, prompts, text, demo_real_clips(config)

  given, labels, prompts, text, real = shd.checked_on_every_host(inputs, ConfigError(
      "another host could not read this run's sampling inputs (its own error says why): every host needs the "
      "same files (sample.embeddings, sample.prompts, the CLIP directory, the demo dataset its figures read) at "
      "the same paths."))
  check_same_inputs(given, labels, prompts)
  source = {"label": "", "embedding": " through the prior"}[config.model.condition]
  if prompts is not None:
    source += f" from {len(set(prompts))} prompt(s)"
  if given is not None:
    source = f" from the embeddings in {s.embeddings}"
    if text_prior(config) and (s.prompt.strip() or s.prompts_file):
      unused = "config.sample.prompt" if s.prompt.strip() else f"config.sample.prompts_file={s.prompts_file!r}"
      print(f"note: config.sample.embeddings is given: {unused} is not used (the videos come from those "
            "embeddings, not from text).")
  n_frames = s.num_clips * config.data.num_frames
  what = {"": "videos", "content": "videos of one content (one b_T and c, a residual noise each)",
          "motion": "videos of one motion (a b_T and c each, one residual noise)"}[s.control]
  print(f"sampling {s.num_samples} {what} of {n_frames} frames ({s.num_clips} clip(s) of {config.data.num_frames}) "
        f"from checkpoint {step} (EMA weights){source}, {s.method} with {chain_steps(config)} steps on "
        f"{experiment.mesh.devices.size} device(s), {describe_batch(experiment, s.num_samples)}: the chain compiles "
        "once, then runs batch by batch", flush=True)
  suffix = (f"_{s.control}" if s.control else "") + (f"_{s.num_clips}clips" if s.num_clips > 1 else "")
  # Chosen before sampling, whose collectives every host joins: no host looks after process 0 has written.
  base = Path(workdir) / "samples" / f"step_{step}{suffix}"
  out_dir = fresh_directory(base)
  if jax.process_index() == 0:  # the host that writes: another's processes are not this one's
    note_left_partials(out_dir.parent)
  t0 = time.time()
  unit = "videos" if s.num_clips == 1 else "clips"
  with (Progress(unit, s.num_samples * s.num_clips, unit=unit, quiet=jax.process_index() > 0) as progress,
        experiment.explain_out_of_memory("sample")):
    videos, used = long_videos(experiment, state.ema_params, s.seed, content, motion, labels, given, progress,
                               text=text)
  print(f"sampled {s.num_samples} videos in {time.time() - t0:.0f} s (compile included)", flush=True)
  results = {"step": step, "num_samples": int(s.num_samples), "num_clips": int(s.num_clips),
             "frames": int(n_frames), "control": s.control, "dir": str(out_dir)}
  clip_frames = config.data.num_frames
  results.update(_demo_figures(videos[:, :clip_frames], labels, real))
  if prompts is not None and "per_sample" in results:
    acc = np.asarray(results["per_sample"]["all_frame_accuracy"])
    results["per_prompt"] = {p: {"all_frame_accuracy": float(acc[[q == p for q in prompts]].mean()),
                                 "clip": int(labels[prompts.index(p)])} for p in dict.fromkeys(prompts)}
  if s.num_clips > 1:
    from videofusion_jax.evaluation.demo_metrics import boundary_jump
    results["boundary_jump"] = boundary_jump(videos, clip_frames)
  if jax.process_index() == 0:
    common = {"config": config_name or config.data.name, "checkpoint_step": step, "seed": int(s.seed),
              **sampler_settings(config), "frames": int(n_frames), "clips": int(s.num_clips),
              "clip_frames": int(clip_frames), "continuity_frames": int(s.continuity_frames), "fps": int(s.fps),
              "control": s.control}
    names, sidecars = [], []
    per_clip = clip_motion_indices(motion, s.num_clips)
    for i in range(s.num_samples):
      suffix, label = label_fields(config, None if labels is None else int(labels[i]))
      names.append(f"sample_{i:03d}{suffix}")
      sidecars.append({**common, "index": i, **label, "prompt": None if prompts is None else prompts[i],
                       "content_index": int(content[i]),
                       "motion_index": int(motion[i]),
                       "clip_motion_indices": per_clip[i].tolist(),
                       "embedding": "given" if given is not None else
                       ("prior" if prior_samples(config) else None)})
    # Written into a hidden folder renamed to out_dir at the end: a run cut short left a half out_dir that a
    # rerun took for an earlier run's complete samples (and moved on to -run2).
    partial, arrays_whole = partial_directory(out_dir), False
    try:
      # The arrays first: a failing video encoder loses no samples.
      np.savez_compressed(partial / "samples.npz", videos=videos,
                          labels=labels if labels is not None else np.zeros(0),
                          embeddings=used if used is not None else np.zeros(0),
                          prompts=np.asarray(prompts if prompts is not None else [], dtype=str))
      arrays_whole = True
      (partial / "results.json").write_text(json.dumps(results, indent=2))
      kinds = write_videos(partial, video_io.to_uint8(videos), names, sidecars, s.fps, s.upscale)
      out_dir = _move_into_place(partial, out_dir, base, results)
    except BaseException as e:  # Ctrl-C too: the half folder goes, the whole arrays stay
      _set_aside(partial, out_dir, arrays_whole, e)
      raise
    print(f"wrote {s.num_samples} videos ({', '.join(kinds)}) and samples.npz to {out_dir}")
  if "all_frame_accuracy" in results:
    against, frames = (("the clip the sample was conditioned on", "every frame")
                       if results["accuracy_against"] == "label" else
                       ("the clip of the sample's key frame (unconditional)", "every frame but the key frame"))
    print(f"all-frame accuracy: {100 * results['all_frame_accuracy']:.0f}% of generated frames ({frames}) "
          f"have their nearest real frame in {against}")
  if "motion_ratio" in results:
    print(f"motion ratio (mean |frame[n+1] - frame[n]|, generated / real; 1 is right, a frozen video 0): "
          f"{results['motion_ratio']:.2f} = {results['motion_generated']:.3f} / {results['motion_real']:.3f}; "
          f"distance to the key frame: {results['key_distance_ratio']:.2f} = "
          f"{results['key_distance_generated']:.3f} / {results['key_distance_real']:.3f}")
  for prompt, figures in results.get("per_prompt", {}).items():
    print(f"  prompt {prompt!r} (clip {figures['clip']}): all-frame accuracy "
          f"{100 * figures['all_frame_accuracy']:.0f}%")
  if "copy_distance_generated" in results:
    real = results["copy_distance_real"]
    against = (f"against {real:.3f} between a real clip and its nearest other real clip" if real is not None else
               f"with no real clip's distance to compare (sample.num_real_clips={s.num_real_clips}: no other clip)")
    print(f"copy distance (mean |sample - nearest real clip|; 0 = a copy): {results['copy_distance_generated']:.3f}, "
          + against)
  if "boundary_jump" in results:
    print("boundary jump (mean |first frame of a clip - last frame of the one before| / mean |frame[n+1] - "
          "frame[n]| inside clips; 1 = no visible seam): "
          + ("undefined (nothing moves inside the clips)" if results["boundary_jump"] is None
             else f"{results['boundary_jump']:.2f}")
          + (f" with continuity_frames={s.continuity_frames}" if s.continuity_frames else ""))
  print(json.dumps({k: v for k, v in results.items() if k != "per_sample"}))
  return results


def label_fields(config: ml_collections.ConfigDict, label: int | None) -> tuple[str, dict]:
  """A video's file-name suffix and sidecar fields for its ``label``: ``_label{L}`` and ``label`` where the
  model was conditioned on it; for a model on text (whose label on the demo clips is the clip its prompt
  describes, the reference of the demo's figures), no suffix, ``label`` None and ``reference_clip`` (a
  reproduction from the sidecar took it for a condition)."""
  if label is None:
    return "", {"label": None}
  if text_prior(config):
    return "", {"label": None, "reference_clip": label}
  return f"_label{label}", {"label": label}


def _demo_prompt_labels(config, prompts: list[str], text: np.ndarray) -> np.ndarray | None:
  """The demo clip each prompt describes, for the all-frame accuracy: the clip of the repository's
  caption it equals, else of the caption nearest to it in CLIP's text space. None off the demo."""
  if config.data.name != "demo_clips":
    return None
  from videofusion_jax.data.builders.demo_clips import CAPTIONS, CLASS_NAMES

  captions = [(CLASS_NAMES.index(name), c) for name, caps in CAPTIONS.items() for c in caps]
  caption_text = prompt_embeddings(config, [c for _, c in captions], verbose=False)
  nearest = np.argmax(text @ caption_text.T, axis=1)
  return np.array([next((lab for lab, c in captions if c == p), captions[j][0]) for p, j in zip(prompts, nearest)],
                  np.int32)


def demo_real_clips(config) -> dict | None:
  """The real clips the demo's figures compare samples with (``pipeline.eval_clips``); None off the demo."""
  from videofusion_jax.data import pipeline

  return pipeline.eval_clips(config, config.sample.num_real_clips) if config.data.name == "demo_clips" else None


def _demo_figures(videos, labels, real: dict | None) -> dict:
  """All-frame accuracy and motion ratios against the ``real`` clips (``demo_real_clips``)."""
  from videofusion_jax.evaluation.demo_metrics import demo_figures

  return {} if real is None else demo_figures(videos, labels, real["video"], real["label"])
