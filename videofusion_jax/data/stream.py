"""The training stream's identity and resume position (the dataset's preparation before a run, which the
hosts agree on, is ``training.loop.prepare_dataset``).

The pipeline makes the stream a function of its position (``pipeline.train_iterator``); this
module says what the position means across restarts. No TensorFlow here.
"""
from __future__ import annotations

import jax
import ml_collections

# How ``pipeline.record_order`` shuffles; a new value when a code change reorders the stream.
# 1 (checkpoints without the field): every host shuffled its block with the permutation of (seed, epoch).
# 2: host h of P shuffles with (seed, epoch * P + h); one host's order is version 1's.
ORDER_VERSION = 2


def stream_identity(config: ml_collections.ConfigDict, process_count: int, local_batch_size: int,
                    source: dict | None = None) -> dict:
  """Everything the record order depends on: which videos qualify, how they are split over hosts
  and shuffled (``order_version``), and, for the pipeline's stream, what they are read from (``source``:
  ``pipeline.source_fingerprint``; a dataset rebuilt with other videos under the same name changes it).
  Saved with each checkpoint beside the number of batches consumed."""
  d = config.data
  identity = {"dataset": d.name, "split": d.split, "num_frames": d.num_frames, "frame_stride": d.frame_stride,
              "seed": config.seed, "process_count": process_count, "local_batch_size": local_batch_size,
              "order_version": ORDER_VERSION}
  if source is not None:
    identity["source"] = f"{source['builder']}, {source['videos']} videos, frame counts {source['lengths_sha256']}"
  return identity


def resume_position(saved: dict | None, stream: dict, step: int) -> int:
  """The input-stream batch to resume at: the saved position when the stream is laid out as it
  was (data, seed, hosts, per-host batch, shuffling code); otherwise the batch that has consumed as
  many examples."""
  if saved is None:
    return step  # a checkpoint without a stream position: one batch per step from batch 0
  saved = {"order_version": 1, **saved}  # saved before the field existed
  # One host's order is the same in every version: only hosts that shuffle apart tell them apart.
  one_host = saved["process_count"] == stream["process_count"] == 1
  # A checkpoint saved before ``source`` existed is taken to be of the same videos.
  ignored = ({"order_version"} if one_host else set()) | ({"source"} - saved.keys())
  changed = [k for k, v in stream.items() if saved.get(k) != v and k not in ignored]
  if not changed:
    return int(saved["batches"])
  examples = int(saved["batches"]) * saved["local_batch_size"] * saved["process_count"]
  position = examples // (stream["local_batch_size"] * stream["process_count"])
  why = ""
  if "order_version" in changed:
    why = (f" The checkpoint's data order is version {saved['order_version']} and this code shuffles with "
           f"version {stream['order_version']} (each host its own permutation), so in the current epoch some "
           "examples may be seen twice and others not at all.")
  if "source" in changed:
    why += (f" The dataset's videos are not those the checkpoint was trained on ({saved['source']}; now "
            f"{stream['source']}): it was rebuilt, so the shuffled order is another one.")
  seen = position * stream["local_batch_size"] * stream["process_count"]
  again = f"; the {examples - seen} examples past it are seen again" if seen < examples else ""
  if jax.process_index() == 0:  # every host computes it; one says it
    if changed == ["local_batch_size"]:  # each host's order is its own, whatever its batch: it goes on
      print(f"note: the batch per host is {stream['local_batch_size']} (was {saved['local_batch_size']}): the "
            f"example order goes on at batch {position}, the whole batches of the {examples} examples seen{again}.")
    else:
      print(f"note: the input stream was {saved} and is now {stream}; the example order cannot continue exactly, "
            f"so it restarts at batch {position}, the whole batches of the {examples} examples seen{again}.{why}")
  return position
