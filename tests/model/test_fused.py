"""The block's fused elementwise ops (`rms_norm`, `gated_head_norm`, `swiglu`, each with its own backward) against
autodiff of their plain expressions in float64, and in bfloat16 against the float64 result of the same rounded
inputs; what their forwards keep for the backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.models.xlstm_large.fused import gated_head_norm, rms_norm, swiglu, swiglu_pair


def _plain(z):
    gate, up = jnp.split(z, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _all_vjps(fn, args, g):
    """(fn(*args), the cotangent of each arg) for the output cotangent g."""
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(g))


def test_values_and_gradient_equal_autodiff_in_float64():
    with jax.enable_x64(True):
        z = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, 2 * 7), jnp.float64)
        g = jax.random.normal(jax.random.key(1), (2, 5, 7), jnp.float64)
        got, want = _all_vjps(swiglu, (z,), g), _all_vjps(_plain, (z,), g)
        assert got[0].dtype == got[1].dtype == jnp.float64
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)


def test_bfloat16_keeps_its_dtype_and_rounds_once():
    z = (3.0 * jax.random.normal(jax.random.key(2), (4, 2 * 16))).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(3), (4, 16)).astype(jnp.bfloat16)
    out, dz = _all_vjps(swiglu, (z,), g)
    assert out.dtype == dz.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        exact = _all_vjps(_plain, (z.astype(jnp.float64),), g.astype(jnp.float64))
    for a, b in zip((out, dz), exact):  # formed in float32, one rounding to bf16 (relative 2^-8)
        a, b = np.asarray(a, np.float64), np.asarray(b)
        assert np.all(np.abs(a - b) <= 2.0**-8 * np.abs(b) + 1e-6)


def _rms_plain(x, weight, bias, eps):
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * weight
    return y if bias is None else y + bias


def _gated_plain(h, gate, weight, bias, eps):
    h = jnp.swapaxes(h, -3, -2)  # the cell's (..., NH, S, DHV) -> (..., S, NH, DHV)
    centred = h - jnp.mean(h, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    y = y.reshape(*y.shape[:-2], -1) * weight
    return jax.nn.sigmoid(gate) * (y if bias is None else y + bias)


@pytest.mark.parametrize("with_bias", [False, True])
def test_rms_norm_values_and_gradients_equal_autodiff_in_float64(with_bias):
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(4), 4)
        x = 2.0 * jax.random.normal(keys[0], (2, 3, 24), jnp.float64) + 0.5
        weight = jax.random.normal(keys[1], (24,), jnp.float64)
        bias = jax.random.normal(keys[2], (24,), jnp.float64) if with_bias else None
        g = jax.random.normal(keys[3], (2, 3, 24), jnp.float64)
        args = (x, weight) if bias is None else (x, weight, bias)
        got = _all_vjps(lambda x, w, b=None: rms_norm(x, w, b, 1e-6), args, g)
        want = _all_vjps(lambda x, w, b=None: _rms_plain(x, w, b, 1e-6), args, g)
        assert len(got) == len(want) == len(args) + 1
        for a, b in zip(got, want):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_head_norm_values_and_gradients_equal_autodiff_in_float64(with_bias):
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(5), 5)
        h = 3.0 * jax.random.normal(keys[0], (2, 3, 5, 8), jnp.float64) - 1.0
        gate = 2.0 * jax.random.normal(keys[1], (2, 5, 24), jnp.float64)
        weight = jax.random.normal(keys[2], (24,), jnp.float64)
        bias = jax.random.normal(keys[3], (24,), jnp.float64) if with_bias else None
        g = jax.random.normal(keys[4], (2, 5, 24), jnp.float64)
        args = (h, gate, weight) if bias is None else (h, gate, weight, bias)
        got = _all_vjps(lambda h, o, w, b=None: gated_head_norm(h, o, w, b, 1e-5, jnp.dtype(jnp.float64)), args, g)
        want = _all_vjps(lambda h, o, w, b=None: _gated_plain(h, o, w, b, 1e-5), args, g)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_gated_head_norm_in_bfloat16_keeps_dtypes_and_matches_float64():
    keys = jax.random.split(jax.random.key(6), 4)
    h = (3.0 * jax.random.normal(keys[0], (2, 4, 16))).astype(jnp.bfloat16)
    gate = jax.random.normal(keys[1], (4, 32)).astype(jnp.bfloat16)
    weight = 1.0 + 0.1 * jax.random.normal(keys[2], (32,))
    g = jax.random.normal(keys[3], (4, 32)).astype(jnp.bfloat16)
    out, dh, dgate, dweight = _all_vjps(
        lambda h, o, w: gated_head_norm(h, o, w, None, 1e-5, jnp.dtype(jnp.bfloat16)), (h, gate, weight), g)
    assert (out.dtype, dh.dtype, dgate.dtype, dweight.dtype) == (jnp.bfloat16,) * 3 + (jnp.float32,)
    with jax.enable_x64(True):
        exact = _all_vjps(lambda h, o, w: _gated_plain(h, o, w, None, 1e-5),
                          tuple(a.astype(jnp.float64) for a in (h, gate, weight)), g.astype(jnp.float64))
    for a, b in zip((out, dh, dgate, dweight), exact):  # float32 arithmetic, one rounding to the output dtype
        a, b = np.asarray(a, np.float64), np.asarray(b)
        tol = 2.0**-8 if a.dtype != np.float32 else 1e-5
        assert np.all(np.abs(a - b) <= tol * (np.abs(b) + np.abs(b).max() * 1e-2)), np.abs(a - b).max()


def test_forward_keeps_one_statistic_per_row_and_head():
    """What the forward keeps for the backward: the inputs and float32 statistics of one value per row (per head),
    nothing of the activation's size beyond the inputs (autodiff of the plain forms kept three to six)."""
    x, w = jnp.ones((4, 6, 32)), jnp.ones((32,))
    _, residuals = jax.vjp(lambda x: rms_norm(x, w, None, 1e-6), x)
    activations = [a.shape for a in jax.tree.leaves(residuals) if a.size > 4 * 6 * 2]  # more than a statistic
    assert activations == [(4, 6, 32)]
    h, o = jnp.ones((4, 2, 6, 16), jnp.bfloat16), jnp.ones((4, 6, 32), jnp.bfloat16)
    _, residuals = jax.vjp(lambda h, o: gated_head_norm(h, o, w, None, 1e-5, jnp.dtype(jnp.bfloat16)), h, o)
    activations = sorted(a.shape for a in jax.tree.leaves(residuals) if a.size > 4 * 6 * 2)
    assert activations == [(4, 2, 6, 16), (4, 6, 32)]


def test_rms_norm_in_the_compute_dtype_rounds_the_float32_result_once():
    """out_dtype bfloat16 (what the blocks ask for): the float32 norm rounded once; the cotangent comes in
    bfloat16 and x's gradient goes back in x's float32, equal to the float32 backward of the rounded cotangent."""
    keys = jax.random.split(jax.random.key(7), 3)
    x = 3.0 * jax.random.normal(keys[0], (4, 6, 32))
    w = 1.0 + 0.1 * jax.random.normal(keys[1], (32,))
    g = jax.random.normal(keys[2], (4, 6, 32)).astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w: rms_norm(x, w, None, 1e-6, jnp.dtype(jnp.bfloat16)), x, w)
    wide, wide_vjp = jax.vjp(lambda x, w: rms_norm(x, w, None, 1e-6), x, w)
    assert y.dtype == jnp.bfloat16 and wide.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(wide.astype(jnp.bfloat16), np.float32))
    for got, want in zip(vjp(g), wide_vjp(g.astype(jnp.float32))):
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_swiglu_pair_equals_autodiff_in_float64_and_swiglu_in_bfloat16():
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(8), 3)
        gate, up = (3.0 * jax.random.normal(k, (2, 5, 7), jnp.float64) for k in keys[:2])
        g = jax.random.normal(keys[2], (2, 5, 7), jnp.float64)
        got = _all_vjps(swiglu_pair, (gate, up), g)
        want = _all_vjps(lambda a, b: jax.nn.silu(a) * b, (gate, up), g)
        for a, b in zip(got, want):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)
    z = (3.0 * jax.random.normal(jax.random.key(9), (4, 2 * 16))).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(10), (4, 16)).astype(jnp.bfloat16)
    out, dgate, dup = _all_vjps(swiglu_pair, (z[:, :16], z[:, 16:]), g)
    joined, dz = _all_vjps(swiglu, (z,), g)  # the same float32 arithmetic, one rounding each
    assert out.dtype == dgate.dtype == dup.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(joined, np.float32))
    np.testing.assert_array_equal(np.asarray(jnp.concatenate([dgate, dup], -1), np.float32),
                                  np.asarray(dz, np.float32))


def test_swiglu_pair_keeps_only_its_inputs():
    """Autodiff of silu(gate) * up in float32 kept five float32 arrays of the FFN's width for the backward
    (weight_mode "single", the training job's); swiglu_pair keeps gate and up as given."""
    gate, up = jnp.ones((4, 6, 32), jnp.bfloat16), jnp.ones((4, 6, 32), jnp.bfloat16)
    _, residuals = jax.vjp(swiglu_pair, gate, up)
    assert sorted((a.shape, a.dtype) for a in jax.tree.leaves(residuals)) == [((4, 6, 32), jnp.bfloat16)] * 2
