"""CLIP embedding throughput: frames/s of the image tower (and of ``preprocess``), texts/s of the
text tower, one JSON line per result. No TensorFlow, nothing downloaded.

python benchmarks/clip.py                               # ViT-B/32 shapes, random weights
python benchmarks/clip.py --clip_dir=/data/clip-vit-base-patch32 --dtype=bfloat16

Without ``--clip_dir`` the towers have the shapes of Hugging Face's ``CLIPModel`` defaults
(ViT-B/32 at 224 pixels, a 12-layer 512-wide text tower, 77 tokens) and random weights: the time
does not depend on the values. Frames are the datasets' 64x64 uint8 frames, upscaled by
``preprocess``; times are medians over ``--repeats`` batches after one untimed (compiling) batch.
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from videofusion_jax.models import clip as clip_lib
from videofusion_jax.models.clip_tokenizer import CLIPTokenizer, train_bpe

_CLIP_DIR = flags.DEFINE_string("clip_dir", "", "A Hugging Face CLIPModel directory ('' = ViT-B/32 shapes, random).")
_BATCH = flags.DEFINE_integer("batch", 32, "Frames (and texts) per batch.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed batches (median).", lower_bound=1)
_FRAME_SIZE = flags.DEFINE_integer("frame_size", 64, "Side of the square uint8 frames given to preprocess.",
                                   lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the towers.")

CAPTIONS = ["a person riding a horse on the beach", "two dogs play in the snow", "time-lapse of clouds over a city"]


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
  """(first call's seconds, median of ``repeats`` later calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  if _CLIP_DIR.value:
    try:
      clip, source = clip_lib.load(_CLIP_DIR.value, dtype=dtype), _CLIP_DIR.value
    except clip_lib.CLIPLoadError as e:  # one line, as the main program gives it
      raise app.UsageError(f"--clip_dir={_CLIP_DIR.value}: {e}") from None
  else:
    config = clip_lib.CLIPConfig(text=clip_lib.TowerConfig(512, 12, 8, 2048),
                                 vision=clip_lib.TowerConfig(768, 12, 12, 3072))
    vocab, merges = train_bpe(CAPTIONS, 50)
    clip = clip_lib.init(config, CLIPTokenizer(vocab, merges, config.context_length), jax.random.PRNGKey(0), dtype)
    source = "ViT-B/32 shapes, random weights"
  b, device = _BATCH.value, jax.devices()[0]
  common = dict(source=source, dtype=_DTYPE.value, batch=b, device=device.device_kind, platform=device.platform,
                image_size=clip.config.image_size)
  frames = np.random.default_rng(0).integers(0, 256, (b, _FRAME_SIZE.value, _FRAME_SIZE.value, 3), np.uint8)
  _, pre_s = _median_seconds(lambda: clip.preprocess(frames), _REPEATS.value)
  print(json.dumps(dict(result="preprocess", frames_per_s=round(b / pre_s, 1), frame_size=_FRAME_SIZE.value,
                        **common)), flush=True)
  pixels = jnp.asarray(clip.preprocess(frames))
  compile_s, image_s = _median_seconds(lambda: clip.encode_image(pixels), _REPEATS.value)
  print(json.dumps(dict(result="encode_image", frames_per_s=round(b / image_s, 1), first_batch_s=round(compile_s, 2),
                        **common)), flush=True)
  ids = clip.tokenize((CAPTIONS * b)[:b])
  compile_s, text_s = _median_seconds(lambda: clip.encode_text(ids), _REPEATS.value)
  print(json.dumps(dict(result="encode_text", texts_per_s=round(b / text_s, 1), first_batch_s=round(compile_s, 2),
                        **common)), flush=True)


if __name__ == "__main__":
  app.run(main)
