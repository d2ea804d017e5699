"""Test-wide settings.

One intra-op thread per test process: the suite runs as `pytest -n 2` on 2 cores, and two processes that
each start 2 OpenMP threads oversubscribe the machine; small ops then spend most of their time in spinning
thread barriers (measured here: a tiny model's forward pass 100x slower). Subprocesses (the CLI, DDP
ranks) inherit OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

torch.set_num_threads(1)
