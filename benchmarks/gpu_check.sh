#!/usr/bin/env bash
# The prepared GPU run for a session lent a device machine (issue 10's targets), one device command
# (under 10 minutes) per part. A full-size U-Net step compiles for minutes there (../shared/gpu.md)
# and compiling is host work, so each part starts its runs side by side: they compile at once, then
# take turns on the device (benchmarks/train_step.py --sync_dir), so no two time at once.
#   PART=train   (default) the train step of VideoFusion (XLA's attention and cuDNN's fused one) and
#                of VDM* on the same base generator: clips/s, MFU, memory and compile; ratios last.
#   PART=sample  DDIM sampling of both kinds from initial weights: videos/s, sampling MFU; ratios.
#                Beside them VideoFusion's train step at a wider batch (WIDE_BATCH, 16; ~93 GB by the
#                CPU analysis, and each run frees its memory when it exits after its turn) with
#                WIDE_ATTENTION (cudnn): the MFU target at a batch that fills the device.
#   PART=all     the six runs of both parts side by side in one command (sampling: 2 timed batches,
#                not 3), for a lease of 15 minutes whose machine start leaves time for one call:
#                TIMEOUT=570 SYNC_TIMEOUT=400 SAMPLE_BATCH=8 PART=all bash benchmarks/gpu_check.sh
# BATCH (train, default 4: VDM* at the ucf101 size holds ~25 GB of activations per clip by XLA's
# CPU memory analysis, so 16 clips would not fit one GPU), SAMPLE_BATCH (default 16), STEPS (20),
# SAMPLE_STEPS (50), TIMEOUT (each run's limit, 540 s), SYNC_TIMEOUT (time alone only until this
# many seconds after the start, 420 s), PEAK_TFLOPS (695). Results: $OUT/bench.jsonl (the JSON
# lines, the ratios last) and one log per run; add rows to benchmarks/RESULTS.md.
# Check it on the CPU first (a few minutes):
#   OUT=/tmp/out CONFIG=configs/demo.py BATCH=8 STEPS=3 SAMPLE_STEPS=2 bash benchmarks/gpu_check.sh
# On the device (ml_collections from .whl, see the developers' guide):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD; bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/out}"
CONFIG="${CONFIG:-configs/ucf101.py}"
PART="${PART:-train}"
mkdir -p "$OUT"
# Each run allocates what it uses (not 75% of the device up front): the runs share one device.
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$OUT/bench.log"
sync_dir=$(mktemp -d)
common=(--config="$CONFIG" --config.train.batch_size="${BATCH:-4}" --config.sample.batch_size="${SAMPLE_BATCH:-16}"
        --steps="${STEPS:-20}" --peak_tflops="${PEAK_TFLOPS:-695}" --compare --sync_dir="$sync_dir"
        --sync_timeout="${SYNC_TIMEOUT:-420}")
case "$PART" in
  train) parties=3
         runs=("vf --kinds=videofusion --sample_steps=0 --config.model.attention_implementation="
               "vdm --kinds=vdm --sample_steps=0 --config.model.attention_implementation="
               "vf_cudnn --kinds=videofusion --sample_steps=0 --config.model.attention_implementation=cudnn") ;;
  sample) parties=3
          runs=("vf_sample --kinds=videofusion --notrain --sample_steps=${SAMPLE_STEPS:-50} --config.model.attention_implementation="
                "vdm_sample --kinds=vdm --notrain --sample_steps=${SAMPLE_STEPS:-50} --config.model.attention_implementation="
                "vf_wide --kinds=videofusion --sample_steps=0 --config.train.batch_size=${WIDE_BATCH:-16} --config.model.attention_implementation=${WIDE_ATTENTION-cudnn}") ;;
  all) parties=6  # both parts in one command: for a lease whose machine start leaves one call
       runs=("vf --kinds=videofusion --sample_steps=0 --config.model.attention_implementation="
             "vdm --kinds=vdm --sample_steps=0 --config.model.attention_implementation="
             "vf_cudnn --kinds=videofusion --sample_steps=0 --config.model.attention_implementation=cudnn"
             "vf_sample --kinds=videofusion --notrain --sample_steps=${SAMPLE_STEPS:-50} --sample_repeats=2 --config.model.attention_implementation="
             "vdm_sample --kinds=vdm --notrain --sample_steps=${SAMPLE_STEPS:-50} --sample_repeats=2 --config.model.attention_implementation="
             "vf_wide --kinds=videofusion --sample_steps=0 --config.train.batch_size=${WIDE_BATCH:-16} --config.model.attention_implementation=${WIDE_ATTENTION-cudnn}") ;;
  *) echo "PART=$PART: use train, sample or all" >&2; exit 2 ;;
esac
logs=()
for r in "${runs[@]}"; do
  read -r name flags <<< "$r"
  logs+=("$OUT/$name.log")
  echo "== $(date +%T) $name: ${common[*]} $flags --sync_parties=$parties" | tee -a "$OUT/bench.log"
  # shellcheck disable=SC2086  # $flags: one run's flags, split on spaces
  (timeout "${TIMEOUT:-540}" python3 benchmarks/train_step.py "${common[@]}" $flags --sync_parties=$parties \
     > "$OUT/$name.log" 2>&1; rc=$?; echo "== $(date +%T) $name: exit $rc" | tee -a "$OUT/bench.log") &
done
wait
rm -rf "$sync_dir"
grep -h '^{' "${logs[@]}" > "$OUT/bench.jsonl"
python3 benchmarks/train_step.py --summarize="$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log" | grep '^{' >> "$OUT/bench.jsonl"
cat "$OUT/bench.jsonl"
