"""UCF101 as in the paper: 16 frames at 64x64, λ = 0.5, class-conditional (101), T = 1000.

Model sizes are for a pod: base 491M and residual 92M parameters (the paper's are ~2B and ~0.5B, the base
pretrained; the ratio, 5.3x, near the paper's ~4x). Pass ``:small`` for a local check.
``:vdm`` is VDM*, the paper's baseline: the same base U-Net made space-time (a temporal attention
after each spatial one) on every frame, with independent noise (λ = 0); ``:vdm_small`` both.

Where it differs from the paper: the paper fine-tunes a pretrained base (DALL-E 2's decoder) at a small
learning rate, which ``train.base_lr_scale=0.1`` assumes: train the image stage first
(``--config.train.stage=image`` in a workdir of its own), then this config with
``--config.train.init_base_from=THAT_WORKDIR`` (from scratch it prints a warning saying so). The key-frame
embedding c is the learned encoder's (``--config.model.encoder.kind=clip`` with a CLIP directory gives the
paper's CLIP image embedding), and there is no super-resolution stage: samples and FVD are at 64x64 (the
paper's UCF101 figures are at 128x128).
"""
from videofusion_jax.config import base_config, unet_config


def get_config(variant: str = ""):
  if variant not in ("", "small", "vdm", "vdm_small"):
    raise ValueError(f"unknown ucf101 variant {variant!r}; use '', 'small', 'vdm' or 'vdm_small'.")
  c = base_config()
  c.data.update(name="ucf101/64", split="train", num_frames=16, frame_stride=2, image_size=64,
                num_classes=101)
  c.diffusion.update(schedule="linear", num_timesteps=1000, lam=0.5)
  c.model.base = unet_config(base_channels=256, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                             attention_resolutions=(32, 16, 8), dropout=0.1)
  c.model.residual = unet_config(base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                                 attention_resolutions=(16, 8), dropout=0.1)
  c.train.update(batch_size=256, num_steps=400_000, learning_rate=1e-4, base_lr_scale=0.1,
                 warmup_steps=5000)
  c.mesh.update(data=-1, fsdp=1)
  if variant.startswith("vdm"):
    c.model.kind = "vdm"
    c.diffusion.lam = 0.0
  if variant.endswith("small"):
    c.model.base.update(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    c.model.residual.update(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    c.train.update(batch_size=4, num_steps=100, log_every=10, warmup_steps=10)
  return c
