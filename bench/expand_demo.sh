#!/bin/bash
# Depth up-scaling against plain LoRA, same pairs, same held-out items (issue 12's demonstration).
#
#   bench/expand_demo.sh [PROBLEMS=64] [EVAL_ITEMS=300] [OUT=runs/expand-demo]
#
# The default recipe's sampling (first PROBLEMS of its 200 train problems; the same chunks and
# seeds `posttrain run recipes/default.yaml` would draw), verify, pairs; then two arms with the
# recipe's DPO settings: A = LoRA all-linear on the 30-layer model, B = `posttrain expand`
# (opt-deus, top, 30 -> 36 layers) + LoRA on the 6 new layers only; eval of base, A and B on the
# first EVAL_ITEMS of the recipe's test set, and paired comparisons. One thread per process.
# C = full fine-tuning of the new layers only (lora.enabled=false, lora.targets=new-layers), in
# fp32: AdamW steps of 1e-4 round away on bf16 weights of magnitude ~0.05.
# Results of one run (64 problems, 41 pairs, 300 items): bench/results/expand_demo.json.
set -euo pipefail
PROBLEMS=${1:-64}; ITEMS=${2:-300}; OUT=${3:-runs/expand-demo}
P=${PYTHON:-.venv/bin/python}; export OMP_NUM_THREADS=1
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
TEST="builtin:arith:${ITEMS}?split=test&difficulty=1"
stamp() { echo "$(date -u +%H:%M:%S) $*; load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/times.log"; }

stamp start
$P -m posttrain.cli sample --problems "builtin:arith:200?split=train&difficulty=1" \
   --limit "$PROBLEMS" --n 4 --temperature 0.7 --max-new-tokens 64 --batch-size 32 --seed 0 \
   --out "$OUT/samples.jsonl"
$P -m posttrain.cli verify --samples "$OUT/samples.jsonl" --out "$OUT/scored.jsonl"
$P -m posttrain.cli pairs --scored "$OUT/scored.jsonl" --out "$OUT/pairs.jsonl" \
   --strategy confident-wrong --max-pairs-per-problem 2
stamp pairs
[ -d "$OUT/model-36" ] || $P -m posttrain.cli expand --model smollm2-135m --method opt-deus \
   --new-layers 6 --placement top --out "$OUT/model-36"
stamp expand
cat > "$OUT/train.yaml" <<'EOF'
# recipes/default.yaml train.config, one thread
dtype: auto
lr: 1.0e-4
beta: 0.1
epochs: 2
batch_size: 4
max_length: 256
num_threads: 1
lora: {r: 16, alpha: 32}
EOF
arm() {  # NAME MODEL TARGETS
  $P -m posttrain.cli train --method dpo --model "$2" --data "$OUT/pairs.jsonl" \
     --out "$OUT/$1/train" --config "$OUT/train.yaml" --set "lora.targets=$3" --no-progress
  stamp "trained $1"
  $P -m posttrain.cli eval --model "$2" --adapter "$OUT/$1/train/adapter" --problems "$TEST" \
     --max-new-tokens 64 --batch-size 25 --out "$OUT/$1/eval"
  stamp "evaluated $1"
}
fullft() {
  $P -m posttrain.cli train --method dpo --model "$OUT/model-36" --data "$OUT/pairs.jsonl" \
     --out "$OUT/expand-fullft/train" --config "$OUT/train.yaml" --set dtype=fp32 \
     --set lora.enabled=false --set lora.targets=new-layers --no-progress
  stamp "trained expand-fullft"
  $P -m posttrain.cli eval --model "$OUT/expand-fullft/train/model" --problems "$TEST" \
     --max-new-tokens 64 --batch-size 25 --out "$OUT/expand-fullft/eval"
  stamp "evaluated expand-fullft"
}
arm lora-base smollm2-135m all-linear &
fullft &
arm expand-new-layers "$OUT/model-36" new-layers &
[ -f "$OUT/base/summary.json" ] || $P -m posttrain.cli eval --model smollm2-135m \
   --problems "$TEST" --max-new-tokens 64 --batch-size 25 --out "$OUT/base" &
wait
stamp done
for pair in "lora-base/eval expand-new-layers/eval" "lora-base/eval expand-fullft/eval" \
            "base lora-base/eval" "base expand-new-layers/eval" "base expand-fullft/eval"; do
  set -- $pair
  $P -m posttrain.cli compare "$OUT/$1" "$OUT/$2" | tee -a "$OUT/compare.txt"
done
