"""Stopping on a preemption notice: SIGTERM (what TPU and cloud GPU preemptions and SLURM send)
or SIGINT (Ctrl-C) ends training after the step in flight, at a step all hosts agree on."""
from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """While installed, SIGTERM and SIGINT ask training to stop instead of killing it.

  One process: Python handlers set a flag, read by ``reached(step)``. Several processes: JAX's
  preemption service (started by ``jax.distributed.initialize``) catches SIGTERM on any host and
  makes ``reached(step)`` true on every host at the same step; SIGINT is turned into SIGTERM so
  that it takes the same path. A second Ctrl-C stops at once.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}
    self._multi = jax.process_count() > 1

  def _on_signal(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name == "SIGINT" and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
    self.signal_name = name
    print(f"\n{name} received: finishing the step in flight, then saving a checkpoint and exiting "
          "(Ctrl-C again to stop at once without it).", flush=True)
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier, which tells the other hosts

  def install(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only: nothing to catch here
    signals = [signal.SIGINT] if self._multi else [signal.SIGTERM, signal.SIGINT]
    for s in signals:
      self._previous[s] = signal.signal(s, self._on_signal)
    return self

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def reached(self, step: int) -> bool:
    """True when training should save ``step`` and stop (the same step on every host)."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal_name is not None

  def __enter__(self) -> StopRequest:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()
