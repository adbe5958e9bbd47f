"""Inputs at the edges of the domain, on every backend: infinite and huge gate pre-activations (a full reset,
nothing written, no decay) match the float64 reference in outputs, last states and every gradient; a NaN at one
position never reaches earlier positions; float16 inputs whose float32 result is finite give finite outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.backend_cases import (
    BACKENDS,
    as_numpy,
    assert_grads_close,
    jitted_forward,
    jitted_outputs_and_grads,
)
from tests.support.helpers import (
    F32_BW_TOL,
    F32_FW_TOL,
    assert_rel_close,
    make_inputs,
    make_weights,
    reference_outputs_and_grads,
)

INF = np.inf
# (batch, head) -> [(gate, position, value)]: chunk size 16, S = 40 (three chunks, the last one padded). Positions
# sit inside a chunk, at its first and last token, back to back, and at t = 0.
EXTREME_GATES = {
    (0, 0): [("f", 3, -INF), ("f", 16, -INF), ("i", 20, -INF)],
    (0, 1): [("f", 21, -1e30), ("f", 22, -1e30), ("f", 0, -INF)],
    (1, 0): [("f", 5, 1e30), ("f", 30, 1e30), ("i", 7, -INF), ("i", 8, -INF), ("i", 31, -INF)],
    (1, 1): [("f", 31, -INF), ("i", 0, -INF), ("f", 10, -3e38), ("f", 15, -INF), ("i", 33, -1e30)],
}


def _extreme_inputs(seed=11):
    x = make_inputs(seed, 2, 2, 40, 16, 16, with_state=True)
    for (b, h), entries in EXTREME_GATES.items():
        for gate, t, value in entries:
            x[gate][b, h, t] = value
    return x


def _run(backend, x, weights):
    out, grads = jitted_outputs_and_grads(backend)({n: jnp.asarray(a) for n, a in x.items()}, weights)
    return as_numpy(out), as_numpy(grads)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_and_huge_gates_match_the_reference(backend):
    """Forget gates of -inf, -1e30, -3e38 (full resets) and +1e30 (no decay), input gates of -inf and -1e30
    (nothing written), anywhere in a chunk: outputs, last states and every gradient as the float64 recurrence."""
    x = _extreme_inputs()
    weights = make_weights(11, x)
    (h, states), grads = _run(backend, x, weights)
    (rh, rstates), ref_grads = reference_outputs_and_grads(x, weights)
    assert_rel_close(h, rh, F32_FW_TOL, "h")
    for name, value, ref in zip("Cnm", states, rstates):
        assert_rel_close(value, ref, F32_FW_TOL, name)
    assert_grads_close(grads, ref_grads, F32_BW_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_with_nothing_written_is_the_zero_state(backend):
    """f = -inf and i = -inf at the same step: the memory is exactly empty there (the literal recurrence), so h is 0
    at that step and the next steps see only what comes after. (The stabilized reference has no m for an empty
    state; it is compared with i = -1e30 at that step, which is the same memory.)"""
    x = make_inputs(12, 1, 2, 40, 16, 16, with_state=True)
    x["f"][:, :, 18] = -INF
    x["i"][:, :, 18] = -INF
    h, _ = as_numpy(jitted_forward(backend)({n: jnp.asarray(a) for n, a in x.items()}))
    x["i"][:, :, 18] = -1e30
    (rh, _), _ = reference_outputs_and_grads(x)
    assert_rel_close(h, rh, F32_FW_TOL, "h")
    np.testing.assert_array_equal(h[:, :, 18], 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_input_gate_gives_nan_from_its_position_on(backend):
    """i = +inf asks for an infinite write: the reference is NaN from that position on, and so is every backend;
    positions before it are untouched."""
    x = make_inputs(13, 1, 2, 40, 16, 16)
    x["i"][:, 1, 21] = INF
    h, _ = as_numpy(jitted_forward(backend)({n: jnp.asarray(a) for n, a in x.items()}))
    (rh, _), _ = reference_outputs_and_grads(x)
    assert np.all(np.isnan(rh[:, 1, 21:])) and np.all(np.isnan(h[:, 1, 21:]))
    assert_rel_close(h[:, 1, :21], rh[:, 1, :21], F32_FW_TOL, "h before the infinite gate")
    assert_rel_close(h[:, 0], rh[:, 0], F32_FW_TOL, "h of the other head")


@pytest.mark.parametrize("name", ["q", "k", "v", "i", "f"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_never_reaches_earlier_positions(backend, name):
    """A NaN in one input at t = 30 (in the middle of the second chunk) leaves h at t < 30 as it was."""
    x = make_inputs(14, 1, 2, 40, 16, 16, with_state=True)
    clean, _ = as_numpy(jitted_forward(backend)({n: jnp.asarray(a) for n, a in x.items()}))
    x[name][:, :, 30] = np.nan
    h, _ = as_numpy(jitted_forward(backend)({n: jnp.asarray(a) for n, a in x.items()}))
    np.testing.assert_array_equal(h[:, :, :30], clean[:, :, :30])
    assert np.isnan(h[:, :, 30:]).any()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_inputs_with_large_scores_stay_finite(backend):
    """float16 q, k of magnitude ~1e3 give q·k products (~1e7) and states far beyond float16's range, while h is
    moderate: outputs and gradients are finite and close to the float64 reference."""
    x = make_inputs(15, 1, 2, 40, 16, 16, with_state=True)
    x["q"], x["k"] = (np.float16(1e3) * x[n].astype(np.float16) for n in ("q", "k"))
    x["v"] = x["v"].astype(np.float16)
    weights = make_weights(15, x)
    (h, states), grads = _run(backend, x, weights)
    for name, value in [("h", h), *zip("Cnm", states), *grads.items()]:
        assert np.all(np.isfinite(value)), f"non-finite {name}"
    (rh, rstates), ref_grads = reference_outputs_and_grads(x, weights)
    assert_rel_close(h, rh, 1e-2, "h")
    assert_rel_close(states[0], rstates[0], 1e-3, "C")
    assert_grads_close({n: grads[n] for n in ("v", "c_initial")}, {n: ref_grads[n] for n in ("v", "c_initial")},
                       3e-2)


def _sprinkle_extreme_gates(x):
    """Resets (f = -inf, -1e30), no-decay steps (f = +1e30) and empty writes (i = -inf) every few hundred tokens,
    at positions that fall anywhere within a chunk."""
    S = x["f"].shape[-1]
    t = np.arange(S)
    x["f"][..., t % 997 == 13] = -INF
    x["f"][..., t % 1009 == 600] = -1e30
    x["f"][..., t % 503 == 100] = 1e30
    x["i"][..., t % 211 == 7] = -INF
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton_limit_chunk", "triton_xl_chunk"])
def test_gpu_extreme_gates_at_the_issue_shape(backend):
    """B=8, S=8192, NH=16, DHQK=128, DHHV=256, bf16 inputs computed in bf16, with resets, no-decay steps and empty
    writes sprinkled in: both Triton families against native_chunkwise computing the same inputs in float32 (the
    stable intra-chunk form), outputs, last states and every gradient; the errors are those of the same call
    without the extreme gates (bf16 rounding), and nothing is NaN."""
    from tests.support.backend_cases import backend_fn
    from tests.support.helpers import outputs_and_grads, rel_err

    x = make_inputs(16, 8, 16, 8192, 128, 256, dtype="bfloat16", with_state=True)
    weights = make_weights(16, x)
    errors = {}
    for case, inputs in (("clean", x), ("extreme", _sprinkle_extreme_gates({n: a.copy() for n, a in x.items()}))):
        (h, states), grads = outputs_and_grads(backend_fn(backend, chunk_size=64), inputs, weights)
        reference = backend_fn("native_chunkwise", chunk_size=64, autocast_dtype="float32")
        (rh, rstates), ref_grads = outputs_and_grads(reference, inputs, weights)
        errors[case] = {"h": rel_err(h, rh), **{n: rel_err(a, b) for n, a, b in zip("Cnm", states, rstates)},
                        **{f"d{n}": rel_err(grads[n], ref_grads[n]) for n in grads}}
        print(f"{backend} {case}: " + " ".join(f"{k}={v:.1e}" for k, v in errors[case].items()))
        assert np.all(np.isfinite(h)) and all(np.all(np.isfinite(g)) for g in grads.values())
    for name, err in errors["extreme"].items():
        assert err <= max(3 * errors["clean"][name], 1e-5), (name, err, errors["clean"][name])


@pytest.mark.parametrize("L", [16, 64])
def test_chunk_gates_kernel_matches_the_float64_sums(L):
    """The Triton gates kernel (two-float within-chunk cumsum b + b_lo, suffix log weights a, chunk totals g)
    against float64 sums of the same floored log forget gates, with resets (-inf, -1e30) inside chunks: the
    two-float differences keep the gates after a reset to float32 precision, where b alone has lost them."""
    from tests.support.backend_cases import skip_unless_runnable

    from xlstm_jax.kernels.base import log_forget
    from xlstm_jax.kernels.triton import core as triton_core

    skip_unless_runnable("triton_limit_chunk")
    rng = np.random.default_rng(17)
    BH, S = 3, 4 * L
    i = rng.uniform(-3, 3, (BH, S)).astype(np.float32)
    f = rng.uniform(-1, 6, (BH, S)).astype(np.float32)
    f[0, 5], f[1, L + 3], f[1, L + 4], f[2, 2 * L - 1] = -INF, -1e30, -1e30, -INF
    b, b_lo, a, g = (np.asarray(x, np.float64) for x in triton_core.gate_vectors(jnp.asarray(i), jnp.asarray(f), L))
    logf = np.asarray(log_forget(jnp.asarray(f)), np.float64).reshape(BH, S // L, L)
    suffix = np.cumsum(logf[..., ::-1], axis=-1)[..., ::-1]
    ref_a = (np.concatenate([suffix[..., 1:], np.zeros_like(suffix[..., :1])], axis=-1)).reshape(BH, S) + i
    np.testing.assert_allclose(g, suffix[..., 0], rtol=1e-6)
    np.testing.assert_allclose(a, ref_a, rtol=1e-6, atol=1e-5)
    # differences within a chunk after a reset: (b_t - b_s) + (lo_t - lo_s) against the float64 difference
    t, s = L + 9, L + 6  # both after the two -1e30 gates of row 1
    exact = logf.reshape(BH, S)[1, s + 1:t + 1].sum()
    assert abs((b[1, t] - b[1, s]) + (b_lo[1, t] - b_lo[1, s]) - exact) <= 1e-5 * max(1.0, abs(exact))
    assert abs((b[1, t] - b[1, s]) - exact) > 0.1  # the high part alone has swallowed them


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton_limit_chunk", "triton_xl_chunk"])
def test_gpu_repeated_calls_are_bit_identical(backend):
    """One compiled forward and backward called three times, with memory filled with NaN in between: outputs, last
    states and gradients are bit-identical every time (a kernel that reads memory it did not write, or races,
    differs between calls; the limit kernel's per-chunk branch once gave an h whose first call was 13% off)."""
    from tests.support.backend_cases import backend_fn
    from tests.support.helpers import INPUT_NAMES, _loss

    x = make_inputs(21, 2, 8, 4096, 128, 256, dtype="bfloat16", with_state=True)
    weights = {n: jnp.asarray(w) for n, w in make_weights(21, x).items()}
    args = {n: jnp.asarray(x[n]) for n in INPUT_NAMES if n in x}
    fn = backend_fn(backend, chunk_size=64)

    def loss(a, w):
        h, states = fn(**a)
        return _loss(h.astype(jnp.float32), states, w), (h, states)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    runs = []
    for _ in range(3):
        runs.append([np.asarray(leaf) for leaf in jax.tree.leaves(step(args, weights))])
        junk = jnp.full((1 << 30,), jnp.nan, jnp.float32).block_until_ready()
        del junk
    for r in (1, 2):
        for n, (a, b) in enumerate(zip(runs[r], runs[0])):
            np.testing.assert_array_equal(a, b, err_msg=f"call {r} leaf {n}")
