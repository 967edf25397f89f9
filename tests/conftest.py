"""Shared test setup: hypothesis profiles, the `cuda` marker, one intra-op thread.

Without a GPU the Triton kernels run through the Triton interpreter, so
TRITON_INTERPRET must be set before anything imports triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test tensors are tiny: a second intra-op thread only adds contention, which on a
# busy 2-core machine made the suite several times slower. LOWRANK_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("LOWRANK_TEST_THREADS", "1")))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("gpu", max_examples=100, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
