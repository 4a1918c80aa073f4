"""CLIP's image and text towers in Flax, loaded from a Hugging Face ``CLIPModel`` directory.

The paper conditions both generators on the CLIP image embedding of a clip's middle frame, and
its text-to-video prior maps the caption's CLIP text embedding to that image embedding. This
module is that CLIP, written for the project (no PyTorch, no ``transformers``), reading a local
directory the user gives; nothing is downloaded::

    clip = videofusion_jax.models.clip.load("/data/clip-vit-base-patch32")
    pixels = clip.preprocess(frames)                # uint8 (B, H, W, 3) of any size -> (B, S, S, 3)
    image_emb = clip.encode_image(pixels)           # (B, D), projected, not L2-normalised
    text_emb = clip.encode_text(clip.tokenize(["a dog on a skateboard"]))   # (B, D)

The directory holds ``config.json`` and the weights, ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) or ``pytorch_model.bin`` (read without PyTorch, see
``torch_pickle``), the tokenizer (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``) and, if
present, ``preprocessor_config.json`` for the image size, mean and std.

The networks follow Hugging Face's ``CLIPModel`` layer for layer, and the Flax parameter tree
mirrors its state-dict names (``text_model/encoder/layers_3/self_attn/q_proj/kernel`` is
``text_model.encoder.layers.3.self_attn.q_proj.weight``, transposed), so that loading is one rule
per leaf kind and a missing or misshapen weight is named exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from videofusion_jax.models.clip_tokenizer import CLIPTokenizer

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI's CLIP
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
# OpenAI's normalisation, what CLIPImageProcessor uses when no preprocessor_config.json says otherwise.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPLoadError(ValueError):
  """A CLIP directory that cannot be loaded; the message names what is missing or wrong."""


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer: ``width`` (hidden size), ``layers``, ``heads``, ``mlp_dim``, activation, LayerNorm ε."""

  width: int
  layers: int
  heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """What the two towers and their inputs need, read from ``config.json`` (Hugging Face's defaults,
  those of ``CLIPTextConfig`` and ``CLIPVisionConfig``, for absent keys)."""

  text: TowerConfig
  vision: TowerConfig
  projection_dim: int = 512
  vocab_size: int = 49408
  context_length: int = 77
  # Hugging Face pools at argmax(token ids) when eos_token_id is the legacy 2 (the end-of-text
  # token has the largest id in CLIP's vocabulary), else at the first eos_token_id.
  eos_token_id: int = 49407
  image_size: int = 224
  patch_size: int = 32
  image_mean: tuple[float, float, float] = OPENAI_MEAN
  image_std: tuple[float, float, float] = OPENAI_STD
  resize_size: int | None = None  # the short side before the centre crop (preprocessor's size); None: image_size
  # The preprocessor's size as {height, width}: Hugging Face resizes to exactly that, the aspect not kept.
  resize_hw: tuple[int, int] | None = None

  @property
  def short_side(self) -> int:
    """The frames' short side after the resize, before the centre crop to ``image_size``."""
    return self.resize_size or self.image_size

  @classmethod
  def from_json(cls, config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None) -> CLIPConfig:
    t, v = config["text_config"] or {}, config["vision_config"] or {}

    def tower(c, width, layers, heads, mlp_dim):
      return TowerConfig(c.get("hidden_size", width), c.get("num_hidden_layers", layers),
                         c.get("num_attention_heads", heads), c.get("intermediate_size", mlp_dim),
                         c.get("hidden_act", "quick_gelu"), c.get("layer_norm_eps", 1e-5))
    image_size = v.get("image_size", 224)
    pre = preprocessor or {}
    resize, hw = pre.get("size", image_size), None
    if isinstance(resize, dict) and "shortest_edge" not in resize and {"height", "width"} <= resize.keys():
      resize, hw = image_size, (resize["height"], resize["width"])
    resize = resize.get("shortest_edge", image_size) if isinstance(resize, dict) else resize

    def triple(key: str, default: tuple) -> tuple:  # CLIPImageProcessor: one number for every channel, or null
      value = pre.get(key)
      value = default if value is None else value
      return tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
    return cls(text=tower(t, 512, 12, 8, 2048), vision=tower(v, 768, 12, 12, 3072),
               projection_dim=config.get("projection_dim", 512), vocab_size=t.get("vocab_size", 49408),
               context_length=t.get("max_position_embeddings", 77), eos_token_id=t.get("eos_token_id", 49407),
               image_size=image_size, patch_size=v.get("patch_size", 32),
               image_mean=triple("image_mean", OPENAI_MEAN), image_std=triple("image_std", OPENAI_STD),
               resize_size=resize if resize != image_size else None, resize_hw=hw)


# ----------------------------------------------------------------------------------------------
# The networks. Module and parameter names are Hugging Face's (see the module docstring).


class Attention(nn.Module):
  width: int
  heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: ``(B, L, width)`` -> ``(B, L, width)``; scaled dot-product attention, 1/√head_dim."""
    b, length, _ = x.shape
    heads = lambda name: nn.Dense(self.width, dtype=self.dtype, name=name)(x).reshape(  # noqa: E731
        b, length, self.heads, self.width // self.heads)
    y = jax.nn.dot_product_attention(heads("q_proj"), heads("k_proj"), heads("v_proj"), is_causal=self.causal)
    return nn.Dense(self.width, dtype=self.dtype, name="out_proj")(y.reshape(b, length, self.width))


class MLP(nn.Module):
  width: int
  mlp_dim: int
  activation: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = ACTIVATIONS[self.activation](nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(self.width, dtype=self.dtype, name="fc2")(h)


class _Layer(nn.Module):
  config: TowerConfig
  causal: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    c = self.config
    norm = lambda name: nn.LayerNorm(c.eps, dtype=self.dtype, name=name)  # noqa: E731
    x = x + Attention(c.width, c.heads, self.causal, self.dtype, name="self_attn")(norm("layer_norm1")(x))
    return x + MLP(c.width, c.mlp_dim, c.activation, self.dtype, name="mlp")(norm("layer_norm2")(x))


class Encoder(nn.Module):
  """``layers`` pre-norm transformer layers (``layers_i``: layer_norm1, self_attn, layer_norm2, mlp)."""

  config: TowerConfig
  causal: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = self.config
    for i in range(c.layers):
      x = _Layer(c, self.causal, self.dtype, name=f"layers_{i}")(x)
    return x


class _TextEmbeddings(nn.Module):
  vocab_size: int
  context_length: int
  width: int
  dtype: Dtype

  @nn.compact
  def __call__(self, ids):
    tok = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embedding")(ids)
    pos = nn.Embed(self.context_length, self.width, dtype=self.dtype, name="position_embedding")(
        jnp.arange(ids.shape[1]))
    return tok + pos[None]


class TextTower(nn.Module):
  """Token ids ``(B, L)`` -> the final-LayerNorm state at the end-of-text token ``(B, width)``."""

  config: CLIPConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    c = self.config
    x = _TextEmbeddings(c.vocab_size, c.context_length, c.text.width, self.dtype, name="embeddings")(ids)
    x = Encoder(c.text, causal=True, dtype=self.dtype, name="encoder")(x)
    x = nn.LayerNorm(c.text.eps, dtype=self.dtype, name="final_layer_norm")(x)
    return x[jnp.arange(ids.shape[0]), end_of_text_index(ids, c.eos_token_id)]


def end_of_text_index(ids: jnp.ndarray, eos_token_id: int) -> jnp.ndarray:
  """``(B,)`` where the text tower pools: Hugging Face's rule (see ``CLIPConfig.eos_token_id``)."""
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == eos_token_id, axis=-1)


class _VisionEmbeddings(nn.Module):
  width: int
  patch_size: int
  num_positions: int
  dtype: Dtype

  @nn.compact
  def __call__(self, pixels):
    p = self.patch_size
    patches = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                      name="patch_embedding")(pixels)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, self.width)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (self.width,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, self.width)), patches], axis=1)
    pos = nn.Embed(self.num_positions, self.width, dtype=self.dtype, name="position_embedding")(
        jnp.arange(self.num_positions))
    return x + pos[None]


class VisionTower(nn.Module):
  """Pixels ``(B, S, S, 3)`` -> the post-LayerNorm class token ``(B, width)`` (a ViT)."""

  config: CLIPConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
    c = self.config
    num_positions = (c.image_size // c.patch_size) ** 2 + 1
    x = _VisionEmbeddings(c.vision.width, c.patch_size, num_positions, self.dtype, name="embeddings")(
        pixels.astype(self.dtype))
    x = nn.LayerNorm(c.vision.eps, dtype=self.dtype, name="pre_layrnorm")(x)  # sic: Hugging Face's name
    x = Encoder(c.vision, dtype=self.dtype, name="encoder")(x)
    return nn.LayerNorm(c.vision.eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])


class CLIPNetwork(nn.Module):
  """Both towers and their projections; ``encode_image`` and ``encode_text`` are its methods."""

  config: CLIPConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    d = self.config.projection_dim
    self.text_model = TextTower(self.config, self.dtype)
    self.vision_model = VisionTower(self.config, self.dtype)
    self.text_projection = nn.Dense(d, use_bias=False, dtype=self.dtype)
    self.visual_projection = nn.Dense(d, use_bias=False, dtype=self.dtype)

  def encode_image(self, pixels: jnp.ndarray) -> jnp.ndarray:
    """pixels ``(B, S, S, 3)``, normalised -> ``(B, projection_dim)`` float32."""
    return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)

  def encode_text(self, ids: jnp.ndarray) -> jnp.ndarray:
    """ids ``(B, L)`` int32, ``L <= context_length`` -> ``(B, projection_dim)`` float32."""
    return self.text_projection(self.text_model(ids)).astype(jnp.float32)

  def __call__(self, ids: jnp.ndarray, pixels: jnp.ndarray):
    return self.encode_text(ids), self.encode_image(pixels)


def abstract_params(config: CLIPConfig) -> dict:
  """The parameter tree's shapes, without allocating it."""
  net = CLIPNetwork(config)
  ids = jnp.zeros((1, config.context_length), jnp.int32)
  pixels = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda r: net.init(r, ids, pixels)["params"], jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------------------------
# Hugging Face names <-> the Flax tree.


def hf_name(path: Sequence[str]) -> str:
  """The state-dict key of the Flax leaf at ``path``: ``('vision_model', 'encoder', 'layers_0',
  'mlp', 'fc1', 'kernel')`` -> ``vision_model.encoder.layers.0.mlp.fc1.weight``."""
  *modules, leaf = path
  modules = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules]
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join(modules + [leaf])


def from_hf(path: Sequence[str], array: np.ndarray) -> np.ndarray:
  """A Hugging Face tensor in the Flax leaf's layout: linear ``(out, in)`` and convolution
  ``(out, in, kh, kw)`` kernels become ``(in, out)`` and ``(kh, kw, in, out)``."""
  if path[-1] == "kernel":
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return array


def params_from_state_dict(state: Mapping[str, np.ndarray], config: CLIPConfig, source: str = "the weights") -> dict:
  """The Flax parameters (float32 NumPy) from a ``CLIPModel`` state dict; each missing or misshapen
  weight is named. Keys the towers do not use (``logit_scale``, ``position_ids``) are ignored."""
  abstract = abstract_params(config)
  flat = {}
  problems = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    path = tuple(k.key for k in key_path)
    name = hf_name(path)
    if name not in state:
      problems.append(f"{name} is missing")
      continue
    value = from_hf(path, np.asarray(state[name]).astype(np.float32))
    if value.shape != leaf.shape:
      problems.append(f"{name} has shape {tuple(np.asarray(state[name]).shape)}, config.json implies "
                      f"{tuple(from_hf(path, np.zeros(leaf.shape)).shape)}")
      continue
    flat[path] = value
  if problems:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise CLIPLoadError(f"{source} do not fit a CLIPModel with this config.json: {'; '.join(problems[:3])}{more}.")
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


# ----------------------------------------------------------------------------------------------
# Weight files.

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
  """Every tensor of a ``.safetensors`` file, memory-mapped (the format: an 8-byte little-endian
  header length, a JSON header of dtype, shape and byte range per tensor, then the bytes)."""
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
    if n + 8 > size:
      raise CLIPLoadError(f"{path} is not a safetensors file or is truncated (header of {n} bytes, file of {size}).")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CLIPLoadError(f"{path} is not a safetensors file: its header is not JSON ({e}).") from None
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  if not isinstance(header, dict):
    raise CLIPLoadError(f"{path} is not a safetensors file: its header is not a JSON object.")
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CLIPLoadError(f"{path} is damaged: the header's record of tensor {name} is not "
                          "{dtype, shape, data_offsets: [begin, end]}; download or save it again.") from None
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
      raise CLIPLoadError(f"{path}: tensor {name} has dtype {dtype_name}, which this reader does not know.")
    if (not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end))
        or begin > end):
      raise CLIPLoadError(f"{path} is damaged: tensor {name} has shape {shape} and byte range [{begin}, {end}).")
    if end > data.size:
      raise CLIPLoadError(f"{path} is truncated: tensor {name} ends at byte {end} of {data.size}.")
    wanted = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
    if end - begin != wanted:
      raise CLIPLoadError(f"{path} is damaged: tensor {name} of shape {tuple(shape)} and dtype {dtype_name} needs "
                          f"{wanted} bytes, its byte range [{begin}, {end}) holds {end - begin}.")
    tensors[name] = data[begin:end].view(dtype).reshape(shape)
  return tensors


def read_weights(directory: Path) -> tuple[dict[str, np.ndarray], str]:
  """The state dict of a Hugging Face checkpoint directory, and the file(s) it came from."""
  single, index, torch_bin = (directory / n for n in ("model.safetensors", "model.safetensors.index.json",
                                                     "pytorch_model.bin"))
  if single.is_file():
    return read_safetensors(single), str(single)
  if index.is_file():
    try:
      spec = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CLIPLoadError(f"{index} is damaged, not valid JSON ({e}); download it again.") from None
    weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise CLIPLoadError(f"{index} is damaged: it has no weight_map of tensor name -> shard file; download it again.")
    shards = sorted(set(weight_map.values()))
    state = {}
    for shard in shards:
      if not (directory / shard).is_file():
        raise CLIPLoadError(f"{index} names the shard {shard}, which is not in {directory}.")
      state.update(read_safetensors(directory / shard))
    return state, str(index)
  if torch_bin.is_file():
    from videofusion_jax.models.torch_pickle import TorchCheckpointError, read_torch_checkpoint
    try:
      return read_torch_checkpoint(torch_bin), str(torch_bin)
    except TorchCheckpointError as e:
      raise CLIPLoadError(str(e)) from None
  raise CLIPLoadError(f"{directory} has no CLIP weights: expected model.safetensors, model.safetensors.index.json "
                      "or pytorch_model.bin (a Hugging Face CLIPModel saved with save_pretrained).")


# ----------------------------------------------------------------------------------------------
# The public object.


@dataclasses.dataclass
class CLIP:
  """A loaded CLIP: ``config``, ``params`` (float32), ``tokenizer``; see the module docstring."""

  config: CLIPConfig
  params: dict
  tokenizer: CLIPTokenizer
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    net = CLIPNetwork(self.config, self.dtype)
    self.network = net
    self._encode_image = jax.jit(lambda p, x: net.apply({"params": p}, x, method=CLIPNetwork.encode_image))
    self._encode_text = jax.jit(lambda p, ids: net.apply({"params": p}, ids, method=CLIPNetwork.encode_text))

  @property
  def embed_dim(self) -> int:
    return self.config.projection_dim

  def encode_image(self, pixels) -> jnp.ndarray:
    """pixels ``(B, S, S, 3)`` float32 from ``preprocess`` -> image embeddings ``(B, D)``."""
    s = self.config.image_size
    if getattr(pixels, "ndim", None) != 4 or tuple(pixels.shape[1:]) != (s, s, 3):
      raise ValueError(f"encode_image takes pixels of shape (B, {s}, {s}, 3), resized and normalised by "
                       f"clip.preprocess(frames); got shape {getattr(pixels, 'shape', type(pixels))}.")
    return self._encode_image(self.params, jnp.asarray(pixels, jnp.float32))

  def encode_text(self, token_ids) -> jnp.ndarray:
    """token_ids ``(B, L)`` int32 from ``tokenize`` -> text embeddings ``(B, D)``, pooled at end-of-text."""
    c = self.config
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or not 0 < ids.shape[1] <= c.context_length:
      raise ValueError(f"encode_text takes integer token ids of shape (B, L) with L <= {c.context_length}, "
                       f"from clip.tokenize(texts); got {ids.dtype} {ids.shape}.")
    if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
      raise ValueError(f"token ids must lie in [0, {c.vocab_size}); got {ids.min()}..{ids.max()}.")
    return self._encode_text(self.params, jnp.asarray(ids, jnp.int32))

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """Texts -> ``(B, context_length)`` int32: start, BPE tokens (truncated), end-of-text, padding."""
    return self.tokenizer(texts)

  def preprocess(self, frames) -> np.ndarray:
    """uint8 frames ``(B, H, W, 3)`` (or one ``(H, W, 3)``) of any size -> pixels ``(B, S, S, 3)``
    float32, as ``CLIPImageProcessor``: bicubic resize of the short side (to the preprocessor's
    ``size.shortest_edge``, S when it has none; to exactly ``size.height`` x ``size.width`` where it gives
    those), centre crop to S, /255, then the checkpoint's mean and std."""
    return preprocess(frames, self.config)


def preprocess(frames, config: CLIPConfig) -> np.ndarray:
  """See ``CLIP.preprocess``."""
  from PIL import Image  # only here: the towers themselves need no image library

  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"preprocess takes uint8 RGB frames (B, H, W, 3) or (H, W, 3); got {frames.dtype} "
                     f"{frames.shape}.")
  s, r = config.image_size, config.short_side
  out = np.empty((len(frames), s, s, 3), np.float32)
  for i, frame in enumerate(frames):
    h, w = frame.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(r * long / short)
    size = (new_long, r) if h <= w else (r, new_long)  # PIL takes (width, height)
    if config.resize_hw:
      size = config.resize_hw[::-1]
    image = np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC))
    top, left = (image.shape[0] - s) // 2, (image.shape[1] - s) // 2
    out[i] = image[top:top + s, left:left + s]
  return (out / 255.0 - np.float32(config.image_mean)) / np.float32(config.image_std)


def load(path: str | Path, dtype: Dtype = jnp.float32) -> CLIP:
  """Loads a Hugging Face ``CLIPModel`` directory (see the module docstring); nothing is downloaded.
  ``dtype`` is the compute type (bfloat16 for accelerators); weights stay float32."""
  directory = Path(path).expanduser()
  if not directory.is_dir():
    raise CLIPLoadError(f"CLIP directory {directory} {'is not a directory' if directory.exists() else 'does not exist'}"
                        ": give a local Hugging Face CLIPModel directory (config.json, model.safetensors, vocab.json, "
                        "merges.txt), e.g. one saved by CLIPModel.save_pretrained on a machine with internet access.")
  config_file = directory / "config.json"
  if not config_file.is_file():
    found = sorted(p.name for p in directory.iterdir())[:10]
    raise CLIPLoadError(f"{directory} has no config.json, so it is not a Hugging Face CLIPModel directory "
                        f"(it holds {found}).")
  try:
    config_json = json.loads(config_file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CLIPLoadError(f"{config_file} is not valid JSON ({e}).") from None
  if not isinstance(config_json, dict):
    raise CLIPLoadError(f"{config_file} is not a CLIPModel config: it holds a JSON {type(config_json).__name__}, "
                        "not an object; download it again.")
  if "text_config" not in config_json or "vision_config" not in config_json:
    raise CLIPLoadError(f"{config_file} is not a CLIPModel config: it has no text_config and vision_config "
                        f"(model_type {config_json.get('model_type')!r}).")
  for tower in ("text_config", "vision_config"):
    if not isinstance(config_json[tower] or {}, dict):
      raise CLIPLoadError(f"{config_file}: {tower} is {config_json[tower]!r}, not an object; download it again.")
  pre_file = directory / "preprocessor_config.json"
  try:
    preprocessor = json.loads(pre_file.read_text()) if pre_file.is_file() else None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CLIPLoadError(f"{pre_file} is not valid JSON ({e}).") from None
  if preprocessor is not None and not isinstance(preprocessor, dict):
    raise CLIPLoadError(f"{pre_file} holds a JSON {type(preprocessor).__name__}, not an object; download it again.")
  _check_preprocessor_steps(pre_file, preprocessor)
  config = CLIPConfig.from_json(config_json, preprocessor)
  for tower, t in (("text_config", config.text), ("vision_config", config.vision)):
    _check_tower(config_file, tower, t)
  _check_sizes(config_file, pre_file, config)
  _check_preprocessor_size(pre_file, preprocessor, config)
  state, source = read_weights(directory)
  params = params_from_state_dict(state, config, source)
  try:
    tokenizer = CLIPTokenizer.from_directory(directory, config.context_length)
  except ValueError as e:
    raise CLIPLoadError(str(e)) from None
  if tokenizer.vocab_size > config.vocab_size:
    raise CLIPLoadError(f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens, more than the text tower's "
                        f"vocab_size {config.vocab_size} in config.json.")
  return CLIP(config, jax.tree.map(jnp.asarray, params), tokenizer, dtype)


def _check_tower(config_file: Path, tower: str, t: TowerConfig) -> None:
  """What the transformer's shapes need of ``config.json``, checked here: past this point a bad value is a
  reshape error deep inside Flax."""
  for key, value in (("hidden_size", t.width), ("num_hidden_layers", t.layers), ("num_attention_heads", t.heads),
                     ("intermediate_size", t.mlp_dim)):
    least = 0 if key == "num_hidden_layers" else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise CLIPLoadError(f"{config_file}: {tower}.{key}={value!r} is not an integer >= {least}; download it again.")
  if t.width % t.heads:
    raise CLIPLoadError(f"{config_file}: {tower}.num_attention_heads={t.heads} does not divide hidden_size={t.width}; "
                        "the heads split the width evenly: download config.json again.")
  if t.activation not in ACTIVATIONS:
    raise CLIPLoadError(f"{config_file}: {tower}.hidden_act={t.activation!r} is not one this CLIP knows "
                        f"({sorted(ACTIVATIONS)}).")


def _is_count(x, least: int = 1) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= least


def _check_sizes(config_file: Path, pre_file: Path, c: CLIPConfig) -> None:
  """The sizes, ids and numbers of ``config.json`` and the preprocessor that ``_check_tower`` does not see: past
  this point a bad one is a shape error inside Flax, or a failure at the first image or text."""
  for key, value in (("vision_config.image_size", c.image_size), ("vision_config.patch_size", c.patch_size),
                     ("projection_dim", c.projection_dim), ("text_config.vocab_size", c.vocab_size),
                     ("text_config.max_position_embeddings", c.context_length)):
    if not _is_count(value):
      raise CLIPLoadError(f"{config_file}: {key}={value!r} is not an integer >= 1; download it again.")
  if not _is_count(c.eos_token_id, 0):
    raise CLIPLoadError(f"{config_file}: text_config.eos_token_id={c.eos_token_id!r} is not a token id (an integer "
                        ">= 0); download it again.")
  for tower, t in (("text_config", c.text), ("vision_config", c.vision)):
    if isinstance(t.eps, bool) or not isinstance(t.eps, (int, float)) or not 0 < t.eps < 1:
      raise CLIPLoadError(f"{config_file}: {tower}.layer_norm_eps={t.eps!r} is not a small positive number; "
                          "download it again.")
  for key, value in (("image_mean", c.image_mean), ("image_std", c.image_std)):
    if len(value) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                  for x in value) or (key == "image_std" and 0 in value):
      nonzero = " (not 0)" if key == "image_std" else ""
      raise CLIPLoadError(f"{pre_file}: {key}={list(value)!r} is not one finite number{nonzero} per RGB channel; "
                          "download it again.")


# The steps CLIPImageProcessor takes that this module always takes: bicubic (PIL's 3), /255, normalised.
_PREPROCESSOR_STEPS = {"do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
                       "resample": 3}


def _check_preprocessor_steps(pre_file: Path, preprocessor: Mapping[str, Any] | None) -> None:
  """A CLIPLoadError for a preprocessor setting this module would not follow (it would embed other pixels than
  the CLIP's own processor, silently)."""
  for key, always in _PREPROCESSOR_STEPS.items():
    if preprocessor and preprocessor.get(key, always) not in (always, None):
      raise CLIPLoadError(f"{pre_file}: {key}={preprocessor[key]!r}: this CLIP's frames are always resized "
                          "bicubically (resample 3), centre-cropped, rescaled by 1/255 and normalised, as OpenAI's "
                          "CLIP; another preprocessing is not supported.")
  factor = (preprocessor or {}).get("rescale_factor")
  if factor is not None and (not isinstance(factor, (int, float)) or abs(factor * 255 - 1) > 1e-6):
    raise CLIPLoadError(f"{pre_file}: rescale_factor={factor!r}: this CLIP's pixels are always rescaled by 1/255.")


def _check_preprocessor_size(pre_file: Path, preprocessor: Mapping[str, Any] | None, config: CLIPConfig) -> None:
  if preprocessor is None:
    return
  crop = preprocessor.get("crop_size", config.image_size)
  crop = crop.get("height", config.image_size) if isinstance(crop, dict) else crop
  if crop != config.image_size:
    raise CLIPLoadError(f"{pre_file} crops to {crop!r} pixels but the vision tower takes {config.image_size} "
                        "(vision_config.image_size in config.json).")
  if config.resize_hw is not None:
    if not all(_is_count(x, config.image_size) for x in config.resize_hw):
      raise CLIPLoadError(f"{pre_file} resizes to height x width {config.resize_hw!r}, which cannot be "
                          f"centre-cropped to {config.image_size} pixels: give integers >= crop_size.")
    return
  resize = config.short_side
  if not _is_count(resize, config.image_size):
    raise CLIPLoadError(f"{pre_file} resizes the short side to {resize!r}, which cannot be centre-cropped to "
                        f"{config.image_size} pixels: give size.shortest_edge >= crop_size.")


def init(config: CLIPConfig, tokenizer: CLIPTokenizer, rng: jax.Array, dtype: Dtype = jnp.float32) -> CLIP:
  """A CLIP with freshly initialised weights (for the project's own small CLIP and the benchmarks)."""
  chex.assert_equal(tokenizer.context_length, config.context_length)
  net = CLIPNetwork(config)
  ids = jnp.zeros((1, config.context_length), jnp.int32)
  pixels = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return CLIP(config, net.init(rng, ids, pixels)["params"], tokenizer, dtype)


def to_state_dict(params) -> dict[str, np.ndarray]:
  """The Hugging Face state dict of Flax ``params`` (the inverse of ``params_from_state_dict``)."""
  state = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = tuple(k.key for k in key_path)
    value = np.asarray(leaf, np.float32)
    if path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    state[hf_name(path)] = np.ascontiguousarray(value)
  return state


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
  """``tensors`` (float32) as a ``.safetensors`` file (see ``read_safetensors``)."""
  header, offset = {}, 0
  for name, array in tensors.items():
    header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array, np.float32).tobytes())


def save_pretrained(clip: CLIP, directory: str | Path) -> Path:
  """Writes ``clip`` as a Hugging Face ``CLIPModel`` directory that ``load`` reads back."""
  from videofusion_jax.models.clip_tokenizer import save_vocab

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  c = clip.config

  def tower(t: TowerConfig) -> dict:
    return {"hidden_size": t.width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "intermediate_size": t.mlp_dim, "hidden_act": t.activation, "layer_norm_eps": t.eps}
  config = {"model_type": "clip", "projection_dim": c.projection_dim,
            "text_config": {**tower(c.text), "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length,
                            "eos_token_id": c.eos_token_id},
            "vision_config": {**tower(c.vision), "image_size": c.image_size, "patch_size": c.patch_size}}
  (directory / "config.json").write_text(json.dumps(config, indent=2))
  size = ({"height": c.resize_hw[0], "width": c.resize_hw[1]} if c.resize_hw else {"shortest_edge": c.short_side})
  (directory / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": list(c.image_mean), "image_std": list(c.image_std), "crop_size": c.image_size,
       "size": size}, indent=2))
  save_vocab(directory, clip.tokenizer.vocab, clip.tokenizer.merges)
  # Its padding token too, where it is not the end of text (the tokenizer's default when none is named).
  pad = next(token for token, i in clip.tokenizer.vocab.items() if i == clip.tokenizer.pad_id)
  (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}, indent=2))
  write_safetensors(directory / "model.safetensors", to_state_dict(clip.params))
  return directory
