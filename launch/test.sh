#!/usr/bin/env bash
# The test suite on a fresh machine (CPU only; 8 simulated devices for the sharding tests).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
python -m pytest -q --durations=15 tests "$@"
