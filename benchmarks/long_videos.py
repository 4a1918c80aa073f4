"""Long videos from a trained workdir (issue 12, item 1): the boundary jump with and without
``sample.continuity_frames``, and a check that every clip of a video has the same key frame.

python benchmarks/long_videos.py --config=configs/demo.py --workdir=workdirs/demo \
    --config.sample.num_clips=4 --config.sample.continuity_frames=3

Both runs draw the same videos (the same keys: one content index per video, a motion index per
clip); only the pull toward the clip before differs, so the first clip of each is the same. One
JSON line, then a readable one. The key frames of a video's clips are the same for VideoFusion
(one base noise); VDM*'s space-time network sees every frame, so not for it. The boundary jump:
the mean absolute difference between the last frame of a clip and the first of the next, divided
by that between neighbouring frames inside clips (1: no visible seam).

Each variant is drawn twice, the same videos: the first draw compiles (``first_draw_seconds_*``,
compiling included), the second is timed (``seconds_*``), so that the two are compared compiled.
"""
from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's workdir.")


def step_profile(videos: np.ndarray, clip_frames: int) -> list[float]:
  """Mean ``|frame[n+1] - frame[n]|`` by ``n mod clip_frames`` (entry ``clip_frames - 1``: the
  seam), over the mean of the steps inside clips, ``(clip_frames,)``."""
  from videofusion_jax.evaluation.demo_metrics import frame_steps

  steps = frame_steps(videos)
  place = np.arange(len(steps)) % clip_frames
  inside = steps[place != clip_frames - 1].mean()
  return [round(float(steps[place == p].mean() / inside), 3) for p in range(clip_frames)]


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it reads at INFO
  from videofusion_jax import sampling
  from videofusion_jax.config import ConfigError
  from videofusion_jax.data.builders import DatasetNotFoundError
  from videofusion_jax.data.pipeline import PipelineError
  from videofusion_jax.diffusion import key_frame_index
  from videofusion_jax.evaluation.demo_metrics import boundary_jump
  from videofusion_jax.experiment import Experiment
  from videofusion_jax.models.clip import CLIPLoadError
  from videofusion_jax.training.checkpoint import CheckpointError
  from videofusion_jax.training.workdir import WorkdirError

  config = _CONFIG.value
  s, n = config.sample, config.data.num_frames
  if s.num_clips < 2 or not s.continuity_frames:
    raise app.UsageError("give --config.sample.num_clips >= 2 and --config.sample.continuity_frames >= 1.")
  try:
    experiment = Experiment(config)
    sampling.check_trained_config(config, _WORKDIR.value)  # as --mode=sample: settings the weights were not trained on
    given = sampling.given_embeddings(config, s.num_samples)
    prompts = sampling.sample_prompts(config, s.num_samples) if given is None else None  # a model on text
    state = experiment.restore(_WORKDIR.value, ema_only=True)
    text = None if prompts is None else sampling.prompt_embeddings(config, prompts)
  except (CheckpointError, WorkdirError) as e:  # one line, as the main program gives it
    raise app.UsageError(f"--workdir={_WORKDIR.value}: {e}") from None
  except (ConfigError, DatasetNotFoundError, PipelineError, CLIPLoadError) as e:
    raise app.UsageError(str(e)) from None
  rows = np.arange(s.num_samples)
  labels = sampling.sample_labels(config, s.num_samples)
  videos, seconds, first_seconds = {}, {}, {}
  for anchored in (False, True):
    # The first draw compiles the sampler (and the anchored variant its own); timed apart.
    for timed in (False, True):
      t0 = time.time()
      videos[anchored], _ = sampling.long_videos(experiment, state.ema_params, s.seed, rows, rows, labels, given,
                                                 anchored=anchored, text=text)
      (seconds if timed else first_seconds)[anchored] = time.time() - t0
  k = key_frame_index(n)
  keys = videos[True][:, k::n]  # (R, clips, H, W, C): the key frame of every clip
  result = {
      "result": "long_videos", "step": int(state.step), "videos": int(s.num_samples), "clips": int(s.num_clips),
      "frames": int(s.num_clips * n), **sampling.sampler_settings(config), "prompts": prompts,
      "continuity_frames": int(s.continuity_frames),
      **{f"boundary_jump_{name}": None if jump is None else round(jump, 4)  # None: frozen clips
         for name, jump in (("without", boundary_jump(videos[False], n)), ("with", boundary_jump(videos[True], n)))},
      "key_frame_max_difference_across_clips": float(np.abs(keys - keys[:, :1]).max()),
      # mean |frame[n+1] - frame[n]| by n's place in its clip (the last entry: the seam), over the
      # mean inside clips: where the option moves the change to
      "step_profile_without": step_profile(videos[False], n), "step_profile_with": step_profile(videos[True], n),
      "seconds_without": round(seconds[False], 2), "seconds_with": round(seconds[True], 2),
      "first_draw_seconds_without": round(first_seconds[False], 1),  # compiling included
      "first_draw_seconds_with": round(first_seconds[True], 1),
  }
  print(json.dumps(result))
  print(f"boundary jump over {s.num_samples} videos of {s.num_clips} clips (1 = no seam): "
        f"{result['boundary_jump_without']} without, {result['boundary_jump_with']} with "
        f"continuity_frames={s.continuity_frames}; key frames of a video's clips differ by at most "
        f"{result['key_frame_max_difference_across_clips']:.1e}; steps by place in the clip (last: the seam), "
        f"without {result['step_profile_without']}, with {result['step_profile_with']}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
