#!/usr/bin/env bash
# The prepared GPU run for a session lent a device machine: train-step time, XLA FLOPs and
# MFU of CONFIG (default: the paper's ucf101 setting), with XLA's and cuDNN's attention.
# Results: $OUT/bench.jsonl (one JSON line per run) and $OUT/bench.log. Add a row to
# benchmarks/RESULTS.md from them. Check it on the CPU first:
#   OUT=/tmp/out CONFIG=configs/demo.py ATTENTION=default bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/out}"
CONFIG="${CONFIG:-configs/ucf101.py}"
ATTENTION="${ATTENTION:-default cudnn}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
for attn in $ATTENTION; do
  [ "$attn" = default ] && attn=""
  echo "== $CONFIG attention='${attn:-xla default}'" | tee -a "$OUT/bench.log"
  python3 benchmarks/train_step.py --config="$CONFIG" --steps="${STEPS:-10}" \
    --peak_tflops="${PEAK_TFLOPS:-695}" --compilation_cache=/tmp/jax_cache \
    --config.model.attention_implementation="$attn" 2>&1 | tee -a "$OUT/bench.log" \
    | grep '^{' >> "$OUT/bench.jsonl"
done
cat "$OUT/bench.jsonl"
