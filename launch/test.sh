#!/usr/bin/env bash
# The test suite on a fresh machine (CPU only; 8 simulated devices for the sharding tests).
# Test files run in parallel, one pytest-xdist worker per CPU core (at most 4: each holds a JAX
# process of up to a few GB); compiling, most of the suite's time, uses one core. TEST_WORKERS=N
# sets the count, TEST_WORKERS=0 runs everything in this one process. Arguments go to pytest: test files or
# ids (tests/test_vdm.py, tests/test_cli.py::test_x) run those alone, options (-k NAME, -x) apply to the suite.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
CORES="$(nproc)"  # the cores this process may use (its CPU affinity)
WORKERS="${TEST_WORKERS:-$(( CORES < 4 ? CORES : 4 ))}"
TARGETS=(tests)
for arg in "$@"; do  # a path or test id given: run it, not the whole folder beside it
  case "$arg" in -*) ;; *) [ -e "${arg%%::*}" ] && TARGETS=() ;; esac
done
python -m pytest -q --durations=15 -n "$WORKERS" --dist loadfile "${TARGETS[@]}" "$@"
