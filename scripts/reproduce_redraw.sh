#!/usr/bin/env bash
# Feature redrawing (issue 26, section 1; docs/redraw.md): favor-softmax whose random features are never redrawn or
# redrawn every 10 or 100 steps, with m = 16 and m = 256, two seeds each, beside exact attention with the same
# seeds; equal steps, identical batches (data seed 0 throughout), one run at a time on one thread. Then the report:
# validation perplexity against steps and at the end, mean and spread over seeds (benchmarks/redraw.py).
# Usage: scripts/reproduce_redraw.sh PROTEOMES_DIR [OUT_DIR]
#   (STEPS=20 VAL_EVERY=10 in the environment: a smoke test of the whole chain in a few minutes)
# About 40 min on one core of an AMD EPYC (bf16-mixed): 14 runs of 360 steps, 1.5-4 min each, then 1 min of
# validations (fresh features, uniform attention).
# A seed s sets the weights (--seed_everything), the first features (--model.config.feature_seed) and the
# redraws (--model.seed); the batches are the same in every run.
# PROTEOMES_DIR holds UniProt reference proteomes as FASTA (E. coli UP000000625, S. cerevisiae UP000002311 and
# P. falciparum UP000001450 train, as in scripts/reproduce_conversion.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/reproduce_redraw.sh PROTEOMES_DIR [OUT_DIR]}
OUT=${2:-runs/redraw}
STEPS=${STEPS:-360}
VAL_EVERY=${VAL_EVERY:-40}
SEEDS=${SEEDS:-"0 1"}
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=1  # one thread: the machine is shared
mkdir -p "$OUT"

if [ ! -e "$OUT/prepared" ]; then
  echo "== prepare E. coli + S. cerevisiae + P. falciparum -> $OUT/prepared"
  protein-performer-prep "$DATA"/UP000000625-*.fasta.gz "$DATA"/UP000002311-*.fasta.gz "$DATA"/UP000001450-*.fasta.gz \
    --out "$OUT/prepared" --no_progress
fi

# name attention m redraw_every; a finished run (marked DONE) is kept, so a stopped script resumes the grid
train() {
  local name=$1 attention=$2 m=$3 redraw=$4 seed
  for seed in $SEEDS; do
    local dir="$OUT/$name-seed$seed"
    if [ -e "$dir/DONE" ]; then echo "$dir done earlier: kept"; continue; fi
    rm -rf "$dir"
    echo "== $(date +%H:%M:%S) $name seed $seed ($STEPS steps)"
    protein-performer fit --config configs/cpu/redraw.yaml --data.data_dir "$OUT/prepared" \
      --seed_everything "$seed" --model.seed "$seed" --model.config.feature_seed "$seed" \
      --model.config.attention "$attention" --model.config.nb_features "$m" --model.redraw_every "$redraw" \
      --trainer.max_steps "$STEPS" --trainer.val_check_interval "$VAL_EVERY" \
      --trainer.default_root_dir "$dir" --trainer.logger.init_args.save_dir "$dir" > "$dir.log" 2>&1 \
      || { echo "training $name seed $seed failed: see $dir.log" >&2; exit 1; }
    touch "$dir/DONE"
  done
}
train exact exact 256 0
train m16-never favor-softmax 16 0
train m16-every100 favor-softmax 16 100
train m16-every10 favor-softmax 16 10
train m256-never favor-softmax 256 0
train m256-every10 favor-softmax 256 10
train m256-every100 favor-softmax 256 100

# What the runs owe to their own features and to attention at all (validate only, seconds each):
# a trained favor-softmax model with a fresh draw of features (another feature_seed; init_from copies every weight
# but the projections), and the exact model with uniform attention (q = k = 0: each position averages its prefix)
validate() {  # name; the rest: options of protein-performer validate
  local name=$1; shift
  if [ -e "$OUT/fresh/$name/DONE" ]; then return; fi
  rm -rf "$OUT/fresh/$name"; mkdir -p "$OUT/fresh"
  protein-performer validate --config configs/cpu/redraw.yaml --data.data_dir "$OUT/prepared" "$@" \
    --trainer.default_root_dir "$OUT/fresh/$name" --trainer.logger.init_args.save_dir "$OUT/fresh/$name" \
    >> "$OUT/fresh.log" 2>&1 || { echo "validating $name failed: see $OUT/fresh.log" >&2; exit 1; }
  touch "$OUT/fresh/$name/DONE"
}
echo "== $(date +%H:%M:%S) trained weights with fresh features; exact with uniform attention"
for m in 16 256; do
  for run in never every10; do
    for seed in $SEEDS; do
      validate "m$m-$run-seed$seed-draw1000" --model.config.nb_features $m --model.config.feature_seed 1000 \
        --model.init_from "$OUT/m$m-$run-seed$seed"
    done
  done
done
# shellcheck disable=SC2046  # one run name per seed
python benchmarks/attention_gap.py curve "$OUT" --parents $(for seed in $SEEDS; do echo "exact-seed$seed"; done)
echo "== $(date +%H:%M:%S) report"
python benchmarks/redraw.py "$OUT" --plot docs/redraw.png
