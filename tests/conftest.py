import os

import pytest
import torch

# One intra-op thread: the tests use small tensors, where threading costs more than it gains, and
# a 2-core CI machine also runs Ray and S3 server processes beside pytest.
torch.set_num_threads(1)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
