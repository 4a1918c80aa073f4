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
    if "tensorflow" in sys.modules or _KERAS_AT_TF_IMPORT in sys.modules:  # nothing to keep out
      import tensorflow as tf
    else:
      sys.modules[_KERAS_AT_TF_IMPORT] = None
      try:
        import tensorflow as tf
      except ModuleNotFoundError as e:
        if e.name != _KERAS_AT_TF_IMPORT:
          raise
        tf = None
      finally:
        if sys.modules.get(_KERAS_AT_TF_IMPORT, 0) is None:
          del sys.modules[_KERAS_AT_TF_IMPORT]
      if tf is None:  # a TensorFlow that needs Keras at its import after all: imported as it is
        import tensorflow as tf

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices (and hid the GPUs on that first call)
    pass
  return tf
