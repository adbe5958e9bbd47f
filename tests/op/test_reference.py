"""The float64 reference itself (xlstm_jax/mlstm/reference.py), checked against an independent numpy float64 loop
of the *unstabilized* true form (docs/math.md §1.1) with eps = 0, and for chunk-split state passing."""

import jax
import numpy as np
import pytest

from tests.support.helpers import make_inputs, make_weights, reference_outputs_and_grads
from xlstm_jax.mlstm.reference import mlstm_recurrent_reference

_SEQ = ("q", "k", "v", "i", "f")


def _true_form(x):
    """numpy float64, no stabilizer: C_t = σ(f_t) C_{t-1} + e^{i_t} k_t v_tᵀ (likewise n),
    h_t = q̂ᵀC_t / max(|q̂ᵀn_t|, 1).

    Initial states are stabilized ones (true C_0 = C̃_0 e^{m_0}). Returns h and the last states in stabilized units
    (C̃_S = C_S e^{-m_S}) with m_S = max(m_0 + F_{S,0}, max_s F_{S,s} + i_s) computed from its closed form.
    """
    q, k, v, i, f = (np.asarray(x[n], np.float64) for n in "qkvif")
    B, NH, S, DHQK = q.shape
    if "c_initial" in x:
        m0 = np.asarray(x["m_initial"], np.float64)
        c = np.asarray(x["c_initial"], np.float64) * np.exp(m0)[..., None, None]
        n = np.asarray(x["n_initial"], np.float64) * np.exp(m0)[..., None]
    else:
        m0 = np.zeros((B, NH))
        c = np.zeros((B, NH, DHQK, v.shape[-1]))
        n = np.zeros((B, NH, DHQK))
    forget = 1.0 / (1.0 + np.exp(-f))
    h = np.zeros(v.shape)
    for t in range(S):
        c = forget[:, :, t, None, None] * c + np.exp(i[:, :, t, None, None]) * k[:, :, t, :, None] * v[:, :, t, None]
        n = forget[:, :, t, None] * n + np.exp(i[:, :, t, None]) * k[:, :, t]
        qs = q[:, :, t] / np.sqrt(DHQK)
        den = np.maximum(np.abs(np.einsum("bhd,bhd->bh", qs, n)), 1.0)
        h[:, :, t] = np.einsum("bhd,bhdv->bhv", qs, c) / den[..., None]
    logf = np.log(forget)
    suffix = np.cumsum(logf[..., ::-1], axis=-1)[..., ::-1]  # suffix[s] = sum_{r >= s} logf_r
    F_from = np.concatenate([suffix[..., 1:], np.zeros((B, NH, 1))], axis=-1)  # F_{S,s} = sum_{r > s} logf_r
    m = np.maximum(m0 + suffix[..., 0], np.max(F_from + i, axis=-1))
    return h, (c * np.exp(-m)[..., None, None], n * np.exp(-m)[..., None], m)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("S", [1, 29])
def test_reference_equals_the_unstabilized_true_form(with_state, S):
    x = make_inputs(0, 2, 3, S, 12, 20, with_state=with_state)
    (h, states), _ = reference_outputs_and_grads(x, eps=0.0)
    rh, rstates = _true_form(x)
    np.testing.assert_allclose(h, rh, rtol=1e-10, atol=1e-12)
    for name, a, e in zip("Cnm", states, rstates):
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12, err_msg=name)


def test_the_denominator_lower_bound_is_active_in_the_check():
    """With moderate input gates |q̂·n| < 1 at some steps but not all: the true-form check covers both branches of
    the denominator's max."""
    x = make_inputs(1, 2, 2, 16, 8, 8, igate=(-3.0, 1.0))
    (h, _), _ = reference_outputs_and_grads(x, eps=0.0)
    np.testing.assert_allclose(h, _true_form(x)[0], rtol=1e-10, atol=1e-12)
    q, k, i, f = (np.asarray(x[n], np.float64) for n in "qkif")
    n, small = np.zeros(k.shape[:2] + k.shape[-1:]), 0
    for t in range(k.shape[2]):
        n = n / (1.0 + np.exp(-f[:, :, t, None])) + np.exp(i[:, :, t, None]) * k[:, :, t]
        small += int(np.sum(np.abs(np.einsum("bhd,bhd->bh", q[:, :, t], n)) / np.sqrt(8) < 1.0))
    assert 0 < small < h.shape[0] * h.shape[1] * h.shape[2]


def test_reference_gradients_match_finite_differences_of_the_true_form():
    """The generic loss (weights on h and every last state) through the numpy true form, differentiated by
    central differences along a random direction of all eight inputs, against the reference's autodiff."""
    x = make_inputs(2, 1, 2, 9, 6, 10, with_state=True)
    w = make_weights(2, x)
    _, grads = reference_outputs_and_grads(x, w, eps=0.0)

    def loss(inputs):
        h, (c, n, m) = _true_form(inputs)
        return float(np.sum(w["h"] * h) + np.sum(w["C"] * c) + np.sum(w["n"] * n) + np.sum(w["m"] * m))

    rng = np.random.default_rng(3)
    direction = {name: rng.standard_normal(a.shape) for name, a in x.items()}
    x64 = {name: np.asarray(a, np.float64) for name, a in x.items()}
    step = 1e-6
    plus = loss({n: x64[n] + step * direction[n] for n in x64})
    minus = loss({n: x64[n] - step * direction[n] for n in x64})
    numeric = (plus - minus) / (2 * step)
    analytic = sum(float(np.sum(grads[n] * direction[n])) for n in x64)
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


@pytest.mark.parametrize("split", [1, 13, 24])
def test_reference_state_passing_equals_one_pass(split):
    x = make_inputs(4, 2, 2, 25, 16, 12, with_state=True)
    (h, states), _ = reference_outputs_and_grads(x)
    first = {n: a[:, :, :split] for n, a in x.items() if n in _SEQ}
    first.update({n: x[n] for n in ("c_initial", "n_initial", "m_initial")})
    (h1, (c1, n1, m1)), _ = reference_outputs_and_grads(first)
    second = {n: a[:, :, split:] for n, a in x.items() if n in _SEQ}
    second.update(c_initial=c1, n_initial=n1, m_initial=m1)
    (h2, states2), _ = reference_outputs_and_grads(second)
    np.testing.assert_allclose(np.concatenate([h1, h2], axis=2), h, rtol=1e-12, atol=1e-14)
    for name, a, e in zip("Cnm", states2, states):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14, err_msg=name)


def test_reference_needs_64_bit_jax():
    x = make_inputs(0, 1, 1, 4, 4, 4)
    with jax.enable_x64(False), pytest.raises(RuntimeError, match="64-bit"):
        mlstm_recurrent_reference(x["q"], x["k"], x["v"], x["i"], x["f"])
