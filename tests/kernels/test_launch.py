"""The launch layer runs kernels that load and store through TMA tensor descriptors (`tl.make_tensor_descriptor`):
in Triton's interpreter on CPU, where descriptor loads reach the interpreter's masked loads with keyword arguments,
and on a GPU that supports them (compat.tma_support)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

from xlstm_jax.compat import installed_versions, tma_support
from xlstm_jax.kernels.launch import interpret_mode, launch


@triton.jit
def _scaled_copy(X, Y, S: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Y = 2 X for X, Y (BH, S, D) in (BR, BC) tiles through descriptors; grid (BH, cdiv(S, BR))."""
    bh = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1) * BR
    src = tl.make_tensor_descriptor(X + bh * S * D, shape=[S, D], strides=[D, 1], block_shape=[BR, BC])
    dst = tl.make_tensor_descriptor(Y + bh * S * D, shape=[S, D], strides=[D, 1], block_shape=[BR, BC])
    for col in range(tl.cdiv(D, BC)):
        dst.store([row, col * BC], src.load([row, col * BC]) * 2)


def test_a_descriptor_kernel_runs_through_the_launch_layer():
    """Tiles past the array's end (S = 40 and D = 24 in 16 x 16 tiles) read zeros and write nothing."""
    if not interpret_mode() and not tma_support(installed_versions())[0]:
        pytest.skip("no TMA tensor descriptors here: " + tma_support(installed_versions())[1])
    x = jax.random.normal(jax.random.key(0), (2, 40, 24), jnp.float32)
    (y,) = jax.jit(lambda x: launch(_scaled_copy, [x], [jax.ShapeDtypeStruct(x.shape, x.dtype)], grid=(3,), S=40,
                                    D=24, BR=16, BC=16))(x)
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))
