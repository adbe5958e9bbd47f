"""jax-triton 0.4.1 on triton 3.6 (xlstm_jax/kernels/jax_triton_shims.py): the driver name it imports, and launches
sized by the compiled kernel's warp count (warp specialization adds warps; sized by the requested count the launch
fails). The wrapper is checked against a stand-in of jax-triton's two internals on any machine; a warp-specialized
kernel launched with 4 warps runs through the launch layer (Triton's interpreter on CPU, jax-triton on a GPU)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

from xlstm_jax.compat import installed_versions, tma_support
from xlstm_jax.kernels.jax_triton_shims import compiled_warps, define_tma_tf32, launch_with_compiled_warps
from xlstm_jax.kernels.launch import interpret_mode, launch

SPECIALIZED = ('module attributes {"ttg.num-ctas" = 1 : i32, "ttg.num-warps" = 4 : i32, '
               '"ttg.total-num-warps" = 12 : i32}')
PLAIN = 'module attributes {"ttg.num-ctas" = 1 : i32, "ttg.num-warps" = 4 : i32}'


def _stand_in(ttgir: str):
    """A module with jax-triton 0.4.1's two names: a compile returning a result with its TTGIR text, and a kernel-call
    library whose TritonKernel records its arguments (jax-triton calls them in this order for each kernel)."""
    library = types.SimpleNamespace(TritonKernel=lambda *args: ("kernel", args), TritonKernelCall="call type")
    return types.SimpleNamespace(compile_ttir_to_ptx_inplace=lambda *a, **k: types.SimpleNamespace(ttgir=ttgir),
                                 triton_kernel_call_lib=library)


def _build(triton_lib, requested_warps=4):
    triton_lib.compile_ttir_to_ptx_inplace("ttir", "backend", "options", 90)
    return triton_lib.triton_kernel_call_lib.TritonKernel("mlstm_kernel", requested_warps, 1, 0, "ptx")


def test_launches_take_the_compiled_warp_count():
    assert compiled_warps(SPECIALIZED) == 12 and compiled_warps(PLAIN) is None
    triton_lib = _stand_in(SPECIALIZED)
    assert _build(triton_lib) == ("kernel", ("mlstm_kernel", 4, 1, 0, "ptx"))  # as jax-triton 0.4.1 launches it
    launch_with_compiled_warps(triton_lib)
    assert _build(triton_lib) == ("kernel", ("mlstm_kernel", 12, 1, 0, "ptx"))
    # each count belongs to the module compiled just before: a kernel built without a compile keeps its request
    assert triton_lib.triton_kernel_call_lib.TritonKernel("k", 8) == ("kernel", ("k", 8))
    assert triton_lib.triton_kernel_call_lib.TritonKernelCall == "call type"  # the rest of the library as it is
    wrapped = triton_lib.triton_kernel_call_lib
    launch_with_compiled_warps(triton_lib)  # a second application wraps nothing again
    assert triton_lib.triton_kernel_call_lib is wrapped
    assert _build(triton_lib) == ("kernel", ("mlstm_kernel", 12, 1, 0, "ptx"))


def test_kernels_without_specialization_and_older_jax_triton_are_unchanged():
    triton_lib = _stand_in(PLAIN)
    launch_with_compiled_warps(triton_lib)
    assert _build(triton_lib, requested_warps=8) == ("kernel", ("mlstm_kernel", 8, 1, 0, "ptx"))
    older = types.SimpleNamespace(triton_kernel_call_lib="0.3's library")  # no compile_ttir_to_ptx_inplace
    launch_with_compiled_warps(older)
    assert older.triton_kernel_call_lib == "0.3's library"


def test_the_driver_name_is_defined_only_where_missing():
    driver = types.SimpleNamespace()
    define_tma_tf32(driver)
    assert driver.TMA_TF32 == 11
    newer = types.SimpleNamespace(TMA_TF32=7)
    define_tma_tf32(newer)
    assert newer.TMA_TF32 == 7


@triton.jit
def _row_block_matmul(X, W, Y, S: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BR: tl.constexpr,
                      BK: tl.constexpr, BN: tl.constexpr):
    """Y = X @ W for X (BH, S, K), W (BH, K, N) in (BR, BN) tiles, the K loop warp-specialized; grid
    (BH, S / BR, N / BN)."""
    bh = tl.program_id(0).to(tl.int64)
    row, col = tl.program_id(1) * BR, tl.program_id(2) * BN
    x = tl.make_tensor_descriptor(X + bh * S * K, shape=[S, K], strides=[K, 1], block_shape=[BR, BK])
    w = tl.make_tensor_descriptor(W + bh * K * N, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    y = tl.make_tensor_descriptor(Y + bh * S * N, shape=[S, N], strides=[N, 1], block_shape=[BR, BN])
    acc = tl.zeros((BR, BN), dtype=tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=True):
        acc = tl.dot(x.load([row, k]), w.load([k, col]), acc)
    y.store([row, col], acc)


def test_a_warp_specialized_kernel_runs_with_four_warps():
    """On an H100, jax-triton 0.4.1 alone launched such a kernel with the 4 requested warps and failed
    (CUDA_ERROR_INVALID_VALUE); with the shim it launches with the compiled count."""
    if not interpret_mode() and not tma_support(installed_versions())[0]:
        pytest.skip("no TMA tensor descriptors here: " + tma_support(installed_versions())[1])
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (2, 128, 256), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (2, 256, 128), jnp.float32).astype(jnp.bfloat16)
    (y,) = jax.jit(lambda x, w: launch(_row_block_matmul, [x, w], [jax.ShapeDtypeStruct((2, 128, 128), jnp.float32)],
                                       grid=(2, 2), num_warps=4, num_stages=3, S=128, K=256, N=128, BR=64, BK=64,
                                       BN=64))(x, w)
    want = np.einsum("bsk,bkn->bsn", np.asarray(x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-3)
