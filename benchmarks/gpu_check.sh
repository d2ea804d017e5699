#!/usr/bin/env bash
# One short GPU run: correctness on the card, then the benchmark tables. Prints the card first.
# Usage (repository root, on a machine with CUDA): bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline
python -m pip install -q -e ".[dev]" 2>/dev/null || python -m pip install -q -e ".[dev]" --no-deps
python -m pip install -q "performer-pytorch==1.1.4" --no-deps 2>/dev/null && python -m pip install -q einops local-attention axial-positional-embedding 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python -m pytest -q -m cuda tests/test_cuda.py
python benchmarks/attention.py --lengths 1024 4096 16384 65536 --repeats 3 --timeout 120
python benchmarks/model.py --lengths 1024 8192 32768 --repeats 2 --timeout 120
