"""CLIP in Flax (``models/clip.py``): a tiny CLIP written here in Hugging Face's layout (random
weights, the real parameter names and PyTorch shapes) is loaded by ``clip.load`` and must give the
embeddings of a NumPy forward pass written from Hugging Face's ``CLIPModel`` code."""
from __future__ import annotations

import collections
import io
import json
import math
import pickle
import re
import struct
import sys
import types
import zipfile

import jax
import ml_collections
import numpy as np
import pytest

from videofusion_jax.models import clip as clip_lib
from videofusion_jax.models.clip_tokenizer import save_vocab, train_bpe
from videofusion_jax.models.torch_pickle import read_torch_checkpoint

CAPTIONS = ["a person riding a horse on the beach", "two dogs play in the snow", "The sky at night, time-lapse!",
            "a dog", "someone plays the violin while riding a bicycle through a crowded market in 2023"]
SIZES = dict(text_width=32, vision_width=24, layers=2, heads=4, projection=20, context=16, image=32, patch=8)


# ---------------------------------------------------------------------------------------------
# The tiny checkpoint, in Hugging Face's names and PyTorch's layouts.


def tiny_state(rng: np.random.Generator, vocab_size: int) -> dict[str, np.ndarray]:
  s = SIZES
  state = {}

  def normal(*shape, scale=0.2):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  def tower(prefix, width, mlp):
    for i in range(s["layers"]):
      p = f"{prefix}.encoder.layers.{i}."
      for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        state[p + f"self_attn.{proj}.weight"] = normal(width, width, scale=1 / math.sqrt(width))
        state[p + f"self_attn.{proj}.bias"] = normal(width, scale=0.05)
      state[p + "mlp.fc1.weight"] = normal(mlp, width, scale=1 / math.sqrt(width))
      state[p + "mlp.fc2.weight"] = normal(width, mlp, scale=1 / math.sqrt(mlp))
      state[p + "mlp.fc1.bias"], state[p + "mlp.fc2.bias"] = normal(mlp), normal(width)
      for ln in ("layer_norm1", "layer_norm2"):
        state[p + f"{ln}.weight"], state[p + f"{ln}.bias"] = 1 + normal(width, scale=0.1), normal(width, scale=0.1)

  tw, vw = s["text_width"], s["vision_width"]
  state["text_model.embeddings.token_embedding.weight"] = normal(vocab_size, tw)
  state["text_model.embeddings.position_embedding.weight"] = normal(s["context"], tw)
  state["text_model.embeddings.position_ids"] = np.arange(s["context"], dtype=np.int64)[None]  # old checkpoints
  tower("text_model", tw, 2 * tw)
  state["text_model.final_layer_norm.weight"], state["text_model.final_layer_norm.bias"] = 1 + normal(tw), normal(tw)
  n = (s["image"] // s["patch"]) ** 2 + 1
  state["vision_model.embeddings.class_embedding"] = normal(vw)
  state["vision_model.embeddings.patch_embedding.weight"] = normal(vw, 3, s["patch"], s["patch"], scale=0.05)
  state["vision_model.embeddings.position_embedding.weight"] = normal(n, vw)
  for ln in ("pre_layrnorm", "post_layernorm"):
    state[f"vision_model.{ln}.weight"], state[f"vision_model.{ln}.bias"] = 1 + normal(vw), normal(vw)
  tower("vision_model", vw, 3 * vw)
  state["text_projection.weight"] = normal(s["projection"], tw)
  state["visual_projection.weight"] = normal(s["projection"], vw)
  state["logit_scale"] = np.float32(2.6592)
  return state


def tiny_config(vocab_size: int, act: str, eos_token_id: int) -> dict:
  s = SIZES
  return {
      "model_type": "clip", "projection_dim": s["projection"],
      "text_config": {"hidden_size": s["text_width"], "intermediate_size": 2 * s["text_width"],
                      "num_attention_heads": s["heads"], "num_hidden_layers": s["layers"],
                      "max_position_embeddings": s["context"], "vocab_size": vocab_size, "hidden_act": act,
                      "eos_token_id": eos_token_id},
      "vision_config": {"hidden_size": s["vision_width"], "intermediate_size": 3 * s["vision_width"],
                        "num_attention_heads": s["heads"], "num_hidden_layers": s["layers"],
                        "image_size": s["image"], "patch_size": s["patch"], "hidden_act": act},
  }


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
  """The safetensors layout, written here independently of the reader under test."""
  codes = {np.float32: "F32", np.float16: "F16", np.int64: "I64"}
  header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, array in tensors.items():
    data = np.ascontiguousarray(array).tobytes()
    header[name] = {"dtype": codes[np.asarray(array).dtype.type], "shape": list(np.shape(array)),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_checkpoint(directory, act="quick_gelu", legacy_eos=True, seed=0, pad_token=None, weights="safetensors"):
  """A tiny CLIPModel directory; returns its state dict and config."""
  directory.mkdir(parents=True, exist_ok=True)
  vocab, merges = train_bpe(CAPTIONS * 3, 60)
  save_vocab(directory, vocab, merges)
  if pad_token:
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
  state = tiny_state(np.random.default_rng(seed), len(vocab))
  config = tiny_config(len(vocab), act, 2 if legacy_eos else vocab["<|endoftext|>"])
  (directory / "config.json").write_text(json.dumps(config))
  if weights == "safetensors":
    write_safetensors(directory / "model.safetensors", state)
  return state, config


# ---------------------------------------------------------------------------------------------
# The reference: Hugging Face's CLIPModel forward pass, in NumPy.


def np_layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def np_activation(name, x):
  if name == "quick_gelu":
    return x / (1 + np.exp(-1.702 * x))
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_encoder(sd, prefix, x, act, causal):
  b, length, w = x.shape
  h = SIZES["heads"]
  for i in range(SIZES["layers"]):
    p = f"{prefix}.encoder.layers.{i}."
    lin = lambda y, name: y @ sd[p + name + ".weight"].T + sd[p + name + ".bias"]  # noqa: E731
    y = np_layer_norm(x, sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"])
    q, k, v = (lin(y, f"self_attn.{n}").reshape(b, length, h, w // h).transpose(0, 2, 1, 3)
               for n in ("q_proj", "k_proj", "v_proj"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(w // h)
    if causal:
      scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    x = x + lin((attn @ v).transpose(0, 2, 1, 3).reshape(b, length, w), "self_attn.out_proj")
    y = np_layer_norm(x, sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"])
    x = x + lin(np_activation(act, lin(y, "mlp.fc1")), "mlp.fc2")
  return x


def np_encode_text(sd, config, ids):
  act, eos = config["text_config"]["hidden_act"], config["text_config"]["eos_token_id"]
  x = sd["text_model.embeddings.token_embedding.weight"][ids]
  x = x + sd["text_model.embeddings.position_embedding.weight"][: ids.shape[1]]
  x = np_encoder(sd, "text_model", x.astype(np.float64), act, causal=True)
  x = np_layer_norm(x, sd["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.bias"])
  # Hugging Face: argmax of the ids for the legacy eos_token_id 2, else the first eos_token_id.
  pool = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
  return x[np.arange(len(ids)), pool] @ sd["text_projection.weight"].T


def np_encode_image(sd, config, pixels):
  act, p, s = config["vision_config"]["hidden_act"], SIZES["patch"], SIZES["image"]
  g = s // p
  patches = pixels.reshape(len(pixels), g, p, g, p, 3)  # (B, row, y, col, x, c)
  x = np.einsum("bipjqc,wcpq->bijw", patches, sd["vision_model.embeddings.patch_embedding.weight"])
  x = x.reshape(len(pixels), g * g, -1)
  cls = np.broadcast_to(sd["vision_model.embeddings.class_embedding"], (len(pixels), 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + sd["vision_model.embeddings.position_embedding.weight"]
  x = np_layer_norm(x, sd["vision_model.pre_layrnorm.weight"], sd["vision_model.pre_layrnorm.bias"])
  x = np_encoder(sd, "vision_model", x.astype(np.float64), act, causal=False)
  x = np_layer_norm(x[:, 0], sd["vision_model.post_layernorm.weight"], sd["vision_model.post_layernorm.bias"])
  return x @ sd["visual_projection.weight"].T


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act,legacy_eos,pad", [("quick_gelu", True, None), ("gelu", False, "!")])
def test_loaded_towers_match_a_numpy_forward_pass(tmp_path, act, legacy_eos, pad):
  state, config = write_checkpoint(tmp_path / "clip", act, legacy_eos, pad_token=pad)
  clip = clip_lib.load(tmp_path / "clip")
  ids = clip.tokenize(CAPTIONS)
  assert ids.shape == (len(CAPTIONS), SIZES["context"]) and ids.dtype == np.int32
  np.testing.assert_allclose(clip.encode_text(ids), np_encode_text(state, config, ids), atol=1e-4, rtol=1e-4)
  # A shorter id sequence, pooled by the same rule.
  np.testing.assert_allclose(clip.encode_text(ids[:, :12]), np_encode_text(state, config, ids[:, :12]), atol=1e-4)
  pixels = np.random.default_rng(1).standard_normal((3, SIZES["image"], SIZES["image"], 3)).astype(np.float32)
  image = np.asarray(clip.encode_image(pixels))
  assert image.shape == (3, SIZES["projection"])
  np.testing.assert_allclose(image, np_encode_image(state, config, pixels), atol=1e-4, rtol=1e-4)
  # The captions differ, and so do their embeddings: the pooling does not read padding.
  assert np.min(np.linalg.norm(np.diff(np.asarray(clip.encode_text(ids)), axis=0), axis=-1)) > 1e-2


def test_a_saved_clip_loads_back_with_its_tokenizer_and_preprocessing(tmp_path):
  """``save_pretrained`` then ``load``: the same weights, the same token ids for a pad token other than the end of
  text (it was dropped: padded with the end of text after the round trip) and the same pixels for a preprocessor
  that resizes to a height and width."""
  write_checkpoint(tmp_path / "clip", pad_token="!")
  (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(
      {"crop_size": SIZES["image"], "size": {"height": SIZES["image"] + 6, "width": SIZES["image"] + 2}}))
  clip = clip_lib.load(tmp_path / "clip")
  again = clip_lib.load(clip_lib.save_pretrained(clip, tmp_path / "saved"))
  assert clip.tokenizer.pad_id != clip.tokenizer.vocab["<|endoftext|>"]
  np.testing.assert_array_equal(again.tokenize(CAPTIONS), clip.tokenize(CAPTIONS))
  frames = np.random.default_rng(2).integers(0, 256, (2, 40, 90, 3), dtype=np.uint8)
  np.testing.assert_array_equal(again.preprocess(frames), clip.preprocess(frames))
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(clip.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pooling_rule_is_hugging_faces():
  ids = np.array([[1, 9, 5, 7, 5], [5, 0, 0, 0, 0]])
  assert clip_lib.end_of_text_index(ids, 2).tolist() == [1, 0]  # legacy: argmax of the ids
  assert clip_lib.end_of_text_index(ids, 5).tolist() == [2, 0]  # first end-of-text


def _fake_torch_save(path, state, monkeypatch, views=None):
  """``torch.save(state_dict)``'s zip layout, written without PyTorch: fake ``torch`` modules give the
  pickle the globals a real checkpoint names. One tensor is stored transposed (non-contiguous).
  ``views``: ``{name: (offset, size, stride)}`` written instead of a tensor's own (damaged records)."""
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")
  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2, torch._utils = _rebuild_tensor_v2, utils
  storages = {}
  for dtype, name in ((np.float32, "FloatStorage"), (np.float16, "HalfStorage"), (np.int64, "LongStorage")):
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)
    storages[np.dtype(dtype)] = cls
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)

  class Storage:
    def __init__(self, key, array):
      self.key, self.array = key, array

  class Tensor:
    def __init__(self, key, array, transposed, name=None):
      self.name = name
      self.storage = Storage(key, np.ascontiguousarray(array.T) if transposed else np.ascontiguousarray(array))
      self.shape, self.stride = array.shape, (1, array.shape[0]) if transposed else None

    def __reduce__(self):
      stride = self.stride or tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
      offset, size, stride = (views or {}).get(self.name, (0, self.shape, stride))
      return _rebuild_tensor_v2, (self.storage, offset, size, stride, False, collections.OrderedDict())

  buf = io.BytesIO()
  pickler = pickle.Pickler(buf, protocol=2)
  pickler.persistent_id = lambda obj: (("storage", storages[obj.array.dtype], obj.key, "cpu", obj.array.size)
                                       if isinstance(obj, Storage) else None)
  tensors = collections.OrderedDict(
      (name, Tensor(str(i), np.asarray(a), transposed=name == "text_projection.weight", name=name))
      for i, (name, a) in enumerate(state.items()))
  pickler.dump(tensors)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    for t in tensors.values():
      z.writestr(f"archive/data/{t.storage.key}", t.storage.array.tobytes())


def test_half_precision_sharded_and_pytorch_bin_weights_load_the_same(tmp_path, monkeypatch):
  state, config = write_checkpoint(tmp_path / "ref")
  ref = clip_lib.load(tmp_path / "ref").params
  leaves = lambda params: {"/".join(k.key for k in p): np.asarray(v)  # noqa: E731
                           for p, v in __import__("jax").tree_util.tree_flatten_with_path(params)[0]}
  ref_leaves = leaves(ref)
  # Every leaf is a state-dict tensor in the Flax layout.
  np.testing.assert_array_equal(ref_leaves["text_projection/kernel"], state["text_projection.weight"].T)
  np.testing.assert_array_equal(ref_leaves["vision_model/embeddings/patch_embedding/kernel"],
                                state["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))

  half = write_checkpoint(tmp_path / "half", weights=None)[0]
  write_safetensors(tmp_path / "half" / "model.safetensors",
                    {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in half.items()})
  for name, value in leaves(clip_lib.load(tmp_path / "half").params).items():
    np.testing.assert_array_equal(value, ref_leaves[name].astype(np.float16).astype(np.float32), err_msg=name)

  write_checkpoint(tmp_path / "sharded", weights=None)
  names = sorted(state)
  shards = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
  for shard, keys in shards.items():
    write_safetensors(tmp_path / "sharded" / shard, {k: state[k] for k in keys})
  (tmp_path / "sharded" / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {k: s for s, keys in shards.items() for k in keys}}))
  for name, value in leaves(clip_lib.load(tmp_path / "sharded").params).items():
    np.testing.assert_array_equal(value, ref_leaves[name], err_msg=name)

  write_checkpoint(tmp_path / "bin", weights=None)
  _fake_torch_save(tmp_path / "bin" / "pytorch_model.bin", state, monkeypatch)
  monkeypatch.delitem(sys.modules, "torch")
  monkeypatch.delitem(sys.modules, "torch._utils")
  for name, value in leaves(clip_lib.load(tmp_path / "bin").params).items():
    np.testing.assert_array_equal(value, ref_leaves[name], err_msg=name)


def test_preprocess_resizes_the_short_side_crops_the_centre_and_normalises(tmp_path):
  write_checkpoint(tmp_path / "clip")
  clip = clip_lib.load(tmp_path / "clip")
  s, mean, std = SIZES["image"], np.float32(clip_lib.OPENAI_MEAN), np.float32(clip_lib.OPENAI_STD)
  # A wide frame whose short side is already S: no resampling, the centre S columns are kept.
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (1, s, 2 * s, 3), dtype=np.uint8)
  np.testing.assert_allclose(clip.preprocess(wide), (wide[:, :, s // 2:s // 2 + s] / 255.0 - mean) / std, atol=1e-6)
  tall = rng.integers(0, 256, (s + 6, s, 3), dtype=np.uint8)  # one frame, (H, W, 3)
  np.testing.assert_allclose(clip.preprocess(tall), (tall[None, 3:3 + s] / 255.0 - mean) / std, atol=1e-6)
  # Any size: a constant frame stays constant through the bicubic resize.
  flat = np.full((2, 50, 70, 3), (10, 128, 250), np.uint8)
  out = clip.preprocess(flat)
  assert out.shape == (2, s, s, 3)
  np.testing.assert_allclose(out, np.broadcast_to((np.float32([10, 128, 250]) / 255 - mean) / std, out.shape),
                             atol=1e-6)
  # A preprocessor that resizes the short side to more than the crop (size.shortest_edge): a frame whose
  # short side is already that size is cropped at its centre, not shrunk to S first.
  (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(
      {"crop_size": s, "size": {"shortest_edge": s + 8}}))
  larger = clip_lib.load(tmp_path / "clip")
  frame = rng.integers(0, 256, (s + 8, s + 20, 3), dtype=np.uint8)
  np.testing.assert_allclose(larger.preprocess(frame), (frame[None, 4:4 + s, 10:10 + s] / 255.0 - mean) / std,
                             atol=1e-6)
  (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": s - 1}}))
  with pytest.raises(clip_lib.CLIPLoadError, match=f"resizes the short side to {s - 1}, which cannot be"):
    clip_lib.load(tmp_path / "clip")
  # size as height and width: CLIPImageProcessor resizes to exactly that, the aspect not kept (it was taken for
  # the short side: other pixels, silently); a mean and std of one number each, or null (OpenAI's), as it takes.
  from PIL import Image
  (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(
      {"crop_size": {"height": s, "width": s}, "size": {"height": s + 4, "width": s}, "image_mean": 0.5,
       "image_std": 0.5}))
  squashed = clip_lib.load(tmp_path / "clip")
  frame = rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)
  resized = np.asarray(Image.fromarray(frame).resize((s, s + 4), Image.BICUBIC), np.float32)[2:2 + s]
  np.testing.assert_allclose(squashed.preprocess(frame), ((resized / 255.0 - 0.5) / 0.5)[None], atol=1e-6)
  (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": None, "image_std": None}))
  np.testing.assert_allclose(clip_lib.load(tmp_path / "clip").preprocess(wide), clip.preprocess(wide), atol=0)
  (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"size": {"height": s - 1, "width": s}}))
  with pytest.raises(clip_lib.CLIPLoadError, match=re.escape(f"resizes to height x width ({s - 1}, {s}), which")):
    clip_lib.load(tmp_path / "clip")


def _error(fn, *args) -> str:
  with pytest.raises(ValueError) as e:
    fn(*args)
  return str(e.value)


def test_bad_directories_and_inputs_get_one_clear_message_each(tmp_path, monkeypatch):
  assert "does not exist" in _error(clip_lib.load, tmp_path / "nowhere")
  (tmp_path / "file").write_text("x")
  assert "is not a directory" in _error(clip_lib.load, tmp_path / "file")
  (tmp_path / "empty").mkdir()
  assert "has no config.json" in _error(clip_lib.load, tmp_path / "empty")
  state, config = write_checkpoint(tmp_path / "c", weights=None)
  assert "has no CLIP weights: expected model.safetensors" in _error(clip_lib.load, tmp_path / "c")
  (tmp_path / "c" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
  assert "is not a CLIPModel config" in _error(clip_lib.load, tmp_path / "c")
  (tmp_path / "c" / "config.json").write_text(json.dumps(config))
  partial = {k: v for k, v in state.items() if k != "vision_model.post_layernorm.bias"}
  partial["text_projection.weight"] = state["text_projection.weight"][:, :-1]
  write_safetensors(tmp_path / "c" / "model.safetensors", partial)
  msg = _error(clip_lib.load, tmp_path / "c")
  assert "vision_model.post_layernorm.bias is missing" in msg
  assert "text_projection.weight has shape (20, 31), config.json implies (20, 32)" in msg
  write_safetensors(tmp_path / "c" / "model.safetensors", state)
  data = (tmp_path / "c" / "model.safetensors").read_bytes()
  (tmp_path / "c" / "model.safetensors").write_bytes(data[:-100])
  assert "is truncated" in _error(clip_lib.load, tmp_path / "c")
  (tmp_path / "c" / "model.safetensors").write_bytes(data)
  (tmp_path / "c" / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 224, "width": 224}}))
  assert "crops to 224 pixels but the vision tower takes 32" in _error(clip_lib.load, tmp_path / "c")
  (tmp_path / "c" / "preprocessor_config.json").unlink()
  (tmp_path / "c" / "model.safetensors").unlink()
  (tmp_path / "c" / "pytorch_model.bin").write_bytes(b"not a zip")
  assert "not a zip-format PyTorch checkpoint" in _error(clip_lib.load, tmp_path / "c")
  with zipfile.ZipFile(tmp_path / "c" / "pytorch_model.bin", "w") as z:  # a storage missing from the archive
    z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2)[:-3])
  assert "is damaged" in _error(clip_lib.load, tmp_path / "c")
  with zipfile.ZipFile(tmp_path / "c" / "pytorch_model.bin", "w") as z:  # APPEND to an int: an AttributeError
    z.writestr("archive/data.pkl", b"\x80\x02K\x01K\x02a.")
  assert "is damaged: AttributeError" in _error(clip_lib.load, tmp_path / "c")
  # A damaged central directory (zipfile.is_zipfile reads only the record at its end): a raw BadZipFile before.
  _fake_torch_save(tmp_path / "c" / "pytorch_model.bin", {"w": np.arange(4, dtype=np.float32)}, monkeypatch)
  data = (tmp_path / "c" / "pytorch_model.bin").read_bytes()
  (tmp_path / "c" / "pytorch_model.bin").write_bytes(data.replace(b"PK\x01\x02", b"PK\x00\x00", 1))
  assert "is damaged: BadZipFile" in _error(clip_lib.load, tmp_path / "c")
  # Tensor records that reach past their storage (4 floats): an error, not memory beyond it read as
  # weights (or a crash).
  for view in ((0, (8,), (1,)), (0, (4,), (1 << 28,)), (9, (), ()), (-1, (2,), (1,)), (0, (2, 2), (1,))):
    _fake_torch_save(tmp_path / "c" / "pytorch_model.bin", {"w": np.arange(4, dtype=np.float32)}, monkeypatch,
                     views={"w": view})
    assert "does not lie inside its storage of 4 elements" in _error(read_torch_checkpoint,
                                                                     tmp_path / "c" / "pytorch_model.bin")
  _fake_torch_save(tmp_path / "c" / "pytorch_model.bin", {"w": np.arange(4, dtype=np.float32)}, monkeypatch,
                   views={"w": (1, (3,), (1,))})
  np.testing.assert_array_equal(read_torch_checkpoint(tmp_path / "c" / "pytorch_model.bin")["w"], [1, 2, 3])
  (tmp_path / "c" / "pytorch_model.bin").unlink()
  # A safetensors header whose records do not fit their bytes, or lack a field.
  for info, message in (({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12 bytes"),
                        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "which this reader does not know"),
                        ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}, "needs 4835703278458516"),
                        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "byte range [8, 0)"),
                        ({"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}, "has shape 2"),
                        ({"dtype": "F32", "shape": [2]}, "is not {dtype, shape, data_offsets")):
    text = json.dumps({"w": info}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))
    assert message in _error(clip_lib.read_safetensors, tmp_path / "bad.safetensors")
  # A scalar and an empty tensor are not damage.
  write_safetensors(tmp_path / "edge.safetensors", {"scalar": np.float32(2.5), "empty": np.zeros((0, 3), np.float32)})
  edge = clip_lib.read_safetensors(tmp_path / "edge.safetensors")
  assert edge["scalar"].shape == () and float(edge["scalar"]) == 2.5 and edge["empty"].shape == (0, 3)
  write_safetensors(tmp_path / "c" / "model.safetensors", state)
  (tmp_path / "c" / "config.json").write_text("{not json")
  assert "config.json is not valid JSON" in _error(clip_lib.load, tmp_path / "c")
  # The config's own check of the directory (model.encoder.clip_dir) says the same of a config that is not an object.
  from videofusion_jax.config import ConfigError, _check_clip_encoder
  (tmp_path / "c" / "config.json").write_text("[1, 2]")
  listed = re.escape(f"{tmp_path / 'c' / 'config.json'} holds a JSON list, not a CLIPModel")
  with pytest.raises(ConfigError, match=listed):
    _check_clip_encoder(ml_collections.ConfigDict({"clip_dir": str(tmp_path / "c"), "embed_dim": 512}))
  (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "text_config": {
      **config["text_config"], "hidden_act": "swish2"}}))
  assert "text_config.hidden_act='swish2' is not one this CLIP knows" in _error(clip_lib.load, tmp_path / "c")
  for e in ("nowhere", "file", "empty", "c"):  # every message above is the loader's own error class
    with pytest.raises(clip_lib.CLIPLoadError):
      clip_lib.load(tmp_path / e)

  write_checkpoint(tmp_path / "ok")
  clip = clip_lib.load(tmp_path / "ok")
  assert "pixels of shape (B, 32, 32, 3)" in _error(clip.encode_image, np.zeros((1, 64, 64, 3), np.float32))
  assert "L <= 16" in _error(clip.encode_text, np.zeros((1, 17), np.int32))
  assert "must lie in [0, " in _error(clip.encode_text, np.full((1, 4), 10**6, np.int32))
  assert "uint8 RGB frames" in _error(clip.preprocess, np.zeros((1, 8, 8, 3), np.float32))


def _sharded_index(directory, text):
  """The weights moved to a shard, with ``text`` as its index."""
  (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
  (directory / "model.safetensors.index.json").write_text(text)


def _config_edit(directory, edit):
  config = json.loads((directory / "config.json").read_text())
  edit(config)
  (directory / "config.json").write_text(json.dumps(config))


def _tokenizer_json_only(directory, spec):
  (directory / "vocab.json").unlink()
  (directory / "merges.txt").unlink()
  (directory / "tokenizer.json").write_text(json.dumps(spec))


DAMAGED = {  # case: (the damage, the file the message must name)
    "index_not_json": (lambda d: _sharded_index(d, "{not json"), "model.safetensors.index.json"),
    "index_without_weight_map": (lambda d: _sharded_index(d, '{"metadata": {}}'), "model.safetensors.index.json"),
    "index_a_list": (lambda d: _sharded_index(d, "[1, 2]"), "model.safetensors.index.json"),
    "config_a_list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json"),
    "text_config_a_list": (lambda d: _config_edit(d, lambda c: c.update(text_config=[1])), "config.json"),
    "heads_not_dividing_width": (lambda d: _config_edit(d, lambda c: c["text_config"].update(num_attention_heads=5)),
                                 "config.json"),
    "zero_heads": (lambda d: _config_edit(d, lambda c: c["vision_config"].update(num_attention_heads=0)),
                   "config.json"),
    "preprocessor_a_list": (lambda d: (d / "preprocessor_config.json").write_text("[]"), "preprocessor_config.json"),
    "vocab_not_json": (lambda d: (d / "vocab.json").write_text('{"a": 1,'), "vocab.json"),
    "vocab_a_list": (lambda d: (d / "vocab.json").write_text('["a"]'), "vocab.json"),
    "merges_of_three_tokens": (lambda d: (d / "merges.txt").write_text((d / "merges.txt").read_text() + "a b c\n"),
                               "merges.txt"),
    "tokenizer_json_without_vocab": (lambda d: _tokenizer_json_only(d, {"model": {}}), "tokenizer.json"),
    "tokenizer_json_a_list": (lambda d: _tokenizer_json_only(d, []), "tokenizer.json"),
    "tokenizer_json_bad_added_token": (lambda d: _tokenizer_json_only(d, {"model": {"vocab": {"a": 0}, "merges": []},
                                                                         "added_tokens": [{"id": 1}]}),
                                       "tokenizer.json"),
    "special_tokens_not_json": (lambda d: (d / "special_tokens_map.json").write_text("{"), "special_tokens_map.json"),
    # Values no check read: each was a raw error inside Flax, at the first image or text, or in preprocess.
    "patch_size_zero": (lambda d: _config_edit(d, lambda c: c["vision_config"].update(patch_size=0)), "config.json"),
    "image_size_a_string": (lambda d: _config_edit(d, lambda c: c["vision_config"].update(image_size="32")),
                            "config.json"),
    "projection_dim_a_string": (lambda d: _config_edit(d, lambda c: c.update(projection_dim="20")), "config.json"),
    "vocab_size_null": (lambda d: _config_edit(d, lambda c: c["text_config"].update(vocab_size=None)), "config.json"),
    "eps_a_string": (lambda d: _config_edit(d, lambda c: c["text_config"].update(layer_norm_eps="x")), "config.json"),
    "eos_a_string": (lambda d: _config_edit(d, lambda c: c["text_config"].update(eos_token_id="x")), "config.json"),
    "mean_of_two": (lambda d: (d / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5]}'),
                    "preprocessor_config.json"),
    "std_zero": (lambda d: (d / "preprocessor_config.json").write_text('{"image_std": 0}'), "preprocessor_config.json"),
    # Steps of CLIPImageProcessor this CLIP would not take: other pixels, silently.
    "resample_bilinear": (lambda d: (d / "preprocessor_config.json").write_text('{"resample": 2}'),
                          "preprocessor_config.json"),
    "no_normalize": (lambda d: (d / "preprocessor_config.json").write_text('{"do_normalize": false}'),
                     "preprocessor_config.json"),
    "rescale_by_one": (lambda d: (d / "preprocessor_config.json").write_text('{"rescale_factor": 1.0}'),
                       "preprocessor_config.json"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_file_is_one_clip_load_error_naming_it(tmp_path, case):
  """Each damaged file of a CLIP directory (config.model.encoder.clip_dir) is a CLIPLoadError (what the
  command line reports in one line) whose message gives the file's path."""
  write_checkpoint(tmp_path / "c")
  clip_lib.load(tmp_path / "c")  # whole, it loads
  damage, name = DAMAGED[case]
  damage(tmp_path / "c")
  with pytest.raises(clip_lib.CLIPLoadError) as e:
    clip_lib.load(tmp_path / "c")
  assert str(tmp_path / "c" / name) in str(e.value)
