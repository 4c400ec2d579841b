#!/usr/bin/env bash
# One prepared GPU check for issue 18's targets (H200, bf16, Llama-3-8B shape, q/v adapters): about 5 minutes.
#
#   1. tests/kernels/test_decode.py on the GPU (the CUDA-graph decode equals generate token for token)
#   2. latency (Table 3): merged LoRA r=512 vs unmerged NoRA and LoRA r=64/128, batch 1, eager generate and the
#      static-cache + CUDA-graph decode                                           -> $OUT/latency.json
#   3. mixed decode: 32 rows on 32 distinct adapters (r=16) vs one adapter vs peft's per-adapter loop -> $OUT/mixed.json
#   4. training step NoRA / LoRA, r=128, batch 4 x 512, dropout 0 and 0.05: time and memory       -> $OUT/train.json
#   5. $OUT/summary.json: each target with its measured value and met / not met
#
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh   (device tool: timeout_s=600)
# A dry run on a CPU (tiny shapes, minutes):  GPU_CHECK_SHAPE=shape:tiny GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh
# Every step has its own time limit and a failing step does not stop the others; $OUT/log.txt holds all output.
set -u
OUT="${OUT:-gpu_check_out}"
SHAPE="${GPU_CHECK_SHAPE:-shape:llama-3-8b}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/log.txt"
: >"$LOG"
if [ "$SHAPE" = "shape:tiny" ]; then
  SMALL=(--repeats 2 --rounds 1 --decode-tokens 8 --seq-len 64)  # the dry run: the same commands, less work,
  SCALE=8                                                           # and time limits for a busy CPU
else
  SMALL=()
  SCALE=1  # on the H200 the limits sum to 520 s, inside one 600 s call; the steps take about 5 minutes together
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log, record the exit status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$((limit * SCALE))" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >>"$OUT/steps.jsonl"
}
: >"$OUT/steps.jsonl"

step env 40 "$PY" -c "
import torch, transformers, peft, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')
"
step decode_tests 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/kernels/test_decode.py
bench=("$PY" -m nora_peft.cli bench --device "$DEVICE" --model "$SHAPE" --targets q_proj,v_proj)
step latency 220 "${bench[@]}" --what latency --ranks 64,128 --merged-rank 512 --decode eager,graph \
  --rounds 2 --repeats 5 --decode-tokens 64 "${SMALL[@]}" --json "$OUT/latency.json"
step mixed 90 "${bench[@]}" --what mixed --rank 16 --mixed-parts decode --repeats 10 "${SMALL[@]}" \
  --json "$OUT/mixed.json"
step train 80 "${bench[@]}" --what train --ranks 128 --batch-size 4 --seq-len 512 --repeats 5 "${SMALL[@]}" \
  --json "$OUT/train.json"
step summary 60 "$PY" benchmarks/gpu_check_summary.py "$OUT"
cat "$OUT/summary.json" 2>/dev/null
