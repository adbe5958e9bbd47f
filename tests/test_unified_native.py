"""`xlstm_jax.mlstm` with the autodiff backends (native_parallel, native_recurrent): outputs, last states and the
gradients of every input against the float64 recurrence, float32 and bf16 inputs."""

import jax.numpy as jnp
import pytest
from helpers import (
    BF16_BW_TOL,
    BF16_FW_TOL,
    BW_TOL,
    FW_TOL,
    assert_matches_reference,
    assert_rel_close,
    make_inputs,
    make_weights,
    outputs_and_grads,
    reference_outputs_and_grads,
)

import xlstm_jax

BACKENDS = ["native_parallel", "native_recurrent"]
CASES = [  # seed, B, NH, S, DHQK, DHHV, with_state
    (11, 2, 2, 37, 24, 48, True),
    (12, 2, 2, 50, 48, 24, False),
    (13, 1, 2, 1, 16, 8, True),
    (14, 2, 1, 1, 8, 24, False),
]


def _unified(backend, **kwargs):
    def fn(**a):
        return xlstm_jax.mlstm(**a, backend=backend, return_last_states=True, **kwargs)

    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{1}NH{2}S{3}d{4}v{5}state{6}".format(*c))
def test_unified_matches_reference_float32(backend, case):
    seed, B, NH, S, DHQK, DHHV, with_state = case
    x = make_inputs(seed, B, NH, S, DHQK, DHHV, with_state=with_state)
    w = make_weights(seed, x)
    out, grads = outputs_and_grads(_unified(backend), x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w)
    assert out[0].shape == (B, NH, S, DHHV)
    assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=FW_TOL, bw_tol=BW_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast", [None, "float32"])
def test_unified_bfloat16(backend, autocast):
    x = make_inputs(15, 2, 2, 29, 16, 24, dtype="bfloat16", with_state=True)
    w = make_weights(15, x)
    h, (c, n, m) = _unified(backend, autocast_dtype=autocast)(**{k: jnp.asarray(a) for k, a in x.items()})
    assert h.dtype == jnp.bfloat16 and c.dtype == n.dtype == m.dtype == jnp.float32
    out, grads = outputs_and_grads(_unified(backend, autocast_dtype=autocast), x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w)
    fw = FW_TOL * 10 if autocast == "float32" else BF16_FW_TOL  # the states are float32, h is rounded to bf16
    assert_rel_close(out[1][0], ref_out[1][0], fw, "C_last")
    assert_rel_close(out[1][1], ref_out[1][1], fw, "n_last")
    assert_rel_close(out[0], ref_out[0], BF16_FW_TOL, "h")
    for name, g in ref_grads.items():  # the cotangent of the bf16 h is bf16, so every gradient sees bf16 rounding
        assert_rel_close(grads[name], g, BF16_BW_TOL, f"d{name}")
