"""WebVid-10M text-to-video as in the paper: 16 frames at 64x64, λ = 0.5, both generators conditioned
on the CLIP image embedding of the key (middle) frame, and a prior from the caption's CLIP text
embedding to that image embedding (DALL-E 2's prior), with classifier-free guidance on both stages.

python -m videofusion_jax.main --config=configs/webvid.py --workdir=W \\
    --config.data.manual_dir=/data/webvid --config.model.encoder.clip_dir=/data/clip-vit-base-patch32
python -m videofusion_jax.main --config=configs/webvid.py --workdir=W --mode=sample \\
    --config.model.encoder.clip_dir=/data/clip-vit-base-patch32 --config.sample.prompt="a dog runs on a beach"

``clip_dir``: a local Hugging Face CLIPModel directory (ViT-B/32: embed_dim 512); without one the
project's own small CLIP is used (trained on the dataset's first 2,000 videos and their captions:
for trying the pipeline, not for results). The frame and caption embeddings are computed once and
stored beside the dataset (``--mode=embed`` does it before a multi-host run). ``:small`` for a
local check. The model sizes and the base's pretraining differ from the paper's as
``unconditional_64_config`` says (videofusion_jax/config.py).
"""
from videofusion_jax.config import unconditional_64_config


def get_config(variant: str = ""):
  if variant not in ("", "small"):
    raise ValueError(f"unknown webvid variant {variant!r}; use '' or 'small'.")
  c = unconditional_64_config("webvid/64", frame_stride=2)
  c.model.condition = "embedding"
  c.model.encoder.update(kind="clip", clip_dir="", embed_dim=512)
  c.model.prior.update(condition="text", width=1024, num_layers=6)
  # Guidance on both stages: the prior on the text, the generators on c.
  c.sample.update(prior_guidance_scale=2.0, guidance_scale=2.0)
  if variant == "small":
    c.model.encoder.embed_dim = 64
    c.model.base.update(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    c.model.residual.update(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    c.model.prior.update(width=128, num_layers=2)
    c.train.update(batch_size=4, num_steps=100, log_every=10, warmup_steps=10)
  return c
