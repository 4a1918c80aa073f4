"""The U-Net: shapes, conditioning inputs, dtypes, and clear errors for bad sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videofusion_jax.models import UNet, check_image_size, timestep_embedding


@pytest.fixture(scope="module")
def residual_unet():
  m = UNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
           head_dim=8, num_classes=3, num_frames=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([3, 700])
  params = nn.unbox(jax.jit(m.init)(jax.random.PRNGKey(1), x, t, jnp.array([0, 1]), jnp.array([0, 1])))["params"]
  # Output convolutions start at zero (as in ADM); perturb every weight so that each
  # input reaches the output.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return m, params, x, t


def test_output_shape_and_every_input_matters(residual_unet):
  m, params, x, t = residual_unet
  out = m.apply({"params": params}, x, t, jnp.array([0, 1]), jnp.array([0, 1]))
  assert out.shape == x.shape and out.dtype == jnp.float32
  for other in [m.apply({"params": params}, x, t, jnp.array([2, 1]), jnp.array([0, 1])),
                m.apply({"params": params}, x, t, jnp.array([0, 1]), jnp.array([3, 1])),
                m.apply({"params": params}, x, jnp.array([500, 700]), jnp.array([0, 1]), jnp.array([0, 1]))]:
    assert not np.allclose(out[0], other[0], atol=1e-4)
    np.testing.assert_allclose(out[1], other[1], atol=1e-4)  # the batch rows stay independent


def test_bfloat16_compute_keeps_float32_params(residual_unet):
  m, params, x, t = residual_unet
  m16 = m.clone(dtype=jnp.bfloat16)
  out16 = m16.apply({"params": params}, x, t, jnp.array([0, 1]), jnp.array([0, 1]))
  out32 = m.apply({"params": params}, x, t, jnp.array([0, 1]), jnp.array([0, 1]))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
  assert 0 < rel < 0.05


def test_missing_conditioning_and_bad_size_are_clear_errors(residual_unet):
  m, params, x, t = residual_unet
  with pytest.raises(ValueError, match="pass a label"):
    m.apply({"params": params}, x, t, None, jnp.array([0, 1]))
  # One label or frame index for a batch of two broadcast over it unseen: the shapes are checked.
  for label, frame in ((jnp.array([1]), jnp.array([0, 1])), (jnp.array([0, 1]), jnp.array([2]))):
    with pytest.raises(AssertionError, match=r"has shape \(1,\) but expected \(2\)"):
      m.apply({"params": params}, x, t, label, frame)
  with pytest.raises(ValueError, match="multiple of 4"):
    check_image_size(18, (1, 2, 2))
  with pytest.raises(ValueError, match="cannot be downsampled"):
    m.apply({"params": params}, jnp.zeros((2, 9, 9, 3)), t, jnp.array([0, 1]), jnp.array([0, 1]))


def test_timestep_embedding_is_sinusoidal():
  emb = np.asarray(timestep_embedding(jnp.array([0.0, 10.0]), 8))
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(10 * freqs), np.sin(10 * freqs)]), rtol=1e-5)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_attention_heads_have_a_fixed_width():
  """Heads of head_dim channels: a 96-channel layer with head_dim 32 is 3-head attention,
  checked against a NumPy reference; widths that head_dim does not divide are an error."""
  from videofusion_jax.models.unet import AttentionBlock, attention_heads

  assert attention_heads(256, 64) == 4 and attention_heads(1024, 64) == 16 and attention_heads(32, 64) == 1
  with pytest.raises(ValueError, match="head_dim=64"):
    attention_heads(96, 64)
  block = AttentionBlock(head_dim=32, dtype=jnp.float32, param_dtype=jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 3, 96))
  params = nn.unbox(block.init(jax.random.PRNGKey(1), x))["params"]
  params["proj"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), (96, 96)) / 10
  out = np.asarray(block.apply({"params": params}, x))
  # Reference: GroupNorm (32 groups), qkv, softmax(q k^T / sqrt(32)) v per head, projection, residual.
  xn = np.asarray(x, np.float64).reshape(2, 6, 32, 3)
  mean, var = xn.mean(axis=(1, 3), keepdims=True), xn.var(axis=(1, 3), keepdims=True)
  y = ((xn - mean) / np.sqrt(var + 1e-6)).reshape(2, 6, 96) * np.asarray(params["norm"]["scale"]) + np.asarray(
      params["norm"]["bias"])
  qkv = (y @ np.asarray(params["qkv"]["kernel"]) + np.asarray(params["qkv"]["bias"])).reshape(2, 6, 3, 3, 32)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(32)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  att = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 6, 96)
  ref = np.asarray(x, np.float64).reshape(2, 6, 96) + att @ np.asarray(params["proj"]["kernel"]) + np.asarray(
      params["proj"]["bias"])
  np.testing.assert_allclose(out.reshape(2, 6, 96), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,dtype,param_dtype,loc,std", [
    ((2, 8, 8, 64), jnp.float32, jnp.float32, 2.0, 3.0),  # off-centre: the mean matters
    ((3, 5, 7, 48), jnp.bfloat16, jnp.float32, 2.0, 3.0),
    ((4, 256), jnp.float32, jnp.float32, 2.0, 3.0),
    ((2, 4, 6, 6, 32), jnp.float32, jnp.float32, 2.0, 3.0),
    ((2, 8, 8, 64), jnp.float32, jnp.float32, 0.0, 1e-3),  # variance 1e-6: epsilon matters
    ((2, 8, 8, 64), jnp.bfloat16, jnp.bfloat16, 2.0, 3.0)])
def test_group_norm_matches_flax(shape, dtype, param_dtype, loc, std):
  """The project's GroupNorm (one jitted lax function, cheap to trace) has flax.linen.GroupNorm's
  parameters, output and gradients, for images, videos, vectors, bfloat16 compute and parameters."""
  from videofusion_jax.models.unet import GroupNorm

  rng = np.random.default_rng(0)
  groups = int(np.gcd(32, shape[-1]))
  x = jnp.asarray(rng.normal(loc, std, shape), dtype)
  ours, ref = GroupNorm(groups, dtype, param_dtype), nn.GroupNorm(groups, dtype=dtype, param_dtype=param_dtype)
  init, expected_init = nn.unbox(ours.init(jax.random.PRNGKey(0), x)), ref.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(init) == jax.tree.structure(expected_init)
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(expected_init)):
    assert a.dtype == b.dtype == param_dtype and np.array_equal(a, b)
  v = jax.tree.map(lambda a: jnp.asarray(rng.normal(1.0, 0.5, a.shape), a.dtype), init)
  out, expected = ours.apply(v, x), ref.apply(v, x)
  assert out.dtype == expected.dtype == dtype
  tol = 1e-4 if dtype == jnp.float32 else 2e-2  # float32 sums in another order; bfloat16 rounding
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), rtol=tol, atol=tol)
  # A constant input far from 0: E[x²] - E[x]² cancels to about 0 or below (clipped), never a NaN.
  assert np.isfinite(np.asarray(ours.apply(v, jnp.full(shape, 1000.0, dtype)), np.float32)).all()

  def loss(m):
    return lambda v, x: jnp.sum(jnp.sin(m.apply(v, x).astype(jnp.float32)))

  # What the backward pass keeps is no larger than flax's (statistics kept per channel, not broadcast).
  kept = [sum(a.nbytes for a in jax.tree.leaves(jax.vjp(loss(m), v, x)[1])) for m in (ours, ref)]
  assert kept[0] <= kept[1], kept
  grads, expected_grads = (jax.tree.leaves(jax.grad(loss(m), (0, 1))(v, x)) for m in (ours, ref))
  assert len(grads) == 3  # scale, bias and the input
  for g, e in zip(grads, expected_grads):
    g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
    np.testing.assert_allclose(g, e, rtol=0, atol=(3e-4 if dtype == jnp.float32 else 5e-2) * np.abs(e).max())


def np_group_norm(x, groups, scale, bias, eps=1e-6):
  """GroupNorm of ``x`` ``(B, H, W, C)`` in float64: each example's channel groups over (H, W, C/groups)."""
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_conv3x3(x, kernel, bias, stride=1):
  """A 3x3 'SAME' convolution as the sum over the kernel's offsets of the zero-padded input: padded 1 before and
  after at stride 1, 0 before and 1 after at stride 2 on an even size (XLA's 'SAME')."""
  h, w = x.shape[1] // stride, x.shape[2] // stride
  pad = [(p // 2, p - p // 2) for p in (max((n - 1) * stride + 3 - x.shape[i], 0) for i, n in ((1, h), (2, w)))]
  padded = np.pad(x, ((0, 0), *pad, (0, 0)))
  return sum(padded[:, dy:dy + stride * h:stride, dx:dx + stride * w:stride] @ kernel[dy, dx]
             for dy in range(3) for dx in range(3)) + bias


def test_res_block_against_numpy():
  """ADM's res block, against NumPy: GroupNorm-SiLU-conv3x3, the time embedding's scale and shift applied as
  norm(h)·(1 + scale) + shift, SiLU, conv3x3, and a 1x1 convolution on the skip where the width changes
  (8 -> 16 channels: 8 groups in the first norm, 16 in the second)."""
  from videofusion_jax.models.unet import ResBlock

  block = ResBlock(16, 0.0, jnp.float32, jnp.float32)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(2, 12)), jnp.float32)
  params = nn.unbox(block.init(jax.random.PRNGKey(0), x, emb, False))["params"]
  # Every weight perturbed: conv2 starts at zero, norms at scale 1 and bias 0, the embedding's bias at 0.
  params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(np.float32), params)
  out = np.asarray(block.apply({"params": params}, x, emb, False))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
  xn = np.asarray(x, np.float64)
  h = np_conv3x3(silu(np_group_norm(xn, 8, p["norm1"]["scale"], p["norm1"]["bias"])), p["conv1"]["kernel"],
                  p["conv1"]["bias"])
  scale_shift = silu(np.asarray(emb, np.float64)) @ p["emb"]["kernel"] + p["emb"]["bias"]
  scale, shift = scale_shift[:, None, None, :16], scale_shift[:, None, None, 16:]
  h = np_group_norm(h, 16, p["norm2"]["scale"], p["norm2"]["bias"]) * (1 + scale) + shift
  h = np_conv3x3(silu(h), p["conv2"]["kernel"], p["conv2"]["bias"])
  skip = xn @ p["skip"]["kernel"][0, 0] + p["skip"]["bias"]
  np.testing.assert_allclose(out, skip + h, rtol=1e-4, atol=1e-4)
