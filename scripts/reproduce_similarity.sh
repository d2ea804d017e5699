#!/usr/bin/env bash
# Attention against amino-acid similarity (BLOSUM62) on models trained here: the paper's App. C.4 at CPU scale.
#   prepare three reference proteomes -> train Performer-ReLU, Performer-softmax and the exact Transformer at
#   equal steps (configs/cpu/similarity.yaml, a checkpoint every 200 steps) -> the agreement with BLOSUM62 of
#   every checkpoint, on a fourth, held-out proteome -> the full analysis of each final model.
# Usage: scripts/reproduce_similarity.sh PROTEOMES_DIR [OUT_DIR] [extra `fit` overrides, e.g. --trainer.max_steps 600]
# PROTEOMES_DIR holds UniProt reference proteomes as FASTA (the project used E. coli UP000000625, S. cerevisiae
# UP000002311 and P. falciparum UP000001450 for training and S. elongatus UP000002717 held out).
# About 2 hours on 2 CPU cores for the three models of 2,400 steps (Performer-softmax, the slowest, sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/reproduce_similarity.sh PROTEOMES_DIR [OUT_DIR] [fit overrides]}
shift
OUT=runs/similarity
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT=$1; shift; fi  # a second argument that is not a flag: OUT_DIR
kinds=(favor-relu favor-softmax exact)
for kind in "${kinds[@]}"; do
  if [ -e "$OUT/$kind" ]; then echo "$OUT/$kind exists (an earlier run): remove it or choose another OUT_DIR" >&2; exit 2; fi
done
export WANDB_MODE=${WANDB_MODE:-offline}

echo "== prepare E. coli + S. cerevisiae + P. falciparum -> $OUT/prepared"
protein-performer-prep "$DATA"/UP000000625-*.fasta.gz "$DATA"/UP000002311-*.fasta.gz "$DATA"/UP000001450-*.fasta.gz \
  --out "$OUT/prepared" --overwrite --no_progress

# The three models train side by side, one thread each (threads of one model would wait on each other on a
# shared 2-core machine); each writes its own log.
echo "== train ${kinds[*]} side by side (configs/cpu/similarity.yaml; logs in $OUT/*.log)"
pids=()
for kind in "${kinds[@]}"; do
  mkdir -p "$OUT/$kind"
  OMP_NUM_THREADS=1 protein-performer fit --config configs/cpu/similarity.yaml --data.data_dir "$OUT/prepared" \
    --model.config.attention "$kind" --trainer.default_root_dir "$OUT/$kind" --trainer.logger.init_args.save_dir "$OUT/$kind" \
    "$@" > "$OUT/$kind.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!kinds[@]}"; do
  wait "${pids[$i]}" || { failed=1; echo "training ${kinds[$i]} failed: see $OUT/${kinds[$i]}.log" >&2; }
done
[ $failed = 0 ] || exit 1

HELD_OUT=$(ls "$DATA"/UP000002717-*.fasta.gz)
echo "== agreement with BLOSUM62 along training, on 300 proteins of $HELD_OUT"
protein-performer agreement "${kinds[@]/#/$OUT/}" --input "$HELD_OUT" \
  --out "$OUT/agreement" --num_sequences 300 --max_len 128 --offset 50 --overwrite
for kind in "${kinds[@]}"; do
  echo "== analysis of the final $kind model"
  protein-performer analyze --ckpt_path "$OUT/$kind/checkpoints/last.ckpt" --input "$HELD_OUT" --out "$OUT/analysis-$kind" \
    --num_sequences 500 --max_len 128 --offset 50 --overwrite
done
