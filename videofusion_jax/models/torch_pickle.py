"""Reads a PyTorch ``state_dict`` file (``pytorch_model.bin``) into NumPy, without PyTorch.

Hugging Face's older CLIP checkpoints ship only this file. ``torch.save`` writes a zip archive:
``<name>/data.pkl`` (a pickle whose tensors are calls of ``torch._utils._rebuild_tensor_v2`` on
storages named by persistent ids) and one raw little-endian file per storage, ``<name>/data/<key>``.
The unpickler here admits only those few globals, so a checkpoint cannot run code when read
(unlike an unrestricted ``pickle.load``).
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchCheckpointError(ValueError):
  """A ``pytorch_model.bin`` this reader cannot read; the message says why and what to do."""


class _StorageType:
  def __init__(self, name: str):
    self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
  size, stride = tuple(size), tuple(stride)
  ints = all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride))
  # The last element the view reaches; as_strided itself would read past the storage (other memory).
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if ints and all(size) else offset - 1
  if not ints or len(size) != len(stride) or last >= len(storage) or offset > len(storage):
    raise ValueError(f"a tensor of shape {size}, strides {stride} at offset {offset} does not lie inside its "
                     f"storage of {len(storage)} elements")
  if not size:
    return storage[offset].copy()
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * item for s in stride))
  return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
  return data


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path):
    super().__init__(file)
    self.archive, self.prefix, self.path = archive, prefix, path

  def find_class(self, module: str, name: str):
    allowed = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
               ("collections", "OrderedDict"): collections.OrderedDict}
    if (module, name) in allowed:
      return allowed[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise TorchCheckpointError(f"{self.path} holds a {module}.{name}, which this reader (plain tensors only) does "
                               "not read; re-save the checkpoint with safe_serialization=True.")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, _numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise TorchCheckpointError(f"{self.path}: unknown storage record {pid!r}.")
    raw = self.archive.read(f"{self.prefix}/data/{key}")
    return np.frombuffer(raw, storage_type.dtype)


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
  """``{name: array}`` from a ``torch.save``'d state dict (zip format, PyTorch 1.6 and later)."""
  path = Path(path)
  if not zipfile.is_zipfile(path):
    raise TorchCheckpointError(
        f"{path} is not a zip-format PyTorch checkpoint (PyTorch < 1.6 wrote another format, or the file is "
        "damaged); convert it once where PyTorch is installed: CLIPModel.from_pretrained(DIR)"
        ".save_pretrained(DIR, safe_serialization=True), which writes model.safetensors.")
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:  # a damaged central directory: is_zipfile reads only its end record
    raise TorchCheckpointError(f"{path} is damaged: {type(e).__name__}: {e}. Download or save it again.") from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if not pickles:
      raise TorchCheckpointError(f"{path} is a zip file without a data.pkl: not a torch.save checkpoint.")
    prefix = pickles[0][: -len("/data.pkl")]
    try:
      with archive.open(pickles[0]) as f:
        state = _Unpickler(f, archive, prefix, path).load()
    except (KeyError, IndexError, TypeError, AttributeError, MemoryError, pickle.UnpicklingError, EOFError,
            ValueError, zipfile.BadZipFile) as e:
      if isinstance(e, TorchCheckpointError):
        raise
      raise TorchCheckpointError(f"{path} is damaged: {type(e).__name__}: {e}. Download or save it again.") from None
  if not isinstance(state, dict):
    raise TorchCheckpointError(f"{path} holds a {type(state).__name__}, not a state dict.")
  return dict(state)
