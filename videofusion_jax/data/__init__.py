"""Datasets and input pipelines. TensorFlow is imported only inside this package, lazily."""
import os


def tensorflow():
  """TensorFlow for the data side: quiet, and kept off the GPUs, whose memory belongs to JAX."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # silences a start-up notice; data only
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices (and hid the GPUs on that first call)
    pass
  return tf
