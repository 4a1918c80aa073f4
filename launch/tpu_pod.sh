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
#   SPOT, CLEANUP and DRY_RUN take 1 or 0 (true/false, yes/no, on/off too; anything else is an error).
# Steps: create the slice (or reuse a READY one of the same type on which no run is going), copy the
# committed code (git archive HEAD) to every worker, set up the environment there, start the run on
# every worker in the background (log in ~/videofusion/logs/main.log on each; an earlier run's log is
# kept beside it under its date), follow worker 0's log, then wait for every worker's process and exit
# with 1 if any ended with another status than 0, naming the workers; clean up.
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

fail() { echo "error: $*" >&2; exit 1; }

# NAME's value as 1 or 0: a typo such as DRY_RUN=true must not run everything for real.
yes_no() {
  case "$(printf '%s' "${!1}" | tr '[:upper:]' '[:lower:]')" in
    1 | true | yes | on) printf -v "$1" 1 ;;
    0 | false | no | off | "") printf -v "$1" 0 ;;
    *) fail "$1=${!1}: use 1 or 0" ;;
  esac
}
yes_no SPOT
yes_no CLEANUP
yes_no DRY_RUN

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
if [ "$DRY_RUN" != 1 ] && ! command -v gcloud >/dev/null; then
  fail "gcloud is not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), run" \
    "'gcloud auth login', and run this again (DRY_RUN=1 prints the commands without it)"
fi
# The workers get the committed HEAD: a config file that is not committed would not be there.
if [[ $CONFIG != /* ]] && ! git -C "$ROOT" cat-file -e "HEAD:${CONFIG%%:*}" 2>/dev/null; then
  fail "CONFIG=$CONFIG is not in the committed HEAD, which is what the workers get (git archive HEAD):" \
    "commit it first"
fi

GC=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then GC+=(--project="$PROJECT"); fi
TPU=(gcloud compute tpus tpu-vm)
CREATED=0
STARTED=0
ENDED=0
# This run's own files (gcloud's errors, the code's tarball); a dry run makes none.
WORK="${TMPDIR:-/tmp}/videofusion-launch.XXXXXX"
if [ "$DRY_RUN" != 1 ]; then WORK="$(mktemp -d "$WORK")"; fi
ERRORS="$WORK/gcloud.err"
TARBALL="$WORK/videofusion.tar.gz"
PID="$REMOTE_DIR/logs/main.pid"
RC="$REMOTE_DIR/logs/main.rc"
# Whether the process in logs/main.pid is this project's run (after a reboot the number may be another's).
RUNNING="[ -f $PID ] && grep -qa videofusion_jax.main /proc/\$(cat $PID)/cmdline 2>/dev/null"
# Until the run's process has ended and its exit status is written: the process itself, to its zombie (whose
# command line is already empty), then a moment for the shell beside it to write logs/main.rc.
WAIT_FOR_RUN="while [ -f $PID ] && kill -0 \"\$(cat $PID)\" 2>/dev/null; do sleep 10; done; \
for _ in \$(seq 30); do [ -s $RC ] && break; sleep 1; done"

cleanup() {
  set +e  # a failed wait (a preempted slice's ssh) must not skip the delete
  if [ "$DRY_RUN" != 1 ]; then rm -rf "$WORK"; fi
  if [ "$CLEANUP" = 1 ] && [ "$CREATED" = 1 ]; then
    if [ "$STARTED" = 1 ] && [ "$ENDED" = 0 ]; then
      # Worker 0 can finish first; the others may still be writing their part of the last checkpoint.
      echo "# waiting for every worker's process to end before deleting $TPU_NAME (Ctrl-C again: delete it now)"
      trap 'echo "# deleting $TPU_NAME now"' INT
      run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=all --command="$WAIT_FOR_RUN"
    fi
    run "${TPU[@]}" delete "$TPU_NAME" "${GC[@]}" --quiet
  fi
}
trap cleanup EXIT

if [ "$DRY_RUN" = 1 ]; then echo "# dry run: printing the commands, running none"; fi

# 1. The slice: reuse a READY one; a preempted spot slice cannot be restarted, only recreated.
show "${TPU[@]}" describe "$TPU_NAME" "${GC[@]}" --format="value(state,acceleratorType)"
STATE="" TYPE=""
if [ "$DRY_RUN" = 1 ]; then
  echo "# dry run: the describe check is not run; assuming the slice does not exist"
elif FOUND="$("${TPU[@]}" describe "$TPU_NAME" "${GC[@]}" --format="value(state,acceleratorType)" 2>"$ERRORS")"; then
  read -r STATE TYPE <<<"$FOUND" || true
elif ! grep -qiE "NOT_FOUND|not found" "$ERRORS"; then  # no answer (credentials, network, permission) is no "absent"
  cat "$ERRORS" >&2
  fail "cannot tell whether TPU $TPU_NAME exists (gcloud's error above); nothing was created or deleted"
fi
case "$STATE" in
  READY)
    if [ -n "$TYPE" ] && [ "$TYPE" != "$ACCELERATOR_TYPE" ]; then
      fail "TPU $TPU_NAME is a READY $TYPE slice, not ACCELERATOR_TYPE=$ACCELERATOR_TYPE: set" \
        "ACCELERATOR_TYPE=$TYPE to use it, or another TPU_NAME"
    fi
    echo "# reusing $TPU_NAME (READY)"
    # Before anything is copied there: the code and the environment of a run going on stay as they are.
    run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=all \
      --command="if $RUNNING; then echo \"error: a run is already \
going on \$(hostname) (process \$(cat $PID)): wait for it, or stop it on every worker (${TPU[*]} ssh $TPU_NAME \
${GC[*]} --worker=all --command='kill \\\$(cat $PID)'; it saves a checkpoint) and run this again\" >&2; exit 1; fi" ;;
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
  show "${CREATE[@]}"
  # gcloud's messages shown as they come, and kept: a slice of this name made by someone else is not deleted.
  if [ "$DRY_RUN" != 1 ] && ! { "${CREATE[@]}" 2>&1 1>&3 | tee "$ERRORS" >&2; } 3>&1; then
    if grep -q "ALREADY_EXISTS" "$ERRORS"; then CREATED=0; fi
    fail "creating TPU $TPU_NAME failed (gcloud's error above)"
  fi
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
# The process is python itself (its pid in logs/main.pid: a kill reaches it, and it saves); a shell beside it
# waits for it and writes its exit status to logs/main.rc.
MAIN="$(quote -m videofusion_jax.main --config="$CONFIG" --workdir="$WORKDIR" --mode="$MODE" --multihost "$@")"
run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=all \
  --command="cd $REMOTE_DIR && source launch/setup_env.sh && mkdir -p logs \
&& if [ -f logs/main.pid ] && grep -qa videofusion_jax.main /proc/\$(cat logs/main.pid)/cmdline 2>/dev/null; then \
echo \"error: a run is already going on \$(hostname)\" >&2; exit 1; fi \
&& rm -f logs/main.pid logs/main.rc && { [ ! -f logs/main.log ] || mv logs/main.log \"logs/main.\$(date -r logs/main.log +%Y%m%d-%H%M%S).log\"; } \
&& { nohup bash -c 'python \"\$@\" & echo \$! > logs/main.pid; wait \$!; echo \$? > logs/main.rc' _ $MAIN \
> logs/main.log 2>&1 < /dev/null & } && for _ in \$(seq 100); do [ -s logs/main.pid ] && break; sleep 0.1; done \
&& { [ -s logs/main.pid ] || { echo \"error: the run did not start on \$(hostname): ~/$REMOTE_DIR/logs/main.log\" >&2; \
exit 1; }; }"
STARTED=1

# 5. Worker 0's log until its process ends (Ctrl-C stops following, not the run).
run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=0 \
  --command="cd $REMOTE_DIR && tail -n +1 -F --pid=\"\$(cat logs/main.pid)\" logs/main.log"
# 6. Every worker's process to its end (the others may still be writing their part of the last checkpoint),
# and its exit status: this script fails where a run did.
run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=all --command="$WAIT_FOR_RUN"
ENDED=1
run "${TPU[@]}" ssh "$TPU_NAME" "${GC[@]}" --worker=all --command="rc=\$(cat $RC 2>/dev/null); \
if [ \"\$rc\" != 0 ]; then echo \"error: the run on \$(hostname) \$([ -n \"\$rc\" ] && echo ended with exit status \
\$rc || echo was killed before it could write its exit status); its log: ~/$REMOTE_DIR/logs/main.log\" >&2; exit 1; fi"
# 7. Clean-up runs on exit (the trap above).
