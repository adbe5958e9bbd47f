"""`blocked_cross_entropy` (the fused LM-head loss) against optax's softmax cross-entropy on the full logits: values
and gradients of x, w and the weights in float64 and float32, with masks, a vocabulary that is not a multiple of the
block, rows in several blocks (the gradient pass), the logit soft cap, argmax ties across blocks, and bfloat16
operands; bad input is a ValueError naming it."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xlstm_jax.train.losses import blocked_cross_entropy, row_blocks, vocab_blocks

N, D, V = 13, 8, 37  # N and V prime: no block divides them


def _plain(x, w, targets, weights, cap=None, dtype=None):
    """The model's head and the training step's masked sums, on the full logits."""
    dtype = dtype or x.dtype
    logits = jnp.einsum("nd,vd->nv", x.astype(dtype), w.astype(dtype),
                        preferred_element_type=jnp.promote_types(x.dtype, jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(logits.dtype)
    return jnp.sum(ce * weights), jnp.sum(correct * weights)


def _inputs(dtype, seed=0):
    kx, kw, kt, km = jax.random.split(jax.random.key(seed), 4)
    x = 2.0 * jax.random.normal(kx, (N, D), dtype)
    w = jax.random.normal(kw, (V, D), dtype)
    targets = jax.random.randint(kt, (N,), 0, V)
    targets = targets.at[:5].set(jnp.argmax(x[:5] @ w.T, axis=-1))  # some rows predicted right
    weights = (jax.random.uniform(km, (N,)) > 0.3).astype(dtype)
    return x, w, targets, weights


def _sums_and_grads(fn, x, w, targets, weights, **kwargs):
    """((ce sum, correct sum), gradients of the ce sum in x, w and weights), in one compiled function."""
    def ce_sum(x, w, m):
        ce, correct = fn(x, w, targets, m, **kwargs)
        return ce, correct

    (ce, correct), grads = jax.jit(jax.value_and_grad(ce_sum, argnums=(0, 1, 2), has_aux=True))(x, w, weights)
    return (ce, correct), grads


def _assert_close(got, want, rtol, atol):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("cap, block_size, row_block", [(None, None, None), (3.0, 8, 4), (None, 5, 13), (3.0, 5, 1)])
def test_equals_the_plain_loss_in_float64(cap, block_size, row_block):
    assert vocab_blocks(V, N, 8) == (5, 8) and vocab_blocks(V, N, 5) == (8, 5)  # the last block overlaps
    assert row_blocks(N, V, 4) == (4, 4) and row_blocks(N, V) == (1, N)  # 4 x 4 rows: 3 padding rows
    with jax.enable_x64(True):
        x, w, targets, weights = _inputs(jnp.float64)
        got = _sums_and_grads(blocked_cross_entropy, x, w, targets, weights, soft_cap=cap, block_size=block_size,
                              row_block=row_block)
        want = _sums_and_grads(_plain, x, w, targets, weights, cap=cap)
        assert got[0][0].dtype == jnp.float64 and got[1][1].shape == (V, D)
        assert float(want[0][1]) >= 3  # the rows set to their argmax count (where their weight is 1)
        _assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_equals_the_plain_loss_in_float32_with_the_model_cap():
    x, w, targets, weights = _inputs(jnp.float32, seed=1)
    x = 8.0 * x  # logits of +-100: the soft cap at 30 bends them
    got = _sums_and_grads(blocked_cross_entropy, x, w, targets, weights, soft_cap=30.0, block_size=16)
    want = _sums_and_grads(_plain, x, w, targets, weights, cap=30.0)
    _assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert got[0][1] == want[0][1]


def test_gradients_take_three_head_matmuls_and_no_backward_pass_over_the_logits():
    """Under differentiation the forward forms the gradients: three (rows x V x D) matmuls in all (logits, dx, dw)
    in one scan, and the backward only scales them (a backward recomputing the logits would take four)."""
    x, w, targets, weights = _inputs(jnp.float32)

    def ce_sum(x, w):
        return blocked_cross_entropy(x, w, targets, weights)[0]

    jaxpr = jax.make_jaxpr(jax.grad(ce_sum, argnums=(0, 1)))(x, w)
    dots = []

    def walk(jaxpr, depth):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append(depth)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub, depth + 1)

    walk(jaxpr.jaxpr, 0)
    assert len(dots) == 3 and all(depth > 0 for depth in dots)  # all three inside the one scan


def test_the_gradient_pass_reads_the_logits_in_one_reduction():
    """Max, sum of exponentials and argmax of each row come from one reduction over the (rows, V) capped logits
    (four reductions read them before), beside the pass that forms their cotangent; the target logit is gathered,
    so the reduction has the logits as one operand (a masked copy as a fourth operand gave them two uses there,
    and XLA on an H100 then wrote the capped logits in a fusion of their own)."""
    x, w, targets, weights = _inputs(jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: blocked_cross_entropy(x, w, targets, weights, soft_cap=15.0)[0]))(x)
    reductions = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if (name.startswith("reduce") or name.startswith("arg")) and eqn.invars[0].aval.shape[-1:] == (V,):
                reductions.append((name, sum(v.aval.shape[-1:] == (V,) for v in eqn.invars)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert reductions == [("reduce", 3)]  # logits, the counted columns' ones, the column indices


def test_argmax_ties_under_differentiation_go_to_the_lowest_index():
    x, w, targets, _ = _inputs(jnp.float32, seed=2)
    x = jnp.broadcast_to(x[0], x.shape)
    w = w.at[3].set(2.0 * x[0]).at[30].set(2.0 * x[0])  # columns 3 and 30 tie at the top
    targets = jnp.full((N,), 30).at[::2].set(3)
    ones = jnp.ones((N,), jnp.float32)
    for row_block in (None, 4):
        (ce, correct), _ = _sums_and_grads(blocked_cross_entropy, x, w, targets, ones, row_block=row_block)
        want = _plain(x, w, targets, ones)
        assert float(correct) == float(want[1]) == 7.0  # the even rows, whose target is column 3
        np.testing.assert_allclose(float(ce), float(want[0]), rtol=1e-6)


def test_argmax_ties_across_blocks_go_to_the_lowest_index():
    x, w, targets, _ = _inputs(jnp.float32, seed=2)
    x = jnp.broadcast_to(x[0], x.shape)
    w = w.at[3].set(2.0 * x[0]).at[30].set(2.0 * x[0])  # columns 3 and 30 tie at the top, in different blocks
    targets = jnp.full((N,), 30).at[::2].set(3)
    ones = jnp.ones((N,), jnp.float32)
    got = blocked_cross_entropy(x, w, targets, ones, block_size=8)
    want = _plain(x, w, targets, ones)
    assert float(got[1]) == float(want[1]) == 7.0  # the even rows, whose target is column 3
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)


@pytest.mark.slow
def test_bfloat16_operands_are_as_close_to_exact_as_the_plain_loss():
    """bf16 x, w with bf16 matmuls: both losses against the float64 loss of the same (rounded) inputs; the fused
    one's error is no larger than twice the plain one's (it rounds the logits' cotangent to bf16 for the matmuls,
    the plain one rounds the gradients)."""
    x, w, targets, weights = _inputs(jnp.bfloat16, seed=3)
    got = _sums_and_grads(blocked_cross_entropy, x, w, targets, weights, soft_cap=30.0, block_size=16)
    plain = _sums_and_grads(_plain, x, w, targets, weights, cap=30.0)
    assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
    with jax.enable_x64(True):
        exact = _sums_and_grads(_plain, *(a.astype(jnp.float64) for a in (x, w)), targets,
                                weights.astype(jnp.float64), cap=30.0)
    for g, p, e in zip(jax.tree.leaves(got), jax.tree.leaves(plain), jax.tree.leaves(exact)):
        g, p, e = (np.asarray(a, np.float64) for a in (g, p, e))
        scale = np.max(np.abs(e))
        assert np.max(np.abs(g - e)) <= 2 * np.max(np.abs(p - e)) + 1e-3 * scale


@pytest.mark.parametrize("change, name", [
    (dict(x=np.zeros((N, D, 1))), "x must"),
    (dict(x=np.zeros((N, D), np.int32)), "x must"),
    (dict(w=np.zeros((V, D + 1))), "w must"),
    (dict(targets=np.zeros((N,), np.float32)), "targets must"),
    (dict(targets=np.zeros((N + 1,), np.int32)), "targets must"),
    (dict(weights=np.zeros((N, 1))), "weights must"),
    (dict(soft_cap=0.0), "soft_cap must"),
    (dict(block_size=0), "block_size must"),
    (dict(row_block=True), "row_block must"),
])
def test_bad_input_is_a_value_error_naming_the_argument(change, name):
    args = dict(x=np.zeros((N, D), np.float32), w=np.zeros((V, D), np.float32), targets=np.zeros((N,), np.int32),
                weights=np.ones((N,), np.float32))
    args.update(change)
    with pytest.raises(ValueError, match=name):
        blocked_cross_entropy(**args)
