#!/usr/bin/env bash
# GPU smoke test, under 5 minutes on one GPU: with bf16, channels_last and torch.compile it
#   trains a few steps; SIGKILLs a run and resumes it; SIGTERMs a run (expects exit 143) and resumes it;
#   samples from the result; trains an edm run (diffusion.formulation=edm), resumes it and samples it
#   with Heun (and DPM-Solver++); and, where 2 GPUs exist, trains with a 2-process `accelerate launch`.
# Prints one PASS/FAIL/SKIP line per check and exits 1 if any failed.
#
#   benchmarks/gpu_smoke.sh [OUT]            # default OUT: runs/gpu_smoke (wiped first)
#   SMOKE_CPU=1 benchmarks/gpu_smoke.sh      # dry run on the CPU: fp32, no compile, fewer steps
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_smoke}
rm -rf "$OUT"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

TINY=(data.resolution=16 data.shapes_size=256 model.base_channels=32 "model.channel_mult=[1,2]"
      model.layers_per_block=1 "model.attention_resolutions=[8]" model.attention_head_dim=16
      diffusion.num_train_timesteps=100 train.warmup_steps=2 train.log_every=1 train.sample_every=0
      data.num_workers=2 data.hflip=true)
if [[ "${SMOKE_CPU:-0}" == 1 ]]; then
  MODE=(train.mixed_precision=no train.compile=false train.channels_last=false train.batch_size=4)
  STEPS=6 LONG=400 EVERY=3 DTYPE=fp32 DEVICE=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  MODE=(train.mixed_precision=bf16 train.compile=true train.channels_last=true train.batch_size=32)
  STEPS=20 LONG=100000 EVERY=10 DTYPE=bf16 DEVICE=cuda
fi
FAILED=0

report() {  # report NAME OK(0/1) DETAIL
  if [[ "$2" == 0 ]]; then echo "PASS  $1"; else echo "FAIL  $1: $3"; FAILED=1; fi
}

train() {  # train DIR STEPS [extra args...]: runs in the foreground, log in DIR.log
  local dir=$1 steps=$2; shift 2
  python train.py configs/shapes.yaml "${TINY[@]}" "${MODE[@]}" "output_dir=$dir" "train.max_steps=$steps" \
    "train.checkpoint_every=$EVERY" "$@" >>"$dir.log" 2>&1
}

start_train() {  # start_train DIR STEPS: in the background; PID is the python process itself
  python train.py configs/shapes.yaml "${TINY[@]}" "${MODE[@]}" "output_dir=$1" "train.max_steps=$2" \
    "train.checkpoint_every=$EVERY" >>"$1.log" 2>&1 &
  PID=$!
}

last_step() {  # last_step DIR: the newest complete checkpoint's step
  local last
  last=$(ls -d "$1"/checkpoints/step-*/ 2>/dev/null | sort | tail -1)
  last=${last%/}
  echo $((10#${last##*step-}))
}

wait_for_checkpoint() {  # wait_for_checkpoint DIR PID: until a complete checkpoint exists (or the run ends)
  for _ in $(seq 1 1200); do
    compgen -G "$1/checkpoints/step-*/info.json" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.25
  done
  return 1
}

interrupt_and_resume() {  # interrupt_and_resume SIGNAL EXPECTED_STATUS
  local sig=$1 expected=$2 dir="$OUT/$1" status
  start_train "$dir" "$LONG"
  local pid=$PID
  if ! wait_for_checkpoint "$dir" "$pid"; then report "$sig and resume" 1 "no checkpoint before the run ended (see $dir.log)"; return; fi
  kill "-$sig" "$pid"
  { wait "$pid"; } 2>/dev/null; status=$?
  if [[ "$status" != "$expected" ]]; then report "$sig exit status" 1 "got $status, expected $expected (see $dir.log)"; return; fi
  report "$sig exit status $status" 0
  train "$dir" "$(($(last_step "$dir") + EVERY))" --resume auto; status=$?
  if [[ "$status" == 0 ]] && grep -q "resumed from" "$dir.log" && [[ -f "$dir/final/ema.safetensors" ]]; then
    report "$sig then --resume auto" 0
  else
    report "$sig then --resume auto" 1 "exit $status (see $dir.log)"
  fi
}

START=$SECONDS
train "$OUT/train" "$STEPS"; status=$?
[[ "$status" == 0 && -f "$OUT/train/final/ema.safetensors" ]]; report "train $STEPS steps (${MODE[*]})" $? "exit $status (see $OUT/train.log)"

interrupt_and_resume KILL 137
interrupt_and_resume TERM 143

python sample.py --checkpoint "$OUT/train" --num-samples 4 --steps 10 --device "$DEVICE" --dtype "$DTYPE" \
  --out "$OUT/samples" >"$OUT/sample.log" 2>&1; status=$?
[[ "$status" == 0 && -f "$OUT/samples/grid.png" ]]; report "sample" $? "exit $status (see $OUT/sample.log)"

# EDM's formulation: train, resume to more steps, sample with Heun (18 steps = 35 evaluations) and DPM-Solver++.
dir="$OUT/edm"
EDM=(diffusion.formulation=edm sample.sampler=heun sample.steps=18)
train "$dir" "$STEPS" "${EDM[@]}"; status=$?
[[ "$status" == 0 && -f "$dir/final/ema.safetensors" ]]; report "edm: train $STEPS steps" $? "exit $status (see $dir.log)"
train "$dir" "$((STEPS + EVERY))" "${EDM[@]}" --resume auto; status=$?
[[ "$status" == 0 ]] && grep -q "resumed from" "$dir.log" && [[ "$(last_step "$dir")" == "$((STEPS + EVERY))" ]]
report "edm: --resume auto to step $((STEPS + EVERY))" $? "exit $status (see $dir.log)"
for sampler in heun dpmsolver; do
  python sample.py --checkpoint "$dir" --num-samples 2 --sampler "$sampler" --steps 18 --guidance-scale 2 \
    --device "$DEVICE" --dtype "$DTYPE" --out "$OUT/edm_$sampler" >"$OUT/edm_$sampler.log" 2>&1; status=$?
  [[ "$status" == 0 && -f "$OUT/edm_$sampler/grid.png" ]]; report "edm: sample with $sampler, 18 steps, CFG 2" $? \
    "exit $status (see $OUT/edm_$sampler.log)"
done

GPUS=0
if [[ "$DEVICE" == cuda ]]; then GPUS=$(python -c "import torch; print(torch.cuda.device_count())"); fi
if [[ "$GPUS" -ge 2 ]]; then
  dir="$OUT/two_gpus"
  accelerate launch --num_processes 2 --multi_gpu train.py configs/shapes.yaml "${TINY[@]}" "${MODE[@]}" \
    "output_dir=$dir" "train.max_steps=$STEPS" "train.checkpoint_every=$EVERY" >"$dir.log" 2>&1; status=$?
  [[ "$status" == 0 && -f "$dir/final/ema.safetensors" ]]; report "2-process accelerate launch" $? "exit $status (see $dir.log)"
else
  echo "SKIP  2-process accelerate launch ($GPUS GPUs)"
fi
echo "$([[ $FAILED == 0 ]] && echo PASS || echo FAIL)  all checks, $((SECONDS - START)) s"
exit $FAILED
