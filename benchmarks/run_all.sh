#!/usr/bin/env bash
# Every benchmark, CSV and plots under benchmarks/results/ (about 1-2 hours on a 2-core CPU; much less on a GPU).
# Run on an otherwise idle machine: the timings of a shared machine are not comparable.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
python benchmarks/attention.py                                   # op level: 1K .. 32K, exact / FAVOR / performer-pytorch
python benchmarks/model.py --lengths 1024 2048 4096 8192 16384   # training step, every system, masked and causal
python benchmarks/model.py --lengths 32768 65536 --systems favor-softmax favor-relu --activation_checkpointing \
    --out benchmarks/results/model_long.csv                      # the longest lengths, recomputing blocks in backward
python benchmarks/decode.py                                      # sampling speed against prefix length
python benchmarks/analysis.py                                    # attention-analysis throughput
python benchmarks/prep.py                                        # data preparation against gzip -dc
python benchmarks/feature_error.py --out benchmarks/results      # the paper's Fig. 4: FAVOR output error against m
