#!/usr/bin/env bash
# End-to-end demo on the bundled UniProt sample, CPU only, about 4 minutes on 2 cores:
#   prepare (3,000 FASTA records + 100 Swiss-Prot entries; 3 Pfam families held out as OOD)
#   -> train a small masked Performer-ReLU for 3 minutes (configs/cpu/demo.yaml)
#   -> evaluate the best checkpoint on test and OOD (the paper's Table 2 layout)
#   -> analyse its attention against BLOSUM62 (figures, CSV, summary.json in OUT/analysis)
#   -> summary: `protein-performer report` (exit 1 if test perplexity is not below the unigram baseline).
# Usage: scripts/demo.sh [OUT_DIR] [extra `protein-performer fit` overrides, e.g. --trainer.max_time 00:00:01:00]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=demo_out
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT=$1; shift; fi  # a first argument that is not a flag: OUT_DIR
export WANDB_MODE=${WANDB_MODE:-offline}
COMMON=(--config configs/cpu/demo.yaml --data.data_dir "$OUT/prepared" --trainer.default_root_dir "$OUT"
        --trainer.logger.init_args.save_dir "$OUT")

echo "== 1/4 prepare the bundled sample -> $OUT/prepared"
protein-performer-prep data/sample/mmseqs2_DB_first3000.fasta.gz data/sample/emboss_swiss_seq.dat.gz \
  --out "$OUT/prepared" --overwrite --ood_families PF00258 PF00001 PF00022

echo "== 2/4 train (configs/cpu/demo.yaml)"
rm -rf "$OUT/checkpoints" "$OUT/demo/train"  # the demo's own outputs of an earlier run: this run starts afresh
protein-performer fit "${COMMON[@]}" --trainer.logger.init_args.version train "$@"

echo "== 3/4 evaluate the best checkpoint on test and OOD"
BEST=$(ls "$OUT"/checkpoints/best-*.ckpt)  # one file: the checkpoint callback keeps the best only
protein-performer test "${COMMON[@]}" --trainer.logger.init_args.version test --ckpt_path "$BEST"

echo "== 4/4 attention analysis of the best checkpoint -> $OUT/analysis"
protein-performer analyze --ckpt_path "$BEST" --input "$OUT/prepared" --out "$OUT/analysis" --num_sequences 100 --overwrite

REPORT="$OUT/demo/test/report/report.json"
echo
echo "== summary: the best checkpoint on test and OOD (Table 2 layout; also ${REPORT%.json}.md)"
protein-performer report "$REPORT"
protein-performer report "$REPORT" --json | python -c 'import json, sys
test = [r for r in json.load(sys.stdin) if r["split"] == "test"]
sys.exit(None if test and all(r["beats_baseline"] for r in test) else "test perplexity is not below the unigram baseline")'
