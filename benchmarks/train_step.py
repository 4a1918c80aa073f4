"""Times the jitted train step on synthetic input and prints one JSON line.

python benchmarks/train_step.py --config=configs/ucf101.py --peak_tflops=695

FLOPs come from XLA's cost analysis of the compiled step; MFU is measured against
``--peak_tflops`` (695 for a bf16 H200 matrix product, see the GPU notes). No TensorFlow.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile step).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (0: skip).")
_CACHE = flags.DEFINE_string("compilation_cache", "", "Persistent compilation cache dir.")


def main(argv):
  del argv
  from videofusion_jax.training.optimizer import trainable_networks
  from videofusion_jax.training.step import Trainer

  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE.value))
  c = _CONFIG.value
  t0 = time.time()
  trainer = Trainer(c)
  state = trainer.init_state(c.seed)
  b, d = c.train.batch_size, c.data
  rng = np.random.default_rng(0)
  batch = trainer.global_batch({
      "video": rng.uniform(-1, 1, (b, d.num_frames, d.image_size, d.image_size, 3)).astype(np.float32),
      "label": rng.integers(0, max(d.num_classes, 1), b).astype(np.int32)})
  compiled = trainer.step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state, m = trainer.step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.time() - t0
  t1 = time.time()
  for _ in range(_STEPS.value):
    state, m = trainer.step(state, batch)
  jax.block_until_ready(m)
  step_s = (time.time() - t1) / _STEPS.value
  out = {
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "batch": b, "frames": d.num_frames, "size": d.image_size, "stage": c.train.stage,
      "trainable": list(trainable_networks(c)),
      **{f"params_{k}": v for k, v in trainer.num_params.items()},
      "compile_and_first_step_s": round(compile_s, 2), "step_ms": round(1000 * step_s, 2),
      "clips_per_s": round(b / step_s, 2), "xla_flops_per_step": flops,
      "tflops_per_s": round(flops / step_s / 1e12, 3),
  }
  if _PEAK.value:
    out["mfu"] = round(flops / step_s / 1e12 / _PEAK.value, 4)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
