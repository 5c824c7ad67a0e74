#!/usr/bin/env bash
# The GPU checks of the scale path, on one GPU, in under 8 minutes; one line per check.
#   1. streaming attn on a random-weight 7B-shaped Llama in bfloat16, built on the GPU (no download),
#      256 records: time against one plain batched pass, engine buffers and GPU peak against the budget;
#   2. bench_scale.py --parts ab --device cuda (embedded model: fair baseline as whole processes, floor);
#   3. a 1-process torchrun through the CLI on cuda: the group is cpu:gloo,cuda:nccl and every
#      collective of the streaming engine runs through NCCL on the rank's GPU.
# Usage (repository root, the project's environment active): bash bench/gpu_check.sh [OUT_DIR]
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-${OUT:-out/gpu_check}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print('gpu:', torch.cuda.get_device_name(), '| torch', torch.__version__)" || exit 1
start=$(date +%s)

timeout 200 "$PY" bench/gpu_check.py > "$OUT/check1.log" 2>&1
rc=$?; grep '^check 1' "$OUT/check1.log" || echo "check 1 FAIL (exit $rc): $(tail -n 3 "$OUT/check1.log" | tr '\n' ' ')"

timeout 200 "$PY" bench/bench_scale.py --parts ab --device cuda --no-float64 > "$OUT/check2.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then
  echo "check 2 PASS: bench_scale --parts ab --device cuda: $(grep -E '^(a|b)\. ' "$OUT/check2.log" | tr '\n' ' ')"
else
  echo "check 2 FAIL (exit $rc): $(tail -n 3 "$OUT/check2.log" | tr '\n' ' ')"
fi

timeout 60 "$PY" -m torch.distributed.run --nproc_per_node=1 -m layerif score --device cuda --mode streaming \
  --task capitals --n-train 32 --n-val 8 --per-val --quiet --out "$OUT/torchrun" > "$OUT/check3.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ -s "$OUT/torchrun/scores.json" ]; then
  echo "check 3 PASS: torchrun --nproc_per_node=1 -m layerif score --device cuda (nccl): $(head -n 1 "$OUT/check3.log")"
else
  echo "check 3 FAIL (exit $rc): $(tail -n 3 "$OUT/check3.log" | tr '\n' ' ')"
fi
echo "total $(( $(date +%s) - start )) s; logs in $OUT"
