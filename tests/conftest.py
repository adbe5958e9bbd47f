"""Test setup: Triton kernels run through Triton's interpreter on machines without a CUDA GPU."""

import os

import jax
import pytest

ON_GPU = jax.default_backend() == "gpu"
if not ON_GPU:
    os.environ.setdefault("XLSTM_JAX_TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
