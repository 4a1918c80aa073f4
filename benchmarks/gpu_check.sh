#!/usr/bin/env bash
# The prepared GPU run for a session lent a device machine (issue 10's targets). A full-size U-Net
# step takes minutes to compile there (../shared/gpu.md), so the work comes in parts, one device
# command (under 10 minutes) each, in order of priority:
#   PART=train   (default) VideoFusion and VDM* on the same base generator, train step only
#                (--compare --sample_steps=0), XLA's attention: clips/s, MFU, memory and compile
#                ratios, the main targets;
#   PART=sample  the same pair, DDIM-50 sampling included (videos/s, sampling MFU);
#   PART=cudnn   VideoFusion's train step with cuDNN's fused attention (its FLOPs are counted on
#                the XLA-attention program: XLA does not count the cuDNN call).
# BATCH: the train and sample batch (default 16: VDM* at the config's 256 runs 4,096 frames of
# the 256-channel base U-Net per step, beyond one GPU's memory). Results: $OUT/bench.jsonl (the
# JSON lines of benchmarks/train_step.py) and $OUT/bench.log; add rows to benchmarks/RESULTS.md.
# Check it on the CPU first (a few minutes):
#   OUT=/tmp/out CONFIG=configs/demo.py BATCH=8 STEPS=3 SAMPLE_STEPS=2 PART=sample bash benchmarks/gpu_check.sh
# On the device (ml_collections from .whl, see the developers' guide):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD; bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/out}"
CONFIG="${CONFIG:-configs/ucf101.py}"
PART="${PART:-train}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$OUT/bench.log"
args=(--config="$CONFIG" --config.train.batch_size="${BATCH:-16}" --config.sample.batch_size="${BATCH:-16}"
      --steps="${STEPS:-20}" --peak_tflops="${PEAK_TFLOPS:-695}")
case "$PART" in
  train) args+=(--compare --sample_steps=0 --config.model.attention_implementation=) ;;
  sample) args+=(--compare --sample_steps="${SAMPLE_STEPS:-50}" --config.model.attention_implementation=) ;;
  cudnn) args+=(--sample_steps=0 --config.model.attention_implementation=cudnn) ;;
  *) echo "PART=$PART: use train, sample or cudnn" >&2; exit 2 ;;
esac
echo "== PART=$PART ${args[*]}" | tee -a "$OUT/bench.log"
timeout "${TIMEOUT:-560}" python3 benchmarks/train_step.py "${args[@]}" 2>&1 | tee -a "$OUT/bench.log" \
  | grep '^{' >> "$OUT/bench.jsonl"
cat "$OUT/bench.jsonl"
