"""Sampling: EMA weights of a checkpoint -> videos (mp4, PNG grid, npz) and figures; the batched,
sharded generator that ``--mode=sample`` and ``--mode=eval`` share."""
from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from videofusion_jax import diffusion
from videofusion_jax.config import ConfigError
from videofusion_jax.data import video_io
from videofusion_jax.experiment import Experiment
from videofusion_jax.models.encoder import to_sphere
from videofusion_jax.models.factory import make_apply_fns, make_prior_fn, make_video_fn


def sample_labels(config: ml_collections.ConfigDict, num: int) -> np.ndarray | None:
  """The labels to sample: ``config.sample.label``, or the classes in turn when it is -1
  (checked by ``config.validate``)."""
  n = config.data.num_classes
  if not n:
    return None
  if config.sample.label == -1:
    return np.arange(num, dtype=np.int32) % n
  return np.full((num,), config.sample.label, np.int32)


def guided(config: ml_collections.ConfigDict) -> bool:
  """Whether sampling mixes conditional and null estimates (a conditioned model, s ≠ 1)."""
  conditioned = config.model.condition == "embedding" or bool(config.data.num_classes)
  return conditioned and config.sample.guidance_scale != 1.0


def prior_eps_fn(experiment: Experiment, params, labels: jnp.ndarray | None) -> Callable:
  """The prior's estimate ``eps_fn(z (B, D), t (B,))`` for ``labels`` ``(B,)`` (None: a prior on
  nothing), guided by ``sample.prior_guidance_scale`` on the label (doubled batch)."""
  c = experiment.config
  s, n = c.sample, c.data.num_classes
  if not (n and s.prior_guidance_scale != 1.0):
    return make_prior_fn(experiment.networks, params, labels)
  doubled = make_prior_fn(experiment.networks, params, jnp.concatenate([labels, jnp.full_like(labels, n)]))
  return functools.partial(diffusion.guided_eps, doubled, scale=s.prior_guidance_scale)


def sample_condition(experiment: Experiment, params, rng: jax.Array, labels: jnp.ndarray | None,
                     batch: int) -> jnp.ndarray:
  """The prior's embeddings ``(batch, D)`` for ``labels`` ``(batch,)`` (``prior_eps_fn``), put on
  the sphere of radius √D where every encoder's embeddings lie."""
  c = experiment.config
  eps_fn = prior_eps_fn(experiment, params, labels)
  return to_sphere(diffusion.sample_embeddings(eps_fn, rng, (batch, c.model.encoder.embed_dim),
                                               experiment.prior_schedule, num_steps=c.sample.prior_num_steps,
                                               eta=c.sample.prior_eta))


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


@functools.lru_cache(maxsize=4)
def make_generate_fn(experiment: Experiment):
  """``generate(params, rng, labels (B,) or None, condition (B, D) or None) -> (videos (B, N, H, W, C),
  condition)``, jitted once per experiment (and once more for given conditions).

  With ``model.condition='embedding'`` and no given ``condition``, the prior samples it from the
  labels (or from nothing); both generators get it. With guidance (``sample.guidance_scale`` ≠ 1)
  each network takes the ``2B`` batch of ``diffusion.guided_decomposed_eps``: the condition (labels
  or c), then the null condition (the null label ``num_classes``, or zeros). VDM* (``model.kind =
  'vdm'``) runs the same chain on its space-time network's estimate.
  """
  c = experiment.config
  shape_tail = (c.data.num_frames, c.data.image_size, c.data.image_size, 3)

  def generate(params, rng, labels, condition):
    batch = c.sample.batch_size
    if c.model.condition == "embedding":
      prior_rng, rng = jax.random.split(rng)
      if condition is None:
        condition = sample_condition(experiment, params, prior_rng, labels, batch)
    net_labels, net_condition = network_conditions(c, labels, condition)
    chain = functools.partial(diffusion.sample_chain, rng=rng, shape=(batch,) + shape_tail,
                              lambdas=experiment.lambdas, schedule=experiment.schedule, method=c.sample.method,
                              num_steps=c.sample.num_steps, eta=c.sample.eta, clip_x0=c.sample.clip_x0)
    key_frame = None
    if c.model.key_frame_clean:
      # The key frame's chain depends on the base generator and the base noise alone (its residual
      # share is √(1-λ^k) = 0), so a first pass with the same noise and no residual generator
      # finishes the very key frame that the full chain will; the residual generator then reads it.
      first = chain(video_eps_fn(experiment, params, net_labels, net_condition, residual=False))
      key_frame = jnp.clip(first[:, diffusion.key_frame_index(c.data.num_frames)], -1.0, 1.0)
    return chain(video_eps_fn(experiment, params, net_labels, net_condition, key_frame=key_frame)), condition

  # Shard the batch over the mesh when it divides evenly; otherwise one device does it all.
  divides = c.sample.batch_size % experiment.mesh.devices.size == 0
  return experiment.jit(generate, out_shardings=experiment.batch_sharding if divides else None)


def generate_videos(experiment: Experiment, params, num: int, seed: int, labels: np.ndarray | None,
                    condition: np.ndarray | None = None, with_condition: bool = False):
  """``num`` videos in [-1, 1], ``(num, N, H, W, C)``, reproducible from ``seed``.

  ``condition`` ``(num, D)``: given key-frame embeddings instead of the prior's (``model.condition
  ='embedding'``). With ``with_condition`` also returns the embeddings used, ``(num, D)`` (None for
  the label condition)."""
  gen = make_generate_fn(experiment)
  batch = experiment.config.sample.batch_size
  out, conds = [], []
  for i, start in enumerate(range(0, num, batch)):
    lab = cond = None
    if labels is not None:
      lab = jnp.asarray(np.resize(labels[start:start + batch], batch))
    if condition is not None:
      cond = jnp.asarray(np.resize(condition[start:start + batch], (batch, condition.shape[-1])), jnp.float32)
    videos, used = gen(params, jax.random.fold_in(jax.random.PRNGKey(seed), i), lab, cond)
    if jax.process_count() > 1:  # the batch lies on every host's devices: gather it everywhere
      videos, used = multihost_utils.process_allgather((videos, used), tiled=True)
    out.append(np.asarray(videos))
    if used is not None:
      conds.append(np.asarray(used))
  videos = np.clip(np.concatenate(out)[:num], -1.0, 1.0)
  if with_condition:
    return videos, (np.concatenate(conds)[:num] if conds else None)
  return videos


def given_embeddings(config: ml_collections.ConfigDict, num: int) -> np.ndarray | None:
  """``sample.embeddings`` loaded and checked: ``(num, embed_dim)`` float32, or None when unset."""
  path = config.sample.embeddings
  if not path:
    return None
  try:
    e = np.load(Path(path).expanduser())
  except (OSError, ValueError) as err:
    raise ConfigError(f"config.sample.embeddings={path!r}: cannot read a .npy array ({err}).") from None
  width = config.model.encoder.embed_dim
  if e.ndim == 1:
    e = e[None]
  if e.ndim != 2 or e.shape[1] != width or e.shape[0] not in (1, num):
    raise ConfigError(f"config.sample.embeddings={path!r} holds an array of shape {e.shape}; this model's "
                      f"embeddings have width {width} (config.model.encoder.embed_dim): give ({num}, {width}) "
                      f"for the {num} samples, or ({width},) for all of them.")
  if not np.all(np.isfinite(e)):
    raise ConfigError(f"config.sample.embeddings={path!r} holds NaN or infinite values.")
  return np.broadcast_to(e, (num, width)).astype(np.float32)


class Progress:
  """Prints ``what: done/total (rate/s, ETA)`` at most every few seconds."""

  def __init__(self, what: str, total: int, every_s: float = 10.0):
    self.what, self.total, self.every_s = what, total, every_s
    self.t0 = self.last = time.time()

  def __call__(self, done: int) -> None:
    now = time.time()
    if now - self.last < self.every_s and done < self.total:
      return
    self.last = now
    rate = done / max(now - self.t0, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    print(f"  {self.what}: {done}/{self.total} ({rate:.2f} clips/s, {eta:.0f} s left)", flush=True)


def generated_videos(experiment: Experiment, params, num: int, seed: int, labels: np.ndarray | None,
                     consume: Callable[[np.ndarray], None]) -> None:
  """Draws ``num`` clips in ``config.sample.batch_size`` batches (batch ``i`` from seed
  ``seed + i``) and hands each batch, ``(B, N, S, S, 3)`` in [-1, 1], to ``consume``."""
  batch = experiment.config.sample.batch_size
  progress = Progress("generated clips", num)
  for i, start in enumerate(range(0, num, batch)):
    size = min(batch, num - start)
    lab = None if labels is None else labels[start:start + size]
    consume(generate_videos(experiment, params, size, seed + i, lab))
    progress(start + size)


def run(config: ml_collections.ConfigDict, workdir: str, experiment: Experiment | None = None) -> dict:
  """Loads the latest checkpoint's EMA weights, writes samples under ``workdir/samples``."""
  experiment = experiment or Experiment(config)
  state = experiment.restore(workdir)
  step = int(state.step)
  s = config.sample
  given = given_embeddings(config, s.num_samples)
  labels = None if given is not None else sample_labels(config, s.num_samples)
  source = {"label": "", "embedding": " through the prior"}[config.model.condition]
  if given is not None:
    source = f" from the embeddings in {s.embeddings}"
  print(f"sampling {s.num_samples} videos from checkpoint {step} (EMA weights){source}, "
        f"{s.method} with {s.num_steps if s.method == 'ddim' else config.diffusion.num_timesteps} steps: compiling "
        "the chain, then running it (one batch; a minute or more on a CPU)", flush=True)
  t0 = time.time()
  videos, used = generate_videos(experiment, state.ema_params, s.num_samples, s.seed, labels, given,
                                 with_condition=True)
  print(f"sampled {s.num_samples} videos in {time.time() - t0:.0f} s (compile included)", flush=True)
  out_dir = Path(workdir) / "samples" / f"step_{step}"
  out_dir.mkdir(parents=True, exist_ok=True)
  frames = video_io.to_uint8(videos)
  np.savez_compressed(out_dir / "samples.npz", videos=videos,
                      labels=labels if labels is not None else np.zeros(0),
                      embeddings=used if used is not None else np.zeros(0))
  try:
    for i, video in enumerate(frames):
      tag = f"_label{labels[i]}" if labels is not None else ""
      video_io.write_video(out_dir / f"sample_{i:03d}{tag}.mp4", video, fps=s.fps, upscale=s.upscale)
    video_io.write_png(out_dir / "grid.png", video_io.frame_grid(frames, upscale=s.upscale))
  except ImportError as e:  # e.g. a GPU image without imageio/PyAV: the npz still holds every frame
    print(f"note: videos not encoded ({e}); install imageio and av to get .mp4 and grid.png.")
  results = {"step": step, "num_samples": int(s.num_samples), "dir": str(out_dir)}
  results.update(_demo_figures(config, videos, labels))
  (out_dir / "results.json").write_text(json.dumps(results, indent=2))
  print(f"wrote {s.num_samples} videos (.mp4), grid.png and samples.npz to {out_dir}")
  if "all_frame_accuracy" in results:
    against = ("the clip the sample was conditioned on" if results["accuracy_against"] == "label"
               else "the clip of the sample's key frame (unconditional)")
    print(f"all-frame accuracy: {100 * results['all_frame_accuracy']:.0f}% of generated frames (every frame) "
          f"have their nearest real frame in {against}")
  if "motion_ratio" in results:
    print(f"motion ratio (mean |frame[n+1] - frame[n]|, generated / real; 1 is right, a frozen video 0): "
          f"{results['motion_ratio']:.2f} = {results['motion_generated']:.3f} / {results['motion_real']:.3f}; "
          f"distance to the key frame: {results['key_distance_ratio']:.2f} = "
          f"{results['key_distance_generated']:.3f} / {results['key_distance_real']:.3f}")
  if "copy_distance_generated" in results:
    print(f"copy distance (mean |sample - nearest real clip|; 0 = a copy): {results['copy_distance_generated']:.3f}, "
          f"against {results['copy_distance_real']:.3f} between a real clip and its nearest other real clip")
  print(json.dumps({k: v for k, v in results.items() if k != "per_sample"}))
  return results


def _demo_figures(config, videos, labels) -> dict:
  """All-frame accuracy and motion ratios against the real clips (the demo dataset)."""
  from videofusion_jax.data import pipeline
  from videofusion_jax.evaluation.demo_metrics import demo_figures

  if config.data.name != "demo_clips":
    return {}
  real = pipeline.eval_clips(config, config.sample.num_real_clips)
  return demo_figures(videos, labels, real["video"], real["label"])
