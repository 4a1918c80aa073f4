#!/usr/bin/env bash
# The prepared GPU run for a session lent a device machine (issue 10's targets), in one command
# of under 10 minutes: (1) VideoFusion and VDM* on the same base generator (--compare), train step
# and DDIM-50 sampling, XLA's attention (its FLOPs are counted exactly); (2) VideoFusion alone with
# cuDNN's fused attention (FLOPs counted on the XLA-attention program). Results: $OUT/bench.jsonl
# (JSON lines of benchmarks/train_step.py) and $OUT/bench.log; add rows to benchmarks/RESULTS.md.
# BATCH: the train batch (default 16: VDM* at the config's 256 runs 4,096 frames through the
# 256-channel base U-Net per step, beyond one GPU's memory). Check it on the CPU first:
#   OUT=/tmp/out CONFIG=configs/demo.py BATCH=8 STEPS=3 SAMPLE_STEPS=2 SECOND=default bash benchmarks/gpu_check.sh
# On the device (ml_collections from .whl, see the developers' guide):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD; bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/out}"
CONFIG="${CONFIG:-configs/ucf101.py}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$OUT/bench.log"
common=(--config="$CONFIG" --config.train.batch_size="${BATCH:-16}" --config.sample.batch_size="${BATCH:-16}"
        --steps="${STEPS:-20}" --sample_steps="${SAMPLE_STEPS:-50}" --peak_tflops="${PEAK_TFLOPS:-695}")
bench() {  # $1: seconds allowed; the rest: extra flags
  local limit=$1; shift
  echo "== $CONFIG $*" | tee -a "$OUT/bench.log"
  timeout "$limit" python3 benchmarks/train_step.py "${common[@]}" "$@" 2>&1 | tee -a "$OUT/bench.log" \
    | grep '^{' >> "$OUT/bench.jsonl"
}
bench "${FIRST_TIMEOUT:-360}" --compare --config.model.attention_implementation=
second="${SECOND:-cudnn}"; [ "$second" = default ] && second=""
bench "${SECOND_TIMEOUT:-180}" --config.model.attention_implementation="$second"
cat "$OUT/bench.jsonl"
