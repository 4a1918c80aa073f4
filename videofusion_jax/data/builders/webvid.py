"""WebVid-10M / WebVid-2M (captioned stock-footage clips) from the CSVs and a (partial) download."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import tensorflow_datasets as tfds

from videofusion_jax.data.builders.common import Source, SplitReport, VideoBuilder

CSV_NAMES = {"train": ("results_10M_train.csv", "results_2M_train.csv"),
             "val": ("results_10M_val.csv", "results_2M_val.csv")}
REQUIRED_COLUMNS = ("videoid", "page_dir", "name")


def find_csv(root: Path, split: str) -> Path | None:
  """The split's CSV: the 10M one if present, else the 2M one, else None."""
  return next((root / n for n in CSV_NAMES[split] if (root / n).is_file()), None)


class WebVid(VideoBuilder):
  """Captioned clips; rows whose video was not downloaded are counted as missing and skipped."""

  name = "videofusion_webvid"
  DATASET = "webvid"
  DESCRIPTION = "WebVid-10M (or -2M): stock-footage clips with their alt-text captions (Bain et al. 2021)."
  HOMEPAGE = "https://github.com/m-bain/webvid"
  SOURCE = ("https://github.com/m-bain/webvid (the CSVs results_10M_{train,val}.csv or results_2M_*, and "
            "its download script, which saves videos/<page_dir>/<videoid>.mp4)")
  LAYOUT = ("  <manual_dir>/results_10M_train.csv (or results_2M_train.csv)  columns videoid,contentUrl,"
            "duration,page_dir,name\n"
            "  <manual_dir>/results_10M_val.csv   (or results_2M_val.csv; optional)\n"
            "  <manual_dir>/videos/<page_dir>/<videoid>.mp4   (a partial download is fine)")
  SPLITS = ("train", "val")

  def _extra_features(self):
    return {"caption": tfds.features.Text()}

  @classmethod
  def _check_layout(cls, root: Path) -> Path:
    problems = []
    if find_csv(root, "train") is None:
      problems.append(f"no train CSV ({' or '.join(CSV_NAMES['train'])})")
    if not (root / "videos").is_dir():
      problems.append("videos/ is missing")
    if problems:
      raise cls.not_found(f"{'; '.join(problems)}. {cls._found_entries(root)}")
    return root

  def _list_sources(self, root: Path) -> dict[str, tuple[list[Source], SplitReport]]:
    videos = root / "videos"
    listings: dict[str, set[str]] = {}  # page_dir -> file names; one listdir per folder, not one stat per row
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # some captions are long
    out = {}
    for split in self.SPLITS:
      path = find_csv(root, split)
      if path is None:
        self._omitted[split] = f"no CSV ({' or '.join(CSV_NAMES[split])})"
        continue
      report, rows = SplitReport(), {}
      # utf-8-sig: a byte-order mark (a CSV saved by Excel) read the first column as '\ufeffvideoid'.
      with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
          fieldnames = reader.fieldnames or []  # the first read: a file not in UTF-8 fails here
        except UnicodeDecodeError as e:
          raise ValueError(f"{path}, line 1: {e}. The CSV is damaged (or not UTF-8): download it again.") from None
        absent = [c for c in REQUIRED_COLUMNS if c not in fieldnames]
        if absent:
          raise ValueError(f"{path}: columns {absent} are missing (header: {reader.fieldnames}); a WebVid CSV "
                           "has videoid,contentUrl,duration,page_dir,name.")
        while True:
          line = reader.line_num + 1  # where the next row starts (a caption may span lines)
          try:
            row = next(reader, None)
          except (csv.Error, UnicodeDecodeError) as e:  # not ValueErrors: get_builder would show a traceback
            raise ValueError(f"{path}, line {line}: {e}. The CSV is damaged (or not UTF-8): download it "
                             "again.") from None
          if row is None:
            break
          # A row cut short (an interrupted download of the CSV) lacks its last columns: skipped and
          # named in the build summary, as a corrupt video is.
          cut = [c for c in REQUIRED_COLUMNS if row.get(c) is None or (c != "name" and not row[c])]
          if cut:
            report.corrupt[f"{path.name} line {line}"] = (
                f"CSV row cut short or empty: no {', '.join(cut)}; download {path.name} again to include it")
            continue
          if row.get(None):  # more fields than the header: the caption was cut at an unquoted comma
            report.corrupt[f"{path.name} line {line}"] = (
                f"CSV row with {len(row[None])} field(s) more than the header (an unquoted comma in the caption?); "
                "quote the caption to include it")
            continue
          page_dir, filename = row["page_dir"], f"{row['videoid']}.mp4"
          if page_dir not in listings:
            folder = videos / page_dir
            listings[page_dir] = set(p.name for p in folder.iterdir()) if folder.is_dir() else set()
          rel = f"videos/{page_dir}/{filename}"
          if filename in listings[page_dir]:
            rows[rel] = row["name"]
          else:
            report.add_missing(rel)
      sources = [Source(id=rel, path=root / rel, features={"caption": caption})
                 for rel, caption in sorted(rows.items())]
      out[split] = (sources, report)
    return out
