#!/usr/bin/env bash
# The GPU check: correctness on the card, every CLI path on the GPU, then the benchmark tables in bf16.
# One short run (under 8 minutes on one H200), for a machine lent for a few minutes:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT (the device tool's) or gpu_check_out
#
# It installs nothing from the network: the project runs from this checkout (PYTHONPATH). Packages the GPU image
# lacks are installed from a folder of wheels when one is given (GPU_WHEELS=DIR, made beforehand on a machine
# with a registry, for the GPU's Python, e.g. 3.12:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d DIR \
#       "jsonargparse[signatures]>=4.27" "biopython>=1.83" "isal>=1.6" docstring-parser typeshed-client
# ). DEVICE=cpu QUICK=1 runs the same steps on a CPU in about two minutes, to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check_out}}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
CLI=("$PY" -m protein_performer.cli)
log() { printf '\n== %s (%s s)\n' "$1" "$SECONDS"; }

log "machine"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; fi
if ! "$PY" -c "import jsonargparse, docstring_parser, Bio, isal" 2>/dev/null; then
  if [ -n "${GPU_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$GPU_WHEELS" "jsonargparse[signatures]" biopython isal
  else
    echo "missing packages (jsonargparse, docstring-parser, biopython, isal) and no GPU_WHEELS folder: see this script's header"
    exit 1
  fi
fi
"$PY" -c "from protein_performer.machine import machine_line; print(machine_line())"

if [ "$QUICK" = 1 ]; then STEPS=6; VAL=3; RECORDS=10; LENGTHS_ATT="1024 2048"; LENGTHS_MODEL="1024"; TIMEOUT=60
else STEPS=60; VAL=30; RECORDS=100; LENGTHS_ATT="1024 4096 16384 65536"; LENGTHS_MODEL="1024 4096 8192 32768"
  TIMEOUT=150; fi

log "CUDA tests (a failure is reported at the end; the other checks still run)"
failed=0
"$PY" -m pytest -q -m cuda tests/test_cuda.py tests/test_cuda_training.py -p no:cacheprovider || failed=1

log "prepare the bundled sample"
"$PY" -m protein_performer.prep data/sample/mmseqs2_DB_first3000.fasta.gz data/sample/emboss_swiss_seq.dat.gz \
  --out "$OUT/prepared" --overwrite --ood_families PF00258 PF00001 PF00022 --no_progress

FIT=(--config configs/cpu/tiny.yaml --data.data_dir "$OUT/prepared" --trainer.accelerator auto --trainer.precision null
     --data.max_len 256 --data.max_tokens 4096 --trainer.val_check_interval "$VAL" --trainer.limit_val_batches 4)
log "fit (precision picked by the machine; padded batches; validation), then resume from last.ckpt"
"${CLI[@]}" fit "${FIT[@]}" --trainer.max_steps "$STEPS" --trainer.default_root_dir "$OUT/masked" \
  --trainer.logger.init_args.save_dir "$OUT/masked" --trainer.logger.init_args.version run
"${CLI[@]}" fit "${FIT[@]}" --trainer.max_steps $((STEPS + VAL)) --trainer.default_root_dir "$OUT/masked" \
  --trainer.logger.init_args.save_dir "$OUT/masked" --trainer.logger.init_args.version run --ckpt_path last
log "test"
"${CLI[@]}" test "${FIT[@]}" --trainer.default_root_dir "$OUT/masked" --trainer.logger.init_args.save_dir "$OUT/masked" \
  --trainer.logger.init_args.version test --ckpt_path "$OUT/masked/checkpoints/last.ckpt"
log "a causal model for generate"
"${CLI[@]}" fit "${FIT[@]}" --model.objective causal --model.config.attention favor-relu --trainer.max_steps "$STEPS" \
  --trainer.default_root_dir "$OUT/causal" --trainer.logger.init_args.save_dir "$OUT/causal"

(zcat data/sample/mmseqs2_DB_first3000.fasta.gz || true) | head -n $((2 * RECORDS)) > "$OUT/first.fasta"  # SIGPIPE
log "embed / score / generate / analyze on $DEVICE"
"${CLI[@]}" embed --ckpt_path "$OUT/masked" --input "$OUT/first.fasta" --out "$OUT/emb" --unknown x --device "$DEVICE" --overwrite
"${CLI[@]}" score --ckpt_path "$OUT/masked" --input "$OUT/first.fasta" --out "$OUT/scores.tsv" --unknown x --device "$DEVICE" \
  --overwrite
"${CLI[@]}" generate --ckpt_path "$OUT/causal" --num_sequences 4 --max_len 100 --top_p 0.9 --device "$DEVICE" --out "$OUT/gen.fasta" \
  --overwrite
"${CLI[@]}" analyze --ckpt_path "$OUT/masked" --input "$OUT/prepared" --out "$OUT/analysis" --num_sequences 50 \
  --permutations 1000 --device "$DEVICE" --overwrite

log "benchmarks in bf16 (roof: bf16 matmul on the device)"
"$PY" benchmarks/attention.py --device "$DEVICE" --precision bf16 --lengths $LENGTHS_ATT --rounds 1 --repeats 3 \
  --timeout "$TIMEOUT" --out "$OUT/attention_bf16.csv"
"$PY" benchmarks/model.py --device "$DEVICE" --precision bf16 --lengths $LENGTHS_MODEL --rounds 1 --repeats 2 \
  --systems exact favor-softmax favor-relu --timeout "$TIMEOUT" --out "$OUT/model_bf16.csv"
log "done: tables and logs under $OUT"
if [ "$failed" = 1 ]; then echo "CUDA tests FAILED (see above)"; exit 1; fi
