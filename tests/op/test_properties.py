"""Property tests: the native backends match the float64 reference over random shapes (S = 1 included, head dims
that are not powers of two), chunk sizes, gate ranges and with or without initial states. Derandomized and bounded
so the file stays well under a minute."""

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support.backend_cases import NATIVE_BACKENDS, assert_grads_close, backend_fn
from tests.support.helpers import (
    DOCTOR_BW_TOL,
    DOCTOR_FW_TOL,
    assert_matches_reference,
    make_inputs,
    make_weights,
    outputs_and_grads,
    reference_outputs_and_grads,
)
from xlstm_jax.mlstm import IMPLEMENTATIONS

# No shrinking: a failure prints the generated example, and shrinking would recompile for every candidate.
SETTINGS = dict(
    deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


def _gate_range(low, high):
    return st.tuples(st.floats(low, high), st.floats(0.0, 12.0)).map(lambda t: (t[0], t[0] + t[1]))


@st.composite
def problems(draw, max_s=40):
    shape = dict(
        B=draw(st.integers(1, 2)),
        NH=draw(st.integers(1, 2)),
        S=draw(st.one_of(st.just(1), st.integers(1, max_s))),
        DHQK=draw(st.integers(1, 40)),
        DHHV=draw(st.integers(1, 40)),
    )
    return dict(
        seed=draw(st.integers(0, 2**16)),
        shape=shape,
        igate=draw(_gate_range(-12.0, 8.0)),
        fgate=draw(_gate_range(-8.0, 8.0)),
        with_state=draw(st.booleans()),
        chunk_exp=draw(st.integers(4, 6)),
    )


def _check_all_native_backends(p, with_grads):
    """One example: every native backend against one float64 reference run."""
    x = make_inputs(p["seed"], **p["shape"], igate=p["igate"], fgate=p["fgate"], with_state=p["with_state"])
    weights = make_weights(p["seed"], x) if with_grads else None
    ref_out, ref_grads = reference_outputs_and_grads(x, weights)
    for backend in NATIVE_BACKENDS:
        chunk = 2 ** p["chunk_exp"] if IMPLEMENTATIONS[backend].chunk_sizes is not None else None
        out, grads = outputs_and_grads(backend_fn(backend, chunk_size=chunk), x, weights)
        try:
            assert_matches_reference(out, None, ref_out, None, fw_tol=DOCTOR_FW_TOL, bw_tol=DOCTOR_BW_TOL)
            if with_grads:
                assert_grads_close(grads, ref_grads, DOCTOR_BW_TOL)
        except AssertionError as exc:
            raise AssertionError(f"{backend}: {exc}") from exc


@pytest.mark.slow
@settings(max_examples=8, **SETTINGS)
@given(p=problems())
def test_outputs_and_states_match_the_reference(p):
    _check_all_native_backends(p, with_grads=False)


@pytest.mark.slow
@settings(max_examples=4, **SETTINGS)
@given(p=problems(max_s=24))
def test_gradients_match_the_reference(p):
    _check_all_native_backends(p, with_grads=True)


def test_strategy_reaches_the_edge_cases():
    """The shape strategy does produce S = 1 and head dims that are not powers of two."""
    seen = []

    @settings(max_examples=30, **SETTINGS)
    @given(p=problems())
    def collect(p):
        seen.append(p["shape"])

    collect()
    assert any(s["S"] == 1 for s in seen)
    assert any(s["DHQK"] & (s["DHQK"] - 1) for s in seen)
    assert np.mean([s["S"] for s in seen]) > 5
