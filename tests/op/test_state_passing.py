"""States are interchangeable between backends (README.md, "What this is"; docs/math.md §5.5): backend a runs the
first part of a sequence and returns its last states, backend b continues from them; h and the last states equal
one unsplit run, and the gradients through the split equal the gradients of the unsplit float64 run.

Gradients through the split are chained exactly as autodiff of the composition does it: b's backward gives the
cotangents of its initial states, which enter a's backward as cotangents of a's last states. Every backend's
forward and backward is compiled once per part shape and reused by all pairs."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.backend_cases import (
    BACKENDS,
    as_numpy,
    assert_trees_close,
    default_chunk,
    jitted_forward,
    jitted_vjp,
)
from tests.support.helpers import (
    DOCTOR_BW_TOL,
    DOCTOR_FW_TOL,
    assert_matches_reference,
    make_inputs,
    make_weights,
    reference_outputs_and_grads,
)
from xlstm_jax.mlstm import mlstm

pytestmark = pytest.mark.slow  # every backend pair, forward and gradients: seconds each (Triton: the interpreter)

B, NH, S, DHQK, DHHV = 2, 1, 40, 16, 32
SPLIT = 23  # neither part is a multiple of the chunk size 16
STATE = ("c_initial", "n_initial", "m_initial")


@pytest.fixture(scope="module")
def problem():
    x = make_inputs(11, B, NH, S, DHQK, DHHV, with_state=True, fgate=(0.0, 5.0))
    weights = make_weights(11, x)
    return x, weights, *reference_outputs_and_grads(x, weights)


def _part(x, start, stop):
    return {n: jnp.asarray(x[n][:, :, start:stop]) for n in "qkvif"}


@pytest.mark.parametrize("first, second", list(itertools.product(BACKENDS, BACKENDS)))
def test_split_run_equals_one_run(first, second, problem):
    x, weights, ref_out, ref_grads = problem
    args1 = {**_part(x, 0, SPLIT), **{n: jnp.asarray(x[n]) for n in STATE}}
    h1, states1 = jitted_forward(first)(args1)
    args2 = {**_part(x, SPLIT, S), **dict(zip(STATE, states1))}
    h2, states2 = jitted_forward(second)(args2)
    out = as_numpy((jnp.concatenate([h1, h2], axis=2), states2))

    w_h = jnp.asarray(weights["h"])
    final = tuple(jnp.asarray(weights[n]) for n in "Cnm")
    grads2 = jitted_vjp(second)(args2, (w_h[:, :, SPLIT:], final))
    grads1 = jitted_vjp(first)(args1, (w_h[:, :, :SPLIT], tuple(grads2[n] for n in STATE)))
    grads = {n: jnp.concatenate([grads1[n], grads2[n]], axis=2) for n in "qkvif"}
    grads.update({n: grads1[n] for n in STATE})
    assert_matches_reference(out, as_numpy(grads), ref_out, ref_grads, fw_tol=DOCTOR_FW_TOL, bw_tol=DOCTOR_BW_TOL)


def test_gradient_chaining_equals_autodiff_of_the_composition(problem):
    """The chained vjp above is what jax.grad of the composed function computes (one pair, checked directly)."""
    x, weights, _, _ = problem
    first, second = "native_chunkwise", "native_recurrent"
    args = {n: jnp.asarray(a) for n, a in x.items()}

    def composed(a):
        h1, states = jitted_forward(first)({**{n: a[n][:, :, :SPLIT] for n in "qkvif"}, **{n: a[n] for n in STATE}})
        h2, states = jitted_forward(second)({**{n: a[n][:, :, SPLIT:] for n in "qkvif"}, **dict(zip(STATE, states))})
        h = jnp.concatenate([h1, h2], axis=2)
        return jnp.sum(weights["h"] * h) + sum(jnp.sum(weights[w] * s) for w, s in zip("Cnm", states))

    grads = jax.jit(jax.grad(composed))(args)
    args1 = {**_part(x, 0, SPLIT), **{n: args[n] for n in STATE}}
    _, states1 = jitted_forward(first)(args1)
    args2 = {**_part(x, SPLIT, S), **dict(zip(STATE, states1))}
    w_h = jnp.asarray(weights["h"])
    grads2 = jitted_vjp(second)(args2, (w_h[:, :, SPLIT:], tuple(jnp.asarray(weights[n]) for n in "Cnm")))
    grads1 = jitted_vjp(first)(args1, (w_h[:, :, :SPLIT], tuple(grads2[n] for n in STATE)))
    assert_trees_close({n: grads1[n] for n in STATE}, {n: grads[n] for n in STATE}, rtol=1e-5)
    assert_trees_close(grads2["q"], grads["q"][:, :, SPLIT:], rtol=1e-5)


@pytest.fixture(scope="module")
def fresh_problem():
    x = make_inputs(12, 1, 2, S, DHQK, DHHV)
    return x, reference_outputs_and_grads(x)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_then_short_segments_from_zero_state(backend, fresh_problem):
    """No initial states (m_0 = 0), then segments of length 1 (decoding steps) and a chunk plus a remainder."""
    x, ref_out = fresh_problem
    forward = jitted_forward(backend)
    h, states = forward(_part(x, 0, 17))
    hs = [h]
    for start, stop in ((17, 18), (18, 19), (19, S)):
        h, states = forward({**_part(x, start, stop), **dict(zip(STATE, states))})
        hs.append(h)
    out = as_numpy((jnp.concatenate(hs, axis=2), states))
    assert_matches_reference(out, None, ref_out, None, fw_tol=DOCTOR_FW_TOL, bw_tol=DOCTOR_BW_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_do_not_change_h(backend, fresh_problem):
    """Asking for the last states does not change h; no initial states equals explicit zero states with m = 0."""
    x, _ = fresh_problem
    forward = jitted_forward(backend)
    h_only = jax.jit(functools.partial(mlstm, backend=backend, chunk_size=default_chunk(backend)))
    h, states = forward(_part(x, 0, S))
    np.testing.assert_array_equal(np.asarray(h_only(*(x[n] for n in "qkvif"))), np.asarray(h))
    zeros = (np.zeros((1, 2, DHQK, DHHV), np.float32), np.zeros((1, 2, DHQK), np.float32), np.zeros((1, 2), np.float32))
    assert_trees_close(forward({**_part(x, 0, S), **dict(zip(STATE, zeros))}), (h, states), rtol=1e-6)
