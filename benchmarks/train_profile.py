"""What a training run's profile says (``--config.train.profile_steps``): for each traced step its wall
time and the host's time before its program was dispatched (reading the input, making the global batch),
and for the window the share of time in which the device ran kernels: below 1 the device waited for
the host (the input, a log, a checkpoint save) and the gaps say for how long.

  python benchmarks/train_profile.py WORKDIR/profile/process_0    # or a trace file; one JSON line

The device's kernels are the events of the trace's ``/device:*`` processes (GPUs, TPUs; not yet checked
against a GPU's trace here) or, on a CPU, of XLA's intra-op threads (``tf_XLAEigen``), which run the
step's kernels while the main thread goes on.
"""
from __future__ import annotations

import gzip
import json
import os
import sys

# The host's call that runs a compiled program on a device (one per program and device): PJRT's
# ``...LoadedExecutable::Execute...`` (CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice on the CPU).
EXECUTE = "LoadedExecutable::Execute"


def newest_trace(path: str) -> str:
  """``path`` if it is a trace file, else the newest ``perfetto_trace.json.gz`` under it."""
  if os.path.isfile(path):
    return path
  found = [os.path.join(root, "perfetto_trace.json.gz") for root, _, files in os.walk(path)
           if "perfetto_trace.json.gz" in files]
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}: run training with "
                            "--config.train.profile_steps='(FIRST,LAST)' and give its WORKDIR/profile/process_<i>.")
  return max(found, key=os.path.getmtime)


def _union(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
  """The time covered by ``intervals`` and the gaps between its pieces."""
  covered, gaps, end = 0.0, [], None
  for a, b in sorted(intervals):
    if end is None or a > end:
      if end is not None:
        gaps.append(a - end)
      covered += b - a
      end = b
    elif b > end:
      covered += b - end
      end = b
  return covered, gaps


def summarize(events: list[dict]) -> dict:
  """The figures of one trace's events (Chrome/Perfetto JSON: 'X' events, 'M' names), times in ms."""
  process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  steps = sorted((e for e in complete if e.get("name") == "train"), key=lambda e: e["ts"])
  if not steps:
    raise ValueError("the trace has no 'train' step annotations: is it a training run's profile?")

  def on_device(e: dict) -> bool:
    return (process.get(e["pid"], "").startswith("/device:")
            or thread.get((e["pid"], e.get("tid")), "").startswith("tf_XLAEigen"))

  kernels = [(e["ts"], e["ts"] + e["dur"]) for e in complete if on_device(e)]
  runs = sorted(e["ts"] for e in complete if EXECUTE in e.get("name", ""))
  rows = []
  for s in steps:
    start, end = s["ts"], s["ts"] + s["dur"]
    first = next((t for t in runs if start <= t <= end), None)
    rows.append({"step": int(s["args"]["step_num"]), "wall_ms": round(s["dur"] / 1e3, 2),
                 "host_before_dispatch_ms": None if first is None else round((first - start) / 1e3, 2)})
  start = steps[0]["ts"]
  end = max([s["ts"] + s["dur"] for s in steps] + [b for _, b in kernels])
  busy, gaps = _union([(max(a, start), min(b, end)) for a, b in kernels if b > start and a < end])
  note = {} if runs else {"note": f"no '{EXECUTE}' events: the host's time before each dispatch is unknown"}
  return {"result": "train_profile", **note, "steps": rows, "window_ms": round((end - start) / 1e3, 2),
          "device_busy_ms": round(busy / 1e3, 2), "device_busy_share": round(busy / (end - start), 4),
          "longest_device_gaps_ms": sorted((round(g / 1e3, 2) for g in gaps), reverse=True)[:5]}


def summarize_file(path: str) -> dict:
  """``summarize`` of the trace at ``path`` (a file, or the newest under a folder), with its path."""
  path = newest_trace(path)
  with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
    data = json.load(f)
  return {**summarize(data["traceEvents"] if isinstance(data, dict) else data), "trace": path}


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__.strip(), file=sys.stderr)
    return 2
  try:
    figures = summarize_file(argv[1])
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(figures))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
