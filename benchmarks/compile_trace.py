"""Where XLA's compile time goes: a compile traced with ``jax.profiler`` (XLA marks its HLO passes,
autotuners and code generation as host trace events), summarised by phase, and given up at a
deadline so that a compile too long for a device lease still says what it spent its time on.

Used by ``benchmarks/train_step.py --compile_profile=DIR --compile_deadline_s=S``; no flags here.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import threading
import time

import jax


class CompileUnfinished(Exception):
  """The compile was still running at the deadline (its thread is left running: XLA cannot be
  interrupted, so the process should report and exit). ``trace``: the Perfetto trace so far, or None."""

  def __init__(self, elapsed_s: float, trace: str | None):
    super().__init__(f"still compiling after {elapsed_s:.1f} s")
    self.elapsed_s, self.trace = elapsed_s, trace


def watched_compile(lowered, profile_dir: str = "", deadline: float | None = None):
  """``lowered.compile()``, traced into ``profile_dir`` (a new folder; '' = not traced) and given up
  at ``deadline`` (a ``time.perf_counter()`` time; None = never).

  Returns ``(compiled, seconds, trace)``, ``trace`` the Perfetto trace written (None when not
  traced). Raises ``CompileUnfinished`` (after the trace is written, its path in ``.trace``) when
  the deadline passes first, and re-raises the compile's own error."""
  if profile_dir:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # XLA's own events only: a small trace
    options.enable_hlo_proto = False
    jax.profiler.start_trace(profile_dir, create_perfetto_trace=True, profiler_options=options)
  done: dict = {}

  def work():
    try:
      done["compiled"] = lowered.compile()
    except BaseException as e:  # handed to the caller's thread
      done["error"] = e

  t0 = time.perf_counter()
  thread = threading.Thread(target=work, name="compile", daemon=True)
  thread.start()
  thread.join(None if deadline is None else max(deadline - time.perf_counter(), 0.0))
  elapsed = time.perf_counter() - t0
  trace = None
  if profile_dir:
    jax.profiler.stop_trace()
    trace = perfetto_trace(profile_dir)
  if thread.is_alive():
    raise CompileUnfinished(elapsed, trace)
  if "error" in done:
    raise done["error"]
  return done["compiled"], elapsed, trace


def perfetto_trace(profile_dir: str) -> str:
  """The Perfetto trace (``perfetto_trace.json.gz``) ``jax.profiler`` wrote under ``profile_dir``."""
  found = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not found:
    raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {profile_dir}.")
  return found[-1]


# jax's own event around the whole compile: recorded on a thread id of its own (XLA's events on the
# same thread carry another), so its self time would be the whole compile, hiding the phases.
WRAPPERS = ("backend_compile_and_load",)


def read_events(path: str) -> list[dict]:
  """The complete ('X') events of a Perfetto/Chrome JSON trace, gzipped or not, less ``WRAPPERS``."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X" and "dur" in e and e.get("name") not in WRAPPERS]


def phase_name(name: str) -> str:
  """An event's phase: its name with numbers written ``#`` (``fusion.12`` and ``fusion.7`` are one
  phase)."""
  return re.sub(r"\d+", "#", name)


def compile_phases(events: list[dict], top: int = 20) -> dict:
  """The phases of a traced compile, longest first by self time (an event's duration less its
  children's, on its own thread: where the time was spent, not what contained it).

  Returns ``{'span_s': first start to last end, 'events': count, 'threads': how many threads
  have events, 'phases': [{'name', 'count', 'self_s', 'total_s'}, ...]}`` (the ``top`` of them;
  total: the phase's events' whole durations, a nested repeat of a phase counted once per event).
  Threads run side by side (XLA compiles kernels in parallel), so the phases' seconds may add up
  to more than the span."""
  by_thread: dict = {}
  for e in events:
    by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
  self_us: dict[str, float] = {}
  total_us: dict[str, float] = {}
  count: dict[str, int] = {}
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))  # a parent before the children it starts with
    stack: list[list] = []  # [end, name, own time] of the open events
    for e in thread_events:
      start, dur = float(e["ts"]), float(e["dur"])
      while stack and stack[-1][0] <= start:
        _close(stack.pop(), self_us)
      if stack:  # an event running past its parent's end (threads' events not nested, as XLA's thread
        stack[-1][2] -= min(dur, stack[-1][0] - start)  # pools write them) is the parent's only while inside it
      name = phase_name(e["name"])
      total_us[name] = total_us.get(name, 0.0) + dur
      count[name] = count.get(name, 0) + 1
      stack.append([start + dur, name, dur])
    while stack:
      _close(stack.pop(), self_us)
  order = sorted(self_us, key=lambda n: -self_us[n])[:top]
  span = max((e["ts"] + e["dur"] for e in events), default=0) - min((e["ts"] for e in events), default=0)
  return {"span_s": round(span / 1e6, 3), "events": len(events), "threads": len(by_thread),
          "phases": [{"name": n[:120], "count": count[n], "self_s": round(self_us[n] / 1e6, 3),
                      "total_s": round(total_us[n] / 1e6, 3)} for n in order]}


def trace_phases(path: str, top: int = 20) -> dict:
  """``compile_phases`` of the Perfetto trace at ``path``."""
  return compile_phases(read_events(path), top)


def _close(entry: list, self_us: dict[str, float]) -> None:
  _, name, own = entry
  self_us[name] = self_us.get(name, 0.0) + own
