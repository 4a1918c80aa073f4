"""The demo TFDS builder and the tf.data pipeline on the real bundled clips."""
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

from videofusion_jax.data import builders, pipeline, video_io


@pytest.fixture(scope="module")
def config(tfds_dir):
  return tiny_config(**{"data.data_dir": tfds_dir})


def test_train_batches_have_the_right_shape_range_and_are_seeded(config):
  it = pipeline.train_iterator(config, 6, seed=3)
  b = next(it)
  assert b["video"].shape == (6, 4, 8, 8, 3) and b["video"].dtype == np.float32
  assert b["video"].min() >= -1.0 and b["video"].max() <= 1.0 and b["video"].std() > 0.1
  assert set(b["label"].tolist()) <= {0, 1, 2}
  again = next(pipeline.train_iterator(config, 6, seed=3))
  np.testing.assert_array_equal(b["video"], again["video"])
  other = next(pipeline.train_iterator(config, 6, seed=4))
  assert not np.array_equal(b["video"], other["video"])


def test_clips_are_consecutive_real_frames(config):
  """A training clip equals frames f, f+s, ... of its source video, resized."""
  c = tiny_config(**{"data.data_dir": config.data.data_dir, "data.image_size": 64})
  clip = next(pipeline.train_iterator(c, 1, seed=0))["video"][0]
  # The stored 64x64 frames, independently decoded by TFDS; every window of stride 2.
  builder = pipeline.get_builder(c.data)
  windows = [np.stack(e["video"])[f:f + 7:2] for e in builder.as_data_source("train")
             for f in range(len(e["video"]) - 6)]
  dist = np.abs(np.stack(windows) / 127.5 - 1.0 - clip[None]).max(axis=(1, 2, 3, 4))
  assert dist.min() < 1e-5


# The demo's records by length (demo_clips.py: bigbuckbunny 132 frames, bikes 250, carphone 120; label =
# the clip's place in that sorted list), a fact of the bundled files rather than of the stored labels.
DEMO_LABEL_OF_LENGTH = {132: 0, 250: 1, 120: 2}


def stored_videos(data_config, size: int) -> tuple[list[np.ndarray], np.ndarray]:
  """Every record of the demo's train split as TFDS stores it (64x64 uint8, decoded by TFDS), area-resized
  to ``size`` by averaging whole blocks (64 / size pixels a side) and scaled to [-1, 1]: ``x / 127.5 - 1``;
  and each record's label, from its length (``DEMO_LABEL_OF_LENGTH``)."""
  videos, labels = [], []
  for e in pipeline.get_builder(data_config, verbose=False).as_data_source("train"):
    frames = np.stack(e["video"]).astype(np.float64)
    t, h, w, c = frames.shape
    block = h // size
    assert h == w == 64 and block * size == h
    videos.append(frames.reshape(t, size, block, size, block, c).mean(axis=(2, 4)) / 127.5 - 1.0)
    labels.append(DEMO_LABEL_OF_LENGTH[t])
    assert int(e["label"]) == labels[-1]  # the label TFDS stored is the one of the record's clip
  return videos, np.array(labels)


def test_a_clips_label_is_the_label_of_the_video_its_frames_come_from(config):
  """Each training clip's frames are found in exactly one stored video (frames f, f+2, ..., area-resized),
  and its label is that video's, kept in memory (data.cache_mb>0) or decoded as read (cache_mb=0);
  evaluation clip i is frames firsts[i], firsts[i]+2, ... of record records[i] of ``eval_plan``, with
  its label."""
  videos, labels = stored_videos(config.data, 8)
  span, stride = 7, 2
  windows = np.stack([v[f:f + span:stride] for v in videos for f in range(len(v) - span + 1)])
  owner = np.concatenate([np.full(len(v) - span + 1, r) for r, v in enumerate(videos)])
  for cache_mb in (512.0, 0.0):
    c = tiny_config(**{"data.data_dir": config.data.data_dir, "data.cache_mb": cache_mb})
    batch = next(pipeline.train_iterator(c, 12, seed=11, verbose=False))
    dist = np.abs(windows[None] - batch["video"][:, None]).max(axis=(2, 3, 4, 5))
    found = owner[np.argmin(dist, axis=1)]
    assert dist.min(axis=1).max() < 1e-4  # every clip is a window of a stored video
    assert len(set(found.tolist())) == 3  # clips of every video were drawn (a control of the labels' check)
    np.testing.assert_array_equal(batch["label"], labels[found], err_msg=f"cache_mb={cache_mb}")
  lengths = np.array([len(v) for v in videos])
  real = pipeline.eval_clips(config, 12)
  records, firsts = pipeline.eval_plan(12, np.arange(3), lengths, span=span)
  expected = np.stack([videos[r][f:f + span:stride] for r, f in zip(records, firsts)])
  np.testing.assert_allclose(real["video"], expected, atol=1e-4)
  np.testing.assert_array_equal(real["label"], labels[records])


def test_a_video_of_exactly_the_clips_span_gives_its_one_clip(config):
  """18 frames at stride 7 span 7 x 17 + 1 = 120 frames, carphone's length: that video is long enough (its
  one clip: frames 0, 7, ..., 119), so each epoch of 3 clips holds a clip of every video, kept in memory or
  decoded as read; the other videos' clips are windows of their own frames."""
  videos, labels = stored_videos(config.data, 8)
  span, stride = 120, 7
  assert sorted(len(v) for v in videos)[0] == span
  for cache_mb in (512.0, 0.0):
    c = tiny_config(**{"data.data_dir": config.data.data_dir, "data.num_frames": 18, "data.frame_stride": stride,
                       "data.cache_mb": cache_mb})
    batch = next(pipeline.train_iterator(c, 6, seed=2, verbose=False))
    for epoch in (batch["label"][:3], batch["label"][3:]):
      assert sorted(epoch.tolist()) == [0, 1, 2], cache_mb
    for clip, label in zip(batch["video"], batch["label"]):
      (record,) = np.flatnonzero(labels == label)
      video = videos[record]
      windows = np.stack([video[f:f + span:stride] for f in range(len(video) - span + 1)])
      assert np.abs(windows - clip).max(axis=(1, 2, 3, 4)).min() < 1e-4, (cache_mb, label)


def test_each_host_reads_its_own_block_at_its_own_draws(config):
  """Two hosts over the demo's 3 records (contiguous blocks [0, 1] and [2]): host h's clip at stream position
  p is frames f, f + 2, ... of record block[perm_e[p mod n]], where perm_e is the stateless shuffle of the
  block's n offsets seeded (seed, e x 2 + h), e = p // n, and f the stateless uniform draw in [0, L - span]
  seeded (seed, p x 2 + h) (TensorFlow's ops called here, by the documented seeds); its label is its
  record's, kept in memory or decoded as read. The evaluation's 5 clips split as 3 + 2 in order."""
  import tensorflow as tf

  videos, labels = stored_videos(config.data, 8)
  span, stride, seed, hosts, b = 7, 2, 11, 2, 6
  for h, block in enumerate(([0, 1], [2])):
    n = len(block)
    records, clips = [], []
    for p in range(b):
      e, offset = divmod(p, n)
      perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                      seed=tf.constant([seed, e * hosts + h], tf.int64)).numpy()
      r = block[perm[offset]]
      f = int(tf.random.stateless_uniform([], seed=tf.constant([seed, p * hosts + h], tf.int64),
                                          maxval=len(videos[r]) - span + 1, dtype=tf.int64))
      records.append(r)
      clips.append(videos[r][f:f + span:stride])
    for cache_mb in (512.0, 0.0):
      c = tiny_config(**{"data.data_dir": config.data.data_dir, "data.cache_mb": cache_mb})
      batch = next(pipeline.train_iterator(c, b, seed=seed, process_index=h, process_count=hosts, verbose=False))
      np.testing.assert_allclose(batch["video"], np.stack(clips), atol=1e-4, err_msg=f"host {h}, cache_mb={cache_mb}")
      np.testing.assert_array_equal(batch["label"], labels[records], err_msg=f"host {h}, cache_mb={cache_mb}")
  lengths = np.array([len(v) for v in videos])
  records, firsts = pipeline.eval_plan(5, np.arange(3), lengths, span=span)
  expected = np.stack([videos[r][f:f + span:stride] for r, f in zip(records, firsts)])
  for h, share in enumerate(([0, 1, 2], [3, 4])):
    got = list(pipeline.eval_iterator(config, 5, 2, process_index=h, process_count=hosts, verbose=False))
    np.testing.assert_allclose(np.concatenate([g["video"] for g in got]), expected[share], atol=1e-4)
    np.testing.assert_array_equal(np.concatenate([g["label"] for g in got]), labels[records[share]])


def test_each_host_reads_its_own_block_and_every_example_once_per_epoch():
  eligible = np.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14])  # records long enough for a clip
  for hosts in (2, 4):
    blocks = [pipeline.host_examples(eligible, h, hosts) for h in range(hosts)]
    assert sorted(np.concatenate(blocks).tolist()) == eligible.tolist()
    for h, block in enumerate(blocks):
      # a contiguous run of the eligible records: each host reads its own files
      start = int(np.flatnonzero(eligible == block[0])[0])
      np.testing.assert_array_equal(block, eligible[start:start + len(block)])
      order = pipeline.record_order(block, seed=1, process_index=h, process_count=hosts)
      stream = list(order.take(3 * len(block)).as_numpy_iterator())
      epochs = [stream[i * len(block):(i + 1) * len(block)] for i in range(3)]
      for epoch in epochs:  # every epoch visits each of the host's examples exactly once
        assert sorted(epoch) == block.tolist()
      if len(block) > 2:  # and in fresh orders (two epochs of 3 records may agree: 1 in 6)
        assert len({tuple(epoch) for epoch in epochs}) > 1
  with pytest.raises(pipeline.PipelineError, match="fewer than the 4 hosts"):
    pipeline.host_examples(eligible[:3], 0, 4)


def test_hosts_shuffle_their_blocks_with_their_own_permutations():
  """Equal blocks of 12 records on 2 and 4 hosts: one permutation shared by every host would put the
  records at the same offset of each block in the same global batch, always. Each host's order of
  offsets differs from every other host's in every epoch, each epoch still visits each of the host's
  records once, a stream started at a position is the tail of the full one, and one host's order is
  fixed by the seed (and is the order of ``(seed, epoch)`` that checkpoints before hosts had their own
  seeds continue, ``stream.ORDER_VERSION``)."""
  import tensorflow as tf

  eligible = np.arange(48)
  for hosts in (2, 4):
    n = len(eligible) // hosts
    offsets = []
    for h in range(hosts):
      block = pipeline.host_examples(eligible, h, hosts)
      order = pipeline.record_order(block, seed=1, process_index=h, process_count=hosts)
      stream = np.array(list(order.take(3 * n).as_numpy_iterator()))
      for e in range(3):
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == block.tolist()
      # Epoch e visits the block in the stateless shuffle seeded (seed, e x hosts + h).
      expected = [block[tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                                 seed=[1, e * hosts + h]).numpy()] for e in range(3)]
      np.testing.assert_array_equal(stream, np.concatenate(expected))
      later = pipeline.record_order(block, seed=1, position=17, process_index=h, process_count=hosts)
      np.testing.assert_array_equal(list(later.take(3 * n - 17).as_numpy_iterator()), stream[17:])
      offsets.append((stream - block[0]).reshape(3, n))
    for a in range(hosts):
      for b in range(a + 1, hosts):
        for e in range(3):
          assert not np.array_equal(offsets[a][e], offsets[b][e]), (hosts, a, b, e)
        # Independent permutations agree at about 1 offset in n; a shared one at all of them.
        assert (offsets[a] == offsets[b]).mean() < 0.5

  def single_host(seed):
    order = pipeline.record_order(np.arange(10), seed, process_index=0, process_count=1)
    return list(order.take(30).as_numpy_iterator())

  one = single_host(3)
  assert one == single_host(3) and one != single_host(4)
  v1 = [tf.random.experimental.stateless_shuffle(tf.range(10, dtype=tf.int64), seed=[3, e]).numpy() for e in range(3)]
  np.testing.assert_array_equal(one, np.concatenate(v1))


def test_a_checkpoint_of_the_old_record_order_is_not_continued_on_the_new_one(capsys):
  """Checkpoints saved before ``order_version`` (every host shuffled with one permutation) resume at
  the same number of examples with a note naming the change; on one host, whose order is unchanged,
  at the saved batch silently, as a checkpoint of the current order does."""
  from videofusion_jax.data import stream as stream_lib

  config = tiny_config()
  now = stream_lib.stream_identity(config, 4, 8)
  assert now["order_version"] == stream_lib.ORDER_VERSION == 2
  old = {k: v for k, v in now.items() if k != "order_version"}
  assert stream_lib.resume_position({**now, "batches": 9}, now, 7) == 9
  assert capsys.readouterr().out == ""
  # 9 batches of 4 hosts x 8 examples on another order: the same 288 examples, batch 9 of the new one.
  assert stream_lib.resume_position({**old, "batches": 9}, now, 7) == 9
  out = capsys.readouterr().out
  assert "cannot continue exactly" in out and "data order is version 1 and this code shuffles with version 2" in out
  assert stream_lib.resume_position({**old, "batches": 9}, {**now, "local_batch_size": 16}, 7) == 4
  out = capsys.readouterr().out
  # 288 examples in batches of 64: 4 whole ones (256), the other 32 seen again (it said "the same number").
  assert "version 1" in out and "restarts at batch 4, the whole batches of the 288 examples seen; the 32 " \
      "examples past it are seen again." in out
  single = stream_lib.stream_identity(config, 1, 8)
  old_single = {k: v for k, v in single.items() if k != "order_version"}
  assert stream_lib.resume_position({**old_single, "batches": 5}, single, 7) == 5
  assert capsys.readouterr().out == ""
  # Another batch per host alone: each host's order is its own whatever its batch, so it goes on
  # (test_resuming_after_k_batches_continues_the_stream).
  assert stream_lib.resume_position({**now, "batches": 9}, {**now, "local_batch_size": 16}, 7) == 4
  assert capsys.readouterr().out == ("note: the batch per host is 16 (was 8): the example order goes on at batch 4, "
                                     "the whole batches of the 288 examples seen; the 32 examples past it are seen "
                                     "again.\n")


def test_a_checkpoint_of_a_rebuilt_dataset_is_not_continued_on_its_new_videos(capsys):
  """The stream names its dataset's videos: a dataset rebuilt with other videos under the same name
  resumes at the same number of examples with a note; a checkpoint saved before the field existed
  resumes at its batch silently, as one of the same videos does."""
  from videofusion_jax.data import stream as stream_lib

  config = tiny_config()
  was = stream_lib.stream_identity(config, 1, 8, {"builder": "demo_clips/1.0.0", "videos": 3, "lengths_sha256": "a1"})
  now = stream_lib.stream_identity(config, 1, 8, {"builder": "demo_clips/1.0.0", "videos": 4, "lengths_sha256": "b2"})
  assert was["source"] == "demo_clips/1.0.0, 3 videos, frame counts a1"
  assert stream_lib.resume_position({**was, "batches": 9}, was, 7) == 9
  assert capsys.readouterr().out == ""
  assert stream_lib.resume_position({**was, "batches": 9}, now, 7) == 9
  out = capsys.readouterr().out
  assert "cannot continue exactly" in out and "(demo_clips/1.0.0, 3 videos, frame counts a1; now demo_clips/1.0.0, " \
      "4 videos, frame counts b2): it was rebuilt" in out
  assert stream_lib.resume_position({**was, "batches": 9}, {**now, "local_batch_size": 16}, 7) == 4
  assert "it was rebuilt" in capsys.readouterr().out
  before = {k: v for k, v in was.items() if k != "source"}
  assert stream_lib.resume_position({**before, "batches": 9}, now, 7) == 9
  assert capsys.readouterr().out == ""


def test_resuming_after_k_batches_continues_the_stream(config):
  """Batches 3..6 of one stream equal the first 4 batches of a stream resumed at batch 3
  (2 examples a batch over 3 videos: the resumed stream starts mid-epoch)."""
  full = pipeline.train_iterator(config, 2, seed=5, verbose=False)
  batches = [next(full) for _ in range(7)]
  resumed = pipeline.train_iterator(config, 2, seed=5, start_batch=3, verbose=False)
  for k in range(3, 7):
    again = next(resumed)
    np.testing.assert_array_equal(again["video"], batches[k]["video"])
    np.testing.assert_array_equal(again["label"], batches[k]["label"])
  labels = np.concatenate([b["label"] for b in batches[:3]]).tolist()
  assert sorted(labels[:3]) == [0, 1, 2] and sorted(labels[3:6]) == [0, 1, 2]  # epochs cover every clip
  # The stream is one of examples, whatever the batch: 6 examples in, batches of 3 go on with examples
  # 6..11, the batches 3..5 of 2 above (a run resumed under another batch size continues its order).
  other = pipeline.train_iterator(config, 3, seed=5, start_batch=2, verbose=False)
  got = [next(other) for _ in range(2)]
  for key in ("video", "label"):
    np.testing.assert_array_equal(np.concatenate([b[key] for b in got]),
                                  np.concatenate([b[key] for b in batches[3:6]]))


def test_videos_kept_decoded_in_memory_give_the_stream_that_decodes_as_it_reads(config, capsys):
  """The demo's videos fit in ``data.cache_mb`` (0.37 MB at 8x8): decoded once and kept, they give
  the same clips and labels in the same order as decoding each clip as it is read (``cache_mb=0``),
  from the start and resumed; a limit below their size decodes as it reads."""
  def stream(cache_mb, start_batch=0):
    c = tiny_config(**{"data.data_dir": config.data.data_dir, "data.cache_mb": cache_mb})
    it = pipeline.train_iterator(c, 4, seed=7, start_batch=start_batch)
    kept = "decoding the 502 frames of 3 videos once and keeping them in memory (0.4 MB" in capsys.readouterr().out
    return it, kept

  (kept, was_kept), (read, was_read) = stream(512.0), stream(0.0)
  assert was_kept and not was_read
  assert not stream(0.3)[1]
  batches = [next(read) for _ in range(6)]
  for b in batches:
    a = next(kept)
    np.testing.assert_array_equal(a["video"], b["video"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(batches[0]["video"], batches[1]["video"])  # control: the batches differ
  resumed, _ = stream(512.0, start_batch=4)
  np.testing.assert_array_equal(next(resumed)["video"], batches[4]["video"])


def test_eval_protocol_is_deterministic_and_spreads_over_each_video(config):
  a = pipeline.eval_clips(config, 15)
  b = pipeline.eval_clips(config, 15)
  assert a["video"].shape == (15, 4, 8, 8, 3)
  np.testing.assert_array_equal(a["video"], b["video"])
  assert sorted(a["label"].tolist()) == sorted([0, 1, 2] * 5)
  records, firsts = pipeline.eval_plan(15, np.arange(3), np.array([132, 250, 120]), span=7)
  for r, length in enumerate([132, 250, 120]):  # 5 visits a video at the centres of 5 equal parts
    expected = np.round((length - 7) * (np.arange(5) + 0.5) / 5)
    np.testing.assert_array_equal(np.sort(firsts[records == r]), expected)
  # One visit a video: the middle clip.
  records, firsts = pipeline.eval_plan(3, np.arange(3), np.array([132, 250, 120]), span=7)
  np.testing.assert_array_equal(firsts[np.argsort(records)], np.round((np.array([132, 250, 120]) - 7) / 2))
  # 8 clips of 3 videos: two are visited 3 times, one twice, each at the centres of its own visits' parts.
  lengths = np.array([132, 250, 120])
  records, firsts = pipeline.eval_plan(8, np.arange(3), lengths, span=7)
  assert sorted(np.bincount(records).tolist()) == [2, 3, 3]
  for r in range(3):
    visits = int(np.sum(records == r))
    np.testing.assert_array_equal(np.sort(firsts[records == r]),
                                  np.round((lengths[r] - 7) * (np.arange(visits) + 0.5) / visits))


def test_unreadable_videos_give_clear_errors(tmp_path):
  bad = tmp_path / "corrupt.mp4"
  bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
  with pytest.raises(video_io.VideoReadError, match="cannot decode video .*corrupt.mp4"):
    video_io.read_video(bad)
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes((video_io.demo_clip_dir() / "bikes.mp4").read_bytes()[:4000])
  with pytest.raises(video_io.VideoReadError, match="truncated"):
    video_io.read_video(truncated)
  with pytest.raises(video_io.VideoReadError, match="not found"):
    video_io.read_video(tmp_path / "missing.mp4")
  import re

  import av
  # Two MPEG-TS pieces of other sizes joined byte for byte (a stream that changes size): NumPy's stack error
  # before, which named no file.
  pieces = []
  for i, (h, w) in enumerate(((72, 96), (64, 80))):
    with av.open(str(tmp_path / f"piece{i}.ts"), "w", format="mpegts") as out:
      stream = out.add_stream("mpeg2video", rate=10)
      stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
      for t in range(4):
        frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 40 * t, np.uint8), format="rgb24")
        out.mux(stream.encode(frame))
      out.mux(stream.encode())
    pieces.append((tmp_path / f"piece{i}.ts").read_bytes())
  joined = tmp_path / "joined.ts"
  joined.write_bytes(b"".join(pieces))
  with pytest.raises(video_io.VideoReadError, match=re.escape(f"video {joined} changes its frame size mid-stream "
                                                              "(80x64, 96x72 pixels): re-encode it at one size")):
    video_io.read_video(joined)


def _decoded_by_pyav(path) -> tuple[list[np.ndarray], int]:
  """The frames PyAV's decoder gives, as RGB (the oracle), and the stream's frame count in its header."""
  import av

  with av.open(str(path)) as container:
    return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)], container.streams.video[0].frames


def test_videos_whose_header_counts_frames_that_do_not_decode_give_only_those_that_do(tmp_path):
  """An mp4 cut with an edit list (as ``ffmpeg -ss ... -c copy`` writes: the header counts 48 frames, 38
  decode) and an AVI cut short (UCF-101's container and codec): the frames the decoder gives, no more (the
  frames past them were whatever memory held, black or another video's, stored as the video's own)."""
  from fractions import Fraction

  import av
  import fabricate

  frames = np.concatenate([fabricate.piece(0, 0, 24), fabricate.piece(1, 0, 24)])
  edited = tmp_path / "edited.mp4"
  with av.open(str(edited), "w") as container:
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt, stream.options = 96, 72, "yuv420p", {"bf": "0"}
    packets = []
    for i, f in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(f, format="rgb24")
      frame.pts, frame.time_base = i, Fraction(1, 25)
      packets += stream.encode(frame)
    packets += stream.encode()
    for packet in packets:  # the first 10 frames before the start: an edit list leaves them out
      shift = 10 * int(round(float(Fraction(1, 25) / packet.time_base)))
      packet.pts -= shift
      packet.dts -= shift
      container.mux(packet)
  decoded, counted = _decoded_by_pyav(edited)
  assert (len(decoded), counted) == (38, 48)
  video = video_io.read_video(edited)
  assert video.shape == (38, 72, 96, 3)
  np.testing.assert_array_equal(video, np.stack(decoded))
  cut = fabricate.write_video(tmp_path / "cut.avi", np.concatenate([frames, frames[::-1]]), codec="mpeg4")
  cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
  decoded, counted = _decoded_by_pyav(cut)
  assert counted == 96 and 0 < len(decoded) < 96
  np.testing.assert_array_equal(video_io.read_video(cut), np.stack(decoded))


def test_a_rotated_or_mirrored_video_is_turned_as_players_show_it(tmp_path):
  """An mp4 whose track header's display matrix (ISO/IEC 14496-12: x' = a x + c y, y' = b x + d y) turns it a
  quarter clockwise (a phone's portrait clip: stored 96 wide and 72 high, shown 72 wide and 96 high, its top-left
  corner at the top right), a half turn, or mirrors it left to right or top to bottom (PyAV calls a mirror a
  half turn: it was shown upside down)."""
  import struct

  import fabricate

  frames = np.zeros((8, 72, 96, 3), np.uint8)
  frames[:, :24, :32] = 255  # a white block in the top-left corner
  one = 1 << 16

  def shown(name, a, b, c, d):
    path = fabricate.write_video(tmp_path / f"{name}.mp4", frames)
    data = bytearray(path.read_bytes())
    matrix = data.find(b"tkhd") + 4 + 4 + 4 * 5 + 8 + 8  # a version-0 track header's display matrix
    data[matrix:matrix + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    video = video_io.read_video(path)
    h, w = video.shape[1:3]
    corners = [video[:, :h // 4, :w // 4], video[:, :h // 4, -w // 4:], video[:, -h // 4:, :w // 4],
               video[:, -h // 4:, -w // 4:]]
    return video.shape, "".join("W" if x.mean() > 200 else "." for x in corners)  # top left, top right, bottom ...

  assert shown("quarter", 0, one, -one, 0) == ((8, 96, 72, 3), ".W..")
  assert shown("half", -one, 0, 0, -one) == ((8, 72, 96, 3), "...W")
  assert shown("mirrored", -one, 0, 0, one) == ((8, 72, 96, 3), ".W..")
  assert shown("upside_down", one, 0, 0, -one) == ((8, 72, 96, 3), "..W.")
  assert shown("as_stored", one, 0, 0, one) == ((8, 72, 96, 3), "W...")


@pytest.mark.parametrize("cache_mb,kept", [(0.0, "half"), (512.0, "half"), (0.0, 1000)])
def test_a_damaged_prepared_dataset_is_one_error_naming_its_folder(config, tmp_path, cache_mb, kept):
  """A prepared dataset's record file cut short (an interrupted copy, a full disk) fails at its first read: one
  PipelineError naming the folder and what to do, where TensorFlow's error reached the user as its traceback
  (read as the clips stream and as every video is decoded into memory up front). Cut under 64 KB (ArrayRecord's
  least), the same advice (it was to check the folder's permissions, which a rerun could not mend). The dataset
  it was copied from still reads."""
  import shutil
  pipeline.get_builder(config.data, verbose=False)  # prepared (once a session)
  damaged = tmp_path / "tfds"
  shutil.copytree(config.data.data_dir, damaged, ignore=shutil.ignore_patterns("clip_embeddings"))
  [records] = damaged.glob("videofusion_demo_clips/*/*/*.array_record-*")
  with open(records, "r+b") as f:
    f.truncate(records.stat().st_size // 2 if kept == "half" else kept)
  c = tiny_config(**{"data.data_dir": str(damaged), "data.cache_mb": cache_mb})
  with pytest.raises(pipeline.PipelineError, match=(
      r"^cannot read videofusion_demo_clips/\d+/[0-9.]+ \[train\] \(\w+Error: .+\): a file of the prepared "
      rf"dataset in {records.parent} is damaged, .* Delete that folder to have it prepared again")):
    next(pipeline.train_iterator(c, 4, seed=0, verbose=False))
  with pytest.raises(pipeline.PipelineError, match=rf"cannot read .* \[train\] .* dataset in {records.parent} "):
    pipeline.eval_clips(c, 4)
  assert next(pipeline.train_iterator(config, 4, seed=0, verbose=False))["video"].shape == (4, 4, 8, 8, 3)
  # An error that says nothing of damage (a folder this host cannot read) is not answered with "delete it".
  import tensorflow as tf
  source = pipeline._source(config, "train", verbose=False)

  def unreadable(i):
    raise PermissionError(13, "Permission denied", "/data/videofusion_demo_clips/64/1.0.0/train.array_record")
  ds = tf.data.Dataset.range(2).map(lambda i: tf.numpy_function(unreadable, [i], tf.int64))
  with pytest.raises(pipeline.PipelineError, match=r"\[Errno 13\] Permission denied.*\): check that .* can be "
                                                   r"read from here .*, then run again\.$") as e:
    next(pipeline.numpy_items(ds, source))
  assert "Delete" not in str(e.value)


def test_hosts_that_wait_for_the_build_check_the_dataset_first(config, tmp_path):
  pipeline.check_dataset(config.data)  # prepared: nothing to say
  c = tiny_config(**{"data.name": "sky_timelapse/64", "data.data_dir": str(tmp_path / "tfds"),
                     "data.manual_dir": str(tmp_path / "raw")})
  with pytest.raises(builders.DatasetNotFoundError, match="sky_train/<long_id>/<short_id>"):
    pipeline.check_dataset(c.data)
  assert not (tmp_path / "tfds" / "videofusion_sky_timelapse").exists()  # nothing was built
  with pytest.raises(pipeline.PipelineError, match="unknown config '100'"):
    pipeline.check_dataset(tiny_config(**{"data.name": "taichi/100"}).data)


def test_clips_longer_than_every_video_are_refused_clearly(config):
  c = tiny_config(**{"data.data_dir": config.data.data_dir, "data.num_frames": 200})
  with pytest.raises(pipeline.PipelineError, match="no video .* has the 399 frames"):
    pipeline.train_iterator(c, 2, seed=0)


def test_num_classes_and_image_size_must_fit_the_dataset(config, tmp_path):
  """data.num_classes against the built dataset's labels (the demo's 3 clips): a smaller count would read
  label 2 as the null label (or index past the embedding), a dataset without labels would train on label
  0 alone; data.image_size against its stored frames. Refused as the run prepares its data, before its
  initial state or any compile."""
  from types import SimpleNamespace

  from videofusion_jax.training.loop import train
  from videofusion_jax.training.step import Trainer

  builder = pipeline.get_builder(config.data, verbose=False)
  assert builder.info.features["label"].num_classes == 3
  pipeline.check_classes(builder, 3)
  pipeline.check_classes(builder, 0)  # labels there, unused: unconditional
  for wrong in (2, 5):
    with pytest.raises(pipeline.PipelineError, match=rf"config.data.num_classes={wrong}: .* has 3 classes; set "
                       r"--config.data.num_classes=3"):
      pipeline.check_classes(builder, wrong)
  unlabelled = SimpleNamespace(info=SimpleNamespace(features={"video": None}, full_name="sky/64/1.0.0"))
  pipeline.check_classes(unlabelled, 0)
  with pytest.raises(pipeline.PipelineError, match=r"sky/64/1.0.0 has no class labels; set --config.data.num_"):
    pipeline.check_classes(unlabelled, 3)
  # Frames stored at 64 px (the short side): a larger image size would upsample them.
  pipeline.check_image_size(builder, 64)
  with pytest.raises(pipeline.PipelineError, match=r"config.data.image_size=128: .* stores its frames at 64 px"):
    pipeline.check_image_size(builder, 128)
  # Known before the dataset is built (its builder's own): refused before a build of hours, where they were
  # refused after it (a dataset built at too small a size is of no use to the config).
  fresh = tmp_path / "fresh"
  for key, value, message in (("data.image_size", 128, "stores its frames at 64 px"),
                              ("data.num_classes", 5, "has 3 classes")):
    with pytest.raises(pipeline.PipelineError, match=message):
      pipeline.get_builder(tiny_config(**{"data.data_dir": str(fresh), key: value}).data)
    assert not list(fresh.glob("*/*/*/*.array_record*"))
  c = tiny_config(**{"data.data_dir": config.data.data_dir, "data.num_classes": 2})
  trainer = Trainer(c)
  trainer.init_state = None  # the initial state is never made: the error comes first
  with pytest.raises(pipeline.PipelineError, match="has 3 classes"):
    train(c, tmp_path / "run", trainer=trainer, verbose=False)
  assert not (tmp_path / "run").exists()  # nothing written: the run's folders removed


def python_says(code: str) -> list[str]:
  """The words ``code`` prints, run in a fresh Python (what it imported stays out of this one)."""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout.split()


def test_tensorflow_is_imported_without_keras_which_still_loads_when_asked_for():
  """``data.tensorflow()`` keeps Keras out of TensorFlow's import (~1.3 s of its ~5 s in every run that reads a
  dataset; nothing here uses it); ``tf.keras`` and Keras's own modules load as before once asked for."""
  code = ("import sys\n"
          "from videofusion_jax.data import tensorflow\n"
          "tf = tensorflow()\n"
          "before = sorted(m for m in sys.modules if m == 'keras' or m.startswith('keras.'))\n"
          "total = int(tf.data.Dataset.range(4).reduce(tf.constant(0, tf.int64), lambda a, b: a + b))\n"
          "import keras.src.optimizers\n"
          "print(before, total, tf.keras.layers.Dense.__name__, type(sys.modules['keras.src.optimizers']).__name__)\n")
  assert python_says(code) == ["[]", "6", "Dense", "module"]


def test_a_tensorflow_that_needs_keras_at_its_import_gets_it(tmp_path):
  """Should a TensorFlow import Keras outside its try (a stand-in package here, and Keras's), ``data.tensorflow()``
  imports it again as it is instead of failing on the Keras it kept out."""
  stand_ins = {"tensorflow/__init__.py": "import keras.src.optimizers\nfrom tensorflow import config\n",
               "tensorflow/config.py": "def set_visible_devices(devices, kind):\n  pass\n",
               "keras/__init__.py": "", "keras/src/__init__.py": "", "keras/src/optimizers.py": "LOADED = 1\n"}
  for name, text in stand_ins.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  code = ("import sys\n"
          f"sys.path.insert(0, {str(tmp_path)!r})\n"
          "from videofusion_jax.data import tensorflow\n"
          "tf = tensorflow()\n"
          "print(tf.__file__.startswith(sys.path[0]), sys.modules['keras.src.optimizers'].LOADED)\n")
  assert python_says(code) == ["True", "1"]
