"""A few hundred steps of the demo-sized model lower the loss on the real clips: the generators'
(eq. 12) and the prior's."""
import copy
import functools

import demo
import jax
import numpy as np
from conftest import one_device

from videofusion_jax.data import pipeline
from videofusion_jax.training.loop import train
from videofusion_jax.training.step import Trainer, loss_fn


def test_demo_model_learns_the_real_clips(tfds_dir, tmp_path):
  config = demo.get_config()
  config.data.data_dir = tfds_dir
  config.train.update(num_steps=200, batch_size=4, log_every=100, checkpoint_every=200)
  real = pipeline.eval_clips(config, 24)
  trainer = Trainer(config, mesh=one_device(config))
  # Measured by eq. 12 as written, on every frame and unweighted, whatever the demo trains with
  # (train.residual_frames, train.loss_weighting).
  unweighted = copy.copy(trainer)
  unweighted.config = copy.deepcopy(config)
  unweighted.config.train.update(loss_weighting="", residual_frames=0)
  evaluate = jax.jit(functools.partial(loss_fn, experiment=unweighted))

  def real_losses(params):
    terms = [evaluate(params, batch=real, rng=jax.random.PRNGKey(i))[1] for i in range(4)]
    return [float(np.mean([t[k] for t in terms])) for k in ("loss_generators", "loss_prior")]

  before, prior_before = real_losses(trainer.init_state(config.seed).params)
  # The output layers start at zero, so the first estimates are ε̂ = 0 and each loss is E[ε²] = 1.
  assert abs(before - 1.0) < 0.05 and abs(prior_before - 1.0) < 0.1
  state = train(config, tmp_path, trainer=trainer, verbose=False)
  after, prior_after = real_losses(state.params)
  assert after < 0.3 * before, (before, after)
  assert prior_after < 0.75 * prior_before, (prior_before, prior_after)
