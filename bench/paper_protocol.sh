#!/usr/bin/env bash
# The LayerIF paper's two tables, in the field's protocol, for one 7B model on one GPU (NOT run here: see README,
# "Paper-protocol recipes").
#
#   1. Pruning: Wanda and SparseGPT at 50% and 70% sparsity, allocations uniform / OWL / AlphaPruning (alpha) /
#      LayerIF, calibration on 128 C4 sequences of 2048 tokens (the cuda default of --n-calib × --seqlen),
#      WikiText-2 perplexity at 2048 tokens, zero-shot lm-eval accuracy (acc, acc_norm) on BoolQ, RTE, HellaSwag,
#      WinoGrande, ARC-easy, ARC-challenge and OpenBookQA (--lm-eval-tasks paper), 3 calibration seeds with
#      paired intervals per task and for the mean.
#   2. LoRA-MoE: 160 experts over the 32 blocks (5 per block on average), allocations uniform / AlphaLoRA (alpha) /
#      LayerIF, trained and tested on lm-eval multiple-choice tasks (--task lm-eval:NAME), 3 seeds.
#
# Needs: a CUDA GPU with ≥ 40 GB (bfloat16 weights, 13.5 GB, plus SparseGPT's Hessians and the scoring buffers),
# the hub (the model, C4, WikiText-2, the lm-eval data sets), and `pip install 'layerif[data,lmeval]'`.
# Every step writes its own folder under $OUT; rerunning a step replaces it (--overwrite).
#
# Environment: MODEL (default mistralai/Mistral-7B-v0.1; meta-llama/Llama-2-7b-hf works the same), OUT (out/paper),
# SEEDS (0,1,2), SCORE_TASK (the lm-eval task the LayerIF scores are computed on: arc_easy), MOE_TASKS.
set -euo pipefail

MODEL=${MODEL:-mistralai/Mistral-7B-v0.1}
OUT=${OUT:-out/paper}
SEEDS=${SEEDS:-0,1,2}
SCORE_TASK=${SCORE_TASK:-arc_easy}
MOE_TASKS=${MOE_TASKS:-"arc_easy arc_challenge openbookqa boolq"}
GPU=(--device cuda --dtype bfloat16)

# 0. The plan of the scoring run (memory, engine, an estimated time; nothing computed), then the LayerIF scores:
#    per-block influence of the attention projections on the task's train documents, streaming.
layerif plan --model "$MODEL" "${GPU[@]}" --task "lm-eval:$SCORE_TASK" --n-train 512 --n-val 128 \
    --target attn --out "$OUT/plan" --overwrite
layerif score --model "$MODEL" "${GPU[@]}" --task "lm-eval:$SCORE_TASK" --n-train 512 --n-val 128 \
    --target attn --out "$OUT/scores" --overwrite

# 1. The pruning table: one comparison folder (comparison.md: perplexity, the built-in task's accuracy and one
#    lm-eval table; paired differences of LayerIF against uniform and the best baseline, per task and the mean).
layerif compare-pruning --model "$MODEL" "${GPU[@]}" --scores "$OUT/scores/scores.json" \
    --allocations uniform,owl,alpha,layerif --methods wanda,sparsegpt --sparsities 0.5,0.7 --seeds "$SEEDS" \
    --calib c4 --eval wikitext2 --eval-windows 0 --task "lm-eval:$SCORE_TASK" --task-items 500 \
    --lm-eval-tasks paper --lm-eval-batch-size 32 --batch-size 8 --out "$OUT/pruning" --overwrite

# 2. The LoRA-MoE table: per task, 160 experts over the 32 blocks, scores of that task.
for task in $MOE_TASKS; do
    layerif score --model "$MODEL" "${GPU[@]}" --task "lm-eval:$task" --n-train 512 --n-val 128 \
        --target attn --out "$OUT/scores-$task" --overwrite
    layerif compare-moe --model "$MODEL" "${GPU[@]}" --task "lm-eval:$task" --scores "$OUT/scores-$task/scores.json" \
        --total-experts 160 --allocations uniform,alpha,layerif --seeds "$SEEDS" --n-train 2000 --n-test 500 \
        --allow-repeats --steps 500 --batch-size 8 --grad-accum 4 --lr 2e-4 --out "$OUT/moe-$task" --overwrite
done
