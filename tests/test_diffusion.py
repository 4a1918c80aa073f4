"""The equations of method.md against independent NumPy computations and analytic statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videofusion_jax import diffusion as d


# --- independent reference: the standard schedulers, written from the papers in NumPy ---
def ref_betas(kind, T):
  if kind == "linear":
    return np.linspace(1e-4, 0.02, T)
  if kind == "scaled_linear":
    return np.linspace(np.sqrt(0.00085), np.sqrt(0.012), T) ** 2
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
  i = np.arange(T)
  return np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)


def ref_ddim(z, eps, t, tp, acp, eta, noise):
  a, ap = acp[t], (acp[tp] if tp >= 0 else 1.0)
  x0 = (z - np.sqrt(1 - a) * eps) / np.sqrt(a)
  sigma = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
  return np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps + sigma * noise


def ref_ddpm(z, eps, t, betas, noise):
  acp = np.cumprod(1 - betas)
  a, ap = acp[t], (acp[t - 1] if t > 0 else 1.0)
  x0 = (z - np.sqrt(1 - a) * eps) / np.sqrt(a)
  mean = np.sqrt(ap) * betas[t] / (1 - a) * x0 + np.sqrt(1 - betas[t]) * (1 - ap) / (1 - a) * z
  var = betas[t] * (1 - ap) / (1 - a)
  return mean + (np.sqrt(var) * noise if t > 0 else 0)


@pytest.mark.parametrize("kind", ["linear", "cosine", "scaled_linear"])
def test_schedules_match_reference(kind):
  s = d.make_schedule(kind, 1000)
  betas = ref_betas(kind, 1000)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(s.alphas, 1 - betas, rtol=1e-6)


def test_bad_schedule_and_lambda_inputs():
  with pytest.raises(ValueError, match="Unknown schedule kind"):
    d.make_schedule("quadratic", 1000)
  with pytest.raises(ValueError, match="at least one other"):
    d.frame_lambdas(1, 0.5)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    d.frame_lambdas(8, 1.5)
  lam = d.frame_lambdas(16, 0.5)
  assert float(lam[8]) == 1.0 and np.allclose(np.delete(np.asarray(lam), 8), 0.5)


def test_decomposed_noise_statistics():
  lambdas = jnp.array([0.2, 0.5, 1.0, 0.8])
  eps = np.asarray(d.decomposed_noise(jax.random.PRNGKey(0), (20000, 4, 2, 2, 1), lambdas))
  flat = eps.transpose(1, 0, 2, 3, 4).reshape(4, -1)
  np.testing.assert_allclose(flat.var(axis=1), 1.0, atol=0.02)
  np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=0.02)
  corr = np.corrcoef(flat)
  expected = np.sqrt(np.outer(lambdas, lambdas))
  np.fill_diagonal(expected, 1.0)
  np.testing.assert_allclose(corr, expected, atol=0.02)


def test_key_frame_noise_is_the_base_noise():
  lambdas = d.frame_lambdas(5, 0.5)
  base_rng, res_rng = jax.random.split(jax.random.PRNGKey(3))
  shape = (3, 5, 4, 4, 3)
  base = jax.random.normal(base_rng, (3, 4, 4, 3))
  residual = jax.random.normal(res_rng, shape)
  eps = d.decomposed_noise(jax.random.PRNGKey(3), shape, lambdas)
  np.testing.assert_array_equal(eps[:, 2], base)
  np.testing.assert_allclose(eps[:, 0], np.sqrt(0.5) * base + np.sqrt(0.5) * residual[:, 0], atol=1e-6)


def test_lambda_zero_is_the_standard_forward_process():
  shape = (2, 6, 4, 4, 3)
  lambdas = d.frame_lambdas(6, 0.0)
  rng = jax.random.PRNGKey(7)
  base_rng, res_rng = jax.random.split(rng)
  eps = np.asarray(d.decomposed_noise(rng, shape, lambdas))
  residual = np.asarray(jax.random.normal(res_rng, shape))
  # Every non-key frame carries its own independent draw, the key frame the (independent) base.
  np.testing.assert_array_equal(np.delete(eps, 3, axis=1), np.delete(residual, 3, axis=1))
  np.testing.assert_array_equal(eps[:, 3], np.asarray(jax.random.normal(base_rng, (2, 4, 4, 3))))
  x0 = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), shape, minval=-1, maxval=1))
  t = np.array([0, 637])
  acp = np.cumprod(1 - ref_betas("linear", 1000))[t].reshape(2, 1, 1, 1, 1)
  z = d.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps), d.make_schedule("linear", 1000))
  np.testing.assert_allclose(z, np.sqrt(acp) * x0 + np.sqrt(1 - acp) * eps, atol=1e-5)


def test_remove_base_noise_and_combine_noise():
  schedule = d.make_schedule("cosine", 1000)
  lam = 0.6
  lambdas = d.frame_lambdas(4, lam)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
  x0 = jax.random.uniform(k1, (2, 4, 4, 4, 3), minval=-1, maxval=1)
  base = jax.random.normal(k2, (2, 4, 4, 3))
  residual = jax.random.normal(k3, (2, 4, 4, 4, 3))
  eps = d.compose_noise(base, residual, lambdas)
  t = jnp.array([10, 900])
  z = d.q_sample(x0, t, eps, schedule)
  z_prime = d.remove_base_noise(z, base, t, lambdas, schedule)
  acp = np.asarray(schedule.alphas_cumprod)[np.asarray(t)].reshape(2, 1, 1, 1, 1)
  expected = np.sqrt(acp) * np.asarray(x0) + np.sqrt(1 - acp) * np.sqrt(1 - lam) * np.asarray(residual)
  others = [0, 1, 3]
  np.testing.assert_allclose(np.asarray(z_prime)[:, others], expected[:, others], atol=1e-5)
  np.testing.assert_allclose(z_prime[:, 2], np.sqrt(acp[:, 0]) * np.asarray(x0[:, 2]), atol=1e-5)
  np.testing.assert_allclose(d.combine_noise(base, residual, lambdas), eps, atol=1e-6)


def test_frame_residuals_invert_eq2():
  lambdas = d.frame_lambdas(4, 0.3)
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  key = jax.random.normal(k1, (2, 4, 4, 3))
  delta = jax.random.normal(k2, (2, 4, 4, 4, 3)).at[:, 2].set(0.0)
  x = d.compose_noise(key, delta, lambdas)  # eq. (2) has the same form as eq. (4)
  np.testing.assert_allclose(d.frame_residuals(x, lambdas), delta, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_reference_at_lambda_zero(eta):
  s = d.make_schedule("linear", 1000)
  acp = np.cumprod(1 - ref_betas("linear", 1000))
  lambdas = d.frame_lambdas(3, 0.0)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
  z = jax.random.normal(k1, (2, 3, 4, 4, 3))
  eps = jax.random.normal(k2, (2, 3, 4, 4, 3))
  for t, tp in [(999, 979), (500, 480), (19, -1)]:
    out = d.ddim_step(z, eps, jnp.full((2,), t), jnp.full((2,), tp), k3, lambdas, s, eta=eta)
    noise = np.asarray(d.decomposed_noise(k3, z.shape, lambdas))
    np.testing.assert_allclose(out, ref_ddim(np.asarray(z), np.asarray(eps), t, tp, acp, eta, noise),
                               rtol=1e-3, atol=1e-3)


def test_ddpm_step_matches_reference_at_lambda_zero():
  s = d.make_schedule("linear", 1000)
  betas = ref_betas("linear", 1000)
  lambdas = d.frame_lambdas(3, 0.0)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(12), 3)
  z = jax.random.normal(k1, (2, 3, 4, 4, 3))
  eps = jax.random.normal(k2, (2, 3, 4, 4, 3))
  noise = np.asarray(d.decomposed_noise(k3, z.shape, lambdas))
  for t in (999, 400, 1, 0):
    out = d.ddpm_step(z, eps, jnp.full((2,), t), k3, lambdas, s)
    np.testing.assert_allclose(out, ref_ddpm(np.asarray(z), np.asarray(eps), t, betas, noise),
                               rtol=1e-3, atol=1e-3)


def test_sampler_noise_is_decomposed():
  """Eq. (8): the fresh noise of an η > 0 step has the decomposed correlation."""
  s = d.make_schedule("linear", 1000)
  lambdas = d.frame_lambdas(3, 0.5)
  z = jnp.zeros((4000, 3, 2, 2, 1))
  out = np.asarray(d.ddpm_step(z, jnp.zeros_like(z), jnp.full((4000,), 500), jax.random.PRNGKey(0),
                               lambdas, s))
  flat = out.transpose(1, 0, 2, 3, 4).reshape(3, -1)
  corr = np.corrcoef(flat)
  # Frame 1 is the key frame (λ = 1); frames 0 and 2 have λ = 0.5.
  np.testing.assert_allclose(corr[0, 1], np.sqrt(0.5), atol=0.03)
  np.testing.assert_allclose(corr[0, 2], 0.5, atol=0.03)


def _oracle(x0, lambdas, schedule):
  """Networks that return the true base and residual noise for the clean video ``x0``."""
  k = d.key_frame_index(x0.shape[1])
  idx = d.non_key_frames(x0.shape[1])

  def base_fn(z_key, t):
    a = schedule.alphas_cumprod[t][:, None, None, None]
    return (z_key - jnp.sqrt(a) * x0[:, k]) / jnp.sqrt(1 - a)

  def residual_fn(z_prime, t, frame_index):
    a = schedule.alphas_cumprod[t][:, None, None, None, None]
    lam = lambdas[frame_index][None, :, None, None, None]
    return (z_prime - jnp.sqrt(a) * x0[:, idx]) / (jnp.sqrt(1 - a) * jnp.sqrt(1 - lam))

  return base_fn, residual_fn


@pytest.mark.parametrize("method,steps", [("ddim", 25), ("ddpm", 1000)])
def test_oracle_sampler_recovers_x0(method, steps):
  """Networks that know x0 (eqs. 10-11 inverted) bring the chain to x0. That alone holds for a broken step
  too (the last step returns the exact x̂0), so for DDIM (η = 0) the chain's states are checked on the way:
  with an exact estimate the noise direction never changes, z_t = √ᾱ_t x0 + √(1-ᾱ_t) ε, ε that of z_T, at every
  step (the key frame, as the base generator sees it). DDPM's step has its NumPy reference below."""
  schedule = d.make_schedule("linear", 1000)
  lambdas = d.frame_lambdas(5, 0.5)
  x0 = jax.random.uniform(jax.random.PRNGKey(4), (2, 5, 4, 4, 3), minval=-1, maxval=1)
  base_fn, residual_fn = _oracle(x0, lambdas, schedule)
  seen = []

  def recording_base(z_key, t):
    jax.debug.callback(lambda tt, z: seen.append((np.asarray(tt), np.asarray(z))), t, z_key)
    return base_fn(z_key, t)
  out = d.sample(recording_base, residual_fn, jax.random.PRNGKey(9), x0.shape, lambdas, schedule,
                 method=method, num_steps=steps, eta=0.0, clip_x0=False)
  np.testing.assert_allclose(out, x0, atol=2e-3)
  assert not np.allclose(d.decomposed_noise(jax.random.PRNGKey(9), x0.shape, lambdas), x0, atol=0.5)
  assert len(seen) == steps
  if method == "ddim":
    a = np.asarray(schedule.alphas_cumprod, np.float64)
    key = np.asarray(x0[:, d.key_frame_index(5)], np.float64)
    t0, z0 = seen[0]
    eps = (z0 - np.sqrt(a[t0])[:, None, None, None] * key) / np.sqrt(1 - a[t0])[:, None, None, None]
    for t, z in seen[1:]:
      expected = np.sqrt(a[t])[:, None, None, None] * key + np.sqrt(1 - a[t])[:, None, None, None] * eps
      np.testing.assert_allclose(z, expected, atol=2e-4, err_msg=f"t={t}")


def _clips_and_noise(seed):
  """A cosine schedule, λ = 0.5 over 4 frames, three random clips and their decomposed noise."""
  schedule = d.make_schedule("cosine", 1000)
  lambdas = d.frame_lambdas(4, 0.5)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x0 = jax.random.uniform(k1, (3, 4, 4, 4, 3), minval=-1, maxval=1)
  return schedule, lambdas, x0, d.decomposed_noise(k2, x0.shape, lambdas)


def test_joint_loss_matches_formula_and_is_zero_for_oracle():
  schedule, lambdas, x0, noise = _clips_and_noise(6)
  t = jnp.array([5, 300, 999])
  base_fn, residual_fn = _oracle(x0, lambdas, schedule)
  loss, terms = d.joint_loss(base_fn, residual_fn, x0, t, noise, lambdas, schedule)
  assert float(loss) < 1e-8
  # Constant "networks": eq. (12) by hand.
  loss, terms = d.joint_loss(lambda z, t: jnp.full_like(z, 0.3), lambda z, t, i: jnp.full_like(z, -0.2),
                             x0, t, noise, lambdas, schedule)
  n = np.asarray(noise)
  key = np.mean((n[:, 2] - 0.3) ** 2)
  res = np.mean((n[:, [0, 1, 3]] - np.sqrt(0.5) * 0.3 - np.sqrt(0.5) * -0.2) ** 2)
  np.testing.assert_allclose(terms["loss_key"], key, rtol=1e-5)
  np.testing.assert_allclose(terms["loss_residual"], res, rtol=1e-5)
  np.testing.assert_allclose(loss, (key + 3 * res) / 4, rtol=1e-5)


def test_min_snr_weights_and_the_weighted_joint_loss():
  """min(SNR, γ)/SNR against the NumPy cosine schedule; the weighted eq. (12) equals the weighted mean
  of each example's own loss, computed one example at a time."""
  schedule, lambdas, x0, noise = _clips_and_noise(7)
  t = jnp.array([3, 400, 990])
  acp = np.cumprod(1 - ref_betas("cosine", 1000))
  snr = acp[np.asarray(t)] / (1 - acp[np.asarray(t)])
  w = d.min_snr_weights(t, schedule, 5.0)
  np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-4)
  assert snr[0] > 5 > snr[1] and float(w[0]) < 0.1 and float(w[1]) == float(w[2]) == 1.0
  base_fn = lambda z, t: 0.3 * z  # noqa: E731
  residual_fn = lambda z, t, i: -0.2 * z + 0.01 * i[None, :, None, None, None]  # noqa: E731
  loss, terms = d.joint_loss(base_fn, residual_fn, x0, t, noise, lambdas, schedule, weights=w)
  one = [d.joint_loss(base_fn, residual_fn, x0[b:b + 1], t[b:b + 1], noise[b:b + 1], lambdas, schedule)
         for b in range(3)]
  for name, value in [("loss", loss), ("loss_key", terms["loss_key"]), ("loss_residual", terms["loss_residual"])]:
    per_example = np.array([float(o[0]) if name == "loss" else float(o[1][name]) for o in one])
    np.testing.assert_allclose(value, np.mean(np.asarray(w) * per_example), rtol=1e-5)
  # Unit weights change nothing; the image loss takes the same weights.
  np.testing.assert_allclose(d.joint_loss(base_fn, residual_fn, x0, t, noise, lambdas, schedule,
                                          weights=jnp.ones(3))[0],
                             d.joint_loss(base_fn, residual_fn, x0, t, noise, lambdas, schedule)[0], rtol=1e-6)
  video = [float(d.video_denoising_loss(base_fn, x0[b:b + 1], t[b:b + 1], noise[b:b + 1], schedule)[0])
           for b in range(3)]
  np.testing.assert_allclose(d.video_denoising_loss(base_fn, x0, t, noise, schedule, w)[0],
                             np.mean(np.asarray(w) * np.array(video)), rtol=1e-5)
  frames, frame_noise = x0[:, 0], noise[:, 0]
  image = [float(d.denoising_loss(base_fn, frames[b:b + 1], t[b:b + 1], frame_noise[b:b + 1], schedule))
           for b in range(3)]
  np.testing.assert_allclose(d.denoising_loss(base_fn, frames, t, frame_noise, schedule, w),
                             np.mean(np.asarray(w) * np.array(image)), rtol=1e-5)


def _frame_dependent_fns():
  """A base and a residual "network" whose outputs depend on the input, the timestep and, for the
  residual, the frame index, which is ``(R,)`` shared by the batch or ``(B, R)`` per example."""
  base_fn = lambda z, t: 0.3 * z + 1e-4 * t[:, None, None, None]  # noqa: E731

  def residual_fn(z, t, i, key=None):
    i = i if i.ndim == 2 else jnp.broadcast_to(i, z.shape[:2])
    out = -0.2 * z + 0.05 * i[..., None, None, None] + 1e-4 * t[:, None, None, None, None]
    return out if key is None else out + 0.1 * key[:, None]

  return base_fn, residual_fn


@pytest.mark.parametrize("clean_key_frame", [False, True])
def test_residual_frames_estimate_eq12_without_bias(clean_key_frame):
  """train.residual_frames: eq. 12's residual term taken on some non-key frames per example. On every
  non-key frame (in any order per example) it is eq. 12; with one frame per example, the mean over
  the N-1 assignments in which each example takes each frame once is eq. 12 exactly (the estimate is
  unbiased), while a single assignment differs from it. The key frame's term never changes."""
  schedule, lambdas, x0, noise = _clips_and_noise(8)
  t = jnp.array([3, 400, 990])
  base_fn, residual_fn = _frame_dependent_fns()
  w = d.min_snr_weights(t, schedule, 5.0)
  kw = dict(key_frame_input=clean_key_frame, clean_key_frame=clean_key_frame, weights=w)
  loss, terms = d.joint_loss(base_fn, residual_fn, x0, t, noise, lambdas, schedule, **kw)
  others = np.asarray(d.non_key_frames(4))  # [0, 1, 3]
  shuffled = jnp.asarray(np.stack([others[[1, 2, 0]], others[[2, 0, 1]], others]))
  sub_loss, sub_terms = d.joint_loss(base_fn, residual_fn, x0, t, noise, lambdas, schedule, frames=shuffled, **kw)
  np.testing.assert_allclose(sub_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(sub_terms["loss_residual"], terms["loss_residual"], rtol=1e-6)
  single = [d.joint_loss(base_fn, residual_fn, x0, t, noise, lambdas, schedule, **kw,
                         frames=jnp.asarray(others[(np.arange(3) + s) % 3][:, None]))[1] for s in range(3)]
  np.testing.assert_allclose(np.mean([o["loss_residual"] for o in single]), terms["loss_residual"], rtol=1e-5)
  assert abs(float(single[0]["loss_residual"]) / float(terms["loss_residual"]) - 1) > 1e-3
  for o in single:
    np.testing.assert_allclose(o["loss_key"], terms["loss_key"], rtol=1e-6)
  # One example alone, its frames by hand (eqs. 10-11 written out).
  f = jnp.array([[3, 0]])
  _, one = d.joint_loss(base_fn, residual_fn, x0[1:2], t[1:2], noise[1:2], lambdas, schedule, frames=f)
  a = float(schedule.alphas_cumprod[400])
  z = np.sqrt(a) * np.asarray(x0[1]) + np.sqrt(1 - a) * np.asarray(noise[1])
  b_hat = 0.3 * z[2] + 0.04
  expect = []
  for i in (3, 0):
    z_prime = z[i] - np.sqrt(0.5) * np.sqrt(1 - a) * b_hat
    r_hat = -0.2 * z_prime + 0.05 * i + 0.04
    expect.append(np.mean((np.asarray(noise[1, i]) - np.sqrt(0.5) * b_hat - np.sqrt(0.5) * r_hat) ** 2))
  np.testing.assert_allclose(one["loss_residual"], np.mean(expect), rtol=1e-5)


def test_residual_frames_are_distinct_non_key_frames_drawn_uniformly():
  """sample_residual_frames: R distinct frames per example, never the key frame; each non-key frame is
  drawn with probability R/(N-1) and each of the C(N-1, R) sets equally often (chi-square, p > 0.001)."""
  from itertools import combinations

  from scipy import stats
  frames = np.asarray(jax.jit(lambda r: d.sample_residual_frames(r, 6000, 5, 2))(jax.random.PRNGKey(1)))
  assert frames.shape == (6000, 2) and frames.dtype == np.int32
  assert set(np.unique(frames)) == {0, 1, 3, 4} and np.all(frames[:, 0] != frames[:, 1])
  np.testing.assert_allclose(np.bincount(frames.ravel(), minlength=5)[[0, 1, 3, 4]] / 6000, 0.5, atol=0.03)
  sets = {pair: i for i, pair in enumerate(combinations((0, 1, 3, 4), 2))}
  counts = np.bincount([sets[tuple(sorted(row))] for row in frames], minlength=6)
  assert stats.chisquare(counts).pvalue > 1e-3
  with pytest.raises(ValueError, match=r"count must be in \[1, 4\] \(the non-key frames of 5\), got 5"):
    d.sample_residual_frames(jax.random.PRNGKey(0), 2, 5, 5)


def test_stratified_timesteps_cover_every_stratum_and_stay_uniform():
  """Each batch holds one timestep per stratum of [0, T); over many batches each example's timestep
  is uniform on [0, T) (chi-square over 10 bins, p > 0.001) and as likely to fall in any stratum."""
  draw = jax.jit(jax.vmap(lambda r: d.sample_timesteps(r, 8, 1000, stratified=True)))
  t = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 4000)))
  assert t.min() >= 0 and t.max() <= 999
  np.testing.assert_array_equal(np.sort(t // 125, axis=1), np.tile(np.arange(8), (4000, 1)))
  from scipy import stats
  for column in (0, 5):
    counts = np.bincount(t[:, column] // 100, minlength=10)
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    assert stats.chisquare(np.bincount(t[:, column] // 125, minlength=8)).pvalue > 1e-3
  # The ordinary draw does not cover the strata (a control for the first assertion).
  plain = np.asarray(jax.vmap(lambda r: d.sample_timesteps(r, 8, 1000))(jax.random.split(jax.random.PRNGKey(0), 50)))
  assert (np.sort(plain // 125, axis=1) != np.arange(8)).any(axis=1).mean() > 0.9


def test_key_frame_input_is_the_base_estimate_of_the_clean_key_frame():
  """With key_frame_input the residual generator receives x̂^k = (z^k - √(1-ᾱ) b̂) / √ᾱ, clipped;
  an oracle base makes it the clean key frame, and any base gives the NumPy formula."""
  schedule, lambdas, x0, noise = _clips_and_noise(11)
  t = jnp.array([5, 300, 990])
  z = d.q_sample(x0, t, noise, schedule)
  base_fn, oracle_residual = _oracle(x0, lambdas, schedule)
  seen = {}

  def residual_fn(z_prime, tt, frame_index, key_x0):
    seen["x0"] = key_x0
    return oracle_residual(z_prime, tt, frame_index)

  eps, _, _ = d.decomposed_eps(base_fn, residual_fn, z, t, lambdas, schedule, key_frame_input=True)
  np.testing.assert_allclose(seen["x0"], x0[:, 2], atol=1e-4)
  np.testing.assert_allclose(eps, noise, atol=1e-3)  # the estimate itself is unchanged by the extra input
  a = np.asarray(schedule.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  wrong = lambda zk, tt: jnp.full_like(zk, 0.7)  # noqa: E731
  d.decomposed_eps(wrong, residual_fn, z, t, lambdas, schedule, key_frame_input=True)
  expected = np.clip((np.asarray(z[:, 2]) - np.sqrt(1 - a) * 0.7) / np.sqrt(a), -1, 1)
  np.testing.assert_allclose(seen["x0"], expected, rtol=1e-5, atol=1e-6)


def test_clean_key_frame_input_in_training_and_the_two_pass_sampler():
  """model.key_frame_clean: in eq. 12 the residual generator reads the real key frame x0[:, k]
  (whatever the base estimates), and at generation the key frame's chain does not depend on the
  residual generator (its residual share is √(1-λ^k) = 0), so a first pass without it finishes
  the same key frame that the full chain does, for DDIM with η = 1 and for DDPM."""
  schedule, lambdas, x0, noise = _clips_and_noise(12)
  t = jnp.array([5, 300, 990])
  seen = []
  wrong_base = lambda zk, tt: jnp.full_like(zk, 0.7)  # noqa: E731

  def residual_fn(z_prime, tt, frame_index, key=None):
    seen.append(key)
    return 0.3 * z_prime + (0.0 if key is None else 0.2 * key[:, None])

  d.joint_loss(wrong_base, residual_fn, x0, t, noise, lambdas, schedule, key_frame_input=True, clean_key_frame=True)
  np.testing.assert_array_equal(seen[-1], x0[:, 2])
  d.joint_loss(wrong_base, residual_fn, x0, t, noise, lambdas, schedule, key_frame_input=True)
  assert np.abs(np.asarray(seen[-1]) - np.asarray(x0[:, 2])).max() > 0.1  # control: the estimate

  base_fn = lambda zk, tt: 0.5 * zk + 0.01 * tt[:, None, None, None] / 1000  # noqa: E731
  for method, steps in (("ddim", 20), ("ddpm", 1000)):
    kw = dict(rng=jax.random.PRNGKey(3), shape=x0.shape, lambdas=lambdas, schedule=schedule, method=method,
              num_steps=steps, eta=1.0)
    first = d.sample(base_fn, lambda z, tt, i, *key: jnp.zeros_like(z), **kw)
    key = first[:, 2]
    full = d.sample(base_fn, residual_fn, key_frame=key, **kw)
    np.testing.assert_allclose(full[:, 2], key, atol=1e-5)  # the same up to XLA's float reordering
    np.testing.assert_array_equal(seen[-1], key)  # the residual generator read the finished key frame
    assert np.abs(np.asarray(full[:, 0] - first[:, 0])).max() > 1e-3  # control: other frames differ


# --- sampler options (issue 12): DDIM "trailing" timestep spacing, DDPM "fixed large" variance ---
def _gaussian_eps_np(z, t, acp, mu=0.3, var=0.25):
  """The exact ε-prediction E[ε | z_t] for data x0 ~ N(mu, var) elementwise (linear in z)."""
  a = acp[t]
  return np.sqrt(1 - a) * (z - np.sqrt(a) * mu) / (a * var + 1 - a)


def _gaussian_eps_fn(acp, mu=0.3, var=0.25):
  acp = jnp.asarray(acp, jnp.float32)

  def eps_fn(z, t):
    a = acp[t].reshape((-1,) + (1,) * (z.ndim - 1))
    return jnp.sqrt(1 - a) * (z - jnp.sqrt(a) * mu) / (a * var + 1 - a)
  return eps_fn


def _row_keys_and_noise(lambdas, shape):
  """Per-row keys for ``sample_chain(row_keys=...)`` and, in NumPy, the chain's draw ``s`` that
  they give: row b's base noise from fold_in(base[b], s), its residual noise from
  fold_in(residual[b], s), mixed as √λ base + √(1-λ) residual (eq. 8)."""
  b, n, h, w, c = shape
  base_keys = jax.random.split(jax.random.PRNGKey(21), b)
  residual_keys = jax.random.split(jax.random.PRNGKey(22), b)
  lam = np.asarray(lambdas, np.float64).reshape(1, n, 1, 1, 1)

  def noise(s):
    base = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, s), (h, w, c))) for k in base_keys])
    res = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, s), (n, h, w, c))) for k in residual_keys])
    return np.sqrt(lam) * base[:, None].astype(np.float64) + np.sqrt(1 - lam) * res.astype(np.float64)
  return (base_keys, residual_keys), noise


@pytest.mark.parametrize("T,n", [(1000, 50), (1000, 1), (100, 7), (50, 29), (20, 20), (1000, 3)])
def test_ddim_trailing_timesteps_follow_diffusers(T, n):
  ts = np.asarray(d.ddim_timesteps(T, n, spacing="trailing"))
  diffusers = np.round(np.arange(T, 0, -T / n)).astype(int) - 1  # DDIMScheduler, timestep_spacing="trailing"
  np.testing.assert_array_equal(ts, diffusers[:n])  # (50, 29): float arange adds a 30th step, -1
  assert ts[0] == T - 1 and len(ts) == n and len(set(ts.tolist())) == n
  assert np.all(np.diff(ts) < 0) and ts[-1] >= 0
  if (T, n) == (1000, 50):
    np.testing.assert_array_equal(ts, np.arange(999, 0, -20))
    np.testing.assert_array_equal(d.ddim_timesteps(T, n), np.arange(980, -1, -20))  # default: leading


def test_unknown_spacing_and_variance_raise():
  from videofusion_jax.diffusion.samplers import sampler_timesteps
  s = d.make_schedule("linear", 20)
  z = jnp.zeros((1, 3, 2, 2, 1))
  with pytest.raises(ValueError, match="'leading', 'trailing'"):
    d.ddim_timesteps(20, 5, spacing="linspace")
  with pytest.raises(ValueError, match="'leading', 'trailing'"):
    sampler_timesteps("ddpm", 20, 5, spacing="Trailing")
  with pytest.raises(ValueError, match="'fixed_small', 'fixed_large'"):
    d.ddpm_step(z, z, jnp.array([3]), jax.random.PRNGKey(0), None, s, variance="learned")
  with pytest.raises(ValueError, match="'fixed_small', 'fixed_large'"):
    d.sample_chain(lambda z, t: z, jax.random.PRNGKey(0), z.shape, None, s, "ddim", 5, variance="large")


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trailing_chain_matches_numpy(eta, lam):
  """A whole trailing-spacing DDIM chain against a NumPy loop over diffusers' trailing timesteps,
  the exact ε of Gaussian data, and the same per-row noise: at λ = 0.5 each draw (z_T and, with
  η > 0, every step's) is mixed √λ base + √(1-λ) residual in NumPy from the same raw normal draws."""
  T, n, shape = 100, 7, (2, 3, 4, 4, 1)
  s = d.make_schedule("linear", T)
  acp = np.cumprod(1 - ref_betas("linear", T))
  lambdas = d.frame_lambdas(3, lam)
  np.testing.assert_array_equal(lambdas, [lam, 1.0, lam])  # the key frame (index 1) is all base noise
  row_keys, noise = _row_keys_and_noise(lambdas, shape)
  out = np.asarray(d.sample_chain(_gaussian_eps_fn(acp), None, shape, lambdas, s, "ddim", n, eta, clip_x0=False,
                                  row_keys=row_keys, spacing="trailing"))

  def ref_chain(ts):
    z = noise(0)
    for i, t in enumerate(ts):
      tp = ts[i + 1] if i + 1 < n else -1
      z = ref_ddim(z, _gaussian_eps_np(z, t, acp), t, tp, acp, eta, noise(i + 1))
    return z

  trailing = np.round(np.arange(T, 0, -T / n)).astype(int) - 1
  assert trailing[0] == T - 1 and len(set(trailing.tolist())) == n
  np.testing.assert_allclose(out, ref_chain(trailing), rtol=1e-4, atol=1e-4)
  leading = np.arange(n)[::-1] * (T // n)
  assert np.abs(ref_chain(leading) - out).max() > 1e-2  # control: the spacing changes the chain


def test_sample_takes_the_chain_options_of_the_config():
  """``diffusion.sample`` (the two networks' chain for library users) passes ``spacing``, ``variance``,
  ``guidance_scale`` and ``key_frame_input`` to the chain that ``--mode=sample`` runs (``sample_chain`` on
  ``decomposed_eps_fn``), each a control that changes the chain. The stand-in networks tell the doubled
  batch's null rows (its second half) from the conditioned ones, and the residual one reads x̂^k."""
  schedule, lambdas, x0, _ = _clips_and_noise(20)

  def base_fn(zk, tt):
    null = (jnp.arange(zk.shape[0]) >= x0.shape[0])[:, None, None, None]  # the guided batch's second half
    return 0.5 * zk + 0.01 * tt[:, None, None, None] / 1000 + 0.2 * null

  def residual_fn(z, tt, i, *key):
    return 0.3 * z + (0.2 * key[0][:, None] if key else 0.0)

  plain = d.decomposed_eps_fn(base_fn, residual_fn, lambdas, schedule)
  cases = ((plain, "ddim", 7, {"spacing": "trailing"}), (plain, "ddpm", 20, {"variance": "fixed_large"}),
           (d.decomposed_eps_fn(base_fn, residual_fn, lambdas, schedule, 2.0), "ddim", 7, {"guidance_scale": 2.0}),
           (d.decomposed_eps_fn(base_fn, residual_fn, lambdas, schedule, None, True), "ddim", 7,
            {"key_frame_input": True}))
  for eps_fn, method, steps, option in cases:
    kw = dict(rng=jax.random.PRNGKey(4), shape=x0.shape, lambdas=lambdas, schedule=schedule, method=method,
              num_steps=steps, eta=1.0)
    out = d.sample(base_fn, residual_fn, **kw, **option)
    chain_kw = {k: v for k, v in option.items() if k in ("spacing", "variance")}
    np.testing.assert_allclose(out, d.sample_chain(eps_fn, **kw, **chain_kw), atol=1e-6, err_msg=str(option))
    assert np.abs(np.asarray(out - d.sample(base_fn, residual_fn, **kw))).max() > 1e-2, option  # not the default


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_ddpm_fixed_large_chain_matches_numpy(lam):
  """Whole DDPM chains with σ_t² = β_t ("fixed_large") and the posterior variance ("fixed_small")
  against a NumPy loop fed the same noise (at λ = 0.5 mixed √λ base + √(1-λ) residual in NumPy from
  the same raw normal draws); no noise at t = 0."""
  T, shape = 20, (2, 3, 4, 4, 1)
  s = d.make_schedule("linear", T)
  betas = ref_betas("linear", T)
  acp = np.cumprod(1 - betas)
  lambdas = d.frame_lambdas(3, lam)
  np.testing.assert_array_equal(lambdas, [lam, 1.0, lam])
  row_keys, noise = _row_keys_and_noise(lambdas, shape)
  outs = {}
  for variance in ("fixed_large", "fixed_small"):
    outs[variance] = np.asarray(d.sample_chain(_gaussian_eps_fn(acp), None, shape, lambdas, s, "ddpm",
                                               clip_x0=False, row_keys=row_keys, variance=variance))
    z = noise(0)
    for i, t in enumerate(range(T - 1, -1, -1)):
      a, ap = acp[t], (acp[t - 1] if t > 0 else 1.0)
      x0 = (z - np.sqrt(1 - a) * _gaussian_eps_np(z, t, acp)) / np.sqrt(a)
      mean = np.sqrt(ap) * betas[t] / (1 - a) * x0 + np.sqrt(1 - betas[t]) * (1 - ap) / (1 - a) * z
      var = betas[t] if variance == "fixed_large" else betas[t] * (1 - ap) / (1 - a)
      z = mean + (np.sqrt(var) * noise(i + 1) if t > 0 else 0.0)
    np.testing.assert_allclose(outs[variance], z, rtol=1e-4, atol=1e-4)
  assert np.abs(outs["fixed_large"] - outs["fixed_small"]).max() > 1e-2  # control: the variance matters


@pytest.mark.parametrize("clip_x0", [False, True])
def test_anchored_eps_pulls_the_clean_estimate_and_spares_the_key_frame(clip_x0):
  """The continuity option's estimate: the x̂0 it implies is ``c + w (anchor - c)`` frame by frame (computed
  here from the definitions), with ``c`` = x̂0, or with clip_x0 (sampling's default) ``clip(x̂0, -1, 1)``;
  weight 0 leaves ε as it was (unclipped), and the weights fall linearly. Controls: a pulled frame's ε
  changes; with clip_x0, x̂0 of the pulled frames lies far outside [-1, 1], where pulling the unclipped
  x̂0 differs."""
  np.testing.assert_allclose(d.anchor_weights(8, 3), [0.75, 0.5, 0.25, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(d.anchor_weights(4, 0), np.zeros(4))
  per_step = np.asarray(d.anchor_weights(8, 3, num_steps=10), np.float64)  # compounded over 10 steps: the same
  np.testing.assert_allclose(1 - (1 - per_step) ** 10, [0.75, 0.5, 0.25, 0, 0, 0, 0, 0], rtol=1e-5, atol=1e-7)
  T = 50
  s = d.make_schedule("cosine", T)
  acp = np.asarray(s.alphas_cumprod, np.float64)
  rng = np.random.default_rng(5 if clip_x0 else 4)
  z = ((2.0 if clip_x0 else 1.0) * rng.normal(size=(2, 4, 3, 3, 2))).astype(np.float32)
  eps = rng.normal(size=z.shape).astype(np.float32)
  anchor = rng.uniform(-1, 1, (2, 3, 3, 2)).astype(np.float32)
  t = np.array([5, 40])
  w = np.array([0.6, 0.3, 0.0, 0.0], np.float32)
  out = np.asarray(d.anchored_eps(jnp.asarray(z), jnp.asarray(eps), jnp.asarray(t), jnp.asarray(anchor),
                                  jnp.asarray(w), s, clip_x0=clip_x0))
  a = acp[t].reshape(2, 1, 1, 1, 1)
  raw = (z - np.sqrt(1 - a) * eps) / np.sqrt(a)
  c = np.clip(raw, -1, 1) if clip_x0 else raw
  implied = (z - np.sqrt(1 - a) * out) / np.sqrt(a)
  np.testing.assert_allclose(implied, c + w.reshape(1, 4, 1, 1, 1) * (anchor[:, None] - c), rtol=1e-4, atol=1e-4)
  assert np.abs(out[:, 0] - eps[:, 0]).max() > 0.1  # control: a pulled frame's ε changes
  if clip_x0:
    assert np.abs(raw[:, :2]).max() > 2.0  # the clip is active on the pulled frames
  else:
    np.testing.assert_allclose(out[:, 2:], eps[:, 2:], rtol=1e-4, atol=1e-4)  # weight 0: ε unchanged


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_steps_with_clip_x0_use_the_clipped_estimate(method):
  """sample.clip_x0 (on by default): x̂0 = clip((z - √(1-ᾱ) ε̂)/√ᾱ, -1, 1) enters the DDPM posterior mean, and
  DDIM's direction uses the ε that gives the clipped x̂0, (z - √ᾱ x̂0)/√(1-ᾱ) (ADM), against NumPy with the
  same fresh noise (λ = 0.5: the noise is decomposed_noise's draw, mixed in NumPy). Control: x̂0 falls outside
  [-1, 1] somewhere at each timestep, so the clip changes the step."""
  s = d.make_schedule("linear", 1000)
  betas = ref_betas("linear", 1000)
  acp = np.cumprod(1 - betas)
  lambdas = d.frame_lambdas(3, 0.5)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(13), 3)
  z = 1.5 * jax.random.normal(k1, (2, 3, 4, 4, 3))
  eps = jax.random.normal(k2, (2, 3, 4, 4, 3))
  base_rng, res_rng = jax.random.split(k3)
  lam = np.array([0.5, 1.0, 0.5]).reshape(1, 3, 1, 1, 1)
  noise = (np.sqrt(lam) * np.asarray(jax.random.normal(base_rng, (2, 4, 4, 3)))[:, None]
           + np.sqrt(1 - lam) * np.asarray(jax.random.normal(res_rng, z.shape)))
  zn, en = np.asarray(z, np.float64), np.asarray(eps, np.float64)
  for t, tp in [(999, 979), (500, 480), (40, 20)]:
    a, ap = acp[t], acp[tp]
    raw = (zn - np.sqrt(1 - a) * en) / np.sqrt(a)
    assert np.abs(raw).max() > 1.5  # the clip is active
    x0 = np.clip(raw, -1, 1)
    if method == "ddim":
      out = d.ddim_step(z, eps, jnp.full((2,), t), jnp.full((2,), tp), k3, lambdas, s, eta=0.5, clip_x0=True)
      sigma = 0.5 * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
      eps_clipped = (zn - np.sqrt(a) * x0) / np.sqrt(1 - a)
      expected = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps_clipped + sigma * noise
    else:
      out = d.ddpm_step(z, eps, jnp.full((2,), t), k3, lambdas, s, clip_x0=True)
      ap = acp[t - 1]
      mean = np.sqrt(ap) * betas[t] / (1 - a) * x0 + np.sqrt(1 - betas[t]) * (1 - ap) / (1 - a) * zn
      expected = mean + np.sqrt(betas[t] * (1 - ap) / (1 - a)) * noise
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_guidance_gives_the_clean_key_frame_to_both_passes():
  """model.key_frame_clean under guidance: the residual generator reads the finished key frame in the
  conditioned pass and in the null one (the key frame is no condition), so the guided estimate is
  ε̂_∅ + s (ε̂_c - ε̂_∅) of the two passes run apart, each with the key frame. Control: the null pass
  without the key frame gives another estimate."""
  schedule, lambdas, x0, _ = _clips_and_noise(14)
  z = jax.random.normal(jax.random.PRNGKey(15), x0.shape)
  t = jnp.array([50, 400, 900])
  key = x0[:, 2]

  def fns(cond):  # cond (rows,): 1 for a conditioned row, 0 for a null one
    def base_fn(zk, tt):
      return 0.3 * zk + 0.2 * cond[:, None, None, None]

    def residual_fn(zp, tt, i, key_frame):
      return -0.2 * zp + 0.5 * key_frame[:, None] + 0.1 * cond[:, None, None, None, None]
    return base_fn, residual_fn

  ones, zeros = jnp.ones(3), jnp.zeros(3)
  guided = d.guided_decomposed_eps(*fns(jnp.concatenate([ones, zeros])), z, t, lambdas, schedule, 2.0, key_frame=key)
  cond = d.decomposed_eps(*fns(ones), z, t, lambdas, schedule, key_frame=key)[0]
  null = d.decomposed_eps(*fns(zeros), z, t, lambdas, schedule, key_frame=key)[0]
  np.testing.assert_allclose(guided, null + 2.0 * (cond - null), rtol=1e-5, atol=1e-5)
  null_without_key = d.decomposed_eps(*fns(zeros), z, t, lambdas, schedule, key_frame=jnp.zeros_like(key))[0]
  assert np.abs(np.asarray(null_without_key - null)).max() > 0.1


@pytest.mark.parametrize("variant", ["every_frame", "residual_frames", "key_frame_input"])
def test_the_residual_term_gives_the_base_no_gradient(variant):
  """Eq. 12's stop-gradient on scalar "networks" (base w_b z, residual w_r z' (+ 0.1 x̂^k)): the residual
  term's gradient in w_b is exactly 0, on every non-key frame, on train.residual_frames' frames and with
  the key-frame input, while w_r gets one, and the key term's gradient is w_b's alone. Control: the
  same residual term built from decomposed_eps without the stop-gradient reaches w_b."""
  schedule, lambdas, x0, noise = _clips_and_noise(9)
  t = jnp.array([3, 400, 990])
  frames = jnp.array([[0], [3], [1]]) if variant == "residual_frames" else None
  key_input = variant == "key_frame_input"

  def fns(w):
    def residual_fn(z, tt, i, key=None):
      return w[1] * z + (0.0 if key is None else 0.1 * key[:, None])
    return (lambda z, tt: w[0] * z), residual_fn

  def terms(w):
    return d.joint_loss(*fns(w), x0, t, noise, lambdas, schedule, key_frame_input=key_input, frames=frames)[1]

  def residual_term_without_sg(w):
    z = d.q_sample(x0, t, noise, schedule)
    eps_hat = d.decomposed_eps(*fns(w), z, t, lambdas, schedule, key_frame_input=key_input, frames=frames)[0]
    target = noise[:, np.asarray(d.non_key_frames(4))] if frames is None else d.take_frames(noise, frames)
    estimate = eps_hat[:, np.asarray(d.non_key_frames(4))] if frames is None else eps_hat
    return jnp.mean(jnp.square(target - estimate))

  w = jnp.array([0.3, -0.2])
  g_res = np.asarray(jax.grad(lambda v: terms(v)["loss_residual"])(w))
  g_key = np.asarray(jax.grad(lambda v: terms(v)["loss_key"])(w))
  assert g_res[0] == 0.0 and abs(g_res[1]) > 1e-3
  assert abs(g_key[0]) > 1e-3 and g_key[1] == 0.0
  assert abs(float(jax.grad(residual_term_without_sg)(w)[0])) > 1e-3
