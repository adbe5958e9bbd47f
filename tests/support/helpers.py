"""Shared test helpers: random inputs, the float64 reference, a generic loss over outputs and last states, and
relative-error assertions.

Loss convention for gradient tests: L = sum(W_h * h) + sum(W_C * C_S) + sum(W_n * n_S) + sum(W_m * m_S) with random
weights, so every output and every last state carries a cotangent (true derivatives: docs/math.md §5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from xlstm_jax import doctor as _doctor
from xlstm_jax.kernels.base import validated
from xlstm_jax.mlstm import MLSTMCall, TritonTuning, dispatch, mlstm
from xlstm_jax.mlstm.reference import mlstm_recurrent_reference

INPUT_NAMES = ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Tolerances: relative Frobenius errors against the float64 reference, outputs / last states (FW) and gradients
# (BW). One name per set of bounds; every test file takes them from here.
# float32 inputs, the tight bound: the autodiff backends (native_parallel, native_recurrent), native_chunkwise, and
# every backend on the edge inputs of tests/op/test_edge_inputs.py
F32_FW_TOL, F32_BW_TOL = 1e-5, 1e-4
# bfloat16 inputs
BF16_FW_TOL, BF16_BW_TOL = 3e-2, 5e-2
# float32 inputs on any backend, the Triton kernels included: the bounds `xlstm-jax doctor` reports PASS at
# (xlstm_jax.doctor.FW_TOL / BW_TOL, taken from there so the tests check what the doctor promises)
DOCTOR_FW_TOL, DOCTOR_BW_TOL = _doctor.FW_TOL, _doctor.BW_TOL
# gradients at gate pre-activations of magnitude ~1e3..1e4: the float32 gate sums lose ~1e-3 absolute, so gradients
# deviate from the float64 derivative by up to a few percent (docs/precision.md); the bound still catches wrong or
# missing terms
EXTREME_BW_TOL = 0.1
# eps must be positive; against a reference with eps = 0 this one is as good as 0 at the tests' magnitudes
TINY_EPS = 1e-30


def make_inputs(
    seed: int,
    B: int,
    NH: int,
    S: int,
    DHQK: int,
    DHHV: int,
    *,
    dtype: str = "float32",
    with_state: bool = False,
    igate: tuple[float, float] = (-3.0, 3.0),
    fgate: tuple[float, float] = (-1.0, 6.0),
) -> dict[str, np.ndarray]:
    """Random inputs as numpy arrays. q/k/v are rounded to `dtype` (values stay exact in float64); gates and
    states are float32. Gate pre-activations are uniform in the given ranges."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    x = {
        "q": rng.standard_normal((B, NH, S, DHQK)).astype(dt),
        "k": rng.standard_normal((B, NH, S, DHQK)).astype(dt),
        "v": rng.standard_normal((B, NH, S, DHHV)).astype(dt),
        "i": rng.uniform(*igate, (B, NH, S)).astype(np.float32),
        "f": rng.uniform(*fgate, (B, NH, S)).astype(np.float32),
    }
    if with_state:
        x["c_initial"] = rng.standard_normal((B, NH, DHQK, DHHV)).astype(np.float32)
        x["n_initial"] = rng.standard_normal((B, NH, DHQK)).astype(np.float32)
        x["m_initial"] = rng.uniform(-2.0, 2.0, (B, NH)).astype(np.float32)
    return x


def make_weights(seed: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Random float32 loss weights for h and each last state."""
    rng = np.random.default_rng(seed + 1000)
    B, NH, S, DHQK = inputs["q"].shape
    DHHV = inputs["v"].shape[-1]
    return {
        "h": rng.standard_normal((B, NH, S, DHHV)).astype(np.float32),
        "C": rng.standard_normal((B, NH, DHQK, DHHV)).astype(np.float32),
        "n": rng.standard_normal((B, NH, DHQK)).astype(np.float32),
        "m": rng.standard_normal((B, NH)).astype(np.float32),
    }


def _loss(h, states, weights):
    c, n, m = states
    return (
        jnp.sum(weights["h"] * h)
        + jnp.sum(weights["C"] * c)
        + jnp.sum(weights["n"] * n)
        + jnp.sum(weights["m"] * m)
    )


@functools.partial(jax.jit, static_argnames=("eps", "variant"))
def _reference_jit(args, w64, eps, variant):
    def loss(a):
        out = mlstm_recurrent_reference(**a, eps=eps, **dict(variant))
        return (0.0 if w64 is None else _loss(*out, w64)), out

    if w64 is None:
        return loss(args)[1], None
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(args)
    return out, grads


def reference_outputs_and_grads(inputs, weights=None, *, eps: float = 1e-6, **variant):
    """float64 reference: (h, (C, n, m)) and, if weights are given, the gradients of the generic loss w.r.t.
    every given input (dict keyed like `inputs`). All numpy float64. `variant`: norm_val / stabilize_correctly.
    Jitted (one compile per shape), so repeated shapes are cheap."""
    names = [n for n in INPUT_NAMES if n in inputs]
    with jax.enable_x64(True):
        args = {n: jnp.asarray(np.asarray(inputs[n], np.float64)) for n in names}
        w64 = None if weights is None else {n: jnp.asarray(np.asarray(w, np.float64)) for n, w in weights.items()}
        (h, states), grads = _reference_jit(args, w64, float(eps), tuple(sorted(variant.items())))
        out = (np.asarray(h), tuple(np.asarray(s) for s in states))
        return out, None if grads is None else {n: np.asarray(g) for n, g in grads.items()}


def triton_core_fn(cfg):
    """`fn(q, k, v, i, f, c_initial, n_initial, m_initial) -> (h, (C, n, m))` of the Triton core with the kernel
    configuration `cfg` (its launch parameters included; the public functions use the table's)."""
    from xlstm_jax.kernels.triton import core as triton_core

    def fn(q, k, v, i, f, c_initial, n_initial, m_initial):
        h, c, n, m = triton_core.mlstm_triton_core(q, k, v, i, f, c_initial, n_initial, m_initial, cfg)
        return h, (c, n, m)

    return fn


def outputs_and_grads(fn, inputs, weights=None):
    """Run `fn(q, k, v, i, f, c_initial=, n_initial=, m_initial=) -> (h, (C, n, m))` on `inputs` (as given dtypes)
    under jit, and if weights are given the gradients of the generic loss w.r.t. every input (one compile)."""
    names = [n for n in INPUT_NAMES if n in inputs]
    args = {n: jnp.asarray(inputs[n]) for n in names}

    def loss(a, w):
        h, states = fn(**a)
        return _loss(h.astype(jnp.float32), states, w), (h, states)

    if weights is None:
        h, states = jax.jit(lambda a: fn(**a))(args)
        grads = None
    else:  # the weights are arguments, not constants: a large h weight would be folded into the program
        (_, (h, states)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args, weights)
    out = (np.asarray(h, np.float64), tuple(np.asarray(s, np.float64) for s in states))
    return out, None if grads is None else {n: np.asarray(g, np.float64) for n, g in grads.items()}


def output_and_grad_dtypes(fn, inputs) -> tuple:
    """Dtypes of h and of the q, k, v gradients of `fn` (as in `outputs_and_grads`), from abstract evaluation."""
    args = {n: jnp.asarray(inputs[n]) for n in INPUT_NAMES if n in inputs}

    def loss(qkv):
        h, _ = fn(**{**args, **qkv})
        return jnp.sum(h.astype(jnp.float32)), h

    qkv = {n: args[n] for n in ("q", "k", "v")}
    grads, h = jax.eval_shape(jax.grad(loss, has_aux=True), qkv)
    return h.dtype, grads["q"].dtype, grads["k"].dtype, grads["v"].dtype


def _normalized_loss_grads(fn, inputs, weights, dtype=None):
    """Gradients of sum(W * h / rms(h)) (per-row scale invariant, like the per-head norm of an xLSTM block)."""
    args = {n: jnp.asarray(inputs[n] if dtype is None else np.asarray(inputs[n], dtype)) for n in INPUT_NAMES}

    def loss(a):
        h = fn(**a)[0].astype(args["i"].dtype)
        return jnp.sum(weights * h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6))

    return {n: np.asarray(g, np.float64) for n, g in jax.jit(jax.grad(loss))(args).items()}


def assert_normalized_loss_grads_match(fn, inputs, weights_h, tol: float) -> None:
    """bf16 compute under a generic loss is ill-conditioned for dq/df (docs/precision.md); under the model's
    per-head-normalized loss every gradient is well conditioned: compare those with the float64 reference (inputs
    with initial states; dn_initial's true value vanishes under this loss and is not compared)."""
    grads = _normalized_loss_grads(fn, inputs, weights_h)
    with jax.enable_x64(True):
        ref = _normalized_loss_grads(lambda **a: mlstm_recurrent_reference(**a), inputs, weights_h, np.float64)
    for name in ("q", "k", "v", "i", "f", "c_initial"):
        assert_rel_close(grads[name], ref[name], tol, f"d{name}")


def rel_err(actual, expected) -> float:
    """||actual - expected|| / max(||expected||, 1e-6) (Frobenius)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-6))


def assert_rel_close(actual, expected, tol: float, name: str) -> None:
    """Relative Frobenius error at most tol, with no NaN/inf in `actual`."""
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def assert_matches_reference(out, grads, ref_out, ref_grads, *, fw_tol: float, bw_tol: float) -> None:
    """Compare outputs, last states and (if given) all gradients with the float64 reference."""
    h, (c, n, m) = out
    rh, (rc, rn, rm) = ref_out
    assert_rel_close(h, rh, fw_tol, "h")
    assert_rel_close(c, rc, fw_tol, "C_last")
    assert_rel_close(n, rn, fw_tol, "n_last")
    np.testing.assert_allclose(m, rm, atol=1e-4, rtol=1e-5, err_msg="m_last")
    if grads is not None:
        for name, g in ref_grads.items():
            assert_rel_close(grads[name], g, bw_tol, f"d{name}")


def native_chunkwise(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, **options):
    """The op's native_chunkwise implementation (`xlstm_jax.mlstm` keywords)."""
    return mlstm(q, k, v, i, f, c_initial=c_initial, n_initial=n_initial, m_initial=m_initial,
                 backend="native_chunkwise", **options)


def xl_chunk(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *, return_last_states=False, eps=1e-6,
             chunk_size=64, autocast_dtype=None, norm_val=1.0, stabilize_correctly=True, **tuning):
    """The op's triton_xl_chunk implementation with its TritonTuning knobs and a denominator variant, through the
    op's door (`dispatch`), as the documented Triton backend calls it."""
    x, o = validated(q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states=return_last_states, eps=eps,
                     autocast_dtype=autocast_dtype, norm_val=norm_val, stabilize_correctly=stabilize_correctly)
    return dispatch(MLSTMCall(x, o, "triton_xl_chunk", chunk_size, TritonTuning(**tuning)))
