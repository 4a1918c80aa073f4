"""The config schema shared by every ``configs/*.py``, and its validation.

Each ``configs/<name>.py`` starts from ``base_config()`` and overrides what differs; every
field can be overridden on the command line (``--config.train.batch_size=64``).
"""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

import ml_collections

from videofusion_jax.diffusion.samplers import DDIM_SPACINGS, DDPM_VARIANCES, start_signal
from videofusion_jax.diffusion.schedules import SCHEDULE_KINDS
from videofusion_jax.models.factory import DTYPES
from videofusion_jax.models.unet import (
    LOGICAL_AXES,
    REMAT_POLICIES,
    attention_channels,
    attention_heads,
    check_image_size,
)
from videofusion_jax.training.optimizer import MAX_LOSS_SCALE


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and what to do."""


# data.name of the synthetic input: random batches of the config's shapes (``training.step.synthetic_batches``),
# no dataset, no TensorFlow: training and sampling check a machine, a pod's launch or the step's speed before
# the data is ready; evaluation has no real clips to compare with.
SYNTHETIC_DATA = "synthetic"


def unet_config(**overrides) -> ml_collections.ConfigDict:
  """One generator's U-Net. ``head_dim``: channels per attention head (ADM's 64)."""
  # attention_resolutions: feature-map sizes; at base_config's 64x64 these three levels make 64, 32 and 16.
  c = ml_collections.ConfigDict(dict(
      base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
      head_dim=64, dropout=0.0))
  # update() would add a misspelled name as a new field, which no network reads.
  for name in overrides:
    if name not in c:
      raise ConfigError(f"unet_config({name}=...): a U-Net has no field {name!r} (its fields: {', '.join(c.keys())})"
                        f"{_did_you_mean(name, c.keys()) or '.'}")
  c.update(overrides)
  return c


def _did_you_mean(name: str, known, prefix: str = "") -> str:
  """'; did you mean <prefix><the known name nearest to name>?', or '' when none is near."""
  close = difflib.get_close_matches(name, list(known), n=1)
  return f"; did you mean {prefix}{close[0]}?" if close else ""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # XLA's persistent compilation cache, for every mode: a rerun (or a resumed run) loads its
  # compiled step and sampler instead of compiling them again. '' turns it off. On several hosts, a folder
  # every host sees at one path, or a Cloud Storage folder (gs://bucket/path; no size limit, no programs/).
  c.compilation_cache_dir = "~/.cache/videofusion_jax/xla"
  # Its size limit: beyond it the least recently used programs are removed. The limit also turns on
  # JAX's file lock, so that runs sharing the folder never read a program another is still writing.
  # Not applied to a gs:// folder (set the bucket's own rules).
  c.compilation_cache_max_gb = 10.0
  # Keep the traced train step and sampler in the cache's programs/ folder too, so that a rerun
  # skips tracing them (training/program_store.py). Its key holds the package's source files, not
  # functions replaced while the process runs: set False when you do that (in a notebook).
  c.store_programs = True

  c.data = ml_collections.ConfigDict(dict(
      # name: a builder of videofusion_jax.data.builders, '/<stored short side>' optional (ucf101/64); 'synthetic':
      # random batches of these shapes (no dataset; training and sampling only).
      # manual_dir: the raw dataset (read once, on first use, to build the TFDS dataset in data_dir).
      name="demo_clips", data_dir="", manual_dir="", split="train", eval_split="",
      num_frames=16, frame_stride=1, image_size=64, num_classes=0,
      # Training reads each video once and keeps its frames decoded in memory when all of this
      # host's, at image_size in float32, fit in cache_mb MB (the demo's: 1.5 MB); 0: never.
      cache_mb=512.0))

  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear", num_timesteps=1000, lam=0.5))

  c.model = ml_collections.ConfigDict()
  # 'videofusion': the base generator on the key frame and the residual generator on the other
  # frames (decomposed noise). 'vdm': VDM* (the paper's baseline), the base generator's U-Net made
  # space-time (temporal attention over the frames, Ho et al. 2022) run on every frame, trained on
  # independent noise with diffusion.lam = 0 (configs/ucf101.py:vdm); model.residual is not used.
  c.model.kind = "videofusion"
  # VDM*: the feature-map sizes whose blocks are followed by a temporal attention (and the middle
  # one); () puts one after every spatial attention (model.base.attention_resolutions), as VDM.
  c.model.vdm = ml_collections.ConfigDict(dict(temporal_resolutions=()))
  c.model.base = unet_config()
  c.model.residual = unet_config(base_channels=32)
  c.model.dtype = "bfloat16"  # compute
  c.model.param_dtype = "float32"
  c.model.attention_implementation = ""  # '' lets XLA choose; 'cudnn' on GPUs.
  # What both generators are conditioned on. 'embedding' (the paper): c, the embedding of the
  # clip's key frame (the real one in training, the prior's sample at generation), added to the
  # time embedding of each U-Net. 'label': the class label itself, in both (no encoder, no prior).
  c.model.condition = "embedding"
  # The key-frame encoder: 'learned' (trained jointly by the diffusion loss, Diffusion
  # Autoencoders' semantic encoder), 'frozen' (a registered fixed encoder, frozen_name; its
  # width must equal embed_dim) or 'clip' (the paper's: the CLIP image embedding of the key frame,
  # from the Hugging Face CLIPModel directory clip_dir, computed once per dataset and stored beside
  # it, see data/embeddings.py; embed_dim = its projection width). Embeddings have norm √embed_dim.
  c.model.encoder = ml_collections.ConfigDict(dict(
      kind="learned", embed_dim=128, base_channels=64, channel_mult=(1, 2, 2, 4), frozen_name="pixels",
      clip_dir=""))
  # The prior: a diffusion model over c (residual MLP), conditioned ('label') on the class label
  # or on nothing (num_classes = 0), or ('text') on the caption's CLIP text embedding (encoder.kind
  # 'clip'; prompts at generation); trained in the same run on the EMA encoder's embeddings.
  c.model.prior = ml_collections.ConfigDict(dict(
      width=512, num_layers=4, schedule="cosine", num_timesteps=1000, condition="label"))
  # Beyond the paper: the residual generator also reads the base generator's current estimate of
  # the clean key frame (stop-gradient), so that each frame is denoised as a change of it.
  c.model.key_frame_input = False
  # With key_frame_input: the residual generator reads the clean key frame instead of the current
  # estimate (the real one in training; at generation the finished key frame, from a first pass of
  # the key-frame chain, which depends on the base generator and the base noise alone).
  c.model.key_frame_clean = False

  c.train = ml_collections.ConfigDict(dict(
      stage="video",  # 'image': the base generator alone on single frames.
      batch_size=64, num_steps=100_000, learning_rate=1e-4, base_lr_scale=0.1,
      warmup_steps=1000, lr_decay="constant", grad_clip=1.0, weight_decay=0.0, ema_decay=0.9999,
      # label_dropout: the share of examples whose condition (the label, or c) the generators see
      # as the null condition, and whose label the prior sees as the null label (guidance).
      label_dropout=0.1, log_every=50, checkpoint_every=5000, keep_checkpoints=3,
      # (first, last): steps first..last traced with jax.profiler into WORKDIR/profile/process_<i> (each host its
      # own; TensorBoard's Profile tab, or ui.perfetto.dev); () = none. A run's first step holds its compile.
      profile_steps=(),
      prior_repeats=1,  # timesteps at which each key-frame embedding is noised for the prior's loss
      # The generators' timesteps: 'uniform' (independent draws) or 'stratified' (one per stratum of
      # [0, T), Kingma et al. 2021: lower loss variance at small batches). loss_weighting: '' (eq. 12 as
      # written) or 'min_snr' (each example's term weighted by min(SNR_t, min_snr_gamma) / SNR_t).
      timesteps="uniform", loss_weighting="", min_snr_gamma=5.0,
      # residual_frames: beyond the paper, the residual generator's term of eq. 12 on this many of
      # each clip's N-1 non-key frames, drawn anew each step (an unbiased estimate of the term at
      # R/(N-1) of the residual generator's cost); 0: every frame, as eq. 12.
      residual_frames=0,
      init_base_from="", freeze_base=False,
      # Memory switches (they change memory and compute, not the update). remat: rematerialise
      # the U-Nets' blocks in the backward pass ('' off, 'block', 'block_dots': models.unet.
      # REMAT_POLICIES). grad_accum_steps: the batch is split into this many micro-batches, run one
      # after the other with their gradients summed, and one optimizer update is made (the same
      # update as the whole batch at once, at the memory of one micro-batch; with model dropout > 0
      # the same in distribution: each micro-batch draws its own dropout masks).
      remat="", grad_accum_steps=1,
      # float16 (model.dtype) only: the dynamic loss scale's start, and the updates in a row without
      # overflow after which it doubles (it halves at each overflow, whose update is skipped).
      loss_scale_initial=2.0 ** 15, loss_scale_period=2000))

  c.sample = ml_collections.ConfigDict(dict(
      method="ddim", num_steps=100, eta=0.0, clip_x0=True, num_samples=16, batch_size=16,
      # DDIM timesteps: 'leading' (980 ... 0 for T=1000, 50 steps) or 'trailing' (999 ... 19, starts
      # at T-1); DDPM's σ_t²: 'fixed_small' (posterior variance) or 'fixed_large' (β_t).
      spacing="leading", variance="fixed_small",
      seed=0, label=-1,  # -1: cycle through the classes
      # num_real_clips: the real clips that the demo's figures (data.name 'demo_clips' only: sampling's
      # _demo_figures) compare the samples with; no other dataset reads it.
      guidance_scale=1.0, fps=8, upscale=4, num_real_clips=192,
      # model.condition='embedding': the prior's DDIM sampler (its timesteps' spacing as above), its
      # guidance on the label, and embeddings: a .npy of given c, (num_samples, embed_dim) or
      # (embed_dim,), or a samples.npz, instead of the prior.
      prior_num_steps=64, prior_spacing="leading", prior_eta=1.0, prior_guidance_scale=1.0, embeddings="",
      # model.prior.condition='text': the prompt, or a file of prompts (one a line); the samples take
      # them in turn. prior_guidance_scale then guides the prior on the text.
      prompt="", prompts_file=""))
  # Long videos and control (--mode=sample). num_clips: clips per video, sharing b_T and c (the
  # paper's long videos), each with fresh residual noise; continuity_frames: beyond the paper, the
  # first m frames of each later clip are pulled toward the last frame of the clip before (0: off;
  # m <= N//2 keeps the key frame free); control: '' new videos, 'content' one b_T and c with a
  # residual noise per video, 'motion' one residual noise with a b_T and c per video.
  c.sample.update(num_clips=1, continuity_frames=0, control="")

  # --mode=eval: StyleGAN-V's fvd2048_16f protocol by default (2048 real, 2048 generated clips).
  c.eval = ml_collections.ConfigDict(dict(
      num_real=2048, num_generated=2048, split="",  # '' = data.eval_split, else data.split
      batch_size=8,  # I3D / C3D batch
      kvd_subsets=100, kvd_subset_size=1000, seed=0,
      c3d_weights=""))  # conv3d_deepnetA_ucf.npz, for the UCF101 Inception Score

  # Mesh axes (data parallel, fully sharded data parallel) and the rule table that maps
  # the U-Net's logical weight axes onto them. -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # Every sharding comes from this table: input batches ('batch'), U-Net activations
  # ('activation_*', constrained inside the step), weights (output channels over fsdp).
  c.sharding_rules = (("batch", ("data", "fsdp")), ("activation_batch", ("data", "fsdp")),
                      ("channels_out", "fsdp"), ("channels_in", None), ("vocab", None), ("norm", None))
  return c


def unconditional_64_config(name: str, frame_stride: int) -> ml_collections.ConfigDict:
  """The unconditional 16 x 64x64 setting shared by Sky Time-lapse and TaiChi-HD (λ = 0.5), WebVid's base.

  Where it differs from the paper: base 272M and residual 50M parameters (the paper's ~2B and ~0.5B), and
  no pretrained base, which ``train.base_lr_scale=0.1`` assumes: train the image stage first
  (``--config.train.stage=image``), then pass ``--config.train.init_base_from=THAT_WORKDIR`` (from scratch
  the run warns); the key-frame encoder is the learned one, not CLIP's (as ``configs/ucf101.py`` says)."""
  c = base_config()
  c.data.update(name=name, num_frames=16, frame_stride=frame_stride, image_size=64, num_classes=0)
  c.model.base = unet_config(base_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                             attention_resolutions=(16, 8))
  c.model.residual = unet_config(base_channels=96, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                                 attention_resolutions=(8,))
  c.train.update(batch_size=128)
  return c


def _check_cudnn_attention(config: ml_collections.ConfigDict) -> None:
  """cuDNN's fused attention runs on NVIDIA GPUs in 16-bit types; elsewhere JAX fails deep in the
  first trace (``cuDNN is not detected``, ``Q must be fp16/bf16``)."""
  import jax  # only here: validating other configs must not start a backend

  fix = "use --config.model.attention_implementation= (XLA's attention) instead"
  if config.model.dtype not in ("bfloat16", "float16"):
    raise ConfigError(f"config.model.attention_implementation='cudnn' with config.model.dtype="
                      f"{config.model.dtype!r}: cuDNN's fused attention takes bfloat16 or float16; set "
                      f"--config.model.dtype=bfloat16, or {fix}.")
  device = jax.devices()[0]
  if device.platform != "gpu" or "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
    raise ConfigError(f"config.model.attention_implementation='cudnn': cuDNN's fused attention needs an NVIDIA GPU "
                      f"and this run's devices are {device.device_kind!r} ({jax.default_backend()}); {fix}.")
  widest = _cudnn_max_head_width(device)
  for width, where in cudnn_head_widths(config):
    if width % 8 or width > widest:
      raise ConfigError(f"config.model.attention_implementation='cudnn': {where} has heads of {width} channels, and "
                        f"cuDNN's fused attention takes widths that are multiples of 8, at most {widest} on this GPU "
                        f"({device.device_kind}); set a head_dim that gives such heads, or {fix}.")


def check_cudnn_training(config: ml_collections.ConfigDict) -> None:
  """What cuDNN's attention takes in training alone (``Trainer``): VDM*'s temporal attention runs over the N
  frames with its relative position bias, and cuDNN's training kernel takes a bias only on sequences of even
  length (JAX refused it inside the first train step's trace); sampling runs at any N."""
  if (config.model.attention_implementation == "cudnn" and config.model.kind == "vdm"
      and config.data.num_frames % 2):
    raise ConfigError(f"config.model.attention_implementation='cudnn' with config.model.kind='vdm' and "
                      f"config.data.num_frames={config.data.num_frames}: cuDNN trains attention with a bias (VDM*'s "
                      "relative positions over the frames) on sequences of even length only; use an even "
                      "data.num_frames, or use --config.model.attention_implementation= (XLA's attention) to train.")


def _cudnn_max_head_width(device) -> int:
  """cuDNN's widest attention head on ``device``: 256 from Hopper (compute capability 9.0) on, else 128."""
  try:
    major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
  except ValueError:
    major = 0
  return 256 if major >= 9 else 128


def cudnn_head_widths(config: ml_collections.ConfigDict) -> list[tuple[int, str]]:
  """``(head width, which attention layer, in words)`` of every attention layer the config's networks build
  (their channels split into heads of ``head_dim``: one head where the channels are fewer)."""
  from videofusion_jax.models.factory import temporal_resolutions

  m, size = config.model, config.data.image_size
  layers = [("base", m.base, m.base.attention_resolutions, "attention")]
  if m.kind == "vdm":
    layers.append(("base", m.base, temporal_resolutions(config), "temporal attention (VDM*)"))
  else:
    layers.append(("residual", m.residual, m.residual.attention_resolutions, "attention"))
  widths = []
  for name, net, resolutions, what in layers:
    for channels in attention_channels(size, net.base_channels, net.channel_mult, resolutions):
      width = channels // attention_heads(channels, net.head_dim)
      widths.append((width, f"the {name} U-Net's {what} over {channels} channels (head_dim={net.head_dim})"))
  return widths


def check_fields(config) -> None:
  """A ConfigError unless ``config`` is a ConfigDict with the fields of ``base_config()``, no more and no fewer:
  what a config file returns is used (its compilation cache) before ``validate`` looks at its values."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"the config file's get_config() returned a {type(config).__name__}, not an "
                      "ml_collections.ConfigDict: start from videofusion_jax.config.base_config() (or a config in "
                      "configs/) and change its fields.")
  _check_field_names(config, base_config())


def _check_field_names(config: ml_collections.ConfigDict, known: ml_collections.ConfigDict, path: str = "config"):
  """A ConfigError for the first field of ``config`` that ``known`` (``base_config()``) lacks: a config file's
  ``c.train.update(warmup_step=5)`` adds it as a new field, which nothing reads, and the real one keeps its
  default. Likewise for a field of ``known`` that ``config`` lacks (a section built by hand)."""
  for name, value in known.items():
    if name not in config:
      build = " (build it with unet_config(...))" if path in ("config.model.base", "config.model.residual") else ""
      raise ConfigError(f"{path} has no field {name!r}{build}: a config sets the fields of base_config() (or of a "
                        f"config in configs/), not a section of its own; set {path}.{name}, or keep that section "
                        "of base_config() and change its fields.")
    if isinstance(value, ml_collections.ConfigDict) and not isinstance(config[name], ml_collections.ConfigDict):
      raise ConfigError(f"{path}.{name}={config[name]!r}: a section of fields, not a value (set its fields, e.g. "
                        f"{path}.{name}.{next(iter(value.keys()), 'x')}=...).")
    if value is not None and config[name] is None:  # a config file's None (the command line refuses one)
      raise ConfigError(f"{path}.{name}=None: give it a value (base_config()'s is {value!r}"
                        + ("; '' leaves it unset)." if value == "" else ")."))
  for name, value in config.items():
    if name not in known:
      shown = "" if isinstance(value, ml_collections.ConfigDict) else f"={value!r}"
      raise ConfigError(f"{path}.{name}{shown}: the config has no such field, so nothing would read it and the "
                        "field meant would keep its default. Fix the name where it is set (the config file, or the "
                        f"code that built the config){_did_you_mean(name, known.keys(), f'{path}.') or '.'}")
    if isinstance(value, ml_collections.ConfigDict) and isinstance(known[name], ml_collections.ConfigDict):
      _check_field_names(value, known[name], f"{path}.{name}")


MESH_AXES = ("data", "fsdp")  # the mesh's axes (training.sharding), in its order


def _check_sharding_rules(rules) -> None:
  """``config.sharding_rules``: (logical axis, mesh axes) pairs, each logical axis one the networks name and
  each mesh axis the mesh's (a misspelled logical name left its weights unsharded without a word; a misspelled
  mesh axis failed in the first trace)."""
  example = "e.g. (('batch', ('data', 'fsdp')), ('channels_out', 'fsdp'), ('norm', None))"
  if not (isinstance(rules, (tuple, list)) and all(isinstance(r, (tuple, list)) and len(r) == 2
                                                   and isinstance(r[0], str) for r in rules)):
    raise ConfigError(f"config.sharding_rules={rules!r}: a table of (logical axis, mesh axes) pairs, {example}.")
  for name, axes in rules:
    if name not in LOGICAL_AXES:
      raise ConfigError(f"config.sharding_rules: ({name!r}, {axes!r}) maps no axis the networks name, so it would "
                        f"shard nothing{_did_you_mean(name, LOGICAL_AXES) or '.'} The logical axes: "
                        f"{', '.join(LOGICAL_AXES)}.")
    mesh = axes if isinstance(axes, (tuple, list)) else (axes,)
    unknown = [a for a in mesh if a is not None and a not in MESH_AXES]
    if unknown:
      raise ConfigError(f"config.sharding_rules: ({name!r}, {axes!r}) names {', '.join(map(repr, unknown))}, not "
                        f"an axis of the mesh ({', '.join(MESH_AXES)}; None: not split).")
  batch = next((axes for name, axes in rules if name == "batch"), None)  # Flax takes a name's first rule
  if all(a is None for a in (batch if isinstance(batch, (tuple, list)) else (batch,))):
    # Correct, and silently as slow as one device: every device would run the whole batch.
    raise ConfigError(f"config.sharding_rules splits the 'batch' axis over no mesh axis ({batch!r}): every device "
                      "would compute the whole batch, as slow on N devices as on one; map 'batch' to ('data', "
                      "'fsdp') (its first rule is the one used).")


# JAX's random keys take 32 bits of a seed (2**32 + s gives seed s's numbers); NumPy's refuses negative ones.
MAX_SEED = 2**32 - 1


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field and how to fix it."""
  check_fields(config)
  _check_sharding_rules(config.sharding_rules)
  for field in ("seed", "sample.seed", "eval.seed"):
    seed = field_or_none(config, field)
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
      raise ConfigError(f"config.{field}={seed!r}: a random seed must be an integer in [0, {MAX_SEED}] (JAX's "
                        "keys keep its low 32 bits, so a larger one repeats a smaller one's numbers, and NumPy's "
                        "generator, which evaluation's KVD subsets use, takes no negative one).")
  cache_gb = config.compilation_cache_max_gb
  if config.compilation_cache_dir and not (_is_number(cache_gb) and math.isfinite(cache_gb) and cache_gb > 0):
    raise ConfigError(f"config.compilation_cache_max_gb={cache_gb!r}: the persistent compilation cache's size "
                      "limit in GiB must be a finite number > 0 (config.compilation_cache_dir='' turns the cache "
                      "off).")
  d, t = config.data, config.train
  if not _is_int(d.num_frames) or d.num_frames < 2:
    raise ConfigError(f"config.data.num_frames={d.num_frames!r}: VideoFusion needs at least 2 "
                      "frames (a key frame and one other).")
  if not 0.0 <= float(config.diffusion.lam) <= 1.0:
    raise ConfigError(f"config.diffusion.lam={config.diffusion.lam!r}: λ is the base-noise share "
                      "and must lie in [0, 1] (0 = independent noise, the paper uses 0.5).")
  if config.diffusion.schedule not in SCHEDULE_KINDS:
    raise ConfigError(f"config.diffusion.schedule={config.diffusion.schedule!r}: use one of "
                      f"{SCHEDULE_KINDS}.")
  _check_num_timesteps("config.diffusion", config.diffusion.num_timesteps)
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: the networks' compute type; use one of "
                      f"{tuple(DTYPES)} (the parameters stay float32).")
  if config.model.param_dtype != "float32":
    raise ConfigError(f"config.model.param_dtype={config.model.param_dtype!r}: the parameters must be float32. In "
                      "bfloat16 the EMA's decay (0.999, 0.9999) and Adam's b2 round to 1 (in float16, 0.9999 "
                      "does), so the EMA weights that sampling uses and Adam's second moment stop moving, without an "
                      "error. For less memory compute in bfloat16 (--config.model.dtype=bfloat16) or split the state "
                      "over devices (--config.mesh.fsdp).")
  if config.model.attention_implementation not in ("", "xla", "cudnn"):
    raise ConfigError(f"config.model.attention_implementation={config.model.attention_implementation!r}: use '' "
                      "(XLA chooses), 'xla' or 'cudnn' (fused attention on NVIDIA GPUs).")
  if d.frame_stride < 1:
    raise ConfigError(f"config.data.frame_stride={d.frame_stride}: must be >= 1.")
  if not _is_int(d.num_classes) or d.num_classes < 0:
    raise ConfigError(f"config.data.num_classes={d.num_classes!r}: the dataset's class count, an integer >= 0 "
                      "(0: unconditional).")
  for name in ("base", "residual"):
    mult = config.model[name].channel_mult
    if not mult or not all(_is_int(x) and x >= 1 for x in mult):
      raise ConfigError(f"config.model.{name}.channel_mult={mult!r}: one positive integer per resolution level, "
                        "e.g. (1, 2, 4).")
  for axis in ("data", "fsdp"):
    n = config.mesh[axis]
    if not _is_int(n) or not (n == -1 or n >= 1):
      raise ConfigError(f"config.mesh.{axis}={n!r}: the devices along the mesh's {axis!r} axis, an integer >= 1, "
                        "or -1 for the devices the other axis leaves.")
  if config.mesh.data == config.mesh.fsdp == -1:
    raise ConfigError("config.mesh.data and config.mesh.fsdp are both -1: give one of them (-1 takes the rest).")
  if not d.cache_mb >= 0:
    raise ConfigError(f"config.data.cache_mb={d.cache_mb}: the MB of decoded frames to keep in memory; "
                      "must be >= 0 (0: decode every clip as it is read).")
  for name in ("base",) if config.model.kind == "vdm" else ("base", "residual"):  # VDM* builds no residual
    m = config.model[name]
    for field in ("base_channels", "num_res_blocks", "head_dim"):
      if not _is_int(m[field]) or m[field] < 1:
        raise ConfigError(f"config.model.{name}.{field}={m[field]!r}: must be an integer >= 1.")
    # Dropout of rate 1 zeroes every activation in training, and a negative one scales them up.
    if not (_is_number(m.dropout) and 0.0 <= m.dropout < 1.0):
      raise ConfigError(f"config.model.{name}.dropout={m.dropout!r}: the share of activations dropped in training "
                        "must lie in [0, 1) (0 = none; ADM uses 0.1).")
    try:
      check_image_size(d.image_size, m.channel_mult)
    except ValueError as e:
      raise ConfigError(f"config.data.image_size / config.model.{name}.channel_mult: {e}") from None
    # The U-Net puts attention where a feature map's size is listed: a size it never makes would get none.
    sizes = [d.image_size // 2 ** level for level in range(len(m.channel_mult))]
    bad = [r for r in m.attention_resolutions if r not in sizes]
    if bad:
      raise ConfigError(f"config.model.{name}.attention_resolutions={tuple(m.attention_resolutions)}: at "
                        f"config.data.image_size={d.image_size} the U-Net's feature maps have the sizes {sizes}, so "
                        f"{bad} would get no attention; list sizes among {sizes} (() for the middle attention alone).")
    try:
      for channels in attention_channels(d.image_size, m.base_channels, m.channel_mult, m.attention_resolutions):
        attention_heads(channels, m.head_dim)
    except ValueError as e:
      raise ConfigError(f"config.model.{name}.head_dim={m.head_dim}: {e}") from None
  m = config.model
  if m.kind not in ("videofusion", "vdm"):
    raise ConfigError(f"config.model.kind={m.kind!r}: use 'videofusion' (base + residual generators) or "
                      "'vdm' (VDM*, one space-time U-Net on every frame).")
  if m.kind == "vdm":
    from videofusion_jax.models.factory import temporal_resolutions
    for field, on in (("model.key_frame_input", m.key_frame_input), ("model.key_frame_clean", m.key_frame_clean),
                      ("train.freeze_base", t.freeze_base)):
      if on:
        raise ConfigError(f"config.{field}=True belongs to VideoFusion's base and residual generators; VDM* "
                          f"(config.model.kind='vdm') has one network: set --config.{field}=False.")
    if float(config.diffusion.lam) != 0.0:
      raise ConfigError(f"config.diffusion.lam={config.diffusion.lam}: VDM* is trained and sampled on independent "
                        "per-frame noise; set --config.diffusion.lam=0 (configs/ucf101.py:vdm and "
                        "configs/demo.py:vdm do).")
    if t.stage != "video":
      raise ConfigError(f"config.train.stage={t.stage!r}: VDM* trains on videos only. To start it from an "
                        "image model, train VideoFusion's image stage and pass its workdir as "
                        "--config.train.init_base_from (its base fills VDM*'s spatial layers).")
    b = m.base
    sizes = [d.image_size // 2 ** level for level in range(len(b.channel_mult))]
    bad = [r for r in temporal_resolutions(config) if r not in sizes]
    if bad:
      raise ConfigError(f"config.model.vdm.temporal_resolutions={tuple(m.vdm.temporal_resolutions)}: the U-Net's "
                        f"feature maps have the sizes {sizes}, so {bad} would get no temporal attention.")
    try:
      for channels in attention_channels(d.image_size, b.base_channels, b.channel_mult, temporal_resolutions(config)):
        attention_heads(channels, b.head_dim)
    except ValueError as e:
      raise ConfigError(f"config.model.base.head_dim={b.head_dim} (VDM*'s temporal attention): {e}") from None
  if config.model.attention_implementation == "cudnn":  # after the heads' checks: its own are of their widths
    _check_cudnn_attention(config)
  if m.condition not in ("embedding", "label"):
    raise ConfigError(f"config.model.condition={m.condition!r}: use 'embedding' (the key-frame embedding c, "
                      "sampled by the prior, as the paper does) or 'label' (the class label in both generators).")
  if m.condition == "label" and config.sample.embeddings:
    raise ConfigError(f"config.sample.embeddings={config.sample.embeddings!r}: a given embedding needs "
                      "config.model.condition='embedding'; this model is conditioned on the label.")
  if m.condition == "embedding":
    if m.encoder.embed_dim < 1:
      raise ConfigError(f"config.model.encoder.embed_dim={m.encoder.embed_dim}: must be >= 1.")
    if m.encoder.kind == "learned":
      enc = m.encoder
      if not _is_int(enc.base_channels) or enc.base_channels < 1:
        raise ConfigError(f"config.model.encoder.base_channels={enc.base_channels!r}: the learned encoder's width; "
                          "must be an integer >= 1.")
      if not enc.channel_mult or not all(_is_int(x) and x >= 1 for x in enc.channel_mult):
        raise ConfigError(f"config.model.encoder.channel_mult={enc.channel_mult!r}: one positive integer per level of "
                          "the learned encoder, e.g. (1, 2, 2, 4).")
    if m.encoder.kind == "frozen":
      from videofusion_jax.models.encoder import frozen_encoder
      try:
        _, width = frozen_encoder(m.encoder.frozen_name, d.image_size)
      except ValueError as e:
        raise ConfigError(f"config.model.encoder.frozen_name={m.encoder.frozen_name!r}: {e}") from None
      if width != m.encoder.embed_dim:
        raise ConfigError(f"config.model.encoder.embed_dim={m.encoder.embed_dim}: the frozen encoder "
                          f"{m.encoder.frozen_name!r} gives embeddings of width {width}; set "
                          f"--config.model.encoder.embed_dim={width}.")
    elif m.encoder.kind == "clip":
      _check_clip_encoder(m.encoder)
    elif m.encoder.kind != "learned":
      raise ConfigError(f"config.model.encoder.kind={m.encoder.kind!r}: use 'learned', 'frozen' or 'clip'.")
    if m.prior.condition not in ("label", "text"):
      raise ConfigError(f"config.model.prior.condition={m.prior.condition!r}: use 'label' (the class label, or "
                        "nothing when data.num_classes = 0) or 'text' (the caption's CLIP text embedding).")
    if m.prior.condition == "text" and m.encoder.kind != "clip":
      raise ConfigError("config.model.prior.condition='text' maps CLIP text embeddings to CLIP image embeddings: "
                        f"set --config.model.encoder.kind=clip (it is {m.encoder.kind!r}).")
    if m.prior.schedule not in SCHEDULE_KINDS:
      raise ConfigError(f"config.model.prior.schedule={m.prior.schedule!r}: use one of {SCHEDULE_KINDS}.")
    _check_num_timesteps("config.model.prior", m.prior.num_timesteps)
    if m.prior.width < 1 or m.prior.num_layers < 1:
      raise ConfigError(f"config.model.prior.width={m.prior.width} / num_layers={m.prior.num_layers}: "
                        "must be >= 1.")
    if t.prior_repeats < 1:
      raise ConfigError(f"config.train.prior_repeats={t.prior_repeats}: must be >= 1.")
    if config.sample.prior_guidance_scale < 0:
      raise ConfigError(f"config.sample.prior_guidance_scale={config.sample.prior_guidance_scale}: must be "
                        ">= 0 (1 = no guidance on the prior's label).")
    if not 1 <= config.sample.prior_num_steps <= m.prior.num_timesteps:
      raise ConfigError(f"config.sample.prior_num_steps={config.sample.prior_num_steps}: must lie in "
                        f"[1, {m.prior.num_timesteps}] (the prior's DDIM steps).")
  if m.key_frame_clean and not m.key_frame_input:
    raise ConfigError("config.model.key_frame_clean=True chooses what model.key_frame_input feeds the residual "
                      "generator: set --config.model.key_frame_input=True as well.")
  if t.stage not in ("video", "image"):
    raise ConfigError(f"config.train.stage={t.stage!r}: use 'video' or 'image'.")
  if t.timesteps not in ("uniform", "stratified"):
    raise ConfigError(f"config.train.timesteps={t.timesteps!r}: use 'uniform' or 'stratified' (one timestep per "
                      "stratum of [0, T) in each batch).")
  if t.loss_weighting not in ("", "min_snr"):
    raise ConfigError(f"config.train.loss_weighting={t.loss_weighting!r}: use '' (eq. 12 unweighted) or 'min_snr'.")
  if t.loss_weighting == "min_snr" and not t.min_snr_gamma > 0:
    raise ConfigError(f"config.train.min_snr_gamma={t.min_snr_gamma}: must be > 0 (the cap on SNR_t in the "
                      "min-SNR weights; Hang et al. use 5).")
  r = t.residual_frames
  if not _is_int(r) or not 0 <= r <= d.num_frames - 1:
    raise ConfigError(f"config.train.residual_frames={r!r}: must be an integer in [0, {d.num_frames - 1}] (how many "
                      f"of the {d.num_frames - 1} non-key frames of each clip train the residual generator per "
                      "step; 0 = all of them).")
  if r and m.kind == "vdm":
    raise ConfigError(f"config.train.residual_frames={r} belongs to VideoFusion's residual generator; VDM* "
                      "(config.model.kind='vdm') trains one network on every frame: set "
                      "--config.train.residual_frames=0.")
  for field in ("batch_size", "num_steps"):
    if t[field] < 1:
      raise ConfigError(f"config.train.{field}={t[field]}: must be >= 1.")
  for field, what in (("log_every", "steps between log lines"), ("checkpoint_every", "steps between checkpoints"),
                      ("keep_checkpoints", "checkpoints kept on disk, the newest; older ones are deleted")):
    if not _is_int(t[field]) or t[field] < 1:
      raise ConfigError(f"config.train.{field}={t[field]!r}: the {what}; must be an integer >= 1.")
  p = t.profile_steps
  if not (isinstance(p, (tuple, list)) and (len(p) == 0 or (len(p) == 2 and all(_is_int(x) for x in p)
                                                             and 1 <= p[0] <= p[1]))):
    raise ConfigError(f"config.train.profile_steps={p!r}: the steps to trace with jax.profiler, as (first, last) "
                      "with 1 <= first <= last, e.g. --config.train.profile_steps='(100, 105)'; () = none.")
  if not 0.0 <= float(t.label_dropout) < 1.0:
    raise ConfigError(f"config.train.label_dropout={t.label_dropout!r}: the share of examples trained on the null "
                      "condition; must lie in [0, 1) (0.1 is usual; guidance needs it > 0). At 1 no example sees its "
                      "condition, and the label embeddings or the key-frame encoder never train: for an "
                      "unconditional model set data.num_classes=0 with model.condition='label'.")
  for field in ("learning_rate", "weight_decay"):
    if not (math.isfinite(float(t[field])) and t[field] >= 0):
      raise ConfigError(f"config.train.{field}={t[field]!r}: must be a finite number >= 0.")
  if t.lr_decay not in ("constant", "cosine"):
    raise ConfigError(f"config.train.lr_decay={t.lr_decay!r}: use 'constant' or 'cosine'.")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ConfigError(f"config.train.ema_decay={t.ema_decay}: must lie in [0, 1).")
  if not _is_int(t.warmup_steps) or t.warmup_steps < 0:
    raise ConfigError(f"config.train.warmup_steps={t.warmup_steps!r}: the steps of the learning rate's linear "
                      "warm-up from 0; must be an integer >= 0 (0 = none).")
  if t.stage == "image" and t.freeze_base:
    raise ConfigError("config.train.freeze_base=True with config.train.stage='image': the image stage trains the "
                      "base generator, which freeze_base would leave untrained; set --config.train.freeze_base="
                      "False, or train the video stage (--config.train.stage=video).")
  if not (math.isfinite(float(t.base_lr_scale)) and t.base_lr_scale >= 0):
    raise ConfigError(f"config.train.base_lr_scale={t.base_lr_scale}: must be a finite number >= 0 (the base "
                      "generator's learning rate is learning_rate x base_lr_scale in the video stage).")
  if t.remat not in REMAT_POLICIES:
    raise ConfigError(f"config.train.remat={t.remat!r}: use '' (off), 'block' (recompute each U-Net block in the "
                      "backward pass: least memory) or 'block_dots' (keep each block's convolution and matmul "
                      "outputs, recompute the rest).")
  k = t.grad_accum_steps
  if not _is_int(k) or k < 1:
    raise ConfigError(f"config.train.grad_accum_steps={k!r}: must be an integer >= 1 (1 = no accumulation).")
  if t.batch_size % k:
    raise ConfigError(f"config.train.batch_size={t.batch_size} does not split into grad_accum_steps={k} "
                      f"micro-batches; use a batch size that is a multiple of {k}, or another grad_accum_steps.")
  if not (math.isfinite(float(t.loss_scale_initial)) and 1 <= t.loss_scale_initial <= MAX_LOSS_SCALE):
    # Above the bound float32 (the scale's type) would round it to inf: every update skipped, the scale stuck.
    raise ConfigError(f"config.train.loss_scale_initial={t.loss_scale_initial!r}: float16 training's first loss "
                      "scale; must be a finite number in [1, 2**64] (a power of 2 keeps the scaling exact; 32768 is "
                      "usual).")
  if not _is_int(t.loss_scale_period) or t.loss_scale_period < 1:
    raise ConfigError(f"config.train.loss_scale_period={t.loss_scale_period!r}: the updates without overflow after "
                      "which float16 training doubles its loss scale; must be an integer >= 1 (2000 is usual).")
  if not (math.isfinite(float(t.grad_clip)) and t.grad_clip > 0):
    raise ConfigError(f"config.train.grad_clip={t.grad_clip}: must be a finite number > 0 (each network's "
                      "gradient is clipped to this global norm on its own: each generator's, the learned encoder's "
                      "and the prior's).")
  s, e = config.sample, config.eval
  if s.guidance_scale < 0:
    raise ConfigError(f"config.sample.guidance_scale={s.guidance_scale}: must be >= 0 (1 = no guidance, "
                      "0 = the null condition alone, > 1 = stronger conditioning).")
  if s.label != -1 and not (d.num_classes and 0 <= s.label < d.num_classes):
    raise ConfigError(f"config.sample.label={s.label}: use -1 (every class in turn)"
                      + (f" or a class in [0, {d.num_classes})." if d.num_classes else
                         "; this config is unconditional (config.data.num_classes=0)."))
  if s.num_samples < 1 or s.batch_size < 1:
    raise ConfigError(f"config.sample.num_samples={s.num_samples} / batch_size={s.batch_size}: must be >= 1.")
  if s.num_clips < 1:
    raise ConfigError(f"config.sample.num_clips={s.num_clips}: must be >= 1 (clips per video; 1 = one clip of "
                      f"config.data.num_frames={d.num_frames} frames).")
  key = d.num_frames // 2
  if not 0 <= s.continuity_frames <= key:
    raise ConfigError(f"config.sample.continuity_frames={s.continuity_frames}: must lie in [0, {key}] (the frames "
                      f"before the key frame {key}, which the clips of a long video share; 0 = off).")
  if (s.prompt or s.prompts_file) and not (m.condition == "embedding" and m.prior.condition == "text"):
    raise ConfigError("config.sample.prompt / prompts_file: this model does not generate from text (its prior is "
                      "not on text: model.prior.condition='text' with model.encoder.kind='clip' is).")
  if m.encoder.clip_dir and clip_used(config) is None:  # else a run on another encoder, recording the CLIP as used
    now = (f"model.encoder.kind={m.encoder.kind!r}" if m.condition == "embedding" else
           "model.condition='label': no encoder")
    raise ConfigError(f"config.model.encoder.clip_dir={m.encoder.clip_dir!r} is read by a CLIP key-frame encoder "
                      f"alone ({now}): add --config.model.encoder.kind=clip (with model.condition='embedding'), or "
                      "leave clip_dir empty.")
  if s.control not in ("", "content", "motion"):
    raise ConfigError(f"config.sample.control={s.control!r}: use '' (new videos), 'content' (one content, a "
                      "motion per video) or 'motion' (one motion, a content per video).")
  if e.num_real < 2 or e.num_generated < 2:
    raise ConfigError(f"config.eval.num_real={e.num_real} / num_generated={e.num_generated}: FVD needs at least "
                      "2 clips on each side (the protocol uses 2048).")
  if e.batch_size < 1 or e.kvd_subsets < 1 or e.kvd_subset_size < 2:
    raise ConfigError(f"config.eval.batch_size={e.batch_size}, kvd_subsets={e.kvd_subsets}, kvd_subset_size="
                      f"{e.kvd_subset_size}: need batch_size >= 1, kvd_subsets >= 1 and kvd_subset_size >= 2.")
  if e.c3d_weights and d.num_frames != 16:
    raise ConfigError(f"config.eval.c3d_weights: the C3D Inception Score takes 16-frame clips; this config "
                      f"makes {d.num_frames} (config.data.num_frames).")
  if config.sample.method not in ("ddim", "ddpm"):
    raise ConfigError(f"config.sample.method={config.sample.method!r}: use 'ddim' or 'ddpm'.")
  for field in ("spacing", "prior_spacing"):
    if config.sample[field] not in DDIM_SPACINGS:
      raise ConfigError(f"config.sample.{field}={config.sample[field]!r}: the DDIM timestep spacing; use "
                        "'leading' (multiples of T // num_steps, ending at 0) or 'trailing' (starting at T-1).")
  if config.sample.variance not in DDPM_VARIANCES:
    raise ConfigError(f"config.sample.variance={config.sample.variance!r}: DDPM's σ_t²; use 'fixed_small' "
                      "(β_t (1-ᾱ_{t-1})/(1-ᾱ_t)) or 'fixed_large' (β_t).")
  if not 1 <= config.sample.num_steps <= config.diffusion.num_timesteps:
    raise ConfigError(f"config.sample.num_steps={config.sample.num_steps}: must lie in "
                      f"[1, {config.diffusion.num_timesteps}].")
  for field in ("eta", "prior_eta"):
    if not 0.0 <= float(s[field]) <= 1.0:  # NaN fails too
      raise ConfigError(f"config.sample.{field}={s[field]!r}: DDIM's η must lie in [0, 1] (0 = deterministic, "
                        "1 = DDPM-like noise).")
  for field in ("guidance_scale", "prior_guidance_scale"):
    if not math.isfinite(float(s[field])):
      raise ConfigError(f"config.sample.{field}={s[field]!r}: must be a finite number >= 0.")
  # Guidance mixes a conditional and a null estimate: a model on nothing has no condition to guide by.
  if s.guidance_scale != 1.0 and m.condition == "label" and not d.num_classes:
    raise ConfigError(f"config.sample.guidance_scale={s.guidance_scale}: this model is unconditional "
                      "(model.condition='label' with data.num_classes=0), so there is nothing to guide; leave it at 1.")
  if s.prior_guidance_scale != 1.0 and prior_samples(config) and m.prior.condition == "label" and not d.num_classes:
    raise ConfigError(f"config.sample.prior_guidance_scale={s.prior_guidance_scale}: this prior is on nothing "
                      "(data.num_classes=0, no text), so there is nothing to guide it by; leave it at 1.")
  for field in ("fps", "upscale", "num_real_clips"):
    if not _is_int(s[field]) or s[field] < 1:
      raise ConfigError(f"config.sample.{field}={s[field]!r}: must be an integer >= 1.")
  if s.method == "ddim":
    _check_chain_start(f"config.sample.num_steps={s.num_steps} with config.sample.spacing={s.spacing!r}",
                       config.diffusion.schedule, config.diffusion.num_timesteps, s.num_steps, s.spacing,
                       "--config.sample.spacing=trailing (it starts at T-1) or another num_steps")
  if prior_samples(config):
    _check_chain_start(f"config.sample.prior_num_steps={s.prior_num_steps} with config.sample.prior_spacing="
                       f"{s.prior_spacing!r}", m.prior.schedule, m.prior.num_timesteps, s.prior_num_steps,
                       s.prior_spacing, "--config.sample.prior_spacing=trailing or another prior_num_steps")


def prior_samples(config: ml_collections.ConfigDict) -> bool:
  """Whether sampling draws the key-frame embedding from the prior (the embedding condition, no
  ``sample.embeddings`` given)."""
  return config.model.condition == "embedding" and not config.sample.embeddings


def text_prior(config: ml_collections.ConfigDict) -> bool:
  """Whether the model generates from text (its prior maps a caption's CLIP text embedding to c)."""
  return config.model.condition == "embedding" and config.model.prior.condition == "text"


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


MAX_START_SIGNAL = 0.1  # how much more of the signal (√ᾱ) a DDIM chain's first step may assume than t = T-1
MAX_END_SIGNAL = 0.1  # how much of the signal (√ᾱ) t = T-1 may hold: sampling starts there from pure noise


def _check_num_timesteps(where: str, num_timesteps) -> None:
  """``num_timesteps`` an integer >= 2 (a schedule's betas need two; how much signal its last step leaves is
  ``schedule_end_problem``'s, which only a new training run refuses)."""
  if not _is_int(num_timesteps) or num_timesteps < 2:
    raise ConfigError(f"{where}.num_timesteps={num_timesteps!r}: the diffusion's steps, an integer >= 2 (1000 "
                      "is usual; sample.num_steps sets how many steps sampling takes).")


def schedule_end_problem(config: ml_collections.ConfigDict) -> str:
  """What is wrong with a schedule whose last step leaves much of the signal ('' if none): the linear schedules
  take DDPM's betas for T=1000 at any T, unscaled, so a shorter one ends with much of the image left (linear at
  T=100: √ᾱ = 0.60), where sampling starts from pure noise. A new training run refuses it (``loop.train``); a run
  trained so before is still sampled, evaluated and resumed, with this as a warning."""
  chains = [("config.diffusion", config.diffusion.schedule, config.diffusion.num_timesteps)]
  if config.model.condition == "embedding":
    chains.append(("config.model.prior", config.model.prior.schedule, config.model.prior.num_timesteps))
  for where, kind, num_timesteps in chains:
    _, end = start_signal(kind, num_timesteps, 1, "trailing")
    if end > MAX_END_SIGNAL:
      return (f"{where}.num_timesteps={num_timesteps} with schedule={kind!r}: its last step (t={num_timesteps - 1}) "
              f"still holds √ᾱ = {end:.2f} of the signal, where sampling starts from pure noise, so the samples are "
              "wrong (this schedule's betas are DDPM's for T=1000, not scaled to T). Train with num_timesteps=1000 "
              "(sample.num_steps sets how many steps sampling takes), or schedule='cosine'.")
  return ""


def schedule_end_warning(config: ml_collections.ConfigDict) -> str | None:
  """``schedule_end_problem`` as the warning of a run that samples, evaluates or resumes a model trained so."""
  problem = schedule_end_problem(config)
  return f"warning: {problem}" if problem else None


def _check_chain_start(what: str, kind: str, num_timesteps: int, num_steps: int, spacing: str, fix: str) -> None:
  """A DDIM chain must start about where its noise holds no signal (t = T-1): ``leading`` spacing with
  more than T/2 steps starts at ``num_steps - 1``, with one step at 0."""
  t, signal = start_signal(kind, num_timesteps, num_steps, spacing)
  _, floor = start_signal(kind, num_timesteps, 1, "trailing")  # at t = T-1
  if signal - floor > MAX_START_SIGNAL:
    raise ConfigError(f"{what} starts the chain at t={t} of {num_timesteps}, where the noise it starts from would "
                      f"still hold √ᾱ_t = {signal:.2f} of the signal (at t={num_timesteps - 1}: {floor:.2f}): the "
                      f"samples would be wrong. Use {fix}.")


def _check_clip_encoder(e: ml_collections.ConfigDict) -> None:
  """``model.encoder.kind='clip'``: a CLIP directory whose projection width is ``embed_dim`` (none: the
  project's own small CLIP)."""
  if not e.get("clip_dir"):
    return  # the project's own small CLIP, made at embed_dim (data/embeddings.py)
  config_file = Path(e.clip_dir).expanduser() / "config.json"
  if not config_file.is_file():
    raise ConfigError(f"config.model.encoder.clip_dir={e.clip_dir!r}: {config_file} does not exist; give a local "
                      "Hugging Face CLIPModel directory.")
  try:
    spec = json.loads(config_file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ConfigError(f"config.model.encoder.clip_dir: {config_file} is not valid JSON ({err}).") from None
  if not isinstance(spec, dict):
    raise ConfigError(f"config.model.encoder.clip_dir: {config_file} holds a JSON {type(spec).__name__}, not a "
                      "CLIPModel config object; download it again.")
  width = spec.get("projection_dim", 512)
  if width != e.embed_dim:
    raise ConfigError(f"config.model.encoder.embed_dim={e.embed_dim}: the CLIP in {e.clip_dir} gives embeddings of "
                      f"width {width}; set --config.model.encoder.embed_dim={width}.")


# What a trained model's weights mean and that restoring cannot check (no parameter's shape depends
# on it): sampling with another value than training's gives wrong samples without an error. Besides λ,
# the schedules, the kinds and the conditions: each U-Net's head_dim (its qkv maps c channels to 3c
# however they split into heads) and data.image_size (the networks are convolutional: they run at any
# size their levels divide, with the same weights). Left out because restoring checks them (another
# value gives other shapes or parameter names): the U-Nets' base_channels, channel_mult, num_res_blocks
# and attention_resolutions, model.vdm.temporal_resolutions, the encoder's embed_dim, base_channels and
# channel_mult, the prior's width and num_layers, and data.num_frames (the residual generator's frame
# embedding has a row per frame, VDM*'s relative position bias 2N - 1; sampling never changes it: a
# long video is sample.num_clips clips of num_frames). Left out as training's alone: the U-Nets'
# dropout (off in sampling); model.dtype and attention_implementation compute the same function another
# way. The encoder's kind and frozen_name are BASE_FIELDS' and RESUMED_FIELDS' alone: sampling never runs the
# encoder (c comes from the prior, or from sample.embeddings).
TRAINED_FIELDS = ("diffusion.lam", "diffusion.schedule", "diffusion.num_timesteps", "model.kind", "model.condition",
                  "model.key_frame_input", "model.key_frame_clean", "model.prior.schedule",
                  "model.prior.num_timesteps", "model.prior.condition", "data.image_size", "model.base.head_dim",
                  "model.residual.head_dim")
# A resumed training run's: training runs the encoder, whose c both generators and the prior learn from (a
# frozen or CLIP encoder has no parameters whose shapes would tell another one).
RESUMED_FIELDS = TRAINED_FIELDS + ("model.encoder.kind", "model.encoder.frozen_name")
# Those of them that the networks ``train.init_base_from`` takes (base, encoder, prior) were trained
# under: λ, the kind, the key-frame input and the residual's head_dim are the residual generator's, or
# the video stage's. And the encoder's kind and frozen_name: the base and prior taken learned the c of
# that run's encoder, and this run trains them on its own encoder's (a frozen or CLIP encoder has no
# parameters whose shapes would tell). Not data.image_size: a base trained at one size and fine-tuned at
# another is a recipe (progressive resolution), not a mistake.
BASE_FIELDS = ("diffusion.schedule", "diffusion.num_timesteps", "model.condition", "model.prior.schedule",
               "model.prior.num_timesteps", "model.prior.condition", "model.base.head_dim",
               "model.encoder.kind", "model.encoder.frozen_name")


def recorded_config(workdir) -> tuple[Path, dict | None]:
  """``workdir/config.json`` (the config a training run wrote) and its contents; None when it is missing
  (no training run wrote one here: nothing to compare). One that is there but is not a readable JSON object
  (cut short, edited by hand) is a ConfigError: taken for none, it let a resume under other settings pass
  the check against it, and be recorded as the trained settings."""
  record = Path(workdir).expanduser() / "config.json"
  try:
    if not record.exists() and not record.is_symlink():
      return record, None
    trained = json.loads(record.read_text())
    problem = None if isinstance(trained, dict) else f"a JSON {type(trained).__name__}, not an object"
  except (OSError, ValueError) as e:
    problem = f"{type(e).__name__}: {e}"
  if problem:
    raise ConfigError(f"{record} records the settings the checkpoints beside it were trained with, and cannot be "
                      f"read ({problem}). Put back the whole record (a copy of it, or the run's first log lines), "
                      "or move it away to go on without the check of these settings against the trained ones.")
  return record, trained


def field_or_none(tree, dotted: str):
  """``tree``'s field at the dotted path (a ConfigDict or the JSON of one); None where it has none."""
  for part in dotted.split("."):
    try:
      tree = tree[part]
    except (KeyError, TypeError, IndexError):
      return None
  return tree


def differing_fields(config: ml_collections.ConfigDict, trained: dict, fields) -> list[tuple[str, object, object]]:
  """``(name, this config's value, the recorded one)`` for each of ``fields`` (dotted) that differs from
  ``trained`` (a recorded config.json); fields the record lacks are not compared, but for
  ``model.encoder.clip_dir``, recorded before it existed, which meant the project's own CLIP ('')."""
  differ = []
  for name in fields:
    was = field_or_none(trained, name)
    if was is None:
      if name != "model.encoder.clip_dir":
        continue
      was = ""
    now = json.loads(json.dumps(field_or_none(config, name)))  # as JSON records it (tuples as lists)
    if not _same_clip(config, now, was, trained) if name == "model.encoder.clip_dir" else now != was:
      differ.append((name, now, was))
  return differ


CLIP_FINGERPRINT = "clip_fingerprint"  # config.json's record of the CLIP directory's weights (training.loop)
CLIP_TOKENIZER = "clip_tokenizer"  # ... and of its tokenizer, where prompts are sampled from (a text prior)


def _same_clip(config: ml_collections.ConfigDict, now: str, was: str, trained: dict) -> bool:
  """Whether the CLIP directories ``now`` and ``was`` (the recorded one) hold one CLIP: where the training
  run recorded its fingerprint, ``now``'s config and weights give that fingerprint (the same folder by
  another name, or a copy on another machine's mount; not other weights saved over the folder trained
  with) and, for a text prior, its tokenizer the recorded one; else the same folder (``~``, a trailing
  slash, a link)."""
  if not now or not was:  # the project's own CLIP against a directory, or against itself
    return now == was
  recorded = trained.get(CLIP_FINGERPRINT) if isinstance(trained, dict) else None
  if recorded and (Path(now).expanduser() / "config.json").is_file():
    return not other_clip_there(config, now, trained)
  return _one_folder(now, was)


def _one_folder(a: str, b: str) -> bool:
  return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def recorded_clip_fingerprint(config: ml_collections.ConfigDict, clip_dir: str, trained: dict) -> str:
  """The fingerprint (``data.embeddings``) of the CLIP in ``clip_dir`` at the frame size ``trained`` (a recorded
  config.json) was trained at: the one its record would hold for this CLIP (an image stage may be fine-tuned at
  another size)."""
  from videofusion_jax.data.embeddings import fingerprint
  return fingerprint(clip_dir, field_or_none(trained, "data.image_size") or config.data.image_size)


def other_clip_there(config: ml_collections.ConfigDict, clip_dir: str, trained: dict) -> str:
  """How the CLIP in ``clip_dir`` differs from the one ``trained`` (a recorded config.json with its
  fingerprint) recorded, in words; '' where it does not. Its tokenizer counts for a text prior alone: prompts
  are tokenized at sampling, and other ids (another vocabulary, other merges) give other text embeddings from
  the same weights; a record written before the tokenizer was recorded is checked on its weights."""
  from videofusion_jax.data.embeddings import is_recorded_clip
  size = field_or_none(trained, "data.image_size") or config.data.image_size
  if not is_recorded_clip(clip_dir, size, trained[CLIP_FINGERPRINT]):
    now = recorded_clip_fingerprint(config, clip_dir, trained)
    return f"its weights give fingerprint {now}, recorded {trained[CLIP_FINGERPRINT]}"
  if text_prior(config) and trained.get(CLIP_TOKENIZER):
    from videofusion_jax.data.embeddings import tokenizer_digest
    try:
      tokenizer = tokenizer_digest(clip_dir)
    except ValueError as e:  # CLIPLoadError: no tokenizer there, or one that cannot be read
      return f"its tokenizer cannot be read: {e}"
    if tokenizer != trained[CLIP_TOKENIZER]:
      return (f"its tokenizer (vocab.json, merges.txt or tokenizer.json) gives {tokenizer}, recorded "
              f"{trained[CLIP_TOKENIZER]}")
  return ""


def check_input_kind(config: ml_collections.ConfigDict, trained: dict, whose: str) -> None:
  """A ConfigError when one of ``config`` and ``trained`` (a recorded config.json; ``whose`` checkpoints, in
  words) trains on the synthetic input and the other on a dataset: networks that learnt noise are no start
  for real data, and real checkpoints would be trained on noise (and deleted as older ones)."""
  was, now = trained.get("data", {}).get("name"), config.data.name
  if (was == SYNTHETIC_DATA) != (now == SYNTHETIC_DATA):
    raise ConfigError(f"config.data.name={now!r}: {whose} were trained on {was!r}; synthetic and real input do not "
                      "mix (the synthetic input's networks learn noise). Use a workdir of its own for each.")


def check_against_record(config: ml_collections.ConfigDict, trained: dict, fields, whose: str, why: str,
                         otherwise: str) -> None:
  """A ConfigError naming each of ``fields`` (and a 'clip' encoder's CLIP directory) whose value differs from
  ``trained`` (a recorded config.json), as ``config.F=now (<whose> was)``, then ``why``, and the flags that
  give the recorded values, or ``otherwise``."""
  fields = tuple(f for f in fields if _compared(config, f))
  fields += (("model.encoder.clip_dir",) if clip_used(config) is not None else ())
  differ = differing_fields(config, trained, fields)
  if not differ:
    return
  said, flags, fix = [], [], otherwise
  for name, now, was in differ:
    if not (name == "model.encoder.clip_dir" and now and was and _one_folder(now, was)):
      said.append(f"config.{name}={now!r} ({whose} {was!r})")
      flags.append(f"--config.{name}={was}")
    else:  # other weights saved over the CLIP folder trained with: no flag gives those back
      said.append(f"config.{name}={now!r} (not the CLIP {whose} there: {other_clip_there(config, now, trained)})")
      fix = f"put that CLIP back in the folder (or give a copy of it), or {otherwise}"
  if flags:
    fix = f"pass {' '.join(flags)}, or {fix}"
  raise ConfigError(f"{', '.join(said)}: {why}; {fix}.")


def _compared(config: ml_collections.ConfigDict, field: str) -> bool:
  """Whether ``field`` means anything to this config's model (a recorded value of a network it lacks is no
  reason to refuse it; where the model itself differs, model.kind or model.condition says so)."""
  m = config.model
  if field.startswith("model.prior."):
    return prior_samples(config)
  if field.startswith("model.residual."):
    return m.kind != "vdm"  # VDM* builds no residual generator
  if field == "model.encoder.frozen_name":
    return m.condition == "embedding" and m.encoder.kind == "frozen"
  if field.startswith("model.encoder."):
    return m.condition == "embedding"
  return True


def clip_used(config: ml_collections.ConfigDict) -> str | None:
  """Which CLIP a 'clip' encoder uses: its directory, or the project's own; None for another encoder."""
  if config.model.condition != "embedding" or config.model.encoder.kind != "clip":
    return None
  return config.model.encoder.clip_dir or "the project's own small CLIP"
