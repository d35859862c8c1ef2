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
# Two pytest-xdist workers (pyproject's addopts) share the cores, and multi-rank tests spawn ranks
# beside them: one intra-op thread per process (OMP_NUM_THREADS reaches the spawned ranks), else the
# processes' thread pools spin against each other on a 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
