#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (a pod slice has several workers, each running one process).
#
# Usage (from a machine with gcloud set up; extra arguments go to videofusion_jax.main):
#   WORKDIR=/mnt/shared/videofusion/ucf101 TPU_NAME=vf ACCELERATOR_TYPE=v5litepod-16 SPOT=1 \
#     bash launch/tpu_pod.sh --config.train.num_steps=100000
#   DRY_RUN=1 WORKDIR=/mnt/shared/run bash launch/tpu_pod.sh   # print every command, run none
#
# Settings (environment variables):
#   TPU_NAME (videofusion), ZONE (us-west4-a), PROJECT (gcloud's default when empty),
#   ACCELERATOR_TYPE (v5litepod-16), RUNTIME_VERSION (v2-alpha-tpuv5-lite), SPOT=1 for spot capacity,
#   CONFIG (configs/ucf101.py, may end in :variant), MODE (train), WORKDIR (required: an absolute path on
#   a filesystem mounted at the same place on every worker (Filestore/NFS, or a bucket through
#   gcsfuse), since every process saves into the same Orbax checkpoint directory; gs:// URLs are
#   not read directly yet), CLEANUP=1 deletes the slice at the end if this script created it,
#   DRY_RUN=1, JAX_EXTRA (tpu: the pip extra that adds libtpu), WORKER_PYTHON (python3.11).
# Steps: create the slice (or reuse a READY one), copy the committed code (git archive HEAD) to
# every worker, set up the environment there, start the run on every worker in the background
# (log in ~/videofusion/logs/main.log on each), follow worker 0's log, clean up.
# Re-running the same command resumes from the latest checkpoint in WORKDIR.
set -euo pipefail

TPU_NAME="${TPU_NAME:-videofusion}"
ZONE="${ZONE:-us-west4-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
SPOT="${SPOT:-0}"
CONFIG="${CONFIG:-configs/ucf101.py}"
WORKDIR="${WORKDIR:-}"
MODE="${MODE:-train}"
CLEANUP="${CLEANUP:-0}"
DRY_RUN="${DRY_RUN:-0}"
JAX_EXTRA="${JAX_EXTRA:-tpu}"
# TPU VM images ship Ubuntu 22.04's python3.10; the pinned requirements need 3.11 or newer.
WORKER_PYTHON="${WORKER_PYTHON:-python3.11}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_VERSION="$(sed -n 's/^jax==//p' "$ROOT/requirements.txt")"
REMOTE_DIR=videofusion  # relative to the home directory on each worker
TARBALL="${TMPDIR:-/tmp}/videofusion-$TPU_NAME.tar.gz"

fail() { echo "error: $*" >&2; exit 1; }

# Shell-quotes its arguments (single quotes, only where needed) so that a printed command can be
# pasted back; plain bash 3 constructs, since this runs on laptops too.
quote() {
  local out="" a safe='^[A-Za-z0-9_./:=@%+,-]+$' q="'"
  for a in "$@"; do
    if [[ $a =~ $safe ]]; then out="$out $a"; else out="$out '${a//$q/$q\\$q$q}'"; fi
  done
  echo "${out# }"
}
show() { echo "+ $(quote "$@")"; }
run() {
  show "$@"
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

# The size suffix counts chips (cores before v5e and for v5p): every generation fits 8 in one host.
SIZE="${ACCELERATOR_TYPE##*-}"
[[ $SIZE =~ ^[0-9]+$ ]] || fail "ACCELERATOR_TYPE=$ACCELERATOR_TYPE: expected a type like v5litepod-16 or v4-32"
SHARED="a directory on a filesystem mounted at the same path on every worker (Filestore/NFS, or a bucket mounted with gcsfuse)"
if [ -z "$WORKDIR" ]; then
  fail "set WORKDIR to $SHARED: every worker saves there"
fi
if [[ $WORKDIR == gs://* ]]; then
  fail "WORKDIR=$WORKDIR: the workdir is written with ordinary file operations and gs:// URLs are not" \
    "supported yet; mount the bucket on every worker (gcsfuse) and set WORKDIR to the mount's path"
fi
if [ "$SIZE" -gt 8 ] && [[ $WORKDIR != /* ]]; then
  fail "WORKDIR=$WORKDIR is local to each worker, but $ACCELERATOR_TYPE has several that save into one" \
    "checkpoint: set WORKDIR to $SHARED"
fi
[ -n "$JAX_VERSION" ] || fail "no jax==VERSION pin in $ROOT/requirements.txt"

GC=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then GC+=(--project="$PROJECT"); fi
TPU=(gcloud compute tpus tpu-vm)
CREATED=0
STARTED=0

cleanup() {
  if [ "$CLEANUP" = 1 ] && [ "$CREATED" = 1 ]; then
    if [ "$STARTED" = 1 ]; then
      # Worker 0 can finish first; the others may still be writing their part of the last checkpoint.
      run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=all \
        --command="while kill -0 \"\$(cat $REMOTE_DIR/logs/main.pid)\" 2>/dev/null; do sleep 10; done"
    fi
    run "${TPU[@]}" delete "$TPU_NAME" "${GC[@]}" --quiet
  fi
}
trap cleanup EXIT

if [ "$DRY_RUN" = 1 ]; then echo "# dry run: printing the commands, running none"; fi

# 1. The slice: reuse a READY one; a preempted spot slice cannot be restarted, only recreated.
show "${TPU[@]}" describe "$TPU_NAME" "${GC[@]}" --format="value(state)"
if [ "$DRY_RUN" = 1 ]; then
  echo "# dry run: the describe check is not run; assuming the slice does not exist"
  STATE=""
else
  STATE="$("${TPU[@]}" describe "$TPU_NAME" "${GC[@]}" --format="value(state)" 2>/dev/null || true)"
fi
case "$STATE" in
  READY) echo "# reusing $TPU_NAME (READY)" ;;
  PREEMPTED | TERMINATED)
    echo "# $TPU_NAME is $STATE: recreating it"
    run "${TPU[@]}" delete "$TPU_NAME" "${GC[@]}" --quiet
    STATE="" ;;
  "") ;;
  *) fail "TPU $TPU_NAME is $STATE; wait until it is READY, or delete it: ${TPU[*]} delete $TPU_NAME ${GC[*]}" ;;
esac
if [ -z "$STATE" ]; then
  CREATE=("${TPU[@]}" create "$TPU_NAME" "${GC[@]}" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [ "$SPOT" = 1 ]; then CREATE+=(--spot); fi
  CREATED=1  # before creating, so that a half-made slice is deleted too
  run "${CREATE[@]}"
fi

# 2. The code: the committed HEAD, the same on every worker.
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]; then
  echo "# note: uncommitted changes are not copied (git archive takes HEAD)"
fi
run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
run "${TPU[@]}" scp "$TARBALL" "$TPU_NAME:$REMOTE_DIR.tar.gz" "${GC[@]}" --worker=all
run rm -f "$TARBALL"
# Untarred over the old copy, so that .venv survives and a re-run skips the install.
run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=all \
  --command="mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR && rm $REMOTE_DIR.tar.gz"

# 3. The environment: the pinned requirements (CPU jax), then the same jax version with libtpu.
PY_INSTALL="sudo apt-get update -qq && sudo apt-get install -y -qq $WORKER_PYTHON $WORKER_PYTHON-venv"
run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=all \
  --command="(command -v $WORKER_PYTHON >/dev/null || ($PY_INSTALL)) && cd $REMOTE_DIR \
&& PYTHON=$WORKER_PYTHON source launch/setup_env.sh \
&& python -m pip install -q $(quote "jax[$JAX_EXTRA]==$JAX_VERSION")"

# 4. The run: one process per worker, detached from the ssh session; JAX finds the coordinator,
# the process count and this worker's id itself on a TPU VM, so only --multihost is passed.
MAIN="$(quote python -m videofusion_jax.main --config="$CONFIG" --workdir="$WORKDIR" --mode="$MODE" --multihost "$@")"
run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=all \
  --command="cd $REMOTE_DIR && source launch/setup_env.sh && mkdir -p logs \
&& if [ -f logs/main.pid ] && kill -0 \"\$(cat logs/main.pid)\" 2>/dev/null; then \
echo \"error: a run is already going on \$(hostname)\" >&2; exit 1; fi \
&& { nohup $MAIN > logs/main.log 2>&1 < /dev/null & echo \$! > logs/main.pid; }"
STARTED=1

# 5. Worker 0's log until its process ends (Ctrl-C stops following, not the run).
run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=0 \
  --command="cd $REMOTE_DIR && tail -n +1 -F --pid=\"\$(cat logs/main.pid)\" logs/main.log"
# 6. Clean-up runs on exit (the trap above).
