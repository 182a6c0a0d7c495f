import os

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    # Before anything imports triton (transformers does, for one), which reads it at import; the
    # kernels' own tests need it, and auto never interprets CPU tensors, so nothing else changes.
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("TOKENMIX_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile("default")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
