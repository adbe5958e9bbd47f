"""Numerical robustness and the precision contract: no NaN/inf for gate pre-activations anywhere in [-1e4, 1e4]
(outputs, states, gradients) for every backend; very long sequences (S = 65536); bf16 inputs against the float64
reference with float32 states (numbers in docs/precision.md, from scripts/measure_precision.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.backend_cases import (
    BACKENDS,
    NATIVE_BACKENDS,
    as_numpy,
    assert_grads_close,
    backend_fn,
    jitted_outputs_and_grads,
)
from tests.support.helpers import (
    EXTREME_BW_TOL,
    assert_rel_close,
    make_inputs,
    make_weights,
    outputs_and_grads,
    reference_outputs_and_grads,
)
from xlstm_jax.doctor import Case, measure_errors

GATE_VALUES = np.array([-1e4, -1e3, -100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1e3, 1e4], np.float32)


def _gates(pattern, shape, rng):
    if pattern == "mixed":
        return rng.choice(GATE_VALUES, shape), rng.choice(GATE_VALUES, shape)
    if pattern == "uniform":
        return rng.uniform(-1e4, 1e4, shape), rng.uniform(-1e4, 1e4, shape)
    if pattern == "open_forgetting":  # input gate wide open, forget gate shut: every step resets the memory
        return np.full(shape, 1e4), np.full(shape, -1e4)
    if pattern == "closed_keeping":  # input gate shut, no decay: the initial state is carried unchanged
        return np.full(shape, -1e4), np.full(shape, 1e4)
    raise ValueError(pattern)


@pytest.mark.parametrize("pattern", ["mixed", "uniform", "open_forgetting", "closed_keeping"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_gates_stay_finite_and_correct(backend, pattern):
    x = make_inputs(5, 1, 2, 40, 16, 16, with_state=True)
    i, f = _gates(pattern, x["i"].shape, np.random.default_rng(5))
    x["i"], x["f"] = i.astype(np.float32), f.astype(np.float32)
    weights = make_weights(5, x)
    out, grads = jitted_outputs_and_grads(backend)({n: jnp.asarray(a) for n, a in x.items()}, weights)
    (h, states), grads = as_numpy(out), as_numpy(grads)
    for name, value in [("h", h), ("C", states[0]), ("n", states[1]), ("m", states[2]), *grads.items()]:
        assert np.all(np.isfinite(value)), f"{backend} {pattern}: non-finite {name}"
    (rh, rstates), ref_grads = reference_outputs_and_grads(x, weights)
    assert_rel_close(h, rh, 1e-3, "h")
    for name, value, ref in zip("Cnm", states, rstates):
        assert_rel_close(value, ref, 1e-3, name)
    assert_grads_close(grads, ref_grads, EXTREME_BW_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native_chunkwise", "native_recurrent"])
def test_very_long_sequence(backend):
    """S = 65536 forward at small head dims, with initial states: matches the float64 recurrence."""
    x = make_inputs(6, 1, 1, 65536, 8, 8, with_state=True, fgate=(2.0, 8.0))
    kwargs = {"chunk_size": 64} if backend == "native_chunkwise" else {}
    (h, states), _ = outputs_and_grads(backend_fn(backend, **kwargs), x)
    (rh, rstates), _ = reference_outputs_and_grads(x)
    assert_rel_close(h, rh, 1e-4, "h")
    for name, value, ref in zip("Cnm", states, rstates):
        assert_rel_close(value, ref, 1e-4, name)


# Bounds for bf16 q, k, v (float32 gates and states) against the float64 reference, 3-4x the largest errors
# measured by scripts/measure_precision.py on this case (docs/precision.md). bf16 unit roundoff: 2**-9 ~ 2e-3.
BF16_CASE = Case(2, 2, 64, 32, 32, 16, True, (-3.0, 3.0), (-1.0, 6.0))
BF16_BOUNDS = {"h": 1e-2, "C": 3e-3, "n": 1e-6, "m": 1e-6, "grad": 1.5e-2}


@pytest.mark.slow
@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_bf16_error_against_float64(backend):
    errors = measure_errors(backend, BF16_CASE, dtype="bfloat16")
    for key in ("h", "C", "n", "m"):
        assert errors[key] <= BF16_BOUNDS[key], f"{key}: {errors[key]:.2e} > {BF16_BOUNDS[key]:.0e}"
    for key, err in errors.items():
        if key.startswith("d"):
            assert err <= BF16_BOUNDS["grad"], f"{key}: {err:.2e} > {BF16_BOUNDS['grad']:.0e}"
    assert errors["h"] > 1e-4, "bf16 error implausibly small: are the inputs really bf16?"


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_bf16_dtypes_follow_the_contract(backend):
    x = make_inputs(7, 1, 2, 20, 16, 16, dtype="bfloat16", with_state=True)
    h, (c, n, m) = jax.jit(backend_fn(backend))(**x)
    assert h.dtype == x["q"].dtype
    assert c.dtype == n.dtype == m.dtype == np.float32
