"""Weight-only int8 / fp8 matmuls (`xlstm_jax.kernels.quantized_matmul`): per-channel quantization round trips
within its bound; the dequantizing Triton kernel (through the interpreter on a CPU) equals the float64 product of
x and the dequantized weight, split-K and ragged tiles included; the XLA path is dequantize-then-dot; bad input
gets clear errors; on a GPU the kernel at the xLSTM-7B's decode shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels.quantized_matmul import dequantize, quantize_weight, quantized_matmul
from xlstm_jax.kernels.quantized_matmul.api import resolve_backend
from xlstm_jax.kernels.quantized_matmul.xla import matmul_xla
from xlstm_jax.models.xlstm_large.config import xLSTMLargeConfig

SCHEMES = ["int8", "fp8"]


def _weight(seed: int, K: int, N: int) -> jax.Array:
    """Columns of very different magnitudes, one all zero."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)) * np.exp(rng.uniform(-4, 4, N))
    w[:, 1] = 0.0
    return jnp.asarray(w, jnp.float32)


def _product64(x, wq, scale) -> np.ndarray:
    return np.asarray(x, np.float64) @ np.asarray(dequantize(wq, scale), np.float64)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_weight_round_trip_is_within_its_bound(scheme):
    w = _weight(0, 96, 40)
    wq, scale = quantize_weight(w, scheme)
    assert wq.dtype == {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[scheme] and wq.shape == w.shape
    assert scale.dtype == jnp.float32 and scale.shape == (40,)
    w64, scale64 = np.asarray(w, np.float64), np.asarray(scale, np.float64)
    err = np.abs(w64 - np.asarray(dequantize(wq, scale), np.float64))
    if scheme == "int8":
        assert np.all(np.abs(np.asarray(wq, np.int32)) <= 127)
        bound = scale64 / 2
    else:  # 3 mantissa bits: half an ulp is 2^-4 relative; below 2^-6 (subnormals) 2^-10 absolute, both x scale
        bound = np.maximum(np.abs(w64) * 2.0**-4, 2.0**-10 * scale64)
    assert np.all(err <= bound * (1 + 2.0**-20) + 1e-30), float(np.max(err / bound))
    np.testing.assert_allclose(np.max(np.abs(np.asarray(dequantize(wq, scale), np.float64)), axis=0)[2:],
                               np.max(np.abs(w64), axis=0)[2:], rtol=1e-6)  # the absmax itself is exact
    assert float(scale[1]) == 1.0 and not np.any(np.asarray(wq[:, 1], np.float32))  # the zero column


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_triton_kernel_equals_the_float64_product(scheme, M):
    """K = 100, N = 75 with 32 x 16 tiles: ragged last tiles on both axes; split-K 1 and 3 (of 2, 2 and 3 tiles).
    float32 out: within the float32 summation bound (K + 2) 2^-24 sum_k |x_k w_k|; bf16 out: that result rounded."""
    K, N = 100, 75
    rng = np.random.default_rng(M)
    wq, scale = quantize_weight(_weight(M, K, N), scheme)
    for dtype, split in ((jnp.bfloat16, 1), (jnp.float32, 3)):
        x = jnp.asarray(rng.standard_normal((M, K)), dtype)
        want = _product64(x, wq, scale)
        size = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(dequantize(wq, scale), np.float64))
        y = quantized_matmul(x, wq, scale, backend="triton", out_dtype=jnp.float32, block_n=32, block_k=16,
                             split_k=split)
        assert y.shape == (M, N) and y.dtype == jnp.float32
        assert np.all(np.abs(np.asarray(y, np.float64) - want) <= (K + 2) * 2.0**-24 * size), (dtype, split)
        y16 = quantized_matmul(x[None], wq, scale, backend="triton", block_n=32, block_k=16, split_k=split)
        assert y16.shape == (1, M, N) and y16.dtype == jnp.bfloat16  # (1, M, K) x, bf16 out (the default)
        # one bf16 ulp (2^-7 relative): the interpreter truncates float32 -> bf16 stores, a GPU rounds (2^-8)
        np.testing.assert_allclose(np.asarray(y16[0], np.float32), np.asarray(y), rtol=2.0**-7, atol=0)


def test_xla_path_is_dequantize_then_dot_and_auto_picks_it_off_gpus():
    wq, scale = quantize_weight(_weight(3, 64, 48), "int8")
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 20, 64)), jnp.bfloat16)  # 40 rows
    y = quantized_matmul(x, wq, scale, out_dtype=jnp.float32)
    w = (np.asarray(wq, np.float32) * np.asarray(scale)).astype(jnp.bfloat16)
    want = jnp.einsum("...d,df->...f", x, w, preferred_element_type=jnp.float32)
    assert y.shape == (2, 20, 48) and np.array_equal(np.asarray(y), np.asarray(want))
    assert np.array_equal(np.asarray(y), np.asarray(matmul_xla(x, wq, scale, jnp.float32)))
    assert resolve_backend("triton", 17) == "xla"  # a prefill: the kernel is a GEMV
    if jax.default_backend() != "gpu":
        assert resolve_backend("auto", 1) == "xla"


def test_bad_input_gets_clear_errors():
    wq, scale = quantize_weight(_weight(4, 8, 4), "int8")
    x = jnp.ones((1, 8))
    with pytest.raises(ValueError, match=r"unknown weight quantization scheme 'int4'.*\['int8', 'fp8'\]"):
        quantize_weight(jnp.ones((8, 4)), "int4")
    with pytest.raises(TypeError, match="wq must be a 2-D int8 or float8_e4m3fn"):
        quantized_matmul(x, jnp.ones((8, 4)), scale)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., K\) with K = 8"):
        quantized_matmul(jnp.ones((1, 7)), wq, scale)
    with pytest.raises(ValueError, match=r"scale must be \(N,\) = \(4,\)"):
        quantized_matmul(x, wq, scale[:3])
    with pytest.raises(ValueError, match="unknown quantized_matmul backend 'cuda'"):
        quantized_matmul(x, wq, scale, backend="cuda")
    with pytest.raises(TypeError, match="x must"):
        quantized_matmul(jnp.ones((1, 8), jnp.int32), wq, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M", [1, 16])
def test_gpu_kernel_at_the_7b_decode_shapes(scheme, M):
    """Every fused projection of an xLSTM-7B block and its LM head: the kernel equals the float64 product (1e-5 of
    each column's largest value) and the XLA path (which rounds the dequantized weight to bf16) within bf16."""
    c = xLSTMLargeConfig(weight_mode="fused")
    D = c.embedding_dim
    shapes = [(D, 2 * c.qk_dim + 2 * c.v_dim), (c.v_dim, D), (D, 2 * c.ffn_dim), (c.ffn_dim, D), (D, c.vocab_size)]
    rng = np.random.default_rng(M)
    for K, N in shapes:
        wq, scale = quantize_weight(jnp.asarray(rng.standard_normal((K, N)) * 0.02, jnp.float32), scheme)
        x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
        y = jax.jit(lambda x, wq, s: quantized_matmul(x, wq, s, backend="triton", out_dtype=jnp.float32))(x, wq, scale)
        want = _product64(x, wq, scale)
        top = np.max(np.abs(want))
        assert np.max(np.abs(np.asarray(y, np.float64) - want)) < 1e-5 * top, (K, N)
        ref = matmul_xla(x, wq, scale, jnp.float32)
        assert np.max(np.abs(np.asarray(y) - np.asarray(ref))) < 1e-2 * top, (K, N)
