"""Datasets and input pipelines. TensorFlow is imported only inside this package, lazily."""
import os
import sys


def tensorflow():
  """TensorFlow for the data side: quiet, and kept off the GPUs, whose memory belongs to JAX."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # silences a start-up notice; data only
  # TensorFlow's import loads Keras eagerly (for its SavedModel registry; it passes on an ImportError), ~1.3 s of
  # its ~5 s, and nothing here uses Keras: kept out of that import, tf.keras and `import keras` still load it.
  blocked = "keras.src.optimizers"
  block = blocked not in sys.modules
  if block:
    sys.modules[blocked] = None
  try:
    import tensorflow as tf
  finally:
    if block and sys.modules.get(blocked, 0) is None:
      del sys.modules[blocked]

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices (and hid the GPUs on that first call)
    pass
  return tf
