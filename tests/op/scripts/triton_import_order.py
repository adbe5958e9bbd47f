"""triton.language imported before xlstm_jax, and the interpreter switched on only after xlstm_jax was imported
(tests/op/test_api.py): the Triton backends still run in the interpreter. Run without XLSTM_JAX_TRITON_INTERPRET and
TRITON_INTERPRET in the environment.

usage: triton_import_order.py (no arguments); prints "ok"."""

import triton.language  # noqa: F401  (first, before xlstm_jax)
import numpy as np
import xlstm_jax
import os

os.environ["XLSTM_JAX_TRITON_INTERPRET"] = "1"
x = np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32)
g = np.zeros((1, 1, 16), np.float32)
for backend in ("triton_limit_chunk", "triton_xl_chunk"):
    h = xlstm_jax.mlstm(x, x, x, g, g + 3, backend=backend, chunk_size=16)
    ref = xlstm_jax.mlstm(x, x, x, g, g + 3, backend="native_recurrent")
    assert np.allclose(h, ref, rtol=1e-4, atol=1e-5), backend
print("ok")
