"""Entry point: ``python -m videofusion_jax.main --config=configs/demo.py --workdir=DIR``.

Modes: ``train`` (resumes from the latest checkpoint in the workdir), ``sample`` (EMA
weights of the latest checkpoint -> videos), ``train_and_sample``, ``eval`` (FVD, KVD and,
given C3D weights, the Inception Score of the latest checkpoint).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, events and samples go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "train_and_sample", "eval"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax and TFDS log every file at INFO.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from videofusion_jax.config import ConfigError
  from videofusion_jax.data.builders import DatasetNotFoundError
  from videofusion_jax.data.pipeline import PipelineError
  from videofusion_jax.data.video_io import VideoReadError
  from videofusion_jax.training.checkpoint import CheckpointError
  from videofusion_jax.training.loop import NonFiniteLossError

  if os.environ.get("VIDEOFUSION_MULTIHOST"):
    import jax
    jax.distributed.initialize()
  config = _CONFIG.value
  try:
    from videofusion_jax.experiment import enable_compilation_cache
    enable_compilation_cache(config.compilation_cache_dir)
    # One experiment per run (it validates the config), shared by the modes the run performs.
    if _MODE.value in ("train", "train_and_sample"):
      from videofusion_jax.training.loop import train
      from videofusion_jax.training.step import Trainer
      experiment = Trainer(config)
      train(config, _WORKDIR.value, trainer=experiment)
    else:
      from videofusion_jax.experiment import Experiment
      experiment = Experiment(config)
    if _MODE.value in ("sample", "train_and_sample"):
      from videofusion_jax import sampling
      sampling.run(config, _WORKDIR.value, experiment=experiment)
    if _MODE.value == "eval":
      from videofusion_jax.evaluation import evaluate
      evaluate.run(config, _WORKDIR.value, experiment=experiment)
  except (ConfigError, DatasetNotFoundError, VideoReadError, CheckpointError, NonFiniteLossError,
          PipelineError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
