"""Suite-wide test settings. One torch thread: tests use tiny models, and on a shared 2-core
machine several OpenMP threads spin against each other and run ~100x slower."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
