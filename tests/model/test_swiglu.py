"""`swiglu` (the FFN's gate activation with its own backward) against autodiff of the plain expression in float64,
and in bfloat16 against the float64 result of the same rounded input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.models.xlstm_large.model import swiglu


def _plain(z):
    gate, up = jnp.split(z, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _value_and_vjp(fn, z, g):
    out, vjp = jax.vjp(fn, z)
    return out, vjp(g)[0]


def test_values_and_gradient_equal_autodiff_in_float64():
    with jax.enable_x64(True):
        z = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, 2 * 7), jnp.float64)
        g = jax.random.normal(jax.random.key(1), (2, 5, 7), jnp.float64)
        got, want = _value_and_vjp(swiglu, z, g), _value_and_vjp(_plain, z, g)
        assert got[0].dtype == got[1].dtype == jnp.float64
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)


def test_bfloat16_keeps_its_dtype_and_rounds_once():
    z = (3.0 * jax.random.normal(jax.random.key(2), (4, 2 * 16))).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(3), (4, 16)).astype(jnp.bfloat16)
    out, dz = _value_and_vjp(swiglu, z, g)
    assert out.dtype == dz.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        exact = _value_and_vjp(_plain, z.astype(jnp.float64), g.astype(jnp.float64))
    for a, b in zip((out, dz), exact):  # formed in float32, one rounding to bf16 (relative 2^-8)
        a, b = np.asarray(a, np.float64), np.asarray(b)
        assert np.all(np.abs(a - b) <= 2.0**-8 * np.abs(b) + 1e-6)
