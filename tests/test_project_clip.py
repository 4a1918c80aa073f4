"""The project's own small CLIP (models/project_clip.py): its contrastive loss against the formula,
and training that separates videos and carries words to unseen captions."""
import math

import jax.numpy as jnp
import numpy as np

from videofusion_jax.models import project_clip


def np_contrastive(a, b, ga, gb, scale):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  logits = scale * a @ b.T

  def side(logits, same):
    losses = []
    for row, pos in zip(logits, same):
      if not pos.any():
        continue
      log_p = row - np.log(np.exp(row - row.max()).sum()) - row.max()
      losses.append(-log_p[pos].mean())
    return np.mean(losses)
  same = ga[:, None] == gb[None, :]
  return 0.5 * (side(logits, same) + side(logits.T, same.T))


def test_contrastive_loss_is_clips_with_every_caption_of_the_video_positive():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((6, 5)), rng.standard_normal((7, 5))
  ga, gb = np.array([0, 0, 1, 2, 1, 3]), np.array([1, 0, 0, 2, 2, 1, 4])  # image group 3 and text 4: no positive
  got = float(project_clip.contrastive_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ga), jnp.asarray(gb), 7.0))
  assert math.isclose(got, np_contrastive(a, b, ga, gb, 7.0), rel_tol=1e-5)
  # One positive each: CLIP's loss; orthogonal perfect pairs at a large scale: about 0.
  eye = np.eye(4)
  assert float(project_clip.contrastive_loss(jnp.asarray(eye), jnp.asarray(eye), jnp.arange(4), jnp.arange(4),
                                             100.0)) < 1e-6


def test_training_separates_the_videos_and_carries_words_to_unseen_captions(optimised):
  """Three 'videos' of 20 frames (a colour and a stripe direction each, with noise) and four captions
  each: after training, every frame's nearest caption is of its own video, the loss falls to near
  its floor, and an unseen caption made of one video's words is nearest to that video's frames."""
  rng = np.random.default_rng(0)
  colours = np.array([[200, 60, 40], [40, 180, 60], [50, 70, 210]], np.float32)
  frames, groups = [], []
  for g, colour in enumerate(colours):
    stripes = np.sin(np.arange(32) * (g + 1) * 0.6)[:, None] * (1 if g != 1 else 0) \
        + np.sin(np.arange(32) * 0.8)[None, :] * (1 if g == 1 else 0)
    for _ in range(20):
      img = colour + 40 * stripes[..., None] + rng.normal(0, 12, (32, 32, 3))
      frames.append(np.clip(img, 0, 255).astype(np.uint8))
      groups.append(g)
  captions = {0: ["a red fox runs", "the red fox in the snow", "a fox jumps", "red fur in winter"],
              1: ["green trees in a forest", "a green forest path", "leaves of the trees", "tall forest trees"],
              2: ["blue waves of the sea", "the sea at noon", "blue water and waves", "a calm blue sea"]}
  texts = [c for g in range(3) for c in captions[g]]
  text_groups = np.repeat(np.arange(3), 4)
  clip = project_clip.project_clip(16, texts)
  pixels = clip.preprocess(np.stack(frames))
  trained, figures = project_clip.train(clip, pixels, np.array(groups), texts, text_groups, steps=300)
  # With about 32/3 positives per row the loss cannot go below about log(32/3) = 2.37.
  assert figures["retrieval"] == 1.0 and figures["loss_last"] < min(figures["loss_first"] - 1.0, 2.6), figures
  image = np.array(trained.encode_image(pixels))
  image /= np.linalg.norm(image, axis=1, keepdims=True)
  unseen = ["a red fox", "the forest trees", "waves of the blue sea"]
  text = np.array(trained.encode_text(trained.tokenize(unseen)))
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  mean_sim = np.stack([(text @ image[np.array(groups) == g].T).mean(1) for g in range(3)], axis=1)
  assert mean_sim.argmax(1).tolist() == [0, 1, 2], mean_sim
