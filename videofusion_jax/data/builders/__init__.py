"""TFDS builders for the demo clips and the real video datasets, and ``prepare()`` to build them.

``from videofusion_jax.data.builders import DatasetNotFoundError`` does not import TensorFlow;
``BUILDERS``, ``prepare``, ``summarize`` and the builder classes import it (and TFDS) on first access.
``common`` holds what the builders share; ``registry`` imports every builder and holds ``prepare``.

Example::

  builder = prepare("ucf101", data_dir="~/tensorflow_datasets", manual_dir="/data/ucf101", config="128")
  source = builder.as_data_source("train")            # random access into the ArrayRecord files
  lengths = builder.info.metadata["lengths"]["train"]  # num_frames of record 0, 1, ...
"""
from __future__ import annotations

import importlib
from typing import Any


class DatasetNotFoundError(FileNotFoundError):
  """The raw dataset is not on disk as expected; the message gives the layout, the source and the flag."""


# Attribute -> module that defines it; imported lazily so that the error class above stays TF-free.
_LAZY = {
    "BUILDERS": "registry",
    "prepare": "registry",
    "summarize": "registry",
    "VideoBuilder": "common",
    "VideoConfig": "common",
    "DemoClips": "demo_clips",
    "Ucf101": "ucf101",
    "SkyTimelapse": "sky_timelapse",
    "TaiChi": "taichi",
    "WebVid": "webvid",
}

__all__ = ["DatasetNotFoundError", *_LAZY]


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
  value = getattr(module, name)
  globals()[name] = value
  return value
