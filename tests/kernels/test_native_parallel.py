"""The documented parallel module: `parallel_stabilized_simple`, the parallel backend, and
`xlstm_jax.mlstm(backend="native_parallel")`, all against the float64 reference."""

import inspect
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.support.helpers import (
    BF16_FW_TOL,
    F32_BW_TOL,
    F32_FW_TOL,
    TINY_EPS,
    assert_matches_reference,
    assert_rel_close,
    make_inputs,
    make_weights,
    reference_outputs_and_grads,
)
import xlstm_jax
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend, mLSTMBackend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.simple import (
    mLSTMBackendParallel,
    mLSTMBackendParallelConfig,
    parallel_stabilized_simple,
)


def _gates4(x):
    return x["i"][..., None], x["f"][..., None]


def _simple(x, **kwargs):
    return parallel_stabilized_simple(x["q"], x["k"], x["v"], *_gates4(x), **kwargs)


def _ref_h(x, eps=1e-6):
    return reference_outputs_and_grads(x, eps=eps)[0][0]


def test_signature_and_defaults():
    params = inspect.signature(parallel_stabilized_simple).parameters
    assert list(params) == ["queries", "keys", "values", "igate_preact", "fgate_preact", "lower_triangular_matrix",
                            "stabilize_rowwise", "eps", "qkv_dtype", "gate_dtype"]
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {"lower_triangular_matrix": None, "stabilize_rowwise": True, "eps": 1e-6, "qkv_dtype": None,
                        "gate_dtype": None}
    assert mLSTMBackendParallelConfig().context_length == -1
    assert issubclass(mLSTMBackendParallel, mLSTMBackend)
    assert mLSTMBackendParallel.config_class is mLSTMBackendParallelConfig
    assert mLSTMBackendParallel().can_vmap_over_heads is True
    assert "independent of the heads dimension" in mLSTMBackendParallel.can_vmap_over_heads.__doc__


@pytest.mark.slow
@pytest.mark.parametrize("S, DHQK, DHHV", [(37, 24, 48), (1, 8, 8), (64, 48, 16)])
def test_4d_matches_reference(S, DHQK, DHHV):
    x = make_inputs(S, 2, 2, S, DHQK, DHHV)
    h = _simple(x)
    assert h.shape == (2, 2, S, DHHV) and h.dtype == jnp.float32
    assert_rel_close(h, _ref_h(x), F32_FW_TOL, "h")


@pytest.mark.slow
def test_per_head_3d_vmap_over_heads_and_extra_leading_dims():
    x = make_inputs(1, 2, 3, 20, 16, 24)
    h4 = np.asarray(_simple(x))
    for head in range(3):
        h3 = parallel_stabilized_simple(*(x[n][:, head] for n in "qkv"), *(g[:, head] for g in _gates4(x)))
        assert_rel_close(h3, h4[:, head], 1e-6, f"head {head}")
    vmapped = jax.vmap(parallel_stabilized_simple, in_axes=1, out_axes=1)(*(x[n] for n in "qkv"), *_gates4(x))
    assert_rel_close(vmapped, h4, 1e-6, "vmapped")
    h5 = parallel_stabilized_simple(*(x[n][None] for n in "qkv"), *(g[None] for g in _gates4(x)))
    assert_rel_close(h5[0], h4, 1e-6, "5-D")


@pytest.mark.slow
def test_mask_larger_than_S_uses_its_leading_block():
    x = make_inputs(2, 2, 2, 21, 16, 16)
    h = np.asarray(_simple(x))
    mask = np.tril(np.ones((40, 40), bool))
    np.testing.assert_allclose(_simple(x, lower_triangular_matrix=mask), h, rtol=1e-6, atol=1e-7)
    # dropping key 0 from every row equals an input gate of -inf at step 0 (for the rows that keep a key)
    mask[:, 0] = False
    dropped = np.asarray(_simple(x, lower_triangular_matrix=mask))
    y = dict(x, i=x["i"].copy())
    y["i"][:, :, 0] = -1e30
    np.testing.assert_allclose(dropped[:, :, 1:], np.asarray(_simple(y))[:, :, 1:], rtol=1e-6, atol=1e-7)
    assert np.abs(dropped[:, :, 1:] - h[:, :, 1:]).max() > 1e-2


def test_mask_errors():
    x = make_inputs(0, 1, 1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"at least \(8, 8\).*\(7, 7\)"):
        _simple(x, lower_triangular_matrix=np.tril(np.ones((7, 7), bool)))
    with pytest.raises(ValueError, match="lower_triangular_matrix"):
        _simple(x, lower_triangular_matrix=np.ones(8, bool))
    with pytest.raises(TypeError, match="lower_triangular_matrix must be boolean.*float32"):
        _simple(x, lower_triangular_matrix=np.tril(np.ones((8, 8), np.float32)))


@pytest.mark.slow
def test_global_and_rowwise_stabilization():
    x = make_inputs(3, 2, 2, 30, 16, 16)
    rh0 = _ref_h(x, eps=0.0)
    assert_rel_close(_simple(x, eps=TINY_EPS, stabilize_rowwise=False), rh0, F32_FW_TOL, "global h")
    assert_rel_close(_simple(x, eps=TINY_EPS, stabilize_rowwise=True), rh0, F32_FW_TOL, "rowwise h")
    # the global max is per leading index: a huge input gate in head 0 must not underflow head 1
    y = dict(x, i=x["i"].copy())
    y["i"][:, 0] += 200.0
    h = np.asarray(_simple(y, eps=TINY_EPS, stabilize_rowwise=False))
    assert_rel_close(h[:, 1], rh0[:, 1], F32_FW_TOL, "head 1 h")


@pytest.mark.slow
def test_gradients_match_reference():
    """With eps = 0 the parallel and recurrent stabilizers give the same function, so autodiff of the simple form
    equals the reference gradient of the h-part of the generic loss."""
    x = make_inputs(5, 2, 2, 19, 24, 16)
    w = make_weights(5, x)
    w0 = dict(w, C=0 * w["C"], n=0 * w["n"], m=0 * w["m"])
    _, rgrads = reference_outputs_and_grads(x, w0, eps=0.0)

    def loss(args):
        q, k, v, i, f = args
        return jnp.sum(w["h"] * parallel_stabilized_simple(q, k, v, i[..., None], f[..., None], eps=TINY_EPS))

    grads = jax.jit(jax.grad(loss))(tuple(jnp.asarray(x[n]) for n in "qkvif"))
    for name, g in zip("qkvif", grads):
        assert_rel_close(g, rgrads[name], F32_BW_TOL, f"d{name}")


@pytest.mark.slow
def test_dtype_arguments():
    x = make_inputs(6, 1, 2, 12, 8, 8)
    mixed = dict(x, k=x["k"].astype(ml_dtypes.bfloat16))
    with pytest.raises(TypeError, match=r"qkv_dtype is None.*keys bfloat16"):
        _simple(mixed)
    h = _simple(mixed, qkv_dtype=jnp.float32)
    assert h.dtype == jnp.float32
    rounded = dict(x, k=mixed["k"].astype(np.float32))
    np.testing.assert_allclose(h, _simple(rounded), rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match=r"gate_dtype is None.*fgate_preact float16"):
        parallel_stabilized_simple(x["q"], x["k"], x["v"], x["i"][..., None], x["f"][..., None].astype(np.float16))
    gate_cast = _simple(x, gate_dtype="bfloat16")
    bf16_gates = {n: x[n].astype(ml_dtypes.bfloat16).astype(np.float32) for n in "if"}
    np.testing.assert_array_equal(gate_cast, _simple(dict(x, **bf16_gates)))
    with pytest.raises(TypeError, match="qkv_dtype must be a floating dtype"):
        _simple(x, qkv_dtype=jnp.int32)


@pytest.mark.slow
def test_bfloat16_inputs():
    x = make_inputs(7, 2, 2, 33, 16, 32, dtype="bfloat16")
    h = _simple(x)
    assert h.dtype == jnp.bfloat16
    assert_rel_close(h, _ref_h(x), BF16_FW_TOL, "bf16 h")


def test_shape_errors_name_the_argument():
    x = make_inputs(0, 1, 2, 8, 4, 6)
    with pytest.raises(ValueError, match=r"keys must have the shape of queries \(1, 2, 8, 4\)"):
        parallel_stabilized_simple(x["q"], x["k"][:, :, :7], x["v"], *_gates4(x))
    with pytest.raises(ValueError, match=r"values must have shape"):
        parallel_stabilized_simple(x["q"], x["k"], x["v"][:, :1], *_gates4(x))
    with pytest.raises(ValueError, match=r"igate_preact must have shape \(\.\.\., S, 1\) = \(1, 2, 8, 1\)"):
        parallel_stabilized_simple(x["q"], x["k"], x["v"], x["i"], x["f"][..., None])
    with pytest.raises(ValueError, match="queries must be"):
        parallel_stabilized_simple(x["q"][0, 0, 0], x["k"], x["v"], *_gates4(x))


# ---- the backend ----------------------------------------------------------------------------------------


def test_backend_factory_and_config():
    backend = create_mlstm_backend("parallel_stabilized", context_length=16)
    assert isinstance(backend, mLSTMBackendParallel) and backend.config.context_length == 16
    built = create_mlstm_backend("parallel_stabilized", model_config=types.SimpleNamespace(context_length=48))
    assert built.config.context_length == 48
    config = mLSTMBackendParallelConfig(context_length=5)
    config.assign_model_config_params(types.SimpleNamespace(hidden=3))
    assert config.context_length == 5
    with pytest.raises(ValueError, match="stabilize_rowwise"):
        create_mlstm_backend("parallel_stabilized", stabilize_rowwise=False)


@pytest.mark.slow
def test_backend_context_length():
    x = make_inputs(8, 2, 2, 17, 8, 12)
    backend = create_mlstm_backend("parallel_stabilized", context_length=16)
    full = {n: a[:, :, :16] for n, a in x.items()}
    h = backend(*(full[n] for n in "qkvif"))
    assert_rel_close(h, _ref_h(full), F32_FW_TOL, "S == context_length")
    short = backend(*(full[n][:, :, :9] for n in "qkvif"))  # causal: a prefix gives the prefix of h
    assert_rel_close(short, np.asarray(h)[:, :, :9], 1e-6, "S < context_length")
    with pytest.raises(ValueError, match="S=17 exceeds.*context_length=16"):
        backend(*(x[n] for n in "qkvif"))
    longer = create_mlstm_backend("parallel_stabilized")(*(x[n] for n in "qkvif"))
    assert longer.shape == (2, 2, 17, 12)
    assert_rel_close(np.asarray(longer)[:, :, :16], h, 1e-6, "context_length -1")


@pytest.mark.slow
def test_backend_vmapped_over_heads_with_and_without_states():
    """The layer's way (the xlstm-jax model layer's `run_backend`): (B, S, NH, ·) tensors vmapped over axis 2, states
    over axis 1."""
    x = make_inputs(9, 2, 3, 14, 16, 8, with_state=True)
    backend = create_mlstm_backend("parallel_stabilized", context_length=32)
    bsnd = {n: np.moveaxis(x[n], 1, 2) for n in "qkv"}
    gates = {n: np.moveaxis(x[n], 1, 2)[..., None] for n in "if"}
    h = jax.vmap(backend, in_axes=2, out_axes=2)(*(bsnd[n] for n in "qkv"), gates["i"], gates["f"])
    (rh, rstates), _ = reference_outputs_and_grads(x)
    rh0 = _ref_h({n: x[n] for n in "qkvif"})
    assert_rel_close(np.moveaxis(np.asarray(h), 2, 1), rh0, F32_FW_TOL, "vmapped h")

    def cached(q, k, v, i, f, c, n, m):
        return backend(q, k, v, i, f, c, n, m, return_last_states=True)

    in_axes, out_axes = (2, 2, 2, 2, 2, 1, 1, 1), (2, (1, 1, 1))
    h, states = jax.vmap(cached, in_axes=in_axes, out_axes=out_axes)(
        *(bsnd[n] for n in "qkv"), gates["i"], gates["f"], x["c_initial"], x["n_initial"], x["m_initial"])
    assert_matches_reference((np.moveaxis(np.asarray(h), 2, 1), states), None, (rh, rstates), None,
                             fw_tol=F32_FW_TOL, bw_tol=F32_BW_TOL)


@pytest.mark.slow
def test_backend_4d_states_and_gate_layouts():
    x = make_inputs(9, 2, 3, 14, 16, 8, with_state=True)  # the shapes of the test above: reference compiled once
    backend = create_mlstm_backend("parallel_stabilized")
    ref_out, _ = reference_outputs_and_grads(x)
    out = backend(*(x[n] for n in ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")),
                  return_last_states=True)
    assert_matches_reference(out, None, ref_out, None, fw_tol=F32_FW_TOL, bw_tol=F32_BW_TOL)
    h_only = backend(*(x[n] for n in ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")))
    np.testing.assert_allclose(h_only, out[0], rtol=1e-6, atol=1e-7)
    no_state = {n: x[n] for n in "qkvif"}
    h, (c, n, m) = backend(*(no_state[n] for n in "qkvif"), return_last_states=True)
    assert_matches_reference((h, (c, n, m)), None, reference_outputs_and_grads(no_state)[0], None,
                             fw_tol=F32_FW_TOL, bw_tol=F32_BW_TOL)
    np.testing.assert_allclose(backend(*(no_state[n] for n in "qkvif")), h, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="missing n_initial, m_initial"):
        backend(*(x[n] for n in "qkvif"), c_initial=x["c_initial"])
    with pytest.raises(ValueError, match=r"so k must be per-head \(B, S, ·\) too, got shape \(2, 3, 14, 16\)"):
        backend(x["q"][:, 0], *(x[n] for n in ("k", "v", "i", "f", "c_initial", "n_initial", "m_initial")))
    with pytest.raises(ValueError, match=r"q must be \(B, NH, S, DHQK\) or per-head"):
        backend(x["q"][0, 0], x["k"][0, 0], x["v"][0, 0], x["i"][0, 0], x["f"][0, 0])


# ---- xlstm_jax.mlstm(backend="native_parallel") --------------------------------------------------------------

def test_unified_refuses_chunk_size():
    x = make_inputs(0, 1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="does not take a chunk_size"):
        xlstm_jax.mlstm(*(x[n] for n in "qkvif"), backend="native_parallel", chunk_size=16)
