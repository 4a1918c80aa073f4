"""Sky Time-lapse, unconditional: 16 frames at 64x64, λ = 0.5."""
from videofusion_jax.config import unconditional_64_config


def get_config():
  return unconditional_64_config("sky_timelapse/64", frame_stride=1)
