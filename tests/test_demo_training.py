"""A few hundred steps of the demo-sized model lower the loss on the real clips."""
import functools

import demo
import jax
import numpy as np

from videofusion_jax.data import pipeline
from videofusion_jax.training.loop import train
from videofusion_jax.training.sharding import make_mesh
from videofusion_jax.training.step import Trainer, loss_fn


def test_demo_model_learns_the_real_clips(tfds_dir, tmp_path):
  config = demo.get_config()
  config.data.data_dir = tfds_dir
  config.train.update(num_steps=200, batch_size=4, log_every=100, checkpoint_every=200)
  real = pipeline.eval_clips(config, 24)
  trainer = Trainer(config, mesh=make_mesh(config, devices=jax.devices()[:1]))
  evaluate = jax.jit(functools.partial(loss_fn, networks=trainer.networks, config=config,
                                       lambdas=trainer.lambdas, schedule=trainer.schedule))

  def real_loss(trainer, params):
    return float(np.mean([evaluate(params, batch=real, rng=jax.random.PRNGKey(i))[0] for i in range(4)]))

  before = real_loss(trainer, trainer.init_state(config.seed).params)
  # The output layers start at zero, so the first estimate is ε̂ = 0 and the loss is E[ε²] = 1.
  assert abs(before - 1.0) < 0.05
  state = train(config, tmp_path, trainer=trainer, verbose=False)
  after = real_loss(trainer, state.params)
  assert after < 0.3 * before, (before, after)
