"""Times I3D feature extraction (the FVD/KVD network) and prints one JSON line.

python benchmarks/i3d.py --batch_size=8 --batches=3
python benchmarks/i3d.py --top5   # also the top-5 Kinetics classes of the bundled demo clips

Input: random uint8 clips of ``--frames`` x 224 x 224 (the resize to 224 still runs). The
first call (compile + one batch) is timed apart. No TensorFlow.
"""
from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

from videofusion_jax.evaluation.i3d import MIN_FRAMES

_BATCH = flags.DEFINE_integer("batch_size", 8, "Clips per compiled call.", lower_bound=1)
_BATCHES = flags.DEFINE_integer("batches", 3, "Timed batches (after one compile batch).", lower_bound=1)
_FRAMES = flags.DEFINE_integer("frames", 16, f"Frames per clip (I3D needs {MIN_FRAMES} or more; FVD uses 16).",
                               lower_bound=MIN_FRAMES)
_TOP5 = flags.DEFINE_bool("top5", False, "Print the top-5 classes of the middle 16 frames of each demo clip.")


def top5_of_demo_clips(features) -> list[dict]:
  from videofusion_jax.data import video_io
  from videofusion_jax.evaluation.i3d import kinetics_class_names

  names = kinetics_class_names()
  rows = []
  for clip in video_io.DEMO_CLIPS:
    frames = video_io.read_video(video_io.demo_clip_dir() / clip)
    start = (len(frames) - 16) // 2
    logits = features(frames[None, start:start + 16]).astype(np.float64)[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:5]
    rows.append({"clip": clip, "frames": f"{start}..{start + 15}", "size": list(frames.shape[1:3]),
                 "top5": [(names[i], round(float(p[i]), 4)) for i in top]})
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
  from videofusion_jax.evaluation.i3d import I3DFeatures, I3DWeightsError

  b, t = _BATCH.value, _FRAMES.value
  t0 = time.time()
  try:
    features = I3DFeatures(batch_size=b)
  except I3DWeightsError as e:  # one line, as the main program gives it
    raise app.UsageError(str(e)) from None
  load_s = time.time() - t0
  videos = np.random.default_rng(0).integers(0, 256, (b, t, 224, 224, 3)).astype(np.uint8)
  t0 = time.time()
  features(videos)
  first_s = time.time() - t0
  t0 = time.time()
  for _ in range(_BATCHES.value):
    features(videos)
  per_batch = (time.time() - t0) / _BATCHES.value
  print(json.dumps({
      "device": jax.devices()[0].device_kind, "devices_used": features.num_devices,
      "batch": b, "frames": t, "size": 224, "load_weights_s": round(load_s, 2),
      "compile_and_first_batch_s": round(first_s, 2), "batch_s": round(per_batch, 3),
      "clips_per_s": round(b / per_batch, 3)}))
  if _TOP5.value:
    single = I3DFeatures(batch_size=1, variables=features.variables)
    for row in top5_of_demo_clips(single):
      print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
