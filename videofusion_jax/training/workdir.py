"""What a run may do with its workdir: checks before any slow work, and the lock that keeps two
training runs from writing the same checkpoints."""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = "train.lock"


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked; the message says why and what to do."""


def write_whole(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
  """Writes ``path`` whole or not at all: ``write(tmp)`` fills a hidden file beside it (ending in ``suffix``,
  for writers that add their own), renamed to ``path`` at the end. A crash or a failed write (a full disk)
  leaves no half file that a later run would take for a whole one."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
  try:
    write(tmp)
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def write_new(path: Path, write: Callable[[Path], None], next_free: Callable[[], Path]) -> Path:
  """Writes ``path`` whole (as ``write_whole``) where no file is there, never over one: where another run wrote
  it since ``path`` was chosen (two evaluations of one checkpoint at once), at ``next_free()`` instead. Returns
  the path written. The file is linked into place, which fails where a file is; on a file system without hard
  links it is renamed after a check, which leaves a moment open."""
  tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.{os.getpid()}.tmp")  # its own: containers share pids
  try:
    write(tmp)
    while True:
      try:
        os.link(tmp, path)
        return path
      except FileExistsError:
        path = next_free()
      except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
          raise
        if path.exists():
          path = next_free()
          continue
        tmp.replace(path)
        return path
  finally:
    tmp.unlink(missing_ok=True)


def check_output_folders(workdir: str | Path, *names: str) -> None:
  """The folders of ``workdir`` a mode writes its results to (``samples``, ``eval``, ``eval_cache``), checked
  before its slow work, not when it writes at the end (the figures of a long evaluation were lost to a
  file in the way): each, where it exists, a writable directory. Changes nothing on disk."""
  for name in names:
    path = Path(workdir).expanduser() / name
    if path.exists() and not path.is_dir():
      raise WorkdirError(f"{path} is a file, where this run writes its {name} folder: move it away.")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
      raise WorkdirError(f"{path} is not writable by this user: fix its permissions, or choose another --workdir.")


def check_workdir(workdir: str | Path, must_exist: bool = False) -> Path:
  """``workdir`` as a Path, after checking that a run can write there (it is created later, when
  missing); ``must_exist`` for the modes that read a trained run. Changes nothing on disk."""
  if not str(workdir).strip():
    raise WorkdirError("--workdir is empty: give the directory for the run's checkpoints, logs and samples (it is "
                       "created when missing).")
  if "://" in str(workdir):
    raise WorkdirError(f"--workdir={workdir}: URLs are not supported yet (the workdir is written with ordinary file "
                       "operations); mount the bucket (e.g. gcsfuse) at the same path on every host and give that "
                       "path.")
  path = Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory: give a directory (it is created "
                       "when missing).")
  if must_exist and not path.is_dir():
    raise WorkdirError(f"--workdir={workdir} does not exist: train first (--mode=train), or give the workdir of "
                       "a trained run.")
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise WorkdirError(f"--workdir={workdir}: {existing} is a file, so the workdir cannot be created under it.")
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "the workdir" if existing == path else f"{existing}, where the workdir would be created,"
    raise WorkdirError(f"--workdir={workdir}: {what} is not writable by this user: choose another --workdir or "
                       "fix its permissions.")
  return path


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


_HELD: set[str] = set()  # the lock files this process holds


def _slurm_attempt() -> tuple[str, str] | None:
  """This process's SLURM job id and restart count (a requeued job keeps its id and counts up), or
  None outside SLURM."""
  job = os.environ.get("SLURM_JOB_ID")
  return (job, os.environ.get("SLURM_RESTART_COUNT", "0")) if job else None


# The holder renews the lock's modification time every HEARTBEAT_S seconds; a lock of another host not
# renewed for STALE_S is a run that died without releasing it (killed past its grace period, its node
# lost; a recreated TPU slice has other host names), and is taken over. Locks written before the
# heartbeat (no "heartbeat" field) are never taken over so.
HEARTBEAT_S = 60.0
STALE_S = 15 * 60.0


class WorkdirLock:
  """``workdir/train.lock`` holding this run's process id and host, created atomically: a
  second training run in the same workdir is refused with a message naming the first. A lock
  left by a run that died on this host (its process is gone, or its id is this process's: a
  restarted container), by an earlier attempt of this SLURM job (requeued after a node failure,
  maybe on other nodes), or not renewed for ``STALE_S`` (its holder renews it every ``HEARTBEAT_S``
  from a thread of its own), is taken over, with a note."""

  def __init__(self, workdir: Path):
    self.path = Path(workdir) / LOCK_NAME
    self.held = False
    self._token: str | None = None  # in the record this run wrote: its own, whoever reuses the pid and host
    self._stop = threading.Event()

  def _renew(self, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:  # gone or unreachable for now: the next beat tries again
        pass

  def _stale_for(self) -> float:
    """Seconds since the lock file was last renewed (0 when it cannot be read)."""
    try:
      return max(0.0, time.time() - self.path.stat().st_mtime)
    except OSError:
      return 0.0

  def acquire(self) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "heartbeat": HEARTBEAT_S, "token": os.urandom(8).hex()}
    attempt = _slurm_attempt()
    if attempt:
      me["slurm_job"], me["slurm_restart"] = attempt
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        other = self._read()
        pid = int(other.get("pid", -1)) if other else -1
        # This process's own id on a lock it does not hold: left by an earlier run whose container reused
        # the id (and the host name).
        mine_before = pid == me["pid"] and str(self.path) not in _HELD
        left_by = None
        if other and other.get("host") == me["host"] and (mine_before or not _alive(pid)):
          left_by = f"process {other['pid']} on this host, which is gone"
        elif other and attempt and other.get("slurm_job") == attempt[0] and other.get("slurm_restart") != attempt[1]:
          left_by = (f"attempt {other.get('slurm_restart')} of this SLURM job ({attempt[0]}, now attempt "
                     f"{attempt[1]}: requeued)")
        elif other and other.get("heartbeat") and other.get("host") != me["host"] and (
            (idle := self._stale_for()) > STALE_S):
          left_by = (f"process {other.get('pid')} on host {other.get('host')}, which has not renewed it for "
                     f"{idle / 60:.0f} minutes (a live run renews it every {float(other['heartbeat']):.0f} s)")
        if left_by:
          if not self._take_over(other):
            break  # another run took it over at the same moment
          print(f"note: {self.path} was left by {left_by}; taking it over.")
          continue
        who = (f"process {other.get('pid')} on host {other.get('host')}, started {other.get('started')}"
               if other else "a run whose lock file cannot be read")
        raise WorkdirError(
            f"another training run ({who}) holds {self.path}: two runs in one workdir would overwrite each other's "
            f"checkpoints. Wait for it to finish or stop it, use another --workdir, or delete {self.path} if "
            "that run is gone.") from None
      try:
        with os.fdopen(fd, "w") as f:
          json.dump(me, f)
      except BaseException:  # a full disk: an empty lock file would refuse every later run
        self.path.unlink(missing_ok=True)
        raise
      self.held = True
      self._token = me["token"]
      _HELD.add(str(self.path))
      self._stop = threading.Event()  # this hold's own: a release ends its thread alone
      threading.Thread(target=self._renew, args=(self._stop,), name="workdir-lock-heartbeat", daemon=True).start()
      return
    raise WorkdirError(f"could not take over {self.path}: another run took it at the same moment. Check that no "
                       "other training run uses this workdir, then run again.")

  def _take_over(self, stale: dict) -> bool:
    """Removes the lock file judged left behind (``stale``, as read), unless another run took it over meanwhile:
    it is moved aside first (one rename: one run moves it) and deleted only if it is still that record; another
    run's fresh lock, moved by mistake, is put back (False: this run is refused). Deleting by name instead let two
    runs starting together both take over one stale lock, the later deleting the earlier's new one."""
    aside = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.{time.time_ns()}")
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:  # another run moved it first: both try the exclusive create, one wins
      return True
    try:
      moved = json.loads(aside.read_text())
    except (OSError, ValueError):
      moved = None
    if moved != stale:
      try:
        os.link(aside, self.path)  # the same file back (its holder renews it by name)
      except OSError:
        pass
    aside.unlink(missing_ok=True)
    return moved == stale

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None

  def release(self) -> None:
    self._stop.set()
    if self.held:
      # Only this run's own record: a lock another run took over (this one judged gone) is that run's.
      record = self._read()
      if record is None or record.get("token") == self._token:
        self.path.unlink(missing_ok=True)
      self.held = False
      _HELD.discard(str(self.path))

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
