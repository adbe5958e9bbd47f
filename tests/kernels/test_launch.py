"""The launch layer: kernels that load and store through TMA tensor descriptors (`tl.make_tensor_descriptor`) run
in Triton's interpreter on CPU, where descriptor loads reach the interpreter's masked loads with keyword arguments,
and on a GPU that supports them (compat.tma_support); aliased outputs start as their inputs and reach the kernel's
parameters in the places jax-triton >= 0.4 gives them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

from xlstm_jax.compat import installed_versions, tma_support
from xlstm_jax.kernels.launch import _aliased_last, interpret_mode, launch


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


@triton.jit
def _add_in_place(X, D, X_OUT, S: tl.constexpr):
    """X_OUT (aliased to X, read through X_OUT only) += D; grid (BH,)."""
    bh = tl.program_id(0).to(tl.int64)
    at = bh * S + tl.arange(0, S)
    tl.store(X_OUT + at, tl.load(X_OUT + at) + tl.load(D + at))


def test_an_aliased_output_starts_as_its_input():
    x, d = (jax.random.normal(key, (2, 16)) for key in jax.random.split(jax.random.key(1)))
    (y,) = jax.jit(lambda x, d: launch(_add_in_place, [x, d], [jax.ShapeDtypeStruct(x.shape, x.dtype)], grid=(),
                                       aliases={0: 0}, S=16))(x, d)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x + d), rtol=1e-6)


def test_aliased_inputs_take_the_aliased_outputs_parameters_under_jax_triton_0_4():
    """jax-triton 0.4 passes the inputs, then the outputs not aliased: each aliased input moves to the end of the
    inputs, where the kernel's first outputs (the aliased ones) have their parameters; a placeholder keeps its own
    place. Aliased outputs that are not the first outputs are refused."""
    a, b, c = (jnp.full((2, 3), value) for value in (1.0, 2.0, 3.0))
    inputs, io = _aliased_last(2, [a, b, c], ((2, 1), (0, 0)))
    assert [x.shape for x in inputs] == [(2,), (2, 3), (2,), (2, 3), (2, 3)]
    assert inputs[1] is b and inputs[3] is a and inputs[4] is c and io == {3: 0, 4: 1}
    with pytest.raises(ValueError, match="aliased outputs must be the first outputs"):
        launch(_add_in_place, [a, b], [jax.ShapeDtypeStruct((2, 3), jnp.float32)] * 2, grid=(), aliases={0: 1}, S=3)
