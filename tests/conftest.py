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
