#!/usr/bin/env bash
# The prepared GPU run for a session lent a device machine (issue 10's targets): VideoFusion and
# VDM* on the same base generator (--compare), train step and DDIM-50 sampling, with XLA's and
# cuDNN's attention. Each run prints JSON lines (benchmarks/train_step.py); results go to
# $OUT/bench.jsonl and $OUT/bench.log. Add rows to benchmarks/RESULTS.md from them.
# Check it on the CPU first (a few minutes):
#   OUT=/tmp/out CONFIG=configs/demo.py ATTENTION=default STEPS=3 SAMPLE_STEPS=2 bash benchmarks/gpu_check.sh
# On the device (ml_collections from .whl, see the developers' guide), about 10 minutes:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD; bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/out}"
CONFIG="${CONFIG:-configs/ucf101.py}"
ATTENTION="${ATTENTION:-cudnn default}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$OUT/bench.log"
first=1
for attn in $ATTENTION; do
  [ "$attn" = default ] && attn=""
  # --compare once (with the first attention); the other attention times VideoFusion alone.
  compare=""; [ "$first" = 1 ] && compare="--compare"; first=0
  echo "== $CONFIG attention='${attn:-xla default}' $compare" | tee -a "$OUT/bench.log"
  timeout "${RUN_TIMEOUT:-420}" python3 benchmarks/train_step.py --config="$CONFIG" $compare \
    --steps="${STEPS:-20}" --sample_steps="${SAMPLE_STEPS:-50}" --peak_tflops="${PEAK_TFLOPS:-695}" \
    --config.model.attention_implementation="$attn" 2>&1 | tee -a "$OUT/bench.log" \
    | grep '^{' >> "$OUT/bench.jsonl"
done
cat "$OUT/bench.jsonl"
