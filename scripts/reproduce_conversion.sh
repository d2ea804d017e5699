#!/usr/bin/env bash
# Backward compatibility (the paper's Performer fine-tuned from a softmax Transformer) at CPU scale:
#   prepare three reference proteomes -> train an exact causal Transformer (the parent) and, side by side, a
#   favor-softmax model from scratch -> the parent's weights under favor-softmax with no training (m = 32 .. 256,
#   two feature draws each) -> fine-tune them -> the report: validation perplexity against steps, steps to come
#   within 2% of the parent, and the attention's agreement with BLOSUM62 before and after the swap.
# Usage: scripts/reproduce_conversion.sh PROTEOMES_DIR [OUT_DIR]
#   (PARENT_STEPS=8 FINE_TUNE_STEPS=4 in the environment: a smoke test of the whole chain in minutes)
# About 1 h 45 min on 2 CPU cores (AMD EPYC): the parent and the from-scratch run side by side, then the fine-tune.
# PROTEOMES_DIR holds UniProt reference proteomes as FASTA (E. coli UP000000625, S. cerevisiae UP000002311 and
# P. falciparum UP000001450 train; S. elongatus UP000002717 is the held-out set of the agreement).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/reproduce_conversion.sh PROTEOMES_DIR [OUT_DIR]}
OUT=${2:-runs/conversion}
PARENT_STEPS=${PARENT_STEPS:-800}
FINE_TUNE_STEPS=${FINE_TUNE_STEPS:-300}  # as configs/cpu/conversion.yaml; the from-scratch run gets as many
for run in exact scratch converted step0; do
  if [ -e "$OUT/$run" ]; then echo "$OUT/$run exists (an earlier run): remove it or choose another OUT_DIR" >&2; exit 2; fi
done
export WANDB_MODE=${WANDB_MODE:-offline}
RECIPE=configs/cpu/similarity.yaml
run_dir() { echo "--trainer.default_root_dir $OUT/$1 --trainer.logger.init_args.save_dir $OUT/$1"; }

echo "== prepare E. coli + S. cerevisiae + P. falciparum -> $OUT/prepared"
protein-performer-prep "$DATA"/UP000000625-*.fasta.gz "$DATA"/UP000002311-*.fasta.gz "$DATA"/UP000001450-*.fasta.gz \
  --out "$OUT/prepared" --overwrite --no_progress

# One thread each: two runs side by side on a 2-core machine
echo "== train the exact parent ($PARENT_STEPS steps) and favor-softmax from scratch ($FINE_TUNE_STEPS steps); logs in $OUT/*.log"
mkdir -p "$OUT"
OMP_NUM_THREADS=1 protein-performer fit --config $RECIPE --data.data_dir "$OUT/prepared" --model.config.attention exact \
  --trainer.max_steps $PARENT_STEPS --trainer.val_check_interval $(( PARENT_STEPS < 100 ? PARENT_STEPS : 100 )) $(run_dir exact) > "$OUT/exact.log" 2>&1 &
parent=$!
OMP_NUM_THREADS=1 protein-performer fit --config $RECIPE --data.data_dir "$OUT/prepared" --model.config.attention favor-softmax \
  --trainer.max_steps $FINE_TUNE_STEPS --trainer.val_check_interval $(( FINE_TUNE_STEPS < 25 ? FINE_TUNE_STEPS : 25 )) $(run_dir scratch) > "$OUT/scratch.log" 2>&1 &
scratch=$!
trap 'kill $scratch 2>/dev/null || true' EXIT  # a failed step stops the run in the background too
wait $parent || { echo "training the exact parent failed: see $OUT/exact.log" >&2; exit 1; }

echo "== the parent's weights under favor-softmax, no training"
for m in 32 64 128 256; do
  for seed in 0 1; do
    OMP_NUM_THREADS=1 protein-performer validate --config $RECIPE --data.data_dir "$OUT/prepared" \
      --model.config.attention favor-softmax --model.config.nb_features $m --model.config.feature_seed $seed --model.init_from "$OUT/exact" \
      $(run_dir "step0/m$m-seed$seed") >> "$OUT/step0.log" 2>&1 || { echo "see $OUT/step0.log" >&2; exit 1; }
  done
done
# another kernel than softmax: the swap changes what attention computes
OMP_NUM_THREADS=1 protein-performer validate --config $RECIPE --data.data_dir "$OUT/prepared" --model.config.attention favor-relu \
  --model.init_from "$OUT/exact" $(run_dir step0/favor-relu) >> "$OUT/step0.log" 2>&1 || { echo "see $OUT/step0.log" >&2; exit 1; }

# The yardstick: the parent with uniform attention (q = k = 0: every position averages its prefix), i.e. what the
# parent's perplexity owes to where its attention looks
echo "== control: the parent with uniform attention"
python benchmarks/attention_gap.py curve "$OUT" --parents exact

echo "== fine-tune favor-softmax from the parent (configs/cpu/conversion.yaml)"
OMP_NUM_THREADS=1 protein-performer fit --config configs/cpu/conversion.yaml --data.data_dir "$OUT/prepared" \
  --model.init_from "$OUT/exact" --trainer.max_steps $FINE_TUNE_STEPS \
  --trainer.val_check_interval $(( FINE_TUNE_STEPS < 25 ? FINE_TUNE_STEPS : 25 )) $(run_dir converted) > "$OUT/converted.log" 2>&1 \
  || { echo "fine-tuning failed: see $OUT/converted.log" >&2; exit 1; }
wait $scratch || { echo "training from scratch failed: see $OUT/scratch.log" >&2; exit 1; }

echo "== report"
python benchmarks/conversion.py "$OUT" --held_out "$(ls "$DATA"/UP000002717-*.fasta.gz)"
