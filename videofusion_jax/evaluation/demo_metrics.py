"""The demo's two figures about sampled videos: label accuracy and frame coherence."""
from __future__ import annotations

import numpy as np

from videofusion_jax.diffusion.decomposition import key_frame_index


def label_accuracy(samples: np.ndarray, labels: np.ndarray, real: np.ndarray,
                   real_labels: np.ndarray) -> float:
  """Share of samples whose key frame's nearest real key frame (L2) has the sample's label.

  samples: ``(B, N, H, W, C)``; labels: ``(B,)``; real: ``(M, N, H, W, C)``; real_labels: ``(M,)``.
  """
  k = key_frame_index(samples.shape[1])
  a = samples[:, k].reshape(len(samples), -1).astype(np.float64)
  r = real[:, k].reshape(len(real), -1).astype(np.float64)
  d = (a**2).sum(1)[:, None] - 2 * a @ r.T + (r**2).sum(1)[None]
  return float(np.mean(real_labels[np.argmin(d, axis=1)] == labels))


def coherence(videos: np.ndarray) -> float:
  """Mean absolute difference between consecutive frames, ``(B, N, H, W, C)`` in [-1, 1]."""
  return float(np.mean(np.abs(np.diff(np.asarray(videos, np.float64), axis=1))))
