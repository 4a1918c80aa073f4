#!/usr/bin/env bash
# The prepared GPU run for a session lent a device machine (issue 10's targets), one device command
# (under 10 minutes) per part. A full-size U-Net step compiles for minutes there (../shared/gpu.md)
# and compiling is host work, so each part starts its runs side by side: they compile at once, then
# take turns on the device (benchmarks/train_step.py --sync_dir), so no two time at once; each makes its
# state in its turn (waiting, a run holds its programs only: an H100's 80 GB would not hold VDM*'s 56.7 GB
# step beside three ucf101 states of ~9.5 GB). Not all of compiling is host work: XLA's autotuner times
# candidate kernels on the device, so runs compiling side by side choose kernels on a shared device (their
# step times may be a little worse than alone; a run alone, RUNS= below, says whether they are).
#   PART=vf      (default) what the H200 lease of 2026-12-04 left unmeasured: VideoFusion's train step
#                did not finish compiling there in 7 minutes (six compiles side by side; VDM*'s took
#                4.5). VideoFusion (batch BATCH, XLA's attention) beside VDM* (the same, for the
#                ratios of one run), VideoFusion with XLA's autotuning off (--xla_gpu_autotune_level=0:
#                what the autotuning costs in compile time, and gains in step time) and VideoFusion at
#                WIDE_BATCH (16) with WIDE_ATTENTION (cudnn): the MFU target at a batch that fills the
#                device. Ratios last.
#   PART=train   the train step of VideoFusion (XLA's attention and cuDNN's fused one) and of VDM* on
#                the same base generator: clips/s, MFU, memory and compile; ratios last.
#   PART=sample  DDIM sampling of both kinds: videos/s, sampling MFU; ratios. Beside them
#                VideoFusion's train step at WIDE_BATCH with WIDE_ATTENTION.
#   PART=all     the six runs of train and sample side by side (sampling: 2 timed batches, not 3).
#                On 2026-12-04 (SAMPLE_BATCH=8) both samplings and VDM*'s step were timed, VideoFusion's
#                three steps were still compiling when the 570 s ran out.
#   PART=loop    the real training loop (python -m videofusion_jax.main) on the synthetic input (no dataset, no
#                TensorFlow), LOOP_STEPS (40) steps at BATCH, its last ones profiled (--config.train.profile_steps,
#                a checkpoint save among them): benchmarks/train_profile.py's line (each step's wall time, the
#                host's time before its dispatch, the device's busy share) beside the loop's steps/s, and the
#                initial state's compile (its draws on JAX's threefry kernel since 2026-12-07, first checked to
#                give the unrolled rounds' bits). Once PART=vf has shown the step compiles within a call.
#   RUNS         instead of a part: runs separated by ';', each "name|XLA_FLAGS|benchmark flags", e.g.
#                RUNS="vf_nofa|--xla_gpu_experimental_enable_fusion_autotuner=false|--kinds=videofusion --sample_steps=0"
#                (a second call that tries what the first one's compile phases point at). The step's draws on
#                JAX's threefry kernel (a quarter of its operations are threefry's unrolled rounds when lowered
#                for CUDA: python benchmarks/gpu_lowering.py; the kernel's bits may cost memory):
#                JAX_THREEFRY_GPU_KERNEL_LOWERING=1 RUNS="vf_kernel||--kinds=videofusion --sample_steps=0 --config.model.attention_implementation="
# Every run times from a zero state (INIT, default zeros: --init=zeros; no figure depends on the
# values, and the initializers took 1.4-2.3 minutes to compile on the H200). Every run traces its
# cold compiles (--compile_profile: a 'compile_phases' line, where XLA spent the time) and gives up
# on one still running COMPILE_DEADLINE seconds after its start (TIMEOUT - 60: a 'compile_unfinished'
# line with the phases so far, where the timeout would have killed it silently; a warm compile still running
# then is given up: the run times, its row says null); the runs' train-step
# traces come back as $OUT/<run>_train_step.json.gz (Perfetto, ui.perfetto.dev; while $OUT holds < 8).
# BATCH (train, default 4: VDM* at batch 4 peaked at 56.7 GB on the H200), SAMPLE_BATCH (8), STEPS
# (20), SAMPLE_STEPS (50), TIMEOUT (each run's limit, 560 s from the script's start: the peak's time
# comes out of it), SYNC_TIMEOUT (time alone only until
# this many seconds after the start, 400 s), PEAK_TFLOPS (the MFU's denominator; unset: measured first,
# alone, on this device: a bfloat16 PEAK_SIZE^3 matrix product, 8192 as in ../shared/gpu.md, whose 695
# TFLOP/s is the H200's; an H100 gives its own; 695 if the measurement fails). Results: $OUT/bench.jsonl
# (the JSON lines, the peak first, the ratios last) and one log per run; add rows to benchmarks/RESULTS.md.
# Check it on the CPU first (a few minutes; the cuDNN runs stop at once there, holding nobody up):
#   OUT=/tmp/out CONFIG=configs/demo.py BATCH=8 STEPS=3 SAMPLE_STEPS=2 PEAK_SIZE=512 bash benchmarks/gpu_check.sh
# On the device (ml_collections from .whl, see the developers' guide; machine start took ~30 s). .whl is
# not in the repository (gitignored): build it here first and name it in the device call's carry:
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     -d .whl ml_collections==1.1.0
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD; bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/out}"
CONFIG="${CONFIG:-configs/ucf101.py}"
PART="${PART:-vf}"
mkdir -p "$OUT"
# Each run allocates what it uses (not 75% of the device up front): the runs share one device. Without
# preallocation JAX's allocator still stops a process at 75% of the device (60 GB of an H100's 80: VDM*'s
# step took 56.7 GB on the H200): 90% (the old and the new name of the setting).
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false \
  XLA_CLIENT_MEM_FRACTION="${XLA_CLIENT_MEM_FRACTION:-0.9}" XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_CLIENT_MEM_FRACTION:-0.9}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$OUT/bench.log"
if [ "$PART" = loop ]; then
  # The initial state draws with JAX's threefry kernel on a GPU (experiment.init_lowering): its bits against
  # the unrolled rounds' (JAX's default there), for the initializers' kinds of draw.
  timeout 120 python3 - <<'EOF' 2>&1 | tail -3 | tee -a "$OUT/bench.log"
import jax, numpy as np
from videofusion_jax.experiment import init_lowering
def draws(key):
  a, b = jax.random.split(jax.random.fold_in(key, 7))
  return (jax.random.normal(a, (3, 3, 64, 128)), jax.random.truncated_normal(b, -2.0, 2.0, (4099,)),
          jax.random.uniform(a, (5, 1000)), jax.random.bits(b, (257,)))
with init_lowering():
  kernel = jax.jit(draws)(jax.random.PRNGKey(3))
unrolled = jax.jit(draws)(jax.random.PRNGKey(3))
same = all(np.array_equal(np.asarray(k), np.asarray(u)) for k, u in zip(kernel, unrolled))
print(f"threefry kernel against unrolled rounds on {jax.devices()[0].device_kind}: "
      f"{'the same bits' if same else 'DIFFERENT bits'}")
EOF
  steps="${LOOP_STEPS:-40}"
  work=$(mktemp -d)
  echo "== $(date +%T) loop: $CONFIG, batch ${BATCH:-4}, $steps steps on the synthetic input" | tee -a "$OUT/bench.log"
  timeout $(( ${TIMEOUT:-560} - SECONDS )) python3 -m videofusion_jax.main --config="$CONFIG" --workdir="$work" \
    --mode=train \
    --config.data.name=synthetic --config.train.batch_size="${BATCH:-4}" --config.train.num_steps="$steps" \
    --config.train.log_every=5 --config.train.checkpoint_every=$(( steps - 5 )) \
    --config.train.profile_steps="($(( steps - 9 )), $(( steps - 2 )))" --config.compilation_cache_dir="$work/xla" \
    > "$OUT/loop.log" 2>&1
  rc=$?  # before anything else sets $? (the echo's $(date) did: every run said exit 0)
  echo "== $(date +%T) loop: exit $rc" | tee -a "$OUT/bench.log"
  grep -E '^(step |first step|initial state|checkpoint|profile)' "$OUT/loop.log" | tail -12
  if [ "$rc" -ne 0 ]; then tail -5 "$OUT/loop.log"; fi  # why it stopped
  python3 benchmarks/train_profile.py "$work/profile/process_0" | tee -a "$OUT/bench.jsonl"
  rm -rf "$work"
  exit 0
fi
sync_dir=$(mktemp -d)
timeout_s="${TIMEOUT:-560}"
if [ -z "${PEAK_TFLOPS:-}" ]; then  # the device's own ceiling, before the runs take the host and the device
  timeout 90 python3 benchmarks/train_step.py --measure_peak="${PEAK_SIZE:-8192}" > "$sync_dir/peak.log" 2>&1
  PEAK_TFLOPS=$(python3 -c 'import json, sys
peak = next(json.loads(x)["tflops_per_s"] for x in open(sys.argv[1]) if x.startswith("{\"result\": \"peak\""))
assert peak > 0, peak
print(peak)' "$sync_dir/peak.log" 2>/dev/null) \
    || { PEAK_TFLOPS=695; { tail -3 "$sync_dir/peak.log"; echo "(the peak was not measured: MFU against 695)"; } \
           | tee -a "$OUT/bench.log"; }
  echo "== $(date +%T) peak: $PEAK_TFLOPS TFLOP/s" | tee -a "$OUT/bench.log"
  timeout_s=$(( timeout_s - SECONDS ))  # the part's whole time stays what TIMEOUT said (one device call)
fi
common=(--config="$CONFIG" --config.train.batch_size="${BATCH:-4}" --config.sample.batch_size="${SAMPLE_BATCH:-8}"
        --steps="${STEPS:-20}" --peak_tflops="$PEAK_TFLOPS" --compare --sync_dir="$sync_dir"
        --sync_timeout="${SYNC_TIMEOUT:-400}" --init="${INIT:-zeros}"
        --compile_deadline_s="${COMPILE_DEADLINE:-$(( timeout_s - 60 ))}")
xla=--config.model.attention_implementation=  # XLA's own attention
sample="--notrain --sample_steps=${SAMPLE_STEPS:-50}"
# Each run: "name|XLA_FLAGS|flags".
vf="vf||--kinds=videofusion --sample_steps=0 $xla"
vdm="vdm||--kinds=vdm --sample_steps=0 $xla"
vf_cudnn="vf_cudnn||--kinds=videofusion --sample_steps=0 --config.model.attention_implementation=cudnn"
vf_wide="vf_wide||--kinds=videofusion --sample_steps=0 --config.train.batch_size=${WIDE_BATCH:-16} --config.model.attention_implementation=${WIDE_ATTENTION-cudnn}"
case "$PART" in
  vf) runs=("$vf" "$vdm" "vf_autotune0|--xla_gpu_autotune_level=0|--kinds=videofusion --sample_steps=0 $xla" "$vf_wide") ;;
  train) runs=("$vf" "$vdm" "$vf_cudnn") ;;
  sample) runs=("vf_sample||--kinds=videofusion $sample $xla" "vdm_sample||--kinds=vdm $sample $xla" "$vf_wide") ;;
  all) runs=("$vf" "$vdm" "$vf_cudnn" "vf_sample||--kinds=videofusion $sample --sample_repeats=2 $xla"
             "vdm_sample||--kinds=vdm $sample --sample_repeats=2 $xla" "$vf_wide") ;;
  *) echo "PART=$PART: use vf, train, sample, all or loop" >&2; exit 2 ;;
esac
if [ -n "${RUNS:-}" ]; then IFS=';' read -r -a runs <<< "$RUNS"; fi
parties=${#runs[@]}
logs=()
for r in "${runs[@]}"; do
  IFS='|' read -r name flags_xla flags <<< "$r"
  logs+=("$OUT/$name.log")
  echo "== $(date +%T) $name: XLA_FLAGS='$flags_xla' ${common[*]} $flags --sync_parties=$parties" | tee -a "$OUT/bench.log"
  # shellcheck disable=SC2086  # split on spaces: $flags, a run's flags; the XLA flags (trimmed: XLA
  # reads a blank XLA_FLAGS as a file name)
  xla_flags="$(echo ${XLA_FLAGS:-} $flags_xla)"
  (if [ -n "$xla_flags" ]; then export XLA_FLAGS="$xla_flags"; else unset XLA_FLAGS; fi
   timeout "$timeout_s" python3 benchmarks/train_step.py "${common[@]}" $flags --sync_parties=$parties \
     --compile_profile="$sync_dir/profile/$name" > "$OUT/$name.log" 2>&1; rc=$?
   echo "== $(date +%T) $name: exit $rc" | tee -a "$OUT/bench.log") &
done
wait
grep -h '^{' "$sync_dir/peak.log" "${logs[@]}" 2>/dev/null > "$OUT/bench.jsonl"
# The ratios: of VideoFusion and VDM* with XLA's attention and the default XLA flags.
grep -h '^{' "$OUT/vf.log" "$OUT/vdm.log" "$OUT/vf_sample.log" "$OUT/vdm_sample.log" 2>/dev/null > "$sync_dir/pairs.jsonl"
python3 benchmarks/train_step.py --summarize="$sync_dir/pairs.jsonl" 2>&1 | tee -a "$OUT/bench.log" | grep '^{' >> "$OUT/bench.jsonl"
# The runs' train-step compile traces, in the runs' order, each under 15 MiB, while fewer than 8
# files are in $OUT (at most 8 come back).
for log in "${logs[@]}"; do
  name=$(basename "$log" .log)
  trace=$(find "$sync_dir/profile/$name" -path '*_train_step/*' -name perfetto_trace.json.gz 2>/dev/null | head -1)
  if [ -n "$trace" ] && [ "$(stat -c %s "$trace")" -lt 15728640 ] && [ "$(ls "$OUT" | wc -l)" -lt 8 ]; then
    cp "$trace" "$OUT/${name}_train_step.json.gz"
  fi
done
# Last, what the reply shows (its end): each run's results in short, its compiles' longest phases
# (a run without results: its log's last lines).
if [ -f "$sync_dir/peak.log" ]; then logs=("$sync_dir/peak.log" "${logs[@]}"); fi
python3 benchmarks/train_step.py --report="$(IFS=,; echo "${logs[*]}")"
grep '"compare"' "$OUT/bench.jsonl" || echo "(no ratios: they need the vf and vdm runs)"
rm -rf "$sync_dir"
