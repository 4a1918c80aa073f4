"""The UCF101-finetuned C3D of TGAN/TGANv2 (and StyleGAN-V) for the UCF101 Inception Score, in Flax.

Architecture and preprocessing follow pfnet-research/tgan2 ``tgan2/models/c3d/c3d_ucf101.py``
(chainer ``C3DVersion1UCF101``), whose weights are the Caffe C3D ``c3d_ucf101_finetune_whole_iter_20000``
converted to ``conv3d_deepnetA_ucf.npz``:

- input: 16 RGB frames in [-1, 1] (uint8 ``p`` -> ``p / 127.5 - 1``);
- ``pre``: RGB -> BGR and x128; bilinear resize of the whole frame to 112x112 with aligned
  corners (chainer 6 ``F.resize_images``; no 128x171 resize and crop in TGANv2);
- ``+ 128 - mean[:, :, 8:120, 8:120]`` with the BGR mean clip of ``mean2.npz`` ``(3, 16, 128, 171)``;
- conv1a (64) pool1 (1,2,2) conv2a (128) pool2 conv3a/b (256) pool3 conv4a/b (512) pool4
  conv5a/b (512) pool5, 3x3x3 convs with padding 1 and ReLU, 2x2x2 max pools that cover the
  whole input (chainer's ``cover_all``: 7 -> 4), fc6 (8192 -> 4096) fc7 (4096) with ReLU,
  fc8 (101) and softmax. fc6 reads the pool5 output flattened in chainer's (C, T, H, W) order.

The weights cannot be downloaded at run time: pass the path of the two files.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videofusion_jax.evaluation.i3d import device_placement, run_batched

WEIGHTS_FILE = "conv3d_deepnetA_ucf.npz"
MEAN_FILE = "mean2.npz"
WEIGHTS_URL = "https://github.com/rezoo/tgan2/releases/download/v1.0/conv3d_deepnetA_ucf.npz"
MEAN_URL = "https://github.com/rezoo/tgan2/releases/download/v1.0/mean2.npz"
NUM_FRAMES = 16
CROP = 112
NUM_CLASSES = 101
MEAN_SHAPE = (3, NUM_FRAMES, 128, 171)

# Chainer's W shapes: convs (out, in, kT, kH, kW), linears (out, in).
_CONVS = (("conv1a", 3, 64), ("conv2a", 64, 128), ("conv3a", 128, 256), ("conv3b", 256, 256),
          ("conv4a", 256, 512), ("conv4b", 512, 512), ("conv5a", 512, 512), ("conv5b", 512, 512))
_DENSES = (("fc6", 512 * 4 * 4, 4096), ("fc7", 4096, 4096), ("fc8", 4096, NUM_CLASSES))
EXPECTED_KEYS = {
    **{f"{n}/W": (o, i, 3, 3, 3) for n, i, o in _CONVS}, **{f"{n}/b": (o,) for n, _, o in _CONVS},
    **{f"{n}/W": (o, i) for n, i, o in _DENSES}, **{f"{n}/b": (o,) for n, _, o in _DENSES},
}


class C3DWeightsError(FileNotFoundError):
  """The C3D weights or mean file is missing or is not the TGANv2 file."""


def _where_from() -> str:
  return (f"The UCF101 C3D of TGAN/TGANv2 needs `{WEIGHTS_FILE}` and its mean clip `{MEAN_FILE}` in one "
          f"folder; nothing is downloaded at run time. Get them on a machine with internet access, as "
          f"pfnet-research/tgan2's README ('Pre-trained weights') does:\n  wget {WEIGHTS_URL}\n  wget {MEAN_URL}\n"
          f"(mean2.npz is also at https://github.com/pfnet-research/tgan/releases/download/v1.0.0/mean2.npz) "
          f"and pass the path of {WEIGHTS_FILE}.")


def _max_pool_cover_all(x: jnp.ndarray, window: tuple[int, int, int]) -> jnp.ndarray:
  """Chainer ``max_pooling_nd(ksize=window)`` (stride = window, cover_all=True) on ``(B, T, H, W, C)``.

  cover_all adds windows until the whole input is covered, padding the end with -inf: 7 -> 4.
  """
  pads = []
  for n, k in zip(x.shape[1:4], window):
    out = (n - k + k - 1) // k + 1
    pads.append((0, max((out - 1) * k + k - n, 0)))
  return nn.max_pool(x, window, strides=window, padding=pads)


class C3D(nn.Module):
  """C3D (``C3DVersion1UCF101``): ``(B, 16, 112, 112, 3)`` preprocessed BGR -> ``(B, 101)`` logits.

  Sows ``conv1a_relu``, ``conv5b_relu`` and ``pool5`` activations into the "intermediates" collection.
  """

  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    chex.assert_shape(x, (None, NUM_FRAMES, CROP, CROP, 3))
    b = x.shape[0]
    for name, _, features in _CONVS:
      x = nn.relu(nn.Conv(features, (3, 3, 3), padding=((1, 1),) * 3, precision=self.precision, name=name)(x))
      if name in ("conv1a", "conv5b"):
        self.sow("intermediates", f"{name}_relu", x)
      if name == "conv1a":
        x = _max_pool_cover_all(x, (1, 2, 2))
      elif name in ("conv2a", "conv3b", "conv4b", "conv5b"):
        x = _max_pool_cover_all(x, (2, 2, 2))
    chex.assert_shape(x, (b, 1, 4, 4, 512))
    self.sow("intermediates", "pool5", x)
    x = jnp.transpose(x, (0, 4, 1, 2, 3)).reshape(b, -1)  # chainer flattens (C, T, H, W)
    x = nn.relu(nn.Dense(4096, precision=self.precision, name="fc6")(x))
    x = nn.relu(nn.Dense(4096, precision=self.precision, name="fc7")(x))
    return nn.Dense(NUM_CLASSES, precision=self.precision, name="fc8")(x)


def _open_npz(path: Path, what: str) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise C3DWeightsError(f"{what} not found: {path}.\n{_where_from()}")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise C3DWeightsError(f"cannot read {path} as an .npz file ({e}).\n{_where_from()}") from None


def load_c3d_variables(path: str | Path | None) -> dict:
  """Reads TGANv2's chainer ``conv3d_deepnetA_ucf.npz`` -> ``{"params": ...}`` for :class:`C3D` (float32).

  Keys ``conv1a/W`` ... ``fc8/b`` (an optional common prefix such as ``predictor/`` is accepted);
  every array must be used exactly once. Conv W ``(out, in, kT, kH, kW)`` -> ``(kT, kH, kW, in, out)``,
  linear W ``(out, in)`` -> ``(in, out)``.
  """
  if path is None:
    raise C3DWeightsError(f"no C3D weights given.\n{_where_from()}")
  path = Path(path)
  raw = _open_npz(path, f"C3D weights file ({WEIGHTS_FILE})")
  anchor = [k for k in raw if k.endswith("conv1a/W")]
  prefix = anchor[0][:-len("conv1a/W")] if len(anchor) == 1 else ""
  arrays = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
  extra = sorted(set(raw) - {prefix + k for k in EXPECTED_KEYS})
  missing = sorted(set(EXPECTED_KEYS) - set(arrays))
  wrong = sorted(k for k in set(EXPECTED_KEYS) & set(arrays) if arrays[k].shape != EXPECTED_KEYS[k])
  if extra or missing or wrong:
    raise C3DWeightsError(
        f"{path} is not TGANv2's C3D UCF101 weights: unexpected arrays {extra[:5]}, missing {missing[:5]}, "
        f"wrong shapes {[(k, arrays[k].shape, EXPECTED_KEYS[k]) for k in wrong[:5]]}.\n{_where_from()}")
  params = {}
  for name, _, _ in _CONVS:
    params[name] = {"kernel": np.transpose(arrays[f"{name}/W"], (2, 3, 4, 1, 0)), "bias": arrays[f"{name}/b"]}
  for name, _, _ in _DENSES:
    params[name] = {"kernel": arrays[f"{name}/W"].T, "bias": arrays[f"{name}/b"]}
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)
  if not all(bool(jnp.isfinite(a).all()) for a in jax.tree_util.tree_leaves(params)):
    raise C3DWeightsError(f"{path} holds NaN or inf weights: the file is corrupt.\n{_where_from()}")
  return {"params": params}


def load_c3d_mean(path: str | Path) -> jnp.ndarray:
  """TGANv2's crop of the BGR mean clip ``(3, 16, 128, 171)``: ``mean[:, :, 8:120, 8:120]`` as ``(16, 112, 112, 3)``."""
  path = Path(path)
  raw = _open_npz(path, f"C3D mean file ({MEAN_FILE})")
  if "mean" not in raw or raw["mean"].size != int(np.prod(MEAN_SHAPE)):
    got = {k: v.shape for k, v in raw.items()}
    raise C3DWeightsError(f"{path} is not TGAN's mean file: expected an array 'mean' of {int(np.prod(MEAN_SHAPE))} "
                          f"values {MEAN_SHAPE}, got {got}.\n{_where_from()}")
  shape = tuple(d for d in raw["mean"].shape if d != 1)  # (3, 1, 16, 128, 171), as TGAN's code reshapes it, too
  if len(shape) > 1 and shape != MEAN_SHAPE:  # the values of another layout (channels last, say) reshaped: scrambled
    raise C3DWeightsError(f"{path} holds its mean clip as {raw['mean'].shape}, not (channels, frames, height, width) "
                          f"= {MEAN_SHAPE} (or flat): it was saved in another layout; save TGAN's mean file as it "
                          f"is.\n{_where_from()}")
  # TGANv2 takes the same 8:120 window in both axes (not the centre of the 171 columns).
  mean = raw["mean"].astype(np.float32).reshape(MEAN_SHAPE)[:, :, 8:8 + CROP, 8:8 + CROP]
  return jnp.asarray(np.transpose(mean, (1, 2, 3, 0)))


def resize_bilinear_align_corners(frames: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """Chainer 6 ``F.resize_images`` (aligned corners): ``(..., H, W, C)`` -> ``(..., height, width, C)`` float32.

  Source coordinates ``linspace(0, in - 1, out)``; the four neighbours weighted as chainer does.
  """

  def coords(n_in, n_out):
    src = np.linspace(0, n_in - 1, num=n_out)
    frac, lo = np.modf(src)
    lo = lo.astype(np.int32)
    return lo, np.minimum(lo + 1, n_in - 1), frac.astype(np.float32)

  x = jnp.asarray(frames, jnp.float32)
  v0, v1, vw = coords(x.shape[-3], height)
  u0, u1, uw = coords(x.shape[-2], width)
  vw, uw = vw[:, None, None], uw[None, :, None]
  rows0, rows1 = jnp.take(x, v0, axis=-3), jnp.take(x, v1, axis=-3)
  return ((1 - vw) * (1 - uw) * jnp.take(rows0, u0, axis=-2) + (1 - vw) * uw * jnp.take(rows0, u1, axis=-2)
          + (vw * (1 - uw) * jnp.take(rows1, u0, axis=-2) + vw * uw * jnp.take(rows1, u1, axis=-2)))


def preprocess(videos: jnp.ndarray, mean: jnp.ndarray) -> jnp.ndarray:
  """``(B, 16, H, W, 3)`` uint8 RGB -> ``(B, 16, 112, 112, 3)`` float32 BGR input of :class:`C3D` (TGANv2's ``pre``)."""
  chex.assert_shape(videos, (None, NUM_FRAMES, None, None, 3))
  chex.assert_shape(mean, (NUM_FRAMES, CROP, CROP, 3))
  x = jnp.asarray(videos, jnp.float32) / 127.5 - 1.0  # TGANv2's samples are in [-1, 1]
  x = x[..., ::-1] * 128.0
  x = resize_bilinear_align_corners(x, CROP, CROP)
  return x + (128.0 - mean)


class C3DProbs:
  """UCF101 class probabilities ``(B, 101)`` of uint8 videos ``(B, 16, H, W, 3)`` for the Inception Score.

  ``weights_path``: ``conv3d_deepnetA_ucf.npz``; ``mean_path`` defaults to ``mean2.npz`` next to it.
  Batching and device placement as :class:`videofusion_jax.evaluation.i3d.I3DFeatures`.
  """

  def __init__(self, weights_path: str | Path | None, batch_size: int = 8, mean_path: str | Path | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if weights_path is None:
      raise C3DWeightsError(f"no C3D weights given.\n{_where_from()}")
    # The small mean file first, so that a missing one fails before 300 MB of weights are read.
    mean = load_c3d_mean(Path(mean_path) if mean_path is not None else Path(weights_path).parent / MEAN_FILE)
    variables = load_c3d_variables(weights_path)
    self.batch_size = batch_size
    self.model = C3D()
    replicated, self._input_sharding, self.num_devices = device_placement(batch_size)
    self.variables = jax.device_put({"variables": variables, "mean": mean}, replicated)
    self._fn = jax.jit(
        lambda v, x: jax.nn.softmax(self.model.apply(v["variables"], preprocess(x, v["mean"])), axis=-1),
        in_shardings=(replicated, self._input_sharding), out_shardings=replicated)

  def __call__(self, videos: np.ndarray, progress: Callable[[int, int], Any] | None = None) -> np.ndarray:
    """``(N, 16, H, W, 3)`` uint8 -> ``(N, 101)`` float32 softmax probabilities."""
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[1] != NUM_FRAMES or videos.shape[-1] != 3:
      raise ValueError(f"C3DProbs takes uint8 videos of shape (N, {NUM_FRAMES}, H, W, 3), got {videos.dtype} "
                       f"{videos.shape}; take 16 frames and convert [-1, 1] samples with video_io.to_uint8.")
    return run_batched(self._fn, self.variables, videos, self.batch_size, self._input_sharding,
                       NUM_CLASSES, progress)
