"""Test setup: Triton kernels run through Triton's interpreter on machines without a CUDA GPU; compiled XLA
programs go to a persistent compilation cache shared by the workers and the subprocesses the tests start (many
tests compile the same training step again: with it the suite needs about a fifth less CPU time; the cache is
keyed by the program, the flags and the versions, so it never hands out another program's executable)."""

import os
import tempfile

# before jax reads its configuration; subprocesses inherit it through the environment
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"xlstm-jax-tests-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

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
