"""The project's own small CLIP, for offline runs without a CLIP directory.

Two 64-wide transformer layers per tower, 32-pixel images in 8-pixel patches, 32 tokens, a BPE
vocabulary learned from the dataset's captions, projections of width ``embed_dim``. Where the
dataset has captions it is trained contrastively on (frame, caption) pairs of the same video
(``train``): CLIP's objective, with every caption of a frame's video counted as a positive
(the demo clips have six captions each and share the batch with each other's frames). It knows
only the words of those captions: a stand-in for CLIP on the bundled clips, not a CLIP.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from videofusion_jax.models.clip import CLIP, CLIPConfig, CLIPNetwork, TowerConfig, init
from videofusion_jax.models.clip_tokenizer import CLIPTokenizer, train_bpe


def project_clip(embed_dim: int, captions, seed: int = 0) -> CLIP:
  """The untrained network (weights from ``seed``) and its tokenizer, learned from ``captions``."""
  tower = TowerConfig(width=64, layers=2, heads=4, mlp_dim=256)
  vocab, merges = train_bpe(list(captions) or ["a video"], 400)
  config = CLIPConfig(text=tower, vision=tower, projection_dim=embed_dim, vocab_size=len(vocab), context_length=32,
                      eos_token_id=vocab["<|endoftext|>"], image_size=32, patch_size=8)
  return init(config, CLIPTokenizer(vocab, merges, config.context_length), jax.random.PRNGKey(seed))


def contrastive_loss(image_emb: jnp.ndarray, text_emb: jnp.ndarray, image_groups: jnp.ndarray,
                     text_groups: jnp.ndarray, scale: float = 10.0) -> jnp.ndarray:
  """CLIP's symmetric cross-entropy over cosine similarities times ``scale``, with several positives:
  image ``i`` (``(B, D)``, group ``image_groups[i]``) targets the texts of its group equally, and
  each text those images of its group. Rows without a positive are left out."""
  a = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
  b = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
  logits = scale * a @ b.T
  same = (image_groups[:, None] == text_groups[None, :]).astype(jnp.float32)

  def side(logits, same):
    has = same.sum(-1) > 0
    target = same / jnp.maximum(same.sum(-1, keepdims=True), 1.0)
    loss = -(target * jax.nn.log_softmax(logits, axis=-1)).sum(-1)
    return jnp.sum(jnp.where(has, loss, 0.0)) / jnp.maximum(has.sum(), 1)
  return 0.5 * (side(logits, same) + side(logits.T, same.T))


def train(clip: CLIP, pixels: np.ndarray, frame_groups: np.ndarray, captions: list[str], caption_groups: np.ndarray,
          steps: int = 400, batch: int = 32, learning_rate: float = 1e-3, seed: int = 0) -> tuple[CLIP, dict]:
  """``clip`` trained on frames ``pixels`` ``(M, S, S, 3)`` (preprocessed) and ``captions``, a pair being
  positive when their groups (video ids) agree. Returns the trained CLIP and
  ``{'loss_first', 'loss_last', 'retrieval'}``: the share of frames whose nearest caption is of
  their own video."""
  net = CLIPNetwork(clip.config)
  ids = jnp.asarray(clip.tokenize(captions))
  pixels, frame_groups = jnp.asarray(pixels), jnp.asarray(frame_groups)
  caption_groups = jnp.asarray(caption_groups)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 10, steps), weight_decay=1e-4)

  def loss_of(params, rng):
    r_img, r_txt = jax.random.split(rng)
    i = jax.random.randint(r_img, (batch,), 0, pixels.shape[0])
    j = jax.random.randint(r_txt, (batch,), 0, ids.shape[0])
    image = net.apply({"params": params}, pixels[i], method=CLIPNetwork.encode_image)
    text = net.apply({"params": params}, ids[j], method=CLIPNetwork.encode_text)
    return contrastive_loss(image, text, frame_groups[i], caption_groups[j])

  @jax.jit
  def run(params):
    def step(carry, rng):
      params, opt = carry
      loss, grads = jax.value_and_grad(loss_of)(params, rng)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt), loss
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                       jax.random.split(jax.random.PRNGKey(seed), steps))
    return params, losses

  params, losses = run(clip.params)
  trained = CLIP(clip.config, params, clip.tokenizer, clip.dtype)
  # Retrieval on at most 4,096 frames and captions (enough for the figure; the matrix stays small).
  fi = np.random.default_rng(seed).permutation(pixels.shape[0])[:4096]
  ti = np.random.default_rng(seed + 1).permutation(ids.shape[0])[:4096]
  image = np.concatenate([np.asarray(trained.encode_image(pixels[fi[k:k + 256]])) for k in range(0, len(fi), 256)])
  text = np.concatenate([np.asarray(trained.encode_text(np.asarray(ids[ti[k:k + 256]])))
                         for k in range(0, len(ti), 256)])
  sim = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T
  retrieval = float(np.mean(np.asarray(caption_groups)[ti][sim.argmax(1)] == np.asarray(frame_groups)[fi]))
  losses = np.asarray(losses)
  return trained, {"loss_first": float(losses[:10].mean()), "loss_last": float(losses[-10:].mean()),
                   "retrieval": retrieval}
