#!/usr/bin/env bash
# Which attention for which task, and where attention matters (issue 26, sections 2 and 3; docs/variants.md and
# docs/conversion.md): one model shape (configs/cpu/variants.yaml), one seed, equal steps and batches.
#   1. the grid: masked and causal x exact, favor-softmax m = 64 and 256 (fixed features; m = 64 also redrawn
#      every 100 steps), favor-relu, on 128-token crops; the masked concatenated view at L = 8192 with the same
#      attentions and m = 256 redrawn too, its Performers with a second seed
#   2. the exact parents (4 heads of 32 dimensions from the grid, 16 heads of 8 beside them, and 4 heads trained
#      3x longer) validated at every checkpoint with uniform attention: the gap curve
#   3. the conversion from the 4-head parent with the largest final gap: its weights under favor-softmax (m = 32 ..
#      256, two draws) and favor-relu with no training, then fine-tuned (m = 64, and favor-relu); the grid's
#      Performers of its objective are the runs from scratch
# Usage: scripts/reproduce_variants.sh PROTEOMES_DIR [OUT_DIR]
#   (STEPS=20 CONCAT_STEPS=4 CONCAT_EXACT_STEPS=2 LONG_STEPS=20 FINE_TUNE_STEPS=4 in the environment: a smoke
#   test of the whole chain in about 20 minutes)
# About 2 h on a 2-core AMD EPYC (3.7 CPU-hours): two runs side by side, one thread each (WORKERS=1: one at a
# time). docs/conversion.md and docs/variants.md say which runs were cut short for time when they were measured.
# A finished run (marked DONE) is kept, so a stopped script resumes where it stopped.
# PROTEOMES_DIR holds UniProt reference proteomes as FASTA (E. coli UP000000625, S. cerevisiae UP000002311 and
# P. falciparum UP000001450 train, as in scripts/reproduce_conversion.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/reproduce_variants.sh PROTEOMES_DIR [OUT_DIR]}
OUT=${2:-runs/variants}
STEPS=${STEPS:-1500}                # the crops: 6.1 M tokens per run
CONCAT_STEPS=${CONCAT_STEPS:-600}   # the concatenated view, Performers: 4.9 M tokens
CONCAT_EXACT_STEPS=${CONCAT_EXACT_STEPS:-150}  # exact attention at L = 8192 takes 10x a Performer's step here
LONG_STEPS=${LONG_STEPS:-4500}      # the gap curve's longest parents
CONCAT_SEEDS=${CONCAT_SEEDS:-1}     # seeds beside 0 for the concatenated view's Performers
FINE_TUNE_STEPS=${FINE_TUNE_STEPS:-300}
WORKERS=${WORKERS:-2}
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=1
mkdir -p "$OUT"

if [ ! -e "$OUT/prepared" ]; then
  echo "== prepare E. coli + S. cerevisiae + P. falciparum -> $OUT/prepared"
  protein-performer-prep "$DATA"/UP000000625-*.fasta.gz "$DATA"/UP000002311-*.fasta.gz "$DATA"/UP000001450-*.fasta.gz \
    --out "$OUT/prepared" --no_progress
fi

fit() {  # name; the rest: options of protein-performer fit
  local name=$1 dir="$OUT/$1"; shift
  if [ -e "$dir/DONE" ]; then echo "$dir done earlier: kept"; return; fi
  rm -rf "$dir"
  echo "== $(date +%H:%M:%S) $name"
  protein-performer fit --config configs/cpu/variants.yaml --data.data_dir "$OUT/prepared" "$@" \
    --trainer.default_root_dir "$dir" --trainer.logger.init_args.save_dir "$dir" > "$dir.log" 2>&1 \
    || { echo "training $name failed: see $dir.log" >&2; return 1; }
  touch "$dir/DONE"
}

queue() {  # run the fits listed on stdin (one per line: name and options), WORKERS at a time
  local line failed=0
  while read -r line; do
    [ -z "$line" ] && continue
    while [ "$(jobs -rp | wc -l)" -ge "$WORKERS" ]; do wait -n || failed=1; done
    # shellcheck disable=SC2086  # the options are words
    fit $line &
  done
  while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
  return $failed
}

CROP="--trainer.max_steps $STEPS --trainer.val_check_interval $(( STEPS < 100 ? STEPS : 100 ))"
CONCAT="--model.objective masked --data.mode concatenated --data.window 8192 --model.config.max_len 8192
  --data.max_tokens 8192 --trainer.val_check_interval $(( CONCAT_STEPS < 50 ? CONCAT_STEPS : 50 ))"
PARENT="--model.config.attention exact --checkpoint.save_top_k -1"  # every checkpoint: the gap curve reads them
performers() {  # prefix, the m whose features are also trained redrawn; the rest: options shared by the runs
  local prefix=$1 redrawn=$2 m; shift 2
  for m in 64 256; do
    echo "$prefix-fs$m --model.config.attention favor-softmax --model.config.nb_features $m $*"
    case " $redrawn " in *" $m "*)
      echo "$prefix-fs$m-redraw --model.config.attention favor-softmax --model.config.nb_features $m" \
        "--model.redraw_every 100 $*";;
    esac
  done
  echo "$prefix-relu --model.config.attention favor-relu $*"
}
echo "== the grid and the parents, $WORKERS at a time; logs in $OUT/*.log"
{
  echo "causal-exact $PARENT $CROP"
  echo "masked-exact $PARENT --model.objective masked $CROP"
  echo "causal-exact-d8 $PARENT --model.config.n_heads 16 $CROP"
  echo "masked-exact-d8 $PARENT --model.config.n_heads 16 --model.objective masked $CROP"
  echo "concat-exact $PARENT" $CONCAT "--trainer.max_steps $CONCAT_EXACT_STEPS" \
    "--trainer.val_check_interval $(( CONCAT_EXACT_STEPS < 50 ? CONCAT_EXACT_STEPS : 50 ))"
  # m = 256 redrawn on crops: left out for time (docs/redraw.md measures redrawing at m = 16 and 256 on crops)
  performers causal 64 "$CROP"
  performers masked 64 --model.objective masked "$CROP"
  performers concat "64 256" $CONCAT "--trainer.max_steps $CONCAT_STEPS"
  for seed in $CONCAT_SEEDS; do  # more seeds where the variants differ most; the run names end in -seed<S>
    performers concat "64 256" $CONCAT "--trainer.max_steps $CONCAT_STEPS --seed_everything $seed --model.seed $seed" \
      "--model.config.feature_seed $seed" | sed "s/^[^ ]*/&-seed$seed/"
  done
  echo "masked-exact-long $PARENT --model.objective masked --trainer.max_steps $LONG_STEPS" \
    "--trainer.val_check_interval $(( LONG_STEPS < 300 ? LONG_STEPS : 300 ))"
  echo "causal-exact-long $PARENT --trainer.max_steps $LONG_STEPS" \
    "--trainer.val_check_interval $(( LONG_STEPS < 300 ? LONG_STEPS : 300 ))"
} | queue

echo "== $(date +%H:%M:%S) the gap curve: every checkpoint of the exact parents with uniform attention"
python benchmarks/attention_gap.py curve "$OUT" --parents causal-exact masked-exact causal-exact-d8 masked-exact-d8 \
  causal-exact-long masked-exact-long concat-exact --plot docs/attention_gap.png \
  --choose_from causal-exact masked-exact causal-exact-long masked-exact-long
PARENT_RUN=$(cat "$OUT/report/parent")
OBJECTIVE=${PARENT_RUN%%-*}
echo "== $(date +%H:%M:%S) fine-tune Performers from $PARENT_RUN (the largest final gap of the 4-head parents)"
TUNE="--model.objective $OBJECTIVE --model.init_from $OUT/$PARENT_RUN --model.lr 5.0e-4 --model.warmup_steps 25
  --trainer.max_steps $FINE_TUNE_STEPS --trainer.val_check_interval $(( FINE_TUNE_STEPS < 25 ? FINE_TUNE_STEPS : 25 ))"
{
  echo "converted-fs64 --model.config.attention favor-softmax --model.config.nb_features 64" $TUNE
  echo "converted-relu --model.config.attention favor-relu" $TUNE
} | queue

echo "== $(date +%H:%M:%S) reports"
python benchmarks/variants.py "$OUT" --plot docs/variants.png
python benchmarks/attention_gap.py conversion "$OUT" --converted converted-fs64 converted-relu \
  --scratch "$OBJECTIVE-fs64" "$OBJECTIVE-relu" --plot docs/conversion_gap.png
