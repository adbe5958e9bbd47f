"""The projection matmul's bfloat16 backward (xlstm_jax/models/xlstm_large/mixed_matmul.py): the forward is the
plain mixed-precision einsum bit for bit, the gradients match float64 within bfloat16 rounding, and the backward
holds no float32 matmul (the TF32 GEMMs a float32 cotangent gave under plain autodiff)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.models.xlstm_large.mixed_matmul import mixed_matmul


def _inputs(x_dtype=jnp.float32, w_dtype=jnp.float32):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 5, 48), x_dtype)
    w = (0.2 * jax.random.normal(kw, (48, 40))).astype(w_dtype)
    g = jax.random.normal(kg, (2, 5, 40), jnp.float32)
    return x, w, g


def _plain(x, w, dtype):
    return jnp.einsum("...k,kn->...n", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(a - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_forward_equals_the_plain_einsum(dtype):
    x, w, _ = _inputs()
    np.testing.assert_array_equal(mixed_matmul(x, w, dtype), _plain(x, w, dtype))


def test_bfloat16_gradients_match_float64_and_keep_the_primal_dtypes():
    x, w, g = _inputs(w_dtype=jnp.float32)
    _, vjp = jax.vjp(lambda a, b: mixed_matmul(a, b, jnp.bfloat16), x, w)
    dx, dw = vjp(g)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    assert _rel(dx, g64 @ w64.T) < 1e-2
    assert _rel(dw, np.einsum("bsk,bsn->kn", x64, g64)) < 1e-2
    # bfloat16 primal inputs get bfloat16 gradients
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    _, vjp = jax.vjp(lambda a, b: mixed_matmul(a, b, jnp.bfloat16), xb, wb)
    assert [t.dtype for t in vjp(g)] == [jnp.bfloat16, jnp.bfloat16]


def test_float32_gradients_are_the_plain_autodiff_ones():
    x, w, g = _inputs()
    got = jax.vjp(lambda a, b: mixed_matmul(a, b, jnp.float32), x, w)[1](g)
    want = jax.vjp(lambda a, b: _plain(a, b, jnp.float32), x, w)[1](g)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_a_bfloat16_result_is_the_float32_one_rounded_with_the_same_gradients():
    """out_dtype bfloat16 (q, k, v, o and the FFN's gate and up): the float32 result rounded once, and gradients
    for a bfloat16 cotangent equal to those of the float32 result's (whose backward rounds the cotangent first)."""
    x, w, g = _inputs()
    y = mixed_matmul(x, w, jnp.bfloat16, out_dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, _plain(x, w, jnp.bfloat16).astype(jnp.bfloat16))
    gb = g.astype(jnp.bfloat16)
    got = jax.vjp(lambda a, b: mixed_matmul(a, b, jnp.bfloat16, out_dtype=jnp.bfloat16), x, w)[1](gb)
    want = jax.vjp(lambda a, b: mixed_matmul(a, b, jnp.bfloat16), x, w)[1](gb.astype(jnp.float32))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)


def _dot_operand_types(fn, *args):
    """The operand types of every dot_general in fn's StableHLO, e.g. "tensor<2x5x40xbf16>, tensor<48x40xbf16>"."""
    text = jax.jit(fn).lower(*args).as_text()
    return [line.split(": (")[1].split(")")[0] for line in text.splitlines() if "stablehlo.dot_general" in line]


def test_the_bfloat16_backward_has_no_float32_matmul():
    x, w, g = _inputs()

    def grads(fn):
        return lambda a, b, c: jax.vjp(fn, a, b)[1](c)

    plain = _dot_operand_types(grads(lambda a, b: _plain(a, b, jnp.bfloat16)), x, w, g)
    mixed = _dot_operand_types(grads(lambda a, b: mixed_matmul(a, b, jnp.bfloat16)), x, w, g)
    assert any("f32" in operands for operands in plain)  # what the custom backward removes
    assert mixed and not any("f32" in operands for operands in mixed), mixed


def test_a_weight_stored_as_n_by_k_gives_the_gradients_of_its_transpose():
    """w_layout "nk" (the tied head's table as stored): gradients against float64 within bf16 rounding, the float32
    forward equal to the (K, N) form's, an unknown layout refused."""
    table = 0.1 * jax.random.normal(jax.random.key(0), (256, 64))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64))
    g = jax.random.normal(jax.random.key(2), (2, 64, 256))
    dx, dt = jax.jit(lambda a, t: jax.vjp(lambda a_, t_: mixed_matmul(a_, t_, jnp.bfloat16, w_layout="nk"),
                                          a, t)[1](g))(x, table)
    x64, t64, g64 = (np.asarray(a, np.float64) for a in (x, table, g))
    assert _rel(dx, g64 @ t64) < 1e-2
    assert _rel(dt, np.einsum("bsv,bsd->vd", g64, x64)) < 1e-2
    np.testing.assert_array_equal(mixed_matmul(x, table, jnp.float32, w_layout="nk"),
                                  mixed_matmul(x, table.T, jnp.float32))
    with pytest.raises(ValueError, match="w_layout"):
        mixed_matmul(x, table, jnp.bfloat16, w_layout="kv")


def test_a_bfloat16_training_step_with_the_tied_head_runs_on_a_cpu():
    """The training step at the tiny size with the plain loss (the tied head's logits): with the table's transposed
    view as the weight, XLA's CPU runtime met a bf16 x bf16 -> f32 dot it cannot run (DotThunk UNIMPLEMENTED)."""
    from xlstm_jax.train.benchmark import synthetic_step

    step = synthetic_step("tiny", "native_chunkwise", 2, 64, "bfloat16", None, "plain", "none", None)
    leaves = jax.tree.leaves(jax.block_until_ready(step.train_step(*step.args)))
    assert leaves and all(bool(jnp.all(jnp.isfinite(x))) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))


def test_the_tied_head_backward_has_no_float32_matmul():
    """The tied LM head (logits = x @ embeddingᵀ) goes through mixed_matmul too: its logits' float32 cotangent
    once made both of its backward matmuls float32."""
    from flax import nnx

    from xlstm_jax.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig

    config = xLSTMLargeConfig(embedding_dim=32, num_heads=2, num_blocks=1, vocab_size=64, tie_word_embeddings=True,
                              compute_dtype="bfloat16")
    graphdef, params = nnx.split(xLSTMLarge(config, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 3, 32))
    g = jnp.ones((2, 3, 64), jnp.float32)

    def grads(p, a, c):
        return jax.vjp(lambda p_, a_: nnx.merge(graphdef, p_).head(a_), p, a)[1](c)

    operands = _dot_operand_types(grads, params, x, g)
    assert len(operands) == 3 and not any("f32" in o for o in operands), operands


def test_bfloat16_results_accumulate_in_float32():
    """A bfloat16 result (the forward's out_dtype, a bfloat16 input's gradient) is the float32 sum rounded once:
    4096 products of 1 sum to 4096, where bfloat16 accumulation stalls at 256 (256 + 1 rounds back to 256)."""
    x, w = jnp.ones((4, 4096), jnp.bfloat16), jnp.ones((4096, 8), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: mixed_matmul(a, b, jnp.bfloat16, out_dtype=jnp.bfloat16), x, w)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), 4096.0)
    dx, dw = vjp(jnp.ones((4, 8), jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dx, np.float32), 8.0)
    wide = jax.vjp(lambda a: mixed_matmul(a, jnp.ones((8, 4096)), jnp.bfloat16), jnp.ones((4, 8), jnp.bfloat16))[1]
    np.testing.assert_array_equal(np.asarray(wide(jnp.ones((4, 4096), jnp.float32))[0], np.float32), 4096.0)
