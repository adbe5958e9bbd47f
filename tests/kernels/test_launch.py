"""The launch layer: kernels that read through TMA tensor descriptors the launch layer makes on the host
(`descriptors`) run in Triton's interpreter on CPU, where descriptor loads reach the interpreter's masked loads with
keyword arguments, and on a GPU that supports them (launch.tma_available), under vmap too; bad descriptor requests
are refused before any launch; aliased outputs start as their inputs and reach the kernel's
parameters in the places jax-triton >= 0.4 gives them."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

from xlstm_jax.compat import installed_versions, tma_support
from xlstm_jax.kernels import launch as launch_mod
from xlstm_jax.kernels.launch import interpret_mode, launch


@triton.jit
def _scaled_copy(X, Y, S: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Y = 2 X for X (a descriptor over the (BH·S, D) rows, (BR, BC) tiles) and Y (BH, S, D); grid
    (BH, cdiv(S, BR))."""
    bh = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1) * BR
    rr = row + tl.arange(0, BR)
    for col in range(tl.cdiv(D, BC)):
        tile = X.load([(bh * S).to(tl.int32) + row, col * BC])
        rc = col * BC + tl.arange(0, BC)
        tl.store(Y + bh * S * D + rr[:, None] * D + rc[None, :], tile * 2, mask=(rr < S)[:, None] & (rc < D)[None, :])


def _doubled(x, S=40):
    return launch(_scaled_copy, [x], [jax.ShapeDtypeStruct(x.shape, x.dtype)], grid=(3,), descriptors={0: (16, 16)},
                  S=S, D=x.shape[-1], BR=16, BC=16)[0]


def test_a_kernel_reads_through_a_host_made_descriptor():
    """Tiles past a row's end (D = 24 in 16 x 16 tiles) read zeros; the last row tile of each BH row (S = 40) reads
    the next row's tokens, which the kernel masks; under vmap the mapped axis folds into the descriptor's rows."""
    if not launch_mod.tma_available():
        pytest.skip("no TMA tensor descriptors here: " + tma_support(installed_versions())[1])
    x = jax.random.normal(jax.random.key(0), (2, 40, 24), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(_doubled)(x)), 2 * np.asarray(x))
    xs = jax.random.normal(jax.random.key(1), (3, 2, 40, 24), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(_doubled))(xs)), 2 * np.asarray(xs))


@pytest.mark.parametrize("dims, dtype, descriptors, message", [
    (8, jnp.float32, {1: (16, 16)}, "must be an unaliased input"),
    (8, jnp.float32, {0: (16,)}, "must be an unaliased input"),
    (6, jnp.float16, {0: (16, 16)}, "not a multiple of 16 bytes"),  # rows of 12 bytes
])
def test_bad_descriptors_are_refused_before_any_launch(dims, dtype, descriptors, message):
    if not launch_mod.tma_available():
        pytest.skip("no TMA tensor descriptors here")
    x = jnp.zeros((2, 40, dims), dtype)
    with pytest.raises(ValueError, match=message):
        launch(_scaled_copy, [x], [jax.ShapeDtypeStruct(x.shape, x.dtype)], grid=(3,), descriptors=descriptors, S=40,
               D=dims, BR=16, BC=16)


@triton.jit
def _add_in_place(X, D, X_OUT, S: tl.constexpr):
    """X_OUT (aliased to X, read through X_OUT only) += D; grid (BH,)."""
    bh = tl.program_id(0).to(tl.int64)
    at = bh * S + tl.arange(0, S)
    tl.store(X_OUT + at, tl.load(X_OUT + at) + tl.load(D + at))


@triton.jit
def _add_in_place_and_sum(X, D, X_OUT, TOTAL, S: tl.constexpr):
    """X_OUT (aliased to X) += D and TOTAL = the sum of the new X_OUT row; grid (BH,)."""
    bh = tl.program_id(0).to(tl.int64)
    at = bh * S + tl.arange(0, S)
    x = tl.load(X_OUT + at) + tl.load(D + at)
    tl.store(X_OUT + at, x)
    tl.store(TOTAL + bh, tl.sum(x, axis=0))


def _add_and_sum(x, d):
    return launch(_add_in_place_and_sum, [x, d], [jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                  jax.ShapeDtypeStruct(x.shape[:1], x.dtype)],
                  grid=(), aliases={0: 0}, S=x.shape[1])


def test_an_aliased_output_starts_as_its_input_and_the_next_output_gets_its_own_buffer():
    """On the GPU (jax-triton 0.4) an output after the aliased one was once handed the aliased buffer."""
    x, d = (jax.random.normal(key, (3, 16)) for key in jax.random.split(jax.random.key(1)))
    (y,) = jax.jit(lambda x, d: launch(_add_in_place, [x, d], [jax.ShapeDtypeStruct(x.shape, x.dtype)], grid=(),
                                       aliases={0: 0}, S=16))(x, d)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x + d), rtol=1e-6)
    y, total = jax.jit(_add_and_sum)(x, d)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x + d), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(total), np.asarray((x + d).sum(-1)), rtol=1e-5, atol=1e-5)


class _JaxTriton04:
    """jax-triton 0.4.1's `triton_call` and jaxlib's launch as they treat buffers, on the host: the operands bind
    the kernel's first parameters, the outputs not aliased fill the parameters left over, an aliased output is the
    buffer of its operand, and the runtime passes the operands' buffers and then every output's (in output order)
    to the kernel's pointer parameters in order (jaxlib/gpu/triton_kernels.cc, KernelCall::Launch)."""

    __version__ = "0.4.1"

    def triton_call(self, *operands, kernel, grid, num_warps, num_stages, input_output_aliases, out_type,
                    **constexprs):
        params = [p for p in inspect.signature(kernel.fn).parameters if p not in constexprs]
        assert len(params) - len(operands) == len(out_type) - len(input_output_aliases)
        operand_of = {o: i for i, o in input_output_aliases.items()}

        def host(*arrays):
            ins = [np.array(a) for a in arrays]
            outs = [ins[operand_of[o]] if o in operand_of else launch_mod._unwritten(s) for o, s in enumerate(out_type)]
            buffers = (ins + outs)[:len(params)]
            with launch_mod._INTERPRETER_LOCK:
                launch_mod._interpreted(kernel)[grid](*map(launch_mod._HostTensor, buffers), **constexprs)
            return tuple(outs)

        launch_mod._fix_interpreter()
        return jax.pure_callback(host, tuple(out_type), *operands, vmap_method="sequential")


@pytest.mark.skipif(not interpret_mode(), reason="runs Triton's interpreter, which patches triton.language for the "
                    "whole process (kernels compiled after it fail): CPU only")
def test_aliased_outputs_reach_their_parameters_under_jax_triton_0_4(monkeypatch):
    """Under jax-triton >= 0.4 the launch layer reorders arguments and outputs so that each pointer parameter gets
    its own buffer (before the fix an unaliased output's parameter received the aliased output's buffer: the decode
    step's h came back NaN on the GPU); aliased outputs not first are refused."""
    monkeypatch.setattr(launch_mod, "interpret_mode", lambda: False)
    monkeypatch.setattr(launch_mod, "triton_availability", lambda: (True, "emulated jax-triton 0.4.1"))
    monkeypatch.setattr(launch_mod, "_jax_triton", lambda: (_JaxTriton04(), "out_type", False))
    x, d = (jax.random.normal(key, (3, 16)) for key in jax.random.split(jax.random.key(2)))
    y, total = jax.jit(_add_and_sum)(x, d)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x + d), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(total), np.asarray((x + d).sum(-1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="aliased outputs must be the first outputs"):
        launch(_add_in_place, [x, d], [jax.ShapeDtypeStruct(x.shape, jnp.float32)] * 2, grid=(), aliases={0: 1}, S=16)


def test_descriptors_where_tma_is_unavailable_are_refused(monkeypatch):
    monkeypatch.setattr(launch_mod, "tma_available", lambda: False)
    x = jnp.zeros((2, 40, 8), jnp.float32)
    with pytest.raises(ValueError, match="cannot be used here"):
        launch(_scaled_copy, [x], [jax.ShapeDtypeStruct(x.shape, x.dtype)], grid=(3,), descriptors={0: (16, 16)},
               S=40, D=8, BR=16, BC=16)
