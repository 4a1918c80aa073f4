"""Datasets and input pipelines. TensorFlow is imported only inside this package, lazily."""
