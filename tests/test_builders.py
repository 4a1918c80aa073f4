"""The TFDS builders, each run on a small copy of its dataset's real on-disk layout cut from the demo clips."""
import os
import tempfile
from pathlib import Path

import fabricate
import numpy as np
import pytest
from conftest import one_device, tiny_config

from videofusion_jax.data import builders, pipeline, video_io
from videofusion_jax.data.builders import common, registry

CONFIG = "64"
STORED = (64, 86)  # 72x96 sources at short side 64: 96 * 64 / 72 = 85.3 -> 86 (even)
MAKERS = {"ucf101": fabricate.make_ucf101, "sky_timelapse": fabricate.make_sky, "taichi": fabricate.make_taichi,
          "webvid": fabricate.make_webvid}
LAYOUT_MARKERS = {"ucf101": "UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi",
                  "sky_timelapse": "sky_train/<long_id>/<short_id>/*.jpg", "taichi": "train/<name>.mp4",
                  "webvid": "videos/<page_dir>/<videoid>.mp4"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """``built(name) -> (builder, layout, data_dir)``: fabricates and builds each dataset once."""
  cache = {}

  def get(name):
    if name not in cache:
      raw = tmp_path_factory.mktemp(f"raw_{name}")
      layout = MAKERS[name](raw)
      data_dir = str(tmp_path_factory.mktemp(f"tfds_{name}"))
      cache[name] = (builders.prepare(name, data_dir, manual_dir=str(raw), config=CONFIG), layout, data_dir)
    return cache[name]

  return get


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@pytest.mark.parametrize("name", list(MAKERS))
def test_build_matches_the_source_videos(built, name):
  builder, layout, data_dir = built(name)
  assert builder.info.file_format.value == "array_record" and builder.info.disable_shuffling
  assert sorted(builder.info.splits) == sorted(layout.examples)
  meta = builder.info.metadata
  for split, examples in layout.examples.items():
    assert builder.info.splits[split].num_examples == len(examples)
    assert meta["lengths"][split] == [e.num_frames for e in examples]
    report = meta["build_report"][split]
    assert sorted(report["corrupt"]) == sorted(layout.corrupt[split])
    assert report["too_short"] == layout.too_short[split]
    assert report["missing"] == len(layout.missing[split])
    assert sorted(report["missing_examples"]) == sorted(layout.missing[split])
    assert report["grayscale_videos"] == layout.grayscale[split]
    assert report["resized_frames"] == layout.resized_frames[split]
    assert (report["examples"], report["frames"]) == (len(examples), sum(e.num_frames for e in examples))

    source = builder.as_data_source(split)
    assert len(source) == len(examples)
    for i, e in enumerate(examples):  # record i is the i-th source in sorted order
      record = source[i]
      assert _text(record["id"]) == e.id
      assert int(record["num_frames"]) == e.num_frames
      video = np.stack(record["video"])
      assert video.shape == (e.num_frames, *STORED, 3) and video.dtype == np.uint8
      decoded = fabricate.decode_independently(e)
      assert len(decoded) == e.num_frames  # the fabricator wrote what it claims
      expected = fabricate.resize_independently(decoded, STORED).astype(np.float32)
      video = video.astype(np.float32)
      error = np.abs(video - expected).mean(axis=(1, 2, 3))
      # JPEG storage (quality 95, ~2-3 levels on these detailed 86x64 frames) and PIL-vs-TF bicubic
      # (~0.2) set the floor; frames one step out of place are measurably further off.
      assert error.max() < 4.0, (e.id, error.round(2))
      shifted = np.abs(video[1:] - expected[:-1]).mean()
      assert error.mean() < 0.8 * shifted, (e.id, error.mean(), shifted)
      if e.label is not None:
        assert int(record["label"]) == e.label
        label_name = builder.info.features["label"].int2str(int(record["label"]))
        assert label_name.lower() == e.id.split("/")[0].lower()
      if e.caption is not None:
        assert _text(record["caption"]) == e.caption

  text = registry.summarize(builder)
  for split in layout.examples:
    for bad in [*layout.corrupt[split], *layout.too_short[split]]:
      assert bad in text

  # A fresh builder on the same data_dir reads everything back from disk.
  fresh = type(builder)(data_dir=data_dir, config=CONFIG)
  assert fresh.is_prepared()
  assert fresh.info.metadata["lengths"] == meta["lengths"]
  assert fresh.info.metadata["build_report"] == meta["build_report"]
  assert fresh.builder_config.resolution == 64 and fresh.builder_config.min_frames == 16
  if layout.class_names is not None:
    assert fresh.info.features["label"].names == layout.class_names


def test_ucf101_reads_labels_from_the_split_lists(built):
  builder, layout, _ = built("ucf101")
  assert builder.info.features["label"].num_classes == 101
  ids = {e.id: e.label for e in layout.examples["train"]}
  # The list says v_HandStandPushups_..., the file v_HandstandPushups_...: found, id as on disk.
  assert ids["HandstandPushups/v_HandstandPushups_g08_c01.avi"] == layout.class_names.index("HandstandPushups")
  assert builder.info.supervised_keys is not None


def test_ucf101_split_list_lines_are_checked_with_their_place(tmp_path):
  """A split list's line gives its class from the folder and, in trainlists, a 1-based label that must
  agree; a label that is not a number (a damaged file) is said with the file and line, not int()'s error."""
  from videofusion_jax.data.builders.ucf101 import read_split_list

  names = ["ApplyEyeMakeup", "Archery", "HandstandPushups"]
  lists = tmp_path / "trainlist01.txt"
  lists.write_text("Archery/v_Archery_g01_c01.avi 2\r\n\r\nApplyEyeMakeup\\v_ApplyEyeMakeup_g02_c03.avi\r\n")
  assert read_split_list(lists, names) == {"Archery/v_Archery_g01_c01.avi": 1,
                                           "ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c03.avi": 0}
  lists.write_text("Archery/v_Archery_g01_c01.avi 2\nArchery/v_Archery_g01_c02.avi two\n")
  with pytest.raises(ValueError, match=rf"^{lists}:2: the label after 'Archery/v_Archery_g01_c02.avi' is 'two', "
                                       r"not a class number of classInd.txt \(1-3\); the split file is damaged"):
    read_split_list(lists, names)
  lists.write_text("Archery/v_Archery_g01_c01.avi 3\n")
  with pytest.raises(ValueError, match=rf"^{lists}:1: label 3 disagrees with the class folder of "
                                       r"'Archery/v_Archery_g01_c01.avi' \(2 in classInd.txt\)"):
    read_split_list(lists, names)


def test_sky_timelapse_is_found_inside_the_folder_its_zip_extracts_to(tmp_path):
  """The zip extracts into sky_timelapse/: a manual_dir holding that folder is read as the folder itself."""
  layout = fabricate.make_sky(tmp_path / "raw" / "sky_timelapse")
  builder = builders.prepare("sky_timelapse", str(tmp_path / "tfds"), manual_dir=str(tmp_path / "raw"), config=CONFIG,
                             verbose=False)
  for split, examples in layout.examples.items():
    assert builder.info.metadata["lengths"][split] == [e.num_frames for e in examples]
    assert [_text(builder.as_data_source(split)[i]["id"]) for i in range(len(examples))] == [e.id for e in examples]


def test_prepared_dataset_is_reused_not_rebuilt(built, tmp_path):
  builder, _, data_dir = built("taichi")
  files = sorted(os.listdir(builder.data_dir))
  mtimes = [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]
  again = builders.prepare("taichi", data_dir, manual_dir=str(tmp_path / "gone"), config=CONFIG, verbose=False)
  assert os.fspath(again.data_dir) == os.fspath(builder.data_dir)
  assert sorted(os.listdir(builder.data_dir)) == files
  assert [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files] == mtimes


@pytest.mark.parametrize("name", list(MAKERS))
def test_missing_or_misplaced_manual_dir_names_the_layout(name, tmp_path, monkeypatch):
  # No builder leaves a folder in the system's temporary folder (TFDS's lookup of its public bucket).
  system_tmp = tmp_path / "system_tmp"
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  with pytest.raises(builders.DatasetNotFoundError) as missing:
    builders.prepare(name, str(tmp_path / "tfds"), manual_dir=str(tmp_path / "nowhere"), config=CONFIG)
  message = str(missing.value)
  assert LAYOUT_MARKERS[name] in message and "--config.data.manual_dir" in message and "nowhere" in message
  wrong = tmp_path / "wrong"
  (wrong / "stray_folder").mkdir(parents=True)
  with pytest.raises(builders.DatasetNotFoundError, match="stray_folder") as misplaced:
    builders.prepare(name, str(tmp_path / "tfds"), manual_dir=str(wrong), config=CONFIG)
  assert LAYOUT_MARKERS[name] in str(misplaced.value)
  with pytest.raises(builders.DatasetNotFoundError, match="downloads/manual"):  # the TFDS default
    builders.prepare(name, str(tmp_path / "tfds"), config=CONFIG)
  assert not (tmp_path / "tfds" / f"videofusion_{name}" / CONFIG / "1.0.0").exists()
  assert not list(system_tmp.iterdir())


def test_a_test_split_without_usable_videos_is_omitted_and_a_train_split_fails_clearly(tmp_path):
  """A test split whose only videos are too short or corrupt is left out, with the reason in the
  metadata and the summary, as an empty one is; a train split without a usable video stops the build
  with one message and leaves nothing."""
  raw = tmp_path / "raw"
  fabricate.write_frames(raw / "sky_train" / "a" / "a_1", fabricate.piece(0, 0, 16))
  fabricate.write_frames(raw / "sky_test" / "b" / "b_1", fabricate.piece(1, 0, fabricate.SHORT))
  fabricate.write_frames(raw / "sky_test" / "b" / "b_2", fabricate.piece(1, 0, 0))  # no frames: too short
  bad = fabricate.write_frames(raw / "sky_test" / "c" / "c_1", fabricate.piece(2, 0, 16))
  (bad / "0000003.jpg").write_bytes(b"not a jpeg")
  builder = builders.prepare("sky_timelapse", str(tmp_path / "tfds"), manual_dir=str(raw), config=CONFIG,
                             verbose=False)
  assert sorted(builder.info.splits) == ["train"] and builder.info.splits["train"].num_examples == 1
  reason = builder.info.metadata["omitted_splits"]["test"]
  assert reason.startswith("no usable video: 1 corrupt/unreadable, 2 shorter than min_frames=16, 0 missing")
  assert "sky_test/c/c_1" in reason and "'sky_test/b/b_1': 10" in reason and "'sky_test/b/b_2': 0" in reason
  assert f"  test: omitted, {reason}." in registry.summarize(builder)
  assert builder.info.metadata["lengths"] == {"train": [16]}
  # Evaluating on it later names the reason, not only the splits there are.
  with pytest.raises(pipeline.PipelineError, match=r"has splits \['train'\].*Split 'test' was left out when the "
                     r"dataset was built: no usable video: 1 corrupt"):
    pipeline.split_lengths(builder, "test")

  raw = tmp_path / "raw_short_train"
  fabricate.write_frames(raw / "sky_train" / "a" / "a_1", fabricate.piece(0, 0, fabricate.SHORT))
  fabricate.write_frames(raw / "sky_test" / "b" / "b_1", fabricate.piece(1, 0, 16))
  with pytest.raises(ValueError, match=r"split 'train' has no usable video: 0 corrupt.*1 shorter than "
                     r"min_frames=16.*Fix the raw data or pick a config with a smaller min_frames"):
    builders.prepare("sky_timelapse", str(tmp_path / "tfds2"), manual_dir=str(raw), config=CONFIG, verbose=False)
  assert not builders.SkyTimelapse(data_dir=str(tmp_path / "tfds2"), config=CONFIG).is_prepared()


def test_a_build_past_tfds_memory_limit_sorts_one_record_per_bucket_in_source_order(tmp_path, monkeypatch):
  """Unshuffled, TFDS orders records by key and, once a split passes its in-memory limit (1 GB; here
  10 kB), spills them to 1000 temporary buckets by key range and sorts one bucket at a time in memory:
  keys 0, 1, 2, ... would all land in bucket 0 (the whole split in memory). Seven taichi videos, the
  fourth too short: written record ``i`` of source ``s`` is alone in bucket ``floor(1000 s / 7)``, and
  the records, and the lengths in the metadata, keep the sources' order."""
  from tensorflow_datasets.core import shuffle

  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 10 << 10)
  buckets = []  # (bucket number, records) of each non-empty bucket read back
  read_values = shuffle._Bucket.read_values

  def counting_read_values(self):
    values = list(read_values(self))
    if values:
      buckets.append((int(Path(self._path).stem.rsplit("_", 1)[-1]), len(values)))
    return values

  monkeypatch.setattr(shuffle._Bucket, "read_values", counting_read_values)
  raw = tmp_path / "raw"
  lengths = [16, 17, 18, 19, 20, 21]  # tell the records apart
  for i, n in enumerate(lengths):
    fabricate.write_video(raw / "train" / f"v{i}.mp4", fabricate.piece(i % 3, 0, n))
  fabricate.write_video(raw / "train" / "v2_short.mp4", fabricate.piece(0, 0, fabricate.SHORT))  # source 3
  (raw / "test").mkdir()
  builder = builders.prepare("taichi", str(tmp_path / "tfds"), manual_dir=str(raw), config=CONFIG, verbose=False)
  assert buckets == [(1000 * s // 7, 1) for s in (0, 1, 2, 4, 5, 6)]
  source = builder.as_data_source("train")
  assert [_text(source[i]["id"]) for i in range(len(source))] == [f"train/v{i}.mp4" for i in range(6)]
  assert [int(source[i]["num_frames"]) for i in range(len(source))] == lengths
  assert builder.info.metadata["lengths"]["train"] == lengths


def test_unknown_dataset_or_config_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="known datasets: demo_clips, ucf101, sky_timelapse, taichi, webvid"):
    builders.prepare("kinetics", str(tmp_path))
  with pytest.raises(ValueError, match="known configs: 64, 128, 256"):
    builders.prepare("sky_timelapse", str(tmp_path), config="100")
  assert set(builders.BUILDERS) == {"demo_clips", "ucf101", "sky_timelapse", "taichi", "webvid"}
  for cls in builders.BUILDERS.values():
    assert cls.disable_shuffling
    if cls.DATASET != "demo_clips":
      assert [c.name for c in cls.BUILDER_CONFIGS][:3] == ["64", "128", "256"]
      # data.name without a resolution: 128, as documented (TFDS took the first, 64, under a misnamed constant).
      assert builders.registry._make_builder(cls, str(tmp_path), None).builder_config.name == "128"


def test_the_folders_of_a_killed_build_are_named_with_their_size(tmp_path, capsys):
  """A build killed before it finished (SIGKILL: the OOM killer, a preempted machine) leaves the folder TFDS
  was writing, gigabytes for UCF-101, that no later build removes; prepare() names it and its size (deleting it
  is the user's: a build running in another process writes one too). The folder is made under TFDS's own
  name for it; another version's and another config's are not this dataset's."""
  import time

  from tensorflow_datasets.core.utils import file_utils

  builder = builders.registry._make_builder(builders.DemoClips, str(tmp_path), "64")
  left = Path(file_utils._get_incomplete_dir(builder.data_dir))  # TFDS's name for the folder it builds in
  (left / "videofusion_demo_clips-train.array_record-00000-of-00001").parent.mkdir(parents=True)
  (left / "videofusion_demo_clips-train.array_record-00000-of-00001").write_bytes(b"\0" * 2_500_000)
  (left / "dataset_info.json").write_bytes(b"{}" * 25_000)
  for path in (left, *left.iterdir()):
    os.utime(path, (time.time() - 7200, time.time() - 7200))
  for other in (Path(builder.data_dir).parent / "incomplete.AAAAAA_0.9.0",
                Path(builder.data_dir).parents[1] / "128" / "incomplete.BBBBBB_1.0.0"):
    other.mkdir(parents=True)
  builders.prepare("demo_clips", str(tmp_path), config="64", build=False)
  assert capsys.readouterr().out == (
      f"note: 1 unfinished build folder(s) beside {builder.data_dir}, 2.5 MB in all:\n"
      f"      {left} (2.5 MB, last written 2.0 h ago)\n"
      "    A build killed before it finished leaves one; nothing reads them. Delete them (rm -r) unless a build of "
      "this dataset is running now in another process.\n")
  builders.prepare("demo_clips", str(tmp_path), config="64", build=False, verbose=False)
  assert capsys.readouterr().out == ""
  # What a build stopped with an exception leaves (TFDS removes its folder then): nothing to name.
  with pytest.raises(RuntimeError), file_utils.incomplete_dir(builder.data_dir) as building:
    assert {folder for folder, _, _ in registry.unfinished_builds(builder)} == {left, Path(building)}  # running too
    raise RuntimeError("stopped")
  assert [folder for folder, _, _ in registry.unfinished_builds(builder)] == [left]


def test_builder_names_do_not_clash_with_tfds_own():
  import tensorflow_datasets as tfds

  assert tfds.builder_cls("ucf101").__module__.startswith("tensorflow_datasets.")
  assert tfds.builder_cls("videofusion_ucf101") is builders.Ucf101
  assert tfds.builder_cls("videofusion_webvid") is builders.WebVid


def test_the_error_class_imports_without_tensorflow():
  import subprocess
  import sys

  code = ("import sys; from videofusion_jax.data.builders import DatasetNotFoundError; "
          "assert issubclass(DatasetNotFoundError, FileNotFoundError); "
          "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_stored_size_keeps_aspect_with_even_sides():
  # Independent arithmetic: long side * res / short side, rounded to the nearest even number.
  assert common.stored_size(240, 320, 64) == (64, 86)  # 85.33 -> 86
  assert common.stored_size(360, 640, 128) == (128, 228)  # 227.56 -> 228
  assert common.stored_size(320, 240, 64) == (86, 64)  # portrait
  assert common.stored_size(256, 256, 128) == (128, 128)
  assert common.stored_size(144, 176, 64) == (64, 78)  # 78.22 -> 78
  with pytest.raises(ValueError, match="even"):
    common.VideoConfig(name="odd", resolution=63)


def test_16_bit_gray_frames_are_scaled_by_their_bit_depth_not_their_values(tmp_path):
  """A folder of 16-bit grayscale PNGs (mode I;16) with a bright frame and a dark one, whose values
  all lie under 256 (under 0.4% of 16-bit white), and an 8-bit one (mode L) with the same values:
  the 16-bit frames map v -> round(v / 257), whatever their values, the 8-bit one keeps them."""
  from PIL import Image

  ramp = np.tile(np.arange(64), (64, 1))  # (64, 64): stored at short side 64, no resize
  bright, dark = (ramp * 600).astype(np.uint16), (ramp * 4).astype(np.uint16)  # peaks 37800 and 252
  for i, frame in enumerate((bright, dark)):
    Image.fromarray(frame).save(tmp_path / f"{i}.png")
  Image.fromarray(dark.astype(np.uint8)).save(tmp_path / "2.png")
  assert [Image.open(tmp_path / f"{i}.png").mode for i in range(3)] == ["I;16", "I;16", "L"]
  decoded = common.decode_frame_folder(tmp_path, resolution=64, min_frames=1)
  assert decoded.grayscale and decoded.frames.shape == (3, 64, 64, 3)
  # Integer arithmetic: round(v / 257) = (2 v + 257) // 514 (no ties: 257 is odd).
  expected = [(2 * bright.astype(np.int64) + 257) // 514, (2 * dark.astype(np.int64) + 257) // 514, dark]
  for frame, want in zip(decoded.frames, expected):
    for channel in range(3):
      np.testing.assert_array_equal(frame[..., channel], want)
  assert decoded.frames[1].max() == 1  # the dark frame stays dark (252 / 257)


def test_gray_video_files_are_counted_as_grayscale(tmp_path):
  """A video stored in pixel format gray (ffv1) is reported grayscale; a colour one (yuv420p) is not,
  nor is gray content in a colour pixel format (the stream says how it was stored)."""
  frames = fabricate.piece(0, 0, 16)
  gray = fabricate.write_video(tmp_path / "gray.avi", frames, codec="ffv1", pixel_format="gray")
  colour = fabricate.write_video(tmp_path / "colour.mp4", frames)
  gray_content = fabricate.write_video(tmp_path / "gray_content.mp4", np.repeat(frames[..., :1], 3, axis=-1))
  decoded = common.decode_video_file(gray, 64, 16)
  assert decoded.grayscale and decoded.num_frames == 16
  np.testing.assert_array_equal(decoded.frames[..., 0], decoded.frames[..., 2])
  assert not common.decode_video_file(colour, 64, 16).grayscale
  assert not common.decode_video_file(gray_content, 64, 16).grayscale


def test_webvid_falls_back_to_the_2m_csv(tmp_path):
  from videofusion_jax.data.builders import webvid

  (tmp_path / "results_2M_train.csv").write_text("videoid,contentUrl,duration,page_dir,name\n")
  assert webvid.find_csv(tmp_path, "train") == tmp_path / "results_2M_train.csv"
  assert webvid.find_csv(tmp_path, "val") is None
  (tmp_path / "results_10M_train.csv").write_text("videoid,contentUrl,duration,page_dir,name\n")
  assert webvid.find_csv(tmp_path, "train") == tmp_path / "results_10M_train.csv"


def test_webvid_skips_a_csv_row_cut_short_and_names_its_line(built):
  """The fabricated train CSV ends mid-row (line 10: the caption on line 3 spans two lines): that row
  is skipped and named with what is missing and what to do; the rows before it are built."""
  builder, layout, _ = built("webvid")
  corrupt = builder.info.metadata["build_report"]["train"]["corrupt"]
  assert corrupt["results_10M_train.csv line 10"] == ("CSV row cut short or empty: no page_dir, name; download "
                                                      "results_10M_train.csv again to include it")
  assert builder.info.splits["train"].num_examples == len(layout.examples["train"]) == 3
  assert "results_10M_train.csv line 10 (CSV row cut short" in registry.summarize(builder)


def test_demo_clips_port(tfds_dir):
  builder = builders.prepare("demo_clips", tfds_dir, verbose=False)
  assert builder.info.metadata["lengths"]["train"] == [132, 250, 120]
  source = builder.as_data_source("train")
  assert len(source) == 3
  assert [int(source[i]["label"]) for i in range(3)] == [0, 1, 2]
  assert [_text(source[i]["id"]) for i in range(3)] == list(video_io.DEMO_CLIPS)
  assert builder.info.features["label"].names == ["bigbuckbunny", "bikes", "carphone"]
  # PNG storage is lossless: carphone (176x144, decoded here with PyAV) is its centre 144x144 square (columns
  # 16-159) box-filtered to 64x64 as PIL's BOX filter is defined: each output pixel the mean of the input
  # pixels whose centres lie in its span (i x 2.25, (i + 1) x 2.25], computed here as a matrix on each side.
  import av

  with av.open(str(video_io.demo_clip_dir() / "carphone_pristine.mp4")) as container:
    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64)
  assert frames.shape == (120, 144, 176, 3)
  centres = np.arange(144) + 0.5
  span = np.arange(64)[:, None] * 2.25
  box = ((centres > span) & (centres <= span + 2.25)).astype(np.float64)
  box /= box.sum(axis=1, keepdims=True)
  stored = np.stack(source[2]["video"]).astype(np.float64)
  for left, error in ((16, 0.5), (15, None)):  # the centre square, and one a pixel to its left (a control)
    expected = np.round(np.einsum("ij,tjkc,lk->tilc", box, frames[:, :, left:left + 144], box))
    if error:
      assert np.abs(stored - expected).max() <= 1 and np.abs(stored - expected).mean() < error  # PIL's fixed point
    else:
      assert np.abs(stored - expected).mean() > 2


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_the_pipeline_reads_every_builder(built, name):
  """One epoch of training clips and the evaluation clips, from each real builder's dataset; the
  same clips whether the decoded videos are kept in memory (they fit ``data.cache_mb``) or not."""
  builder, layout, data_dir = built(name)
  c = tiny_config(**{"data.name": f"{name}/{CONFIG}", "data.data_dir": data_dir, "data.image_size": 16,
                     "data.num_classes": 101 if name == "ucf101" else 0})  # the dataset's own class count
  train = layout.examples["train"]
  batch = next(pipeline.train_iterator(c, len(train), seed=0, verbose=False))  # exactly one epoch
  c.data.cache_mb = 0.0
  np.testing.assert_array_equal(next(pipeline.train_iterator(c, len(train), seed=0, verbose=False))["video"],
                                batch["video"])
  video = batch["video"]
  assert video.shape == (len(train), 4, 16, 16, 3) and video.dtype == np.float32
  assert video.min() >= -1.0 and video.max() <= 1.0 and video.std() > 0.1
  expected = [e.label for e in train] if name == "ucf101" else [0] * len(train)
  assert sorted(batch["label"].tolist()) == sorted(expected)  # each example once, its label kept
  # Each clip is the centre square of 4 frames 2 apart of one stored video, box-averaged to 16x16, with
  # that video's label: found among every such clip of the split, computed here from the stored frames.
  candidates = _every_clip(builder.as_data_source("train"), 16, 4, 2)
  records = [_matching_clip(clip, label, candidates) for clip, label in zip(video, batch["label"])]
  assert sorted(records) == list(range(len(train)))  # one epoch: every video once
  for cached in (True, False):  # the evaluation's clips, from the decoded videos kept in memory or not
    c.data.cache_mb = 64.0 if cached else 0.0
    real = pipeline.eval_clips(c, 2 * len(train))
    assert real["video"].shape == (2 * len(train), 4, 16, 16, 3)
    assert sorted(real["label"].tolist()) == sorted(expected * 2)
    for clip, label in zip(real["video"], real["label"]):
      _matching_clip(clip, label, candidates)


def _every_clip(source, size: int, num_frames: int, stride: int) -> list:
  """``(record, first frame, clip, label)`` of every clip of a TFDS data source's stored videos: the
  centre square of each frame (NumPy slicing), mean of each block of pixels to ``size``, in [-1, 1]."""
  out = []
  for i in range(len(source)):
    record = source[i]
    frames = np.stack(record["video"]).astype(np.float32)
    h, w = frames.shape[1:3]
    side = min(h, w)
    square = frames[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    f = side // size
    small = square.reshape(len(square), size, f, size, f, 3).mean(axis=(2, 4)) / 127.5 - 1.0
    label = int(record["label"]) if "label" in record else 0
    span = (num_frames - 1) * stride + 1
    out += [(i, first, small[first:first + span:stride], label) for first in range(len(small) - span + 1)]
  return out


def _matching_clip(clip: np.ndarray, label: int, candidates: list) -> int:
  """The record whose clip ``clip`` is: the closest candidate equals it to float32 round-off (JPEG frames are
  decoded accurately, as TFDS decodes them; TensorFlow's fast default was ~0.01 off, up to 0.06), far under the
  clip one frame later or earlier (~0.02-0.04), and the labels agree."""
  errors = sorted((float(np.abs(clip - c).max()), i, first, lab) for i, first, c, lab in candidates)
  (best, record, _, want), runner_up = errors[0], errors[1][0]
  assert best < 1e-4 and runner_up > 1e-2, errors[:2]
  assert int(label) == want, (record, int(label), want)
  return record


def test_hosts_split_ucf101_and_train_plus_test_reads_both(built):
  """'train+test' reads both splits; over 2 and 4 simulated hosts, one epoch of every host's
  stream holds each video once (the labels of the fabricated UCF101 tell the videos apart)."""
  _, layout, data_dir = built("ucf101")
  c = tiny_config(**{"data.name": f"ucf101/{CONFIG}", "data.data_dir": data_dir, "data.split": "train+test",
                     "data.num_classes": 101})
  labels = sorted(e.label for split in ("train", "test") for e in layout.examples[split])
  assert len(labels) >= 4
  for hosts in (1, 2, 4):
    seen = []
    for h in range(hosts):
      block = np.array_split(np.arange(len(labels)), hosts)[h]
      batch = next(pipeline.train_iterator(c, len(block), seed=3, process_index=h, process_count=hosts,
                                           verbose=False))
      seen += batch["label"].tolist()
    assert sorted(seen) == labels


def test_unconditional_configs_train_and_sample_through_the_prior(built, tmp_path):
  """configs/sky_timelapse.py (learned encoder) and configs/taichi.py (the frozen 'pixels' encoder
  in the frozen slot, and the clean key-frame input with its two-pass sampler), with the tiny
  model, train on their fabricated datasets through the TFDS pipeline and sample through the
  prior on nothing: no label anywhere, the prior's embeddings kept in samples.npz."""
  import sky_timelapse
  import taichi

  from videofusion_jax import sampling
  from videofusion_jax.training.loop import train
  from videofusion_jax.training.step import Trainer

  tiny = tiny_config()
  for name, module, encoder in (("sky_timelapse", sky_timelapse, "learned"), ("taichi", taichi, "frozen")):
    c = module.get_config()
    assert c.model.condition == "embedding" and c.data.num_classes == 0
    c.data.update(data_dir=built(name)[2], image_size=8, num_frames=4)
    c.model, c.train, c.sample = tiny.model, tiny.train, tiny.sample
    c.train.num_steps = 2
    if encoder == "frozen":
      c.model.encoder.update(kind="frozen", frozen_name="pixels", embed_dim=49)
      c.model.update(key_frame_input=True, key_frame_clean=True)
    trainer = Trainer(c, mesh=one_device(c))
    assert ("encoder" in trainer.num_params) == (encoder == "learned") and "prior" in trainer.num_params
    state = train(c, tmp_path / name, trainer=trainer, verbose=False)
    assert "label_embed" not in state.params["prior"] and int(state.step) == 2
    sampling.run(c, str(tmp_path / name), experiment=trainer)
    npz = np.load(tmp_path / name / "samples" / "step_2" / "samples.npz")
    assert npz["videos"].shape == (3, 4, 8, 8, 3) and np.all(np.abs(npz["videos"]) <= 1.0)
    assert npz["labels"].size == 0 and npz["embeddings"].shape == (3, c.model.encoder.embed_dim)
    assert np.all(np.isfinite(npz["embeddings"]))
    # The prior on nothing still draws each row its own c (a row's noise is its own), and each video differs.
    assert np.abs(npz["embeddings"][:, None] - npz["embeddings"][None]).sum(-1)[np.triu_indices(3, 1)].min() > 1e-3
    assert np.abs(npz["videos"][:, None] - npz["videos"][None]).mean((2, 3, 4, 5))[np.triu_indices(3, 1)].min() > 1e-3


def test_webvid_config_trains_on_captions_and_samples_from_prompts(built, tmp_path, capsys):
  """configs/webvid.py with the tiny model and a tiny CLIP in Hugging Face's layout (test_clip):
  the fabricated WebVid's frames and captions are embedded once beside the dataset, the prior
  trains on the captions' text embeddings, and sampling from prompts writes each prompt into the
  video's sidecar and samples.npz."""
  import json
  import re

  import jax
  import jax.numpy as jnp
  import ml_collections
  import webvid
  from test_clip import write_checkpoint

  from videofusion_jax import sampling
  from videofusion_jax.config import ConfigError
  from videofusion_jax.data import embeddings
  from videofusion_jax.models import clip as clip_lib
  from videofusion_jax.training.loop import check_resumed_config, train
  from videofusion_jax.training.step import Trainer

  builder, layout, data_dir = built("webvid")
  clip_dir = tmp_path / "clip"
  write_checkpoint(clip_dir)
  tiny = tiny_config()
  c = webvid.get_config()
  assert c.model.encoder.kind == "clip" and c.model.prior.condition == "text" and c.data.num_frames == 16
  c.data.update(data_dir=data_dir, image_size=8, num_frames=4)
  c.model.base, c.model.residual = tiny.model.base, tiny.model.residual
  c.model.encoder.update(clip_dir=str(clip_dir), embed_dim=20)
  c.model.prior.update(width=tiny.model.prior.width, num_layers=tiny.model.prior.num_layers)
  c.train, c.sample = tiny.train, tiny.sample
  c.train.update(num_steps=2, label_dropout=0.1)  # guided below: the null text and c seen in training
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a sunset over the sea\n\nan aerial view of a city at night\n")
  c.sample.update(prompts_file=str(prompts), prior_guidance_scale=2.0, guidance_scale=2.0)
  trainer = Trainer(c, mesh=one_device(c))
  assert trainer.networks["prior"].text_dim == 20 and trainer.networks["prior"].num_classes == 0
  state = train(c, tmp_path / "run", trainer=trainer, verbose=False)
  assert int(state.step) == 2 and "text_embed" in state.params["prior"]

  # The caption table holds each training record's caption, embedded by CLIP's text tower.
  path = embeddings.table_path(builder, "train", clip_dir, 8, kind="captions")
  meta = json.loads(path.with_suffix(".json").read_text())
  assert meta["captions"] == [e.caption for e in layout.examples["train"]]
  assert np.load(path.with_suffix(".counts.npy")).tolist() == [1] * 3
  clip = clip_lib.load(clip_dir)
  np.testing.assert_allclose(np.load(path), clip.encode_text(clip.tokenize(meta["captions"])), atol=2e-3)

  other = ml_collections.ConfigDict(c.to_dict())
  other.model.encoder.clip_dir = ""  # the project's own CLIP: not the one the model was trained with
  with pytest.raises(ConfigError, match=re.escape(f"config.model.encoder.clip_dir='' (trained with '{clip_dir}')")):
    sampling.run(other, str(tmp_path / "run"), experiment=trainer)
  # The same CLIP by another name, or copied elsewhere (another machine's mount), is the CLIP trained with
  # (before: refused, and the flag it offered named a folder that machine lacks); a copy with one weight
  # changed is not.
  import shutil
  shutil.copytree(clip_dir, tmp_path / "moved")
  for same in (f"{clip_dir}/", str(tmp_path / "moved")):
    other.model.encoder.clip_dir = same
    sampling.check_trained_config(other, str(tmp_path / "run"))
  weights = next((tmp_path / "moved").glob("*.safetensors"))
  data = bytearray(weights.read_bytes())
  data[-1] ^= 1
  weights.write_bytes(bytes(data))
  with pytest.raises(ConfigError, match=re.escape(f"config.model.encoder.clip_dir='{tmp_path / 'moved'}' (trained "
                                                  f"with '{clip_dir}')")):
    sampling.check_trained_config(other, str(tmp_path / "run"))
  # A copy with the same weights and another tokenizer (two tokens' ids swapped) is not the CLIP trained with
  # either: a prompt's ids, and so its text embedding, differ (before: taken, as its weights were the same).
  shutil.copytree(clip_dir, tmp_path / "retokenized")
  vocab_file = tmp_path / "retokenized" / "vocab.json"
  vocab = json.loads(vocab_file.read_text())
  a, b = sorted(vocab, key=vocab.get)[300:302]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  vocab_file.write_text(json.dumps(vocab))
  assert json.loads((tmp_path / "run" / "config.json").read_text())["clip_tokenizer"] == embeddings.tokenizer_digest(
    clip_dir) != embeddings.tokenizer_digest(tmp_path / "retokenized")
  other.model.encoder.clip_dir = str(tmp_path / "retokenized")
  with pytest.raises(ConfigError, match=re.escape(f"config.model.encoder.clip_dir='{tmp_path / 'retokenized'}' "
                                                  f"(trained with '{clip_dir}')")):
    sampling.check_trained_config(other, str(tmp_path / "run"))
  kept_vocab = (clip_dir / "vocab.json").read_bytes()
  (clip_dir / "vocab.json").write_bytes(vocab_file.read_bytes())
  other.model.encoder.clip_dir = f"{clip_dir}/"
  try:
    with pytest.raises(ConfigError, match=re.escape(f"config.model.encoder.clip_dir='{clip_dir}/' (not the CLIP "
                                                    "trained with there: its tokenizer (vocab.json")):
      sampling.check_trained_config(other, str(tmp_path / "run"))
  finally:
    (clip_dir / "vocab.json").write_bytes(kept_vocab)
  # A run recorded before the frames' preprocessing changed (its fingerprint carries 'preprocessing v2', as
  # d0e5e96 computed it, written out here) trained with this very CLIP: taken (before: refused as other weights,
  # every run trained before the change then could not resume, sample or be evaluated); a fingerprint of nothing
  # here is still refused.
  import hashlib

  def v2_fingerprint(directory: Path, size: int) -> str:
    h = hashlib.sha256(f"frame size {size}, preprocessing v2".encode())
    for name in ("config.json", "preprocessor_config.json"):
      if (directory / name).is_file():
        h.update((directory / name).read_bytes())
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("pytorch_model*.bin")):
      h.update(f"{path.name} {path.stat().st_size}".encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:12]

  record_file = tmp_path / "run" / "config.json"
  now_recorded = record_file.read_text()
  assert json.loads(now_recorded)["clip_fingerprint"] != v2_fingerprint(Path(clip_dir), 8)
  try:
    for recorded, taken in ((v2_fingerprint(Path(clip_dir), 8), True), ("0123456789ab", False)):
      record_file.write_text(json.dumps({**json.loads(now_recorded), "clip_fingerprint": recorded}))
      if taken:
        sampling.check_trained_config(other, str(tmp_path / "run"))
        check_resumed_config(c, tmp_path / "run")
      else:
        with pytest.raises(ConfigError, match="its weights give fingerprint .*, recorded 0123456789ab"):
          sampling.check_trained_config(other, str(tmp_path / "run"))
  finally:
    record_file.write_text(now_recorded)
  # Other weights saved over the folder trained with (by another name here) are not the CLIP trained with either
  # (before: taken, as the same path; a resumed run then trained on on them and recorded their fingerprint).
  original = next(Path(clip_dir).glob("*.safetensors"))
  kept = original.read_bytes()
  original.write_bytes(bytes(data))
  other.model.encoder.clip_dir = f"{clip_dir}/"
  try:
    with pytest.raises(ConfigError, match=re.escape(f"config.model.encoder.clip_dir='{clip_dir}/' (not the CLIP "
                                                    "trained with there: its weights give fingerprint ")):
      sampling.check_trained_config(other, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="put that CLIP back in the folder"):
      check_resumed_config(c, tmp_path / "run")
  finally:
    original.write_bytes(kept)
  check_resumed_config(c, tmp_path / "run")
  sampling.run(c, str(tmp_path / "run"), experiment=trainer)
  out = tmp_path / "run" / "samples" / "step_2"
  expected = ["a sunset over the sea", "an aerial view of a city at night", "a sunset over the sea"]
  sides = [json.loads((out / f"sample_{i:03d}.json").read_text()) for i in range(3)]
  assert [s["prompt"] for s in sides] == expected and sides[0]["clip"] == str(clip_dir)
  assert sides[0]["prior"]["guidance_scale"] == 2.0 and sides[0]["guidance_scale"] == 2.0
  npz = np.load(out / "samples.npz")
  assert npz["prompts"].tolist() == expected and npz["videos"].shape == (3, 4, 8, 8, 3)
  assert np.all(np.isfinite(npz["embeddings"]))
  # Embeddings given: the prompts file is not read, and a note says so (it went unsaid).
  given = ml_collections.ConfigDict(c.to_dict())
  given.sample.embeddings = str(out / "samples.npz")
  capsys.readouterr()
  sampling.run(given, str(tmp_path / "run"), experiment=trainer)
  said = capsys.readouterr().out
  assert (f"note: config.sample.embeddings is given: config.sample.prompts_file={str(prompts)!r} is not used" in said
          and f"from the embeddings in {out / 'samples.npz'}" in said), said
  assert json.loads((tmp_path / "run" / "samples" / "step_2-run2" / "sample_000.json").read_text())["prompt"] is None
  # The prior reads the prompt: one content index (the same prior noise) gives one c for one prompt
  # and another c for the other. Two steps leave the zero-initialised output layers near zero, so
  # the weights are perturbed first, as in the conditioning tests.
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  text = sampling.prompt_embeddings(c, [expected[0], expected[0], expected[1]], verbose=False)
  keys = sampling.row_keys(0, np.zeros(3), np.zeros(3))
  cond = np.asarray(sampling.sample_condition(trainer, params, keys[2], None, 3, jnp.asarray(text)))
  np.testing.assert_allclose(cond[0], cond[1], atol=1e-6)
  assert np.abs(cond[0] - cond[2]).max() > 1e-2


def test_frame_folders_numbered_without_padding_are_read_in_number_order(tmp_path):
  """frame_0 ... frame_11, not zero-padded: stored in the order of their numbers (they were in the order of their
  names, frame_10 and frame_11 before frame_2)."""
  from PIL import Image

  folder = tmp_path / "f"
  folder.mkdir()
  for i in range(12):
    Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(folder / f"frame_{i}.png")
  decoded = common.decode_frame_folder(folder, 8, 1)
  assert [int(round(f.mean())) for f in decoded.frames] == [20 * i for i in range(12)]


def test_builder_inputs_that_gave_wrong_records_are_refused_or_named(tmp_path):
  """What a build took without a word and stored wrong: a WebVid caption cut at an unquoted comma (kept short;
  now the row is skipped and named), a CSV saved with a byte-order mark (its videoid column 'missing') or not in
  UTF-8 (a bare decode error); a UCF101 video in both split lists (in both splits); frames one folder level up in
  Sky Time-lapse (dropped unsaid); a custom config of a name already built with other settings (served those
  records); a plain VideoConfig for UCF101 (an AttributeError)."""
  def webvid(name: str, text: str, encoding: str = "utf-8"):
    raw = tmp_path / name
    fabricate.write_video(raw / "videos" / "p" / "1.mp4", fabricate.piece(0, 0, 16))
    fabricate.write_video(raw / "videos" / "p" / "2.mp4", fabricate.piece(1, 0, 16))
    (raw / "results_10M_train.csv").write_bytes(text.encode(encoding))
    return builders.prepare("webvid", str(tmp_path / f"tfds_{name}"), manual_dir=str(raw), config="64",
                            verbose=False)

  header = "videoid,contentUrl,duration,page_dir,name\n"
  b = webvid("comma", header + "1,u,d,p,Sunset over the sea, golden hour\n2,u,d,p,\"A dog, running\"\n")
  assert [r["caption"] for r in b.as_data_source("train")] == [b"A dog, running"]
  assert b.info.metadata["build_report"]["train"]["corrupt"] == {
      "results_10M_train.csv line 2": "CSV row with 1 field(s) more than the header (an unquoted comma in the "
                                      "caption?); quote the caption to include it"}
  b = webvid("bom", header + "1,u,d,p,hello\n", "utf-8-sig")
  assert [r["caption"] for r in b.as_data_source("train")] == [b"hello"]
  with pytest.raises(ValueError, match=r"results_10M_train.csv, line \d: 'utf-8' codec can't decode .* The CSV is "
                                       r"damaged \(or not UTF-8\)"):
    webvid("latin1", header + "1,u,d,p,caf\u00e9\n", "latin-1")

  raw = tmp_path / "ucf"
  layout = fabricate.make_ucf101(raw)
  testlist = raw / "ucfTrainTestlist" / "testlist01.txt"
  testlist.write_text(testlist.read_text() + layout.examples["train"][0].id + "\r\n")
  with pytest.raises(ValueError, match=r"1 video\(s\) are in both trainlist01.txt and testlist01.txt .* the split "
                                       "lists do not belong together"):
    builders.prepare("ucf101", str(tmp_path / "tfds_ucf"), manual_dir=str(raw), config="64", verbose=False)
  with pytest.raises(TypeError, match="ucf101 needs a Ucf101Config config"):
    builders.prepare("ucf101", str(tmp_path / "tfds_ucf"), manual_dir=str(raw),
                     config=common.VideoConfig(name="96", resolution=96), verbose=False)

  raw = tmp_path / "sky"
  fabricate.write_frames(raw / "sky_train" / "a" / "a_1", fabricate.piece(0, 0, 16))
  fabricate.write_frames(raw / "sky_train" / "flat", fabricate.piece(1, 0, 16))
  fabricate.write_frames(raw / "sky_test" / "b" / "b_1", fabricate.piece(2, 0, 16))
  b = builders.prepare("sky_timelapse", str(tmp_path / "tfds_sky"), manual_dir=str(raw), config="64", verbose=False)
  assert b.info.splits["train"].num_examples == 1
  assert b.info.metadata["build_report"]["train"]["corrupt"] == {
      "sky_train/flat": "frames directly in sky_train/flat/: expected sky_train/<long_id>/<short_id>/*.jpg (move them "
                        "into a folder of their own there)"}

  raw = tmp_path / "taichi"
  for i in range(2):
    fabricate.write_video(raw / "train" / f"v{i}.mp4", fabricate.piece(i, 0, 6))
  (raw / "test").mkdir()
  builders.prepare("taichi", str(tmp_path / "tfds_taichi"), manual_dir=str(raw),
                   config=common.VideoConfig(name="c", resolution=64, min_frames=4), verbose=False)
  with pytest.raises(ValueError, match=r"was built with \{'resolution': 64, 'min_frames': 4\}, and this config 'c' "
                                       r"asks for \{'resolution': 128, 'min_frames': 4\}: give the new config another"):
    builders.prepare("taichi", str(tmp_path / "tfds_taichi"), manual_dir=str(raw),
                     config=common.VideoConfig(name="c", resolution=128, min_frames=4), verbose=False)
  assert builders.prepare("taichi", str(tmp_path / "tfds_taichi"), manual_dir=str(raw),
                          config=common.VideoConfig(name="c", resolution=64, min_frames=4), verbose=False).is_prepared()
