"""`mlstm_prefill` (xlstm_jax/mlstm/prefill.py): S tokens from random states equal the float64 recurrence (native,
and the fused Triton kernel through the interpreter) for float32 / bfloat16 inputs and bfloat16 states, several
row tiles, any length up to the limit, neutral (padding) gates at the front, the sigmoid input gate; bad input
gets clear errors; the GPU test runs the kernel at the 7B head shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels.base import NEUTRAL_FGATE, NEUTRAL_IGATE
from xlstm_jax.kernels.triton.prefill import prefill_triton
from xlstm_jax.mlstm.prefill import mlstm_prefill
from xlstm_jax.mlstm.reference import mlstm_recurrent_reference, mlstm_sig_reference

BACKENDS = ["native", "triton"]  # Triton through its interpreter on CPU (tests/conftest.py)


def _inputs(seed, B=1, NH=2, S=32, DHQK=16, DHHV=32, dtype=jnp.float32, state_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, NH, S, DHQK)) for _ in range(2))
    v = rng.standard_normal((B, NH, S, DHHV))
    i, f = rng.standard_normal((B, NH, S)) * 3, rng.standard_normal((B, NH, S)) * 3 + 2
    c = rng.standard_normal((B, NH, DHQK, DHHV))
    n = rng.standard_normal((B, NH, DHQK))
    m = rng.standard_normal((B, NH)) * 2
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(x, jnp.float32) for x in (i, f)]
    return arrays + [jnp.asarray(c, state_dtype), jnp.asarray(n, state_dtype), jnp.asarray(m, jnp.float32)]


def _reference(*args, reference=mlstm_recurrent_reference):
    with jax.enable_x64(True):
        h, last = reference(*(np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in args))
        return [np.asarray(x) for x in (h, *last)]


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, state_dtype, tol", [
    (jnp.float32, jnp.float32, 2e-5),
    (jnp.bfloat16, jnp.float32, 2e-2),
    (jnp.float32, jnp.bfloat16, 2e-2),
])
def test_a_prefill_equals_the_float64_recurrence(backend, dtype, state_dtype, tol):
    args = _inputs(0, dtype=dtype, state_dtype=state_dtype)
    h, (c, n, m) = jax.jit(lambda *a: mlstm_prefill(*a, backend=backend))(*args)
    assert h.dtype == dtype and c.dtype == n.dtype == state_dtype and m.dtype == jnp.float32
    assert h.shape == (1, 2, 32, 32) and c.shape == (1, 2, 16, 32)
    for name, got, ref in zip("hcnm", (h, c, n, m), _reference(*args)):
        assert _rel(got, ref) < tol, (name, _rel(got, ref))


def test_the_kernel_over_several_row_tiles_and_batch_rows():
    """S = 64 in row tiles of 16 (the output's key loop stops at each tile's diagonal; the state sums every tile),
    two sequences, value and head-dim blocks smaller than the head dims."""
    args = _inputs(1, B=2, S=64, DHQK=32, DHHV=48)
    h, states = prefill_triton(*args[:5], *args[5:], 1e-6, rows=16, block_v=16, block_k=16)
    for name, got, ref in zip("hcnm", (h, *states), _reference(*args)):
        assert _rel(got, ref) < 2e-5, (name, _rel(got, ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S", [5, 24, 40])
def test_any_length_up_to_the_limit(backend, S):
    """S not a power of two (a serving chunk sized to fill whole matmul tiles with the decode rows) runs as the next
    power of two >= 16 with neutral steps after it: outputs and last states are the recurrence's on the S tokens."""
    args = _inputs(7, S=S)
    h, states = jax.jit(lambda *a: mlstm_prefill(*a, backend=backend))(*args)
    assert h.shape == (1, 2, S, 32)
    for name, got, ref in zip("hcnm", (h, *states), _reference(*args)):
        assert _rel(got, ref) < 2e-5, (name, _rel(got, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_neutral_gates_at_the_front_leave_the_state_as_given(backend):
    """Left padding (a serving chunk shorter than its bucket): tokens with neutral gates before the real ones give
    the real ones' outputs and last state, as a call without them."""
    q, k, v, i, f, c, n, m = _inputs(2, S=32)
    pad = 16
    i = i.at[..., :pad].set(NEUTRAL_IGATE)
    f = f.at[..., :pad].set(NEUTRAL_FGATE)
    h, states = mlstm_prefill(q, k, v, i, f, c, n, m, backend=backend)
    want = _reference(*(a[..., pad:, :] if a.ndim == 4 else a[..., pad:] for a in (q, k, v, i, f)), c, n, m)
    assert _rel(h[..., pad:, :], want[0]) < 2e-5
    for name, got, ref in zip("cnm", states, want[1:]):
        assert _rel(got, ref) < 2e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sigmoid_input_gate(backend):
    q, k, v, i, f, c, n, _ = _inputs(3)
    m = jnp.zeros_like(_inputs(3)[-1])
    h, states = mlstm_prefill(q, k, v, i, f, c, n, m, backend=backend, input_gate="sigmoid")
    want = _reference(q, k, v, i, f, c, n, reference=lambda *a: mlstm_sig_reference(*a))
    for name, got, ref in zip("hcn", (h, *states), want):
        assert _rel(got, ref) < 2e-5, (name, _rel(got, ref))


def test_without_states_a_prefill_starts_from_zeros():
    q, k, v, i, f, *_ = _inputs(4)
    zeros = (jnp.zeros((1, 2, 16, 32)), jnp.zeros((1, 2, 16)), jnp.zeros((1, 2)))
    for backend in BACKENDS:
        got = jax.tree.leaves(mlstm_prefill(q, k, v, i, f, backend=backend))
        want = jax.tree.leaves(mlstm_prefill(q, k, v, i, f, *zeros, backend=backend))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input_is_refused_before_any_kernel_runs():
    q, k, v, i, f, c, n, m = _inputs(5)
    with pytest.raises(ValueError, match="backend"):
        mlstm_prefill(q, k, v, i, f, c, n, m, backend="cuda")
    with pytest.raises(ValueError, match=r"1 to 512 tokens \(q.shape\[2\]\), got 520"):
        long = [jnp.concatenate([a] * 17, axis=2)[:, :, :520] for a in (q, k, v, i, f)]
        mlstm_prefill(*long, c, n, m)
    with pytest.raises(TypeError, match="m must be float32"):
        mlstm_prefill(q, k, v, i, f, c, n, m.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="c must be float32 or bfloat16"):
        mlstm_prefill(q, k, v, i, f, c.astype(jnp.float16), n, m)


@pytest.mark.gpu
def test_fused_prefill_at_the_7b_head_shape_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    args = _inputs(6, NH=8, S=256, DHQK=256, DHHV=512, dtype=jnp.bfloat16)
    h, states = jax.jit(lambda *a: mlstm_prefill(*a, backend="triton"))(*args)
    native = jax.jit(lambda *a: mlstm_prefill(*a, backend="native"))(*args)
    want = _reference(*args)
    for name, got, nat, ref in zip("hcnm", (h, *states), jax.tree.leaves(native), want):
        assert _rel(got, ref) < max(2 * _rel(nat, ref), 1e-5), (name, _rel(got, ref), _rel(nat, ref))
