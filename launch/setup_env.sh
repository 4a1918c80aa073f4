# Sourced by the launch scripts: creates .venv and installs the pinned requirements when
# they are missing or changed, then activates it. Needs only python3 (3.11 or 3.12) and pip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.requirements.sha256"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
ready() { [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; }
if ! ready; then
  # One set-up at a time for one venv (two jobs started together on a shared filesystem): the one that waited
  # finds it made. The lock is a file beside the venv; without flock (macOS), or where the filesystem refuses
  # locks (Lustre mounted without them), there is none, and a note says so.
  LOCKED=""
  if command -v flock >/dev/null && { exec 9>>"$VENV.lock"; } 2>/dev/null; then
    if flock 9 2>/dev/null; then
      LOCKED=1
    else
      echo "[setup] note: $VENV.lock cannot be locked on this filesystem; setting up without a lock" >&2
    fi
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    if ! command -v "$PYTHON" >/dev/null; then
      echo "error: $PYTHON is not found; install Python 3.11 or 3.12 and run again (PYTHON=python3.11 picks one)." >&2
      exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "error: $PYTHON is $("$PYTHON" --version 2>&1); the pinned requirements need Python 3.11 or 3.12:" \
        "install one and run again with PYTHON=python3.11 (or python3.12)." >&2
      exit 1
    fi
    echo "[setup] creating $VENV"
    [ -e "$VENV" ] && made="" || made=1
    if ! "$PYTHON" -m venv "$VENV"; then
      [ -n "$made" ] && rm -rf "$VENV"  # half made here: the next run would take it for a working one
      echo "error: '$PYTHON -m venv' failed (above); on Debian or Ubuntu install the venv module" \
        "(apt install ${PYTHON##*/}-venv, or python3-venv) and run again." >&2
      exit 1
    fi
  fi
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing pinned requirements into $VENV (first run: a few minutes)"
    # Each step checked here, not by set -e, which a caller's `cmd && source setup_env.sh` turns off: the stamp
    # must not be written over a failed install. setuptools' editable build warns at length on stderr; shown
    # only if it fails.
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip \
           && "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" \
           && { "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" 2>"$VENV/.editable-install.log" \
                || { cat "$VENV/.editable-install.log" >&2; false; }; }; }; then
      echo "error: installing the pinned requirements into $VENV failed (pip's message above); fix that (the" \
        "network, the disk) and run again: it starts the install over." >&2
      exit 1
    fi
    echo "$WANT" > "$STAMP"
  fi
  if [ -n "$LOCKED" ]; then exec 9>&-; fi
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$ROOT"
