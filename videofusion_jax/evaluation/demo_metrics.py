"""The demo's figures about sampled videos, chosen so that a trivial output cannot win them.

- *All-frame accuracy*: every generated frame (not only the key frame, which the base
  generator alone makes) is matched to its nearest real frame; a frame scores when that frame
  comes from the clip the sample was conditioned on (for unconditional samples: the clip of
  the key frame's nearest real frame, and the share is of the other frames, so the figure measures
  whether the video stays in one clip; the key frame, which always finds its own clip, would give
  any output 1/N). A model that paints one memorised key frame and noise elsewhere scores low.
- *Motion ratio*: the mean absolute difference between consecutive frames of the samples
  divided by that of real clips (1 is right: a frozen video scores 0, flicker scores > 1); and
  the same ratio for each frame's distance to the key frame.
- *Copy distance*: the mean absolute difference between each sample and its nearest real clip
  (every frame aligned), against the same for each real clip and its nearest *other* real clip
  (None with a single real clip).
  These three figures are all won by copying training clips; this one shows it: a copy scores
  0, and a sample closer to the training clips than they are to each other is a near-copy.

Videos are ``(B, N, H, W, C)`` in [-1, 1]; labels ``(B,)``.
"""
from __future__ import annotations

import numpy as np

from videofusion_jax.diffusion.decomposition import key_frame_index


def nearest_real_frame_labels(samples: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
                              chunk: int = 256) -> np.ndarray:
  """For each generated frame, the label of the real clip holding its nearest real frame (L2),
  ``(B, N)``. ``real``: ``(M, N', H, W, C)`` real clips (every frame of each is a candidate)."""
  b, n = samples.shape[:2]
  frames = samples.reshape(b * n, -1).astype(np.float64)
  pool = real.reshape(real.shape[0] * real.shape[1], -1).astype(np.float64)
  pool_labels = np.repeat(real_labels, real.shape[1])
  pool_sq = (pool**2).sum(1)
  out = np.empty(b * n, real_labels.dtype)
  for start in range(0, b * n, chunk):
    f = frames[start:start + chunk]
    d = (f**2).sum(1)[:, None] - 2 * f @ pool.T + pool_sq[None]
    out[start:start + chunk] = pool_labels[np.argmin(d, axis=1)]
  return out.reshape(b, n)


def all_frame_accuracy(samples: np.ndarray, labels: np.ndarray | None, real: np.ndarray,
                       real_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per sample, the share of its frames whose nearest real frame comes from the labelled
  clip, ``(B,)`` (the figure is its mean), and the labels used: ``labels``, or with None the
  label of each key frame's nearest real frame (unconditional samples), the share then of the
  frames other than the key frame (which matches by construction)."""
  nearest = nearest_real_frame_labels(samples, real, real_labels)
  if labels is not None:
    labels = np.asarray(labels)
    return (nearest == labels[:, None]).mean(axis=1), labels
  k = key_frame_index(samples.shape[1])
  labels = nearest[:, k]
  others = np.delete(nearest, k, axis=1) if samples.shape[1] > 1 else nearest
  return (others == labels[:, None]).mean(axis=1), labels


def motion(videos: np.ndarray) -> np.ndarray:
  """Per video, the mean absolute difference between consecutive frames, ``(B,)``."""
  return np.abs(np.diff(np.asarray(videos, np.float64), axis=1)).mean(axis=(1, 2, 3, 4))


def key_frame_distance(videos: np.ndarray) -> np.ndarray:
  """Per video, the mean absolute difference between each other frame and the key frame, ``(B,)``."""
  v = np.asarray(videos, np.float64)
  k = key_frame_index(v.shape[1])
  others = np.delete(v, k, axis=1)
  return np.abs(others - v[:, k:k + 1]).mean(axis=(1, 2, 3, 4))


def nearest_clip_distance(samples: np.ndarray, real: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
  """Per sample, the mean absolute difference to its nearest real clip, ``(B,)``; with
  ``leave_one_out`` (``samples`` is ``real``) a clip's own entry is skipped."""
  a = samples.reshape(samples.shape[0], -1).astype(np.float32)
  r = real.reshape(real.shape[0], -1).astype(np.float32)
  d = np.stack([np.abs(x[None] - r).mean(axis=1) for x in a])
  if leave_one_out:
    np.fill_diagonal(d, np.inf)
  return d.min(axis=1)


def demo_figures(samples: np.ndarray, labels: np.ndarray | None, real: np.ndarray,
                 real_labels: np.ndarray) -> dict:
  """The figures and their per-sample values (lists), for ``results.json``. With ``labels`` None
  (unconditional samples) all-frame accuracy is measured against the key frame's nearest clip. With a
  single real clip ``copy_distance_real`` is None: there is no other clip to be near."""
  m_gen, m_real = motion(samples), motion(real)
  k_gen, k_real = key_frame_distance(samples), key_frame_distance(real)
  out = {
      "motion_generated": float(m_gen.mean()), "motion_real": float(m_real.mean()),
      "motion_ratio": float(m_gen.mean() / m_real.mean()),
      "key_distance_generated": float(k_gen.mean()), "key_distance_real": float(k_real.mean()),
      "key_distance_ratio": float(k_gen.mean() / k_real.mean()),
      "per_sample": {"motion": m_gen.tolist(), "key_distance": k_gen.tolist()},
  }
  c_gen = nearest_clip_distance(samples, real)
  # One real clip has no other to be near: None (JSON null), not an infinite distance (invalid JSON).
  c_real = float(nearest_clip_distance(real, real, leave_one_out=True).mean()) if len(real) > 1 else None
  out.update(copy_distance_generated=float(c_gen.mean()), copy_distance_real=c_real)
  out["per_sample"]["copy_distance"] = c_gen.tolist()
  out["accuracy_against"] = "label" if labels is not None else "key frame's nearest clip"
  acc, labels = all_frame_accuracy(samples, labels, real, real_labels)
  out["all_frame_accuracy"] = float(acc.mean())
  out["per_sample"]["all_frame_accuracy"] = acc.tolist()
  out["per_sample"]["label"] = labels.tolist()
  return out


def frame_steps(videos: np.ndarray) -> np.ndarray:
  """Mean absolute difference between frame ``n`` and ``n + 1`` over videos ``(B, T, H, W, C)`` and
  pixels, ``(T - 1,)``."""
  return np.abs(np.diff(np.asarray(videos, np.float64), axis=1)).mean(axis=(0, 2, 3, 4))


def boundary_jump(videos: np.ndarray, clip_frames: int) -> float | None:
  """The seam figure of long videos ``(B, T, H, W, C)`` made of clips of ``clip_frames`` frames:
  the mean absolute difference between the last frame of a clip and the first of the next,
  divided by that between neighbouring frames inside clips. 1: no visible seam; a frozen clip
  boundary 0; a cut between unrelated clips well above 1. None where nothing moves inside the clips
  (frozen clips, as a model at λ = 1 makes): no step to measure the seam against (it was NaN or inf,
  which JSON cannot hold)."""
  shape = np.shape(videos)
  if len(shape) != 5 or shape[1] % clip_frames or shape[1] // clip_frames < 2:
    raise ValueError(f"boundary_jump needs (B, T, H, W, C) videos of two clips or more of {clip_frames} frames; "
                     f"got shape {shape}.")
  steps = frame_steps(videos)
  seam = (np.arange(1, shape[1]) % clip_frames) == 0
  inside = float(steps[~seam].mean())
  return float(steps[seam].mean() / inside) if inside > 0 else None
