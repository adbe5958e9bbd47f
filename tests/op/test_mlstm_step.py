"""`xlstm_jax.mlstm_step`: one step from random states equals one step of the float64 recurrence (native, and the
fused Triton kernel through the interpreter), for float32 / bfloat16 inputs and bfloat16 states; bad input gets
clear errors; the GPU test runs the kernel at the 7B head shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax import mlstm_step
from xlstm_jax.mlstm.reference import mlstm_recurrent_reference

BACKENDS = ["native", "triton"]  # Triton through its interpreter on CPU (tests/conftest.py)


def _inputs(seed, B=2, NH=3, DHQK=16, DHHV=32, dtype=jnp.float32, state_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, NH, DHQK)) for _ in range(2))
    v = rng.standard_normal((B, NH, DHHV))
    i, f = rng.standard_normal((B, NH)) * 3, rng.standard_normal((B, NH)) * 3 + 2
    c = rng.standard_normal((B, NH, DHQK, DHHV))
    n = rng.standard_normal((B, NH, DHQK))
    m = rng.standard_normal((B, NH)) * 2
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(x, jnp.float32) for x in (i, f)]
    return arrays + [jnp.asarray(c, state_dtype), jnp.asarray(n, state_dtype), jnp.asarray(m, jnp.float32)]


def _reference(q, k, v, i, f, c, n, m):
    with jax.enable_x64(True):
        h, (c1, n1, m1) = mlstm_recurrent_reference(*(np.asarray(x, np.float64)[:, :, None] for x in (q, k, v)),
                                                    np.asarray(i, np.float64)[:, :, None],
                                                    np.asarray(f, np.float64)[:, :, None],
                                                    *(np.asarray(x, np.float64) for x in (c, n, m)))
        return [np.asarray(x) for x in (h[:, :, 0], c1, n1, m1)]


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, state_dtype, tol", [
    (jnp.float32, jnp.float32, 2e-6),
    (jnp.bfloat16, jnp.float32, 1e-2),
    (jnp.float32, jnp.bfloat16, 2e-2),
])
def test_one_step_equals_the_float64_recurrence(backend, dtype, state_dtype, tol):
    args = _inputs(0, dtype=dtype, state_dtype=state_dtype)
    h, (c, n, m) = jax.jit(lambda *a: mlstm_step(*a, backend=backend))(*args)
    assert h.dtype == dtype and c.dtype == n.dtype == state_dtype and m.dtype == jnp.float32
    assert h.shape == (2, 3, 32) and c.shape == (2, 3, 16, 32)
    want = _reference(*(jnp.asarray(a, jnp.float32) for a in args))
    for name, got, ref in zip(("h", "c", "n", "m"), (h, c, n, m), want):
        assert _rel(got, ref) < tol, (name, _rel(got, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_gates_equal_the_float64_recurrence(backend):
    """Gates at the edges of their range, formed inside the Triton kernel: f = -inf (a full reset: only the new
    token remains), f = +inf (nothing forgotten), very negative / positive i and f, and a very negative max-state."""
    args = _inputs(2, B=2, NH=4)
    i = jnp.asarray([[-60.0, 60.0, 0.5, -1.0], [3.0, -2.0, 80.0, -80.0]])
    f = jnp.asarray([[-jnp.inf, jnp.inf, -90.0, 90.0], [-jnp.inf, 30.0, -30.0, 0.0]])
    m = args[7].at[1, 3].set(-500.0)
    args = [*args[:3], i, f, *args[5:7], m]
    h, states = jax.jit(lambda *a: mlstm_step(*a, backend=backend))(*args)
    want = _reference(*args)
    for name, got, ref in zip(("h", "c", "n", "m"), (h, *states), want):
        assert np.all(np.isfinite(np.asarray(got))), name
        assert _rel(got, ref) < 2e-6, (name, _rel(got, ref))
    c, n = (np.asarray(x) for x in states[:2])
    k, v = (np.asarray(x) for x in args[1:3])
    i_bar = np.exp(np.asarray(i)[0, 0] - np.asarray(states[2])[0, 0])
    np.testing.assert_allclose(c[0, 0], i_bar * np.outer(k[0, 0], v[0, 0]), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(n[0, 0], i_bar * k[0, 0], rtol=1e-6, atol=1e-30)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_continue_a_sequence(backend):
    """Eight steps from zero states equal the float64 recurrence over the eight tokens, head dims not powers of
    two (masked tiles)."""
    B, NH, S, DHQK, DHHV = 1, 2, 8, 24, 40
    rng = np.random.default_rng(1)
    q, k = (rng.standard_normal((B, NH, S, DHQK)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((B, NH, S, DHHV)).astype(np.float32)
    i, f = (rng.standard_normal((B, NH, S)).astype(np.float32) * 2 for _ in range(2))
    state = (jnp.zeros((B, NH, DHQK, DHHV)), jnp.zeros((B, NH, DHQK)), jnp.zeros((B, NH)))
    step = jax.jit(lambda *a: mlstm_step(*a, backend=backend))
    hs = []
    for t in range(S):
        h, state = step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], *state)
        hs.append(h)
    with jax.enable_x64(True):
        want_h, want_state = mlstm_recurrent_reference(*(np.asarray(x, np.float64) for x in (q, k, v, i, f)))
        want_h, want_state = np.asarray(want_h), [np.asarray(x) for x in want_state]
    assert _rel(jnp.stack(hs, axis=2), want_h) < 1e-5
    for got, want in zip(state, want_state):
        assert _rel(got, want) < 1e-5


def test_bad_input_gets_clear_errors():
    q, k, v, i, f, c, n, m = _inputs(2)
    with pytest.raises(ValueError, match="k must have q's shape"):
        mlstm_step(q, k[:, :, :8], v, i, f, c, n, m)
    with pytest.raises(ValueError, match=r"i must be \(B, NH\)"):
        mlstm_step(q, k, v, i[:, :2], f, c, n, m)
    with pytest.raises(ValueError, match="c must be"):
        mlstm_step(q, k, v, i, f, c[..., :8], n, m)
    with pytest.raises(TypeError, match="c must be float32 .* or bfloat16"):
        mlstm_step(q, k, v, i, f, c.astype(jnp.float16), n, m)
    with pytest.raises(TypeError, match="m must be float32"):
        mlstm_step(q, k, v, i, f, c, n, m.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="q must have a floating dtype"):
        mlstm_step(q.astype(jnp.int32), k, v, i, f, c, n, m)
    with pytest.raises(ValueError, match="unknown mlstm_step backend"):
        mlstm_step(q, k, v, i, f, c, n, m, backend="fast")
    with pytest.raises(ValueError, match="eps"):
        mlstm_step(q, k, v, i, f, c, n, m, eps=0.0)


@pytest.mark.slow
def test_gates_shaped_b_nh_1_are_accepted():
    q, k, v, i, f, c, n, m = _inputs(3)
    a = mlstm_step(q, k, v, i, f, c, n, m, backend="native")
    b = mlstm_step(q, k, v, i[..., None], f[..., None], c, n, m, backend="native")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.gpu
def test_fused_step_at_the_7b_head_shape_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    args = _inputs(4, B=16, NH=8, DHQK=256, DHHV=512, dtype=jnp.bfloat16)
    h, (c, n, m) = jax.jit(lambda *a: mlstm_step(*a, backend="triton"))(*args)
    want = _reference(*(jnp.asarray(a, jnp.float32) for a in args))
    for name, got, ref, tol in zip("hcnm", (h, c, n, m), want, (1e-2, 1e-5, 1e-5, 1e-6)):
        assert _rel(got, ref) < tol, (name, _rel(got, ref))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_states_the_step_starts_from_zero_states_as_mlstm_does(backend):
    """The first step of a sequence: no states given equals zero states, and equals `mlstm` on one token."""
    q, k, v, i, f, *_ = _inputs(3)
    B, NH, DHQK, DHHV = 2, 3, 16, 32
    zeros = (jnp.zeros((B, NH, DHQK, DHHV)), jnp.zeros((B, NH, DHQK)), jnp.zeros((B, NH)))
    h, states = mlstm_step(q, k, v, i, f, backend=backend)
    h0, states0 = mlstm_step(q, k, v, i, f, *zeros, backend=backend)
    for got, want in zip((h, *states), (h0, *states0)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    want = _reference(q, k, v, i, f, *zeros)
    for got, ref in zip((h, *states), want):
        assert _rel(got, ref) < 2e-6
    with pytest.raises(ValueError, match="c, n and m together"):
        mlstm_step(q, k, v, i, f, zeros[0], backend=backend)
