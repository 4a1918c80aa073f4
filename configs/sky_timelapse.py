"""Sky Time-lapse, unconditional: 16 frames at 64x64, λ = 0.5."""
from videofusion_jax.config import unconditional_64_config


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"configs/sky_timelapse.py has no variant {variant!r}: use configs/sky_timelapse.py (for a "
                     "small local run, override fields: --config.train.batch_size=4 ...).")
  return unconditional_64_config("sky_timelapse/64", frame_stride=1)
