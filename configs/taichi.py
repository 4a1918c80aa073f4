"""TaiChi-HD, unconditional: 16 frames at 64x64, λ = 0.5, frame stride 4 as in DIGAN."""
from videofusion_jax.config import unconditional_64_config


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"configs/taichi.py has no variant {variant!r}: use configs/taichi.py (for a "
                     "small local run, override fields: --config.train.batch_size=4 ...).")
  return unconditional_64_config("taichi/64", frame_stride=4)
