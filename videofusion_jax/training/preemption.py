"""Stopping on a preemption notice: SIGTERM (what TPU and cloud GPU preemptions and SLURM send)
or SIGINT (Ctrl-C) ends training after the step in flight, at a step all hosts agree on; where there is
no step to finish (sampling, evaluation, a dataset build), either stops the work at once, as an exception
(on several hosts: after a batch all hosts agree on)."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils

AT_ONCE = "stopped at once"  # ``Interrupted.how`` of a host that stopped alone (``main._interrupted`` tells the others)


class Interrupted(KeyboardInterrupt):
  """SIGTERM or SIGINT where work stops at once: raised like Ctrl-C's ``KeyboardInterrupt`` (which it is), so
  that ``finally`` blocks run and temporary files go; Python's default for SIGTERM ends the process without
  them. ``how``: how it stopped, in words."""

  def __init__(self, signal_name: str, how: str = AT_ONCE):
    super().__init__(signal_name)
    self.signal_name, self.how = signal_name, how


def _raise_interrupted(signum, frame) -> None:
  del frame
  raise Interrupted(signal.Signals(signum).name)


# JAX's preemption service, on a notice, asks every host for the last id it gave ``reached_preemption_sync_point``
# (0 before the first) and sets the sync point to the highest plus one. One count of every call a process makes
# (training's steps, then batches of other work) keeps every host's ids equal and growing: a step number would
# not (a resumed run's first step is 5 where a notice during its start set the point to 1).
_calls = 0
_sigint_here = False  # this host's Ctrl-C, not a SIGTERM, started the stop (a multi-host run only)


def _reached_sync_point() -> bool:
  global _calls
  _calls += 1
  return multihost_utils.reached_preemption_sync_point(_calls)


def _forward_sigint(signum, frame) -> None:
  """A multi-host run's first Ctrl-C: to JAX's preemption notifier as SIGTERM (which tells every host);
  the second stops this host at once, and it tells the others (``main._interrupted``)."""
  del signum, frame
  global _sigint_here
  _sigint_here = True
  signal.signal(signal.SIGINT, signal.default_int_handler)
  print("\nSIGINT received: every host stops after the batch in flight (Ctrl-C again to stop every host at "
        "once).", flush=True)
  os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def sigterm_stops_at_once(multihost: bool) -> Iterator[None]:
  """While inside, SIGTERM raises ``Interrupted``, as Ctrl-C raises ``KeyboardInterrupt`` (main thread only).
  A ``multihost`` run's SIGTERM is JAX's preemption service's, which ``stop_between_batches`` and training
  read, and its first Ctrl-C is sent to it as SIGTERM: enter after ``jax.distributed.initialize``, which
  starts the service (before it, that SIGTERM would end the process). ``multihost`` is asked, not read from
  JAX: one process enters before it could know."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  global _sigint_here
  sig, handler = (signal.SIGINT, _forward_sigint) if multihost else (signal.SIGTERM, _raise_interrupted)
  previous = signal.signal(sig, handler)
  try:
    yield
  finally:
    signal.signal(sig, previous)
    _sigint_here = False


def stop_between_batches() -> None:
  """Where work with no step to save (sampling, evaluation) ends a batch, on several hosts: once any host got
  SIGTERM (JAX's preemption service) or Ctrl-C (``sigterm_stops_at_once``), raises ``Interrupted`` on every
  host at the same batch; one process: nothing (the signal raised already). Every host must call it equally
  often: a host that stopped alone would leave the others waiting at their next collective."""
  if jax.process_count() > 1 and _reached_sync_point():
    raise Interrupted("SIGINT" if _sigint_here else "SIGTERM", "every host stopped after the same batch")


class StopRequest:
  """While installed, SIGTERM and SIGINT ask training to stop instead of killing it.

  One process: Python handlers set a flag, read by ``reached(step)``. Several processes: JAX's
  preemption service (started by ``jax.distributed.initialize``) catches SIGTERM on any host and
  makes ``reached(step)`` true on every host at the same step; SIGINT is turned into SIGTERM so
  that it takes the same path. A second Ctrl-C stops at once, and so does either signal inside
  ``at_once()`` (one process).
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    # A Ctrl-C before training (sigterm_stops_at_once forwarded it) makes the next one stop at once.
    self.signal_name: str | None = "SIGINT" if self._multi and _sigint_here else None
    self._previous: dict[int, object] = {}
    self._at_once = False

  def _on_signal(self, signum, frame) -> None:
    del frame
    global _sigint_here
    name = signal.Signals(signum).name
    if self._at_once:
      raise Interrupted(name)
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a Ctrl-C after either signal, as the message asks: stop now, without the checkpoint
    self.signal_name = name
    print(f"\n{name} received: finishing the step in flight, then saving a checkpoint and exiting "
          f"(Ctrl-C again to stop {'every host ' if self._multi else ''}at once without it).", flush=True)
    if self._multi:
      _sigint_here = _sigint_here or signum == signal.SIGINT  # for the work after training, if it comes to it
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

  @contextlib.contextmanager
  def at_once(self) -> Iterator[None]:
    """While inside, a signal raises ``Interrupted`` instead of waiting for a step to save: for work before
    the first step (a first-use dataset build, which a preemption's grace period would not see end, and
    whose temporary folder TFDS removes on the exception). One process only: on several, a host that
    stopped alone would leave the others waiting at their next collective."""
    if self.signal_name is not None and not self._multi:  # told already, with no step to save since
      raise Interrupted(self.signal_name)
    self._at_once = not self._multi
    try:
      yield
    finally:
      self._at_once = False

  def reached(self, step: int) -> bool:
    """True when training should save ``step`` and stop (the same step on every host: each calls this once
    per step)."""
    del step  # the hosts agree on a count of calls, not on a step number (see _calls)
    if self._multi:
      return _reached_sync_point()
    return self.signal_name is not None

  def __enter__(self) -> StopRequest:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()
