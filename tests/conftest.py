import os

import pytest
import torch

# Deterministic, single-threaded math keeps analytic tests reproducible on 2-core CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
