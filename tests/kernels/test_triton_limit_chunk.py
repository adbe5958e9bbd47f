"""Triton limit-chunk kernels (the documented triton_fwbw module) and the documented Triton backend.

On CPU the real kernels run through Triton's interpreter at small shapes; `gpu` tests run them at realistic shapes
on CUDA. Everything is compared with the float64 reference: outputs, last states and the gradients of all eight
inputs under a loss with weights on h and on every last state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.helpers import (
    assert_matches_reference,
    assert_normalized_loss_grads_match,
    assert_rel_close,
    make_inputs,
    make_weights,
    output_and_grad_dtypes,
    outputs_and_grads,
    reference_outputs_and_grads,
    triton_core_fn,
)
from xlstm_jax.kernels.mlstm_chunkwise.triton_stablef.triton_fwbw import (
    _get_chunkwise_fwbw_kernel,
    _mlstm_chunkwise_fwbw_generator,
    mlstm_chunkwise_triton_stablef,
)
from xlstm_jax.kernels.triton import families as triton_families
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.triton_kernels import (
    BackendNameType,
    mLSTMBackendTriton,
    mLSTMBackendTritonConfig,
)


def _limit_chunk(**kw):
    return lambda **a: mlstm_chunkwise_triton_stablef(**a, return_last_states=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    "B, NH, S, DHQK, DHHV, L, with_state",
    [
        (1, 2, 40, 16, 32, 16, True),  # S not a multiple of L, initial states
        (2, 1, 32, 32, 16, 16, False),  # S a multiple of L
        (1, 1, 1, 16, 16, 16, True),  # S = 1
        (1, 1, 20, 24, 48, 32, True),  # head dims that are not powers of two, S < L
        (1, 1, 20, 48, 1024, 16, True),  # the largest head dim (1024), tiled
        (1, 3, 40, 16, 160, 16, True),  # output column blocks of several heads and chunks (program renumbering)
    ],
)
def test_matches_float64_reference(B, NH, S, DHQK, DHHV, L, with_state):
    x = make_inputs(0, B, NH, S, DHQK, DHHV, with_state=with_state)
    w = make_weights(0, x)
    out, grads = outputs_and_grads(_limit_chunk(chunk_size=L), x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w)
    assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=2e-5, bw_tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "NH, S, DHQK, DHHV, L, launch",
    [
        (2, 40, 24, 40, 16, {"limit.block": 16}),  # head dims ending inside 16-wide tiles, S not a multiple of L
        (3, 64, 16, 32, 32, {}),  # several heads and chunks
        (1, 40, 24, 40, 16, {"limit.block": 16, "limit.tma": 1}),  # with descriptor reads
    ],
)
def test_one_backward_kernel_matches_the_float64_reference(NH, S, DHQK, DHHV, L, launch):
    """limit.fused_bw: dq, dk and dv from one kernel (dq's score cotangent the transpose of dk's): outputs, last
    states and the gradients of all eight inputs, with initial states."""
    x = make_inputs(5, 1, NH, S, DHQK, DHHV, with_state=True)
    w = make_weights(5, x)
    cfg = triton_families.config("limit", L, "float32").with_launch({"limit.fused_bw": 1, **launch})
    out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=2e-5, bw_tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "S, L, chunks, launch",
    [
        (250, 16, 3, {"limit.block": 16}),  # 16 chunks, 6 programs a row: the last walks one chunk
        (64, 16, 8, {"limit.block": 16, "limit.out_v_block": 16}),  # more chunks a program than there are
        (250, 16, 4, {"limit.block": 16, "limit.tma": 1, "limit.stages": 3}),  # descriptor reads, 3 stages
    ],
)
def test_chunk_loop_forward_matches_the_float64_reference(S, L, chunks, launch):
    """limit.chunks_per_program: each forward output program walks several chunks in a pipelined loop. DHQK = 24,
    DHHV = 40 (head dims ending inside 16-wide tiles), outputs, last states and all eight gradients."""
    x = make_inputs(6, 1, 2, S, 24, 40, with_state=True)
    w = make_weights(6, x)
    cfg = triton_families.config("limit", L, "float32").with_launch({"limit.chunks_per_program": chunks, **launch})
    out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=2e-5, bw_tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("norm_val, stabilize_correctly", [(2.0, True), (0.5, False)])
def test_denominator_variants(norm_val, stabilize_correctly):
    x = make_inputs(1, 1, 2, 24, 16, 16, with_state=True)
    w = make_weights(1, x)
    variant = dict(norm_val=norm_val, stabilize_correctly=stabilize_correctly)
    out, grads = outputs_and_grads(_limit_chunk(chunk_size=16, **variant), x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w, **variant)
    assert_rel_close(out[0], ref_out[0], 2e-5, "h")
    # The m-dependent variant's gradient holds m constant (as documented); the standard one is exact.
    names = ["v", "c_initial", "n_initial"] if not stabilize_correctly else list(ref_grads)
    for name in names:
        assert_rel_close(grads[name], ref_grads[name], 1e-4, f"d{name}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype, compute", [("bfloat16", "float32"), ("bfloat16", None), ("float16", None)])
def test_half_precision_inputs(dtype, compute):
    """bf16 / fp16 q/k/v with the seed's default float32 kernel compute and with compute in their own dtype
    (autocast_kernel_dtype=None: half-precision matmul operands, chunk states and state cotangents): h and the
    q/k/v gradients come back in the input dtype."""
    x = make_inputs(2, 1, 2, 48, 32, 32, dtype=dtype, with_state=True)
    w = make_weights(2, x)
    fn = _limit_chunk(chunk_size=16, autocast_kernel_dtype=compute)
    assert output_and_grad_dtypes(fn, x) == (jnp.dtype(dtype),) * 4
    out, grads = outputs_and_grads(fn, x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w)
    assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=1e-2, bw_tol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("option", [{"recompute_states_in_bw": False}, {"reduce_slicing": False}])
def test_options_do_not_change_results(option):
    x = make_inputs(3, 1, 1, 40, 16, 16, with_state=True)
    w = make_weights(3, x)
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")]

    def loss(fwd, *a):
        h, c, n, m = fwd(*a)
        return jnp.sum(w["h"] * h) + jnp.sum(w["C"] * c) + jnp.sum(w["n"] * n) + jnp.sum(w["m"] * m)

    base = _mlstm_chunkwise_fwbw_generator(jnp.float32, return_last_states=True, chunk_size=16)
    other = _mlstm_chunkwise_fwbw_generator(jnp.float32, return_last_states=True, chunk_size=16, **option)
    g0 = jax.grad(lambda *a: loss(base, *a), argnums=tuple(range(8)))(*args)
    g1 = jax.grad(lambda *a: loss(other, *a), argnums=tuple(range(8)))(*args)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_generator_returns_four_tuple_and_is_cached():
    x = make_inputs(4, 1, 1, 16, 16, 16)
    fwd = _mlstm_chunkwise_fwbw_generator(jnp.float32, chunk_size=16)
    h, c, n, m = fwd(*(jnp.asarray(x[k]) for k in ("q", "k", "v", "i", "f")))
    assert h.shape == (1, 1, 16, 16) and c is None and n is None and m is None
    kernel = _get_chunkwise_fwbw_kernel(jnp.float32, chunk_size=16)
    assert kernel is _get_chunkwise_fwbw_kernel("float32", chunk_size=16)


@pytest.mark.slow
def test_vmap_over_leading_axis_folds_into_the_kernel():
    xs = [make_inputs(s, 1, 2, 20, 16, 16) for s in (5, 6)]
    stacked = {k: jnp.stack([jnp.asarray(x[k]) for x in xs]) for k in ("q", "k", "v", "i", "f")}

    def fn(q, k, v, i, f):
        return mlstm_chunkwise_triton_stablef(q, k, v, i, f, chunk_size=16)

    h = jax.vmap(fn)(*(stacked[k] for k in ("q", "k", "v", "i", "f")))
    g = jax.vmap(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=4))(*(stacked[k] for k in ("q", "k", "v", "i", "f")))
    for n, x in enumerate(xs):
        a = [jnp.asarray(x[k]) for k in ("q", "k", "v", "i", "f")]
        np.testing.assert_allclose(h[n], fn(*a), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(g[n], jax.grad(lambda *b: jnp.sum(fn(*b) ** 2), argnums=4)(*a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        ({"chunk_size": 8}, (1, 1, 16, 16, 16), "chunk_size"),
        ({"chunk_size": 256}, (1, 1, 16, 16, 16), "chunk_size"),
        ({"chunk_size": 48}, (1, 1, 16, 16, 16), "chunk_size"),
        ({}, (1, 1, 16, 1040, 16), "DHQK"),
        ({"autocast_kernel_dtype": "int8"}, (1, 1, 16, 16, 16), "autocast_kernel_dtype"),
    ],
)
def test_bad_input_is_refused_before_launch(kwargs, shape, match):
    x = make_inputs(0, *shape)
    with pytest.raises(ValueError, match=match):
        mlstm_chunkwise_triton_stablef(*(jnp.asarray(x[k]) for k in ("q", "k", "v", "i", "f")), **kwargs)


def test_backend_config_defaults_and_names():
    cfg = mLSTMBackendTritonConfig()
    assert (cfg.autocast_dtype, cfg.chunk_size, cfg.reduce_slicing, cfg.backend_name) == (
        None, 64, True, "max_triton_noslice")
    assert (cfg.eps, cfg.norm_val, cfg.stabilize_correctly) == (1e-6, 1.0, True)
    assert set(BackendNameType.__args__) == {"max_triton_xlchunksize", "max_triton_noslice", "max_triton",
                                             "triton_stablef"}
    assert mLSTMBackendTriton().can_vmap_over_heads is False
    with pytest.raises(ValueError, match="backend_name"):
        mLSTMBackendTritonConfig(backend_name="nope")


@pytest.mark.parametrize(
    "name", ["max_triton", "max_triton_noslice", "triton_stablef", "chunkwise--triton_limit_chunk",
             "max_triton_xlchunksize", "chunkwise--triton_xl_chunk"],
)
def test_backend_runs_every_limit_chunk_name_and_honours_fields(name):
    x = make_inputs(7, 1, 2, 24, 16, 16, with_state=True)
    a = {k: jnp.asarray(v) for k, v in x.items()}
    gates4 = {"i": a["i"][..., None], "f": a["f"][..., None]}
    backend = create_mlstm_backend("triton_kernels", backend_name=name, chunk_size=16, eps=1e-3, norm_val=2.0)
    h, (c, n, m) = backend(a["q"], a["k"], a["v"], gates4["i"], gates4["f"], a["c_initial"], a["n_initial"],
                           a["m_initial"], return_last_states=True)
    (rh, (rc, rn, rm)), _ = reference_outputs_and_grads(x, eps=1e-3, norm_val=2.0)
    assert_rel_close(h, rh, 2e-5, "h")
    assert_rel_close(c, rc, 2e-5, "C")
    np.testing.assert_allclose(m, rm, atol=1e-5)


# --------------------------------------------------------------------------------------------- GPU (CUDA) tests
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, fw_tol, bw_tol", [("float32", 1e-4, 1e-3), ("bfloat16", 1e-2, 5e-2)])
def test_gpu_parity_realistic_shape(dtype, fw_tol, bw_tol):
    x = make_inputs(0, 2, 4, 4096, 128, 256, dtype=dtype, with_state=True)
    out, _ = outputs_and_grads(_limit_chunk(chunk_size=64, autocast_kernel_dtype=None), x)
    ref_out, _ = reference_outputs_and_grads(x)
    assert_matches_reference(out, None, ref_out, None, fw_tol=fw_tol, bw_tol=bw_tol)
    small = {k: v[:, :, :1024] if v.ndim >= 3 and v.shape[2] == 4096 else v for k, v in x.items()}
    w = make_weights(0, small)
    if dtype == "float32":  # generic loss: exact true derivatives, every input
        out, grads = outputs_and_grads(_limit_chunk(chunk_size=64, autocast_kernel_dtype=None), small, w)
        ref_out, ref_grads = reference_outputs_and_grads(small, w)
        assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=fw_tol, bw_tol=bw_tol)
    assert_normalized_loss_grads_match(_limit_chunk(chunk_size=64, autocast_kernel_dtype=None), small, w["h"], bw_tol)


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [{"limit.fused_bw": 1}, {"limit.chunks_per_program": 4},
                                    {"limit.chunks_per_program": 4, "limit.tma": 1}])
@pytest.mark.parametrize("DHQK, DHHV", [(128, 256), (256, 512)])
def test_gpu_launch_variants_match_the_float64_reference(DHQK, DHHV, launch):
    """The one-kernel backward (limit.fused_bw) and the forward's chunk loop (limit.chunks_per_program, with
    descriptor reads too) at the 16-head and 7B head dims, float32, L = 64: every output and gradient as tight as
    the table's kernels' GPU parity test."""
    x = make_inputs(6, 1, 2, 1024, DHQK, DHHV, with_state=True)
    w = make_weights(6, x)
    cfg = triton_families.config("limit", 64, "float32").with_launch(launch)
    out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=1e-4, bw_tol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [16, 32, 64, 128])
def test_gpu_extreme_gates_stay_finite(chunk_size):
    x = make_inputs(1, 2, 4, 1000, 64, 128, dtype="bfloat16", igate=(-1e4, 1e4), fgate=(-1e4, 1e4), with_state=True)
    w = make_weights(1, x)
    out, grads = outputs_and_grads(_limit_chunk(chunk_size=chunk_size, autocast_kernel_dtype=None), x, w)
    assert np.all(np.isfinite(out[0])) and all(np.all(np.isfinite(s)) for s in out[1])
    assert all(np.all(np.isfinite(g)) for g in grads.values())


@pytest.mark.gpu
def test_gpu_two_compilations_agree_at_the_7b_heads():
    """B8 NH8 S8192 256/512 bf16, the limit-chunk forward with its last states, compiled twice: bit for bit the same
    (a launch sweep on an H100 saw two runs of one configuration differ by 0.11 there)."""
    x = make_inputs(2, 8, 8, 8192, 256, 512, dtype="bfloat16", with_state=True)
    args = {name: jnp.asarray(value) for name, value in x.items()}
    runs = [jax.jit(lambda a, r=r: _limit_chunk(chunk_size=64)(**a))(args) for r in range(2)]
    for got, want in zip(*(jax.tree.leaves(run) for run in runs)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert np.isfinite(np.asarray(got, np.float32)).all()
