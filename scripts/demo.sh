#!/usr/bin/env bash
# End-to-end demo on the bundled UniProt sample, CPU only, about 4 minutes on 2 cores:
#   prepare (3,000 FASTA records + 100 Swiss-Prot entries; 3 Pfam families held out as OOD)
#   -> train a small masked Performer-ReLU for 3 minutes (configs/cpu/demo.yaml)
#   -> evaluate the best checkpoint on test and OOD (the paper's Table 2 layout)
#   -> analyse its attention against BLOSUM62 (figures, CSV, summary.json in OUT/analysis)
#   -> summary: validation perplexity against the unigram baseline (exit 1 if not below it).
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
protein-performer analyze --ckpt "$BEST" --input "$OUT/prepared" --out "$OUT/analysis" --num_sequences 100 --overwrite

python - "$OUT" <<'PY'
import csv, json, sys
out = sys.argv[1]
rows = [r for r in csv.DictReader(open(f"{out}/demo/train/metrics.csv")) if r.get("val/ppl")]
best = min(rows, key=lambda r: float(r["val/ppl"]))
report = json.load(open(f"{out}/demo/test/report/report.json"))
print("\n== summary")
print(f"validation (best, step {best['step']}): perplexity {float(best['val/ppl']):.2f} vs unigram baseline "
      f"{float(best['val/baseline_ppl']):.2f}; accuracy {100 * float(best['val/acc']):.1f}% vs {100 * float(best['val/baseline_acc']):.1f}%")
for split, r in report["results"].items():
    print(f"{split:>5}: perplexity {r['ppl']:.2f} vs baseline {r['baseline_ppl']:.2f}; "
          f"accuracy {100 * r['acc']:.1f}% vs {100 * r['baseline_acc']:.1f}%  ({int(r['tokens'])} masked tokens)")
print(f"report: {out}/demo/test/report/report.md")
if float(best["val/ppl"]) >= float(best["val/baseline_ppl"]):
    sys.exit("validation perplexity is not below the unigram baseline")
PY
