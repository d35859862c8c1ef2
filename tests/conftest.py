import os

import torch
from hypothesis import HealthCheck, settings

# Tests are CPU-only and must stay quick on a 2-core machine: bounded examples, no deadlines
# (the first call of a compiled function takes seconds).
settings.register_profile(
    "zerostep",
    deadline=None,
    max_examples=int(os.environ.get("ZEROSTEP_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("zerostep")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Ranks spawned by multi-rank tests (they inherit the environment) run one intra-op thread each: two or
# three ranks of two threads on 2 cores spin against each other (test_zero + test_checkpointing +
# test_flat + test_optim_parity: 156 s against 165 s)
os.environ.setdefault("OMP_NUM_THREADS", "1")
