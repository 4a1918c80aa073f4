"""TaiChi-HD, unconditional: 16 frames at 64x64, λ = 0.5, frame stride 4 as in DIGAN."""
from videofusion_jax.config import base_config, unet_config


def get_config():
  c = base_config()
  c.data.update(name="taichi/64", num_frames=16, frame_stride=4, image_size=64, num_classes=0)
  c.model.base = unet_config(base_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                             attention_resolutions=(16, 8))
  c.model.residual = unet_config(base_channels=96, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                                 attention_resolutions=(8,))
  c.train.update(batch_size=128, label_dropout=0.0)
  return c
