"""Datasets and input pipelines. TensorFlow is imported only inside this package, lazily."""
import os
import sys
import threading

_KERAS_AT_TF_IMPORT = "keras.src.optimizers"
_IMPORTING = threading.Lock()


def tensorflow():
  """TensorFlow for the data side: quiet, and kept off the GPUs, whose memory belongs to JAX."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # silences a start-up notice; data only
  # TensorFlow's import loads Keras eagerly (for its SavedModel registry; it passes on an ImportError), ~1.3 s of
  # its ~5 s, and nothing here uses Keras: kept out of that import, tf.keras and `import keras` still load it.
  with _IMPORTING:
    block = "tensorflow" not in sys.modules and _KERAS_AT_TF_IMPORT not in sys.modules
    if block:
      sys.modules[_KERAS_AT_TF_IMPORT] = None
    try:
      import tensorflow as tf
    except ModuleNotFoundError as e:  # a TensorFlow that needs it after all: imported as it is
      if not block or e.name != _KERAS_AT_TF_IMPORT:
        raise
      sys.modules.pop(_KERAS_AT_TF_IMPORT, None)
      block = False
      import tensorflow as tf
    finally:
      if block and sys.modules.get(_KERAS_AT_TF_IMPORT, 0) is None:
        del sys.modules[_KERAS_AT_TF_IMPORT]

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices (and hid the GPUs on that first call)
    pass
  return tf
