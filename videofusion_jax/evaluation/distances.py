"""FVD, KVD and the Inception Score from network outputs: NumPy float64, pure functions.

- Fréchet distance (FVD on I3D logits): ``||mu1 - mu2||² + tr(s1 + s2 - 2 (s1 s2)^½)``, with the
  trace of the square root taken as the nuclear norm of ``s2^½ s1^½`` (the symmetric square roots
  of each), which stays exact when the covariances are singular (fewer videos than features).
- Kernel distance (KVD): the unbiased MMD² of Bińkowski et al.'s KID code with the cubic
  polynomial kernel ``(x·y / d + 1)³``, averaged over random subsets (as DIGAN and LVDM report it).
- Inception score: ``exp(E_x KL(p(y|x) || p(y)))`` per split, as TGAN/TGANv2 compute it.
"""
from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np


def _check_features(features: np.ndarray, name: str, min_rows: int) -> np.ndarray:
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D array (num_videos, feature_dim), got shape {x.shape}.")
  if x.shape[0] < min_rows:
    raise ValueError(f"{name} has {x.shape[0]} rows; at least {min_rows} videos are needed here "
                     "(a covariance needs 2). Evaluate more videos.")
  if not np.isfinite(x).all():
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    raise ValueError(f"{name} holds NaN or inf in {bad} of {x.shape[0]} rows: the network or the "
                     "videos fed to it produced non-finite values; check the inputs.")
  return x


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(N, D)`` features -> mean ``(D,)`` and unbiased covariance ``(D, D)`` (ddof=1), float64."""
  x = _check_features(features, "features", 2)
  return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


# An eigenvalue below -_NEG_TOL * (the largest) is a sign of a non-PSD input, not of round-off (below
# -_round_off when the input's own precision is coarser).
_NEG_TOL = 1e-9


def _eps(dtype: np.dtype) -> float:
  """The unit in the last place of a floating type (ml_dtypes' bfloat16 too, which NumPy does not count as
  floating); 0 for any other type."""
  if dtype.kind not in "fV":
    return 0.0
  try:
    return float(ml_dtypes.finfo(dtype).eps)
  except ValueError:
    return 0.0


def _round_off(d: int, *arrays) -> float:
  """The relative size of round-off in the eigenvalues of ``d``-dimensional covariances given as ``arrays``:
  the float64 computation's (``d`` units in the last place), or the inputs' own rounding when coarser
  (``√d`` units of their least precise floating type: a covariance rounded to float32, as stored statistics
  or ``jnp.cov`` give, has null-space eigenvalues of about ±1e-8 of its largest)."""
  given = max((_eps(a.dtype) for a in arrays), default=0.0)
  return max(d * float(np.finfo(np.float64).eps), float(np.sqrt(d) * given))


def _psd_eigh(a: np.ndarray, name: str, tol: float) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of a symmetric PSD matrix; eigenvalues within ``tol`` (relative, ``_round_off``)
  of 0 -> 0."""
  a = (a + a.T) / 2
  w, v = np.linalg.eigh(a)
  scale = max(float(np.abs(w).max()), 1e-300)
  if w.min() < -max(tol, _NEG_TOL) * scale:
    # Its square root would be imaginary: this is not a covariance, not round-off.
    raise ValueError(f"{name} has a negative eigenvalue {w.min():.3g} (largest {w.max():.3g}): it is not a "
                     "covariance matrix; compute it with `feature_statistics`.")
  return _drop_round_off(w, scale, tol), v


def _drop_round_off(w: np.ndarray, scale: float, tol: float) -> np.ndarray:
  # Eigenvalues within round-off of 0 would each add sqrt(round-off) to the trace of the square root
  # (in float64 about 1e-7 per null direction, 1e-4 over 400 features; in float32 about 1e-3 each): zero them.
  w = w.copy()
  w[w < tol * scale] = 0.0
  return w


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, tol: float) -> float:
  """``tr((s1 s2)^½)``, as the sum of the singular values of ``s2^½ s1^½`` (``(s1 s2)^½`` has the eigenvalues
  of ``(s1^½ s2 s1^½)^½ = |s2^½ s1^½|``): both roots are of PSD matrices, nothing is square-rooted twice,
  so the round-off of either input (``tol``) stays its own size instead of growing to its square root."""
  roots = []
  for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
    w, v = _psd_eigh(s, name, tol)
    roots.append((v * np.sqrt(w)) @ v.T)
  return float(np.linalg.svd(roots[1] @ roots[0], compute_uv=False).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); means ``(D,)``, covariances ``(D, D)``.

  Computed in float64; what counts as round-off (an eigenvalue near 0 of either sign) follows the
  precision the covariances were given in (``_round_off``: float32 statistics are accepted). If the
  square root comes out non-finite, ``eps * I`` is added to both covariances (as pytorch-fid does)
  with a warning.
  """
  sigma1, sigma2 = np.asarray(sigma1), np.asarray(sigma2)
  tol = _round_off(sigma1.shape[-1] if sigma1.ndim else 1, sigma1, sigma2)
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = sigma1.astype(np.float64), sigma2.astype(np.float64)
  d = mu1.shape[-1] if mu1.ndim == 1 else -1
  if mu1.ndim != 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"expected means (D,) and covariances (D, D) of one D; got mu1 {mu1.shape}, sigma1 "
                     f"{sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}.")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.isfinite(a).all():
      raise ValueError(f"{name} holds NaN or inf: the features it came from were not finite.")
  for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
    # At the precision it was given in: float32 products leave its triangles ~1e-7 of its largest apart.
    if not np.allclose(s, s.T, rtol=1e-6, atol=max(1e-10, tol) * max(float(np.abs(s).max()), 1e-300)):
      raise ValueError(f"{name} is not symmetric: pass a covariance matrix (see `feature_statistics`).")
  try:
    tr_covmean = _trace_sqrt_product(sigma1, sigma2, tol)
  except np.linalg.LinAlgError:
    tr_covmean = float("nan")
  if not np.isfinite(tr_covmean):
    warnings.warn(f"Fréchet distance: the square root of sigma1 @ sigma2 is not finite; adding {eps:g} * I to "
                  "both covariances.", RuntimeWarning, stacklevel=2)
    offset = eps * np.eye(d)
    sigma1, sigma2 = sigma1 + offset, sigma2 + offset
    tr_covmean = _trace_sqrt_product(sigma1, sigma2, tol)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fvd(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Fréchet distance between two sets of I3D logits ``(N, 400)`` and ``(M, 400)`` (N, M >= 2)."""
  a = _check_features(features_a, "features_a", 2)
  b = _check_features(features_b, "features_b", 2)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}; both sets must come from one network.")
  return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """``(x·y / d + 1)³``: sklearn's polynomial kernel with its defaults (degree 3, gamma 1/d, coef0 1)."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD² of two equal-size samples: off-diagonal means of K_XX, K_YY minus 2 mean(K_XY)."""
  m = x.shape[0]
  k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  sum_xx = k_xx.sum() - np.trace(k_xx)
  sum_yy = k_yy.sum() - np.trace(k_yy)
  return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_distance(features_a: np.ndarray, features_b: np.ndarray, num_subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float | None]:
  """KVD/KID: mean and std over ``num_subsets`` random subsets of the unbiased polynomial MMD².

  Each subset draws ``min(subset_size, N, M)`` rows of each set without replacement. Where that is every row
  of both sets (N = M <= subset_size), each subset is the whole sets reordered, which leaves the statistic as it
  is: the MMD² of the sets, and None for the std (a spread of 0 would look like a precise figure); one subset has
  no std either.
  """
  a = _check_features(features_a, "features_a", 2)
  b = _check_features(features_b, "features_b", 2)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}; both sets must come from one network.")
  if num_subsets < 1 or subset_size < 2:
    raise ValueError(f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}.")
  m = min(subset_size, len(a), len(b))
  if m == len(a) == len(b):
    return _mmd2_unbiased(a, b), None
  rng = np.random.default_rng(seed)
  mmds = np.array([_mmd2_unbiased(a[rng.choice(len(a), m, replace=False)],
                                  b[rng.choice(len(b), m, replace=False)]) for _ in range(num_subsets)])
  return float(mmds.mean()), float(mmds.std()) if num_subsets > 1 else None


IS_SPLITS = 10  # StyleGAN-V's isv2048_ucf and TGANv2: mean and std over 10 splits (of ~205 at 2048 clips)


def inception_splits(num_videos: int, num_classes: int) -> int:
  """How many splits the Inception Score of ``num_videos`` takes: ``IS_SPLITS``, fewer where a split would
  hold fewer videos than there are classes (at least one). A split's score is at most its number of
  videos (its ``p(y)`` spreads over no more classes than it holds), so 10 splits of 9 or 10 videos each
  would cap the score near 10 whatever the model; 1 split of ``n < num_classes`` is still capped at ``n``."""
  return max(1, min(IS_SPLITS, num_videos // num_classes))


def inception_score(probs: np.ndarray, splits: int = 10, eps: float = 1e-20) -> tuple[float, float]:
  """Mean and std over ``splits`` consecutive splits of ``exp(mean_x KL(p(y|x) || p(y)))``.

  ``probs``: ``(N, C)`` class probabilities (softmax outputs). ``eps`` is added to every
  probability before the logs, as TGANv2 does.
  """
  p = np.asarray(probs, np.float64)
  if p.ndim != 2:
    raise ValueError(f"probs must be (num_videos, num_classes), got shape {p.shape}.")
  if not np.isfinite(p).all():
    raise ValueError("probs holds NaN or inf: the classifier produced non-finite outputs.")
  if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
    raise ValueError("probs rows must be probabilities (non-negative, summing to 1): pass softmax outputs, "
                     "not logits.")
  if not 1 <= splits <= len(p):
    raise ValueError(f"splits must be between 1 and the number of videos ({len(p)}), got {splits}.")
  n = len(p)
  scores = []
  for i in range(splits):
    part = p[i * n // splits:(i + 1) * n // splits] + eps
    kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))
