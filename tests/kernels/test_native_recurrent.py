"""The documented recurrent module: `recurrent_step_fw`, `recurrent_sequence_fw`, the recurrent backend, and
`xlstm_jax.mlstm(backend="native_recurrent")`, all against the float64 reference."""

import inspect
import types

import jax
import jax.numpy as jnp
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
    outputs_and_grads,
    reference_outputs_and_grads,
)
import xlstm_jax
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend, mLSTMBackend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent import (
    mLSTMBackendRecurrent,
    mLSTMBackendRecurrentConfig,
    recurrent_sequence_fw,
    recurrent_step_fw,
)

STATES = ("c_initial", "n_initial", "m_initial")


def _seq(x):
    return tuple(x[n] for n in "qkvif")


def _states(x):
    return {n: x[n] for n in STATES}


def test_signatures_and_defaults():
    step = inspect.signature(recurrent_step_fw).parameters
    assert list(step) == ["matC_state", "vecN_state", "scaM_state", "vecQ", "vecK", "vecV", "scaI", "scaF", "eps"]
    assert step["eps"].default == 1e-6
    seq = inspect.signature(recurrent_sequence_fw).parameters
    assert list(seq) == ["queries", "keys", "values", "igate_preact", "fgate_preact", "c_initial", "n_initial",
                         "m_initial", "return_last_states", "eps", "state_dtype", "use_scan", "mlstm_step_fn"]
    defaults = {n: p.default for n, p in seq.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {"c_initial": None, "n_initial": None, "m_initial": None, "return_last_states": False,
                        "eps": 1e-6, "state_dtype": None, "use_scan": False, "mlstm_step_fn": recurrent_step_fw}
    config = mLSTMBackendRecurrentConfig()
    assert (config.context_length, config.eps, config.state_dtype, config.use_scan) == (-1, 1e-6, None, False)
    assert issubclass(mLSTMBackendRecurrent, mLSTMBackend)
    assert mLSTMBackendRecurrent.config_class is mLSTMBackendRecurrentConfig
    assert mLSTMBackendRecurrent().can_vmap_over_heads is False
    assert "cannot be vmapped" in mLSTMBackendRecurrent.can_vmap_over_heads.__doc__


def test_step_matches_one_reference_step():
    x = make_inputs(0, 2, 3, 1, 12, 20, with_state=True)
    (rh, (rc, rn, rm)), _ = reference_outputs_and_grads(x)
    h, (c, n, m) = recurrent_step_fw(
        x["c_initial"], x["n_initial"], x["m_initial"][..., None], x["q"][:, :, 0], x["k"][:, :, 0],
        x["v"][:, :, 0], x["i"][:, :, :1], x["f"][:, :, :1])
    assert (h.shape, c.shape, n.shape, m.shape) == ((2, 3, 20), (2, 3, 12, 20), (2, 3, 12), (2, 3, 1))
    assert_rel_close(h, rh[:, :, 0], F32_FW_TOL, "h")
    assert_rel_close(c, rc, F32_FW_TOL, "C")
    assert_rel_close(n, rn, F32_FW_TOL, "n")
    np.testing.assert_allclose(m[..., 0], rm, rtol=1e-6)


@pytest.mark.slow
def test_step_dtypes():
    x = make_inputs(1, 1, 2, 1, 8, 8, with_state=True)
    q, k, v = (jnp.asarray(x[n][:, :, 0]) for n in "qkv")
    i, f = (jnp.asarray(x[n]) for n in "if")  # (B, NH, S=1) is the step's (B, NH, 1)
    c, n, m = (jnp.asarray(x[s]) for s in STATES)
    h, (c1, n1, m1) = recurrent_step_fw(c.astype(jnp.bfloat16), n, m[..., None], q, k, v, i, f)
    assert (h.dtype, c1.dtype, n1.dtype, m1.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32, jnp.float32)
    h, (c1, n1, m1) = recurrent_step_fw(c, n, m[..., None], *(a.astype(jnp.bfloat16) for a in (q, k, v)), i, f)
    assert (h.dtype, c1.dtype, n1.dtype, m1.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32, jnp.float32)
    rounded = {s: np.asarray(a)[:, :, None] for s, a in zip("qkv", (q, k, v))}
    (rh, _), _ = reference_outputs_and_grads(dict(x, **rounded))
    assert_rel_close(h, rh[:, :, 0], BF16_FW_TOL, "bf16 h")


def test_step_shape_errors():
    x = make_inputs(2, 1, 2, 1, 8, 4, with_state=True)
    args = dict(matC_state=x["c_initial"], vecN_state=x["n_initial"], scaM_state=x["m_initial"][..., None],
                vecQ=x["q"][:, :, 0], vecK=x["k"][:, :, 0], vecV=x["v"][:, :, 0], scaI=x["i"], scaF=x["f"])
    recurrent_step_fw(**args)
    with pytest.raises(ValueError, match=r"scaM_state must have shape \(1, 2, 1\).*got \(1, 2\)"):
        recurrent_step_fw(**dict(args, scaM_state=x["m_initial"]))
    with pytest.raises(ValueError, match=r"vecV must have shape \(1, 2, 4\)"):
        recurrent_step_fw(**dict(args, vecV=x["v"][:, :, 0, :3]))
    with pytest.raises(ValueError, match="matC_state must be"):
        recurrent_step_fw(**dict(args, matC_state=x["c_initial"][0]))


@pytest.mark.slow
@pytest.mark.parametrize("with_state", [False, True])
def test_sequence_loop_and_scan_match_reference_and_each_other(with_state):
    x = make_inputs(3, 2, 2, 10, 24, 16, with_state=with_state)
    states = _states(x) if with_state else {}
    ref_out, _ = reference_outputs_and_grads(x)
    loop = recurrent_sequence_fw(*_seq(x), **states, return_last_states=True)
    scan = recurrent_sequence_fw(*_seq(x), **states, return_last_states=True, use_scan=True)
    assert_matches_reference(loop, None, ref_out, None, fw_tol=F32_FW_TOL, bw_tol=F32_BW_TOL)
    for name, a, b in zip(("h", "C", "n", "m"), jax.tree.leaves(loop), jax.tree.leaves(scan)):
        assert_rel_close(a, b, 1e-6, f"loop vs scan {name}")
    h4 = recurrent_sequence_fw(*_seq(x)[:3], x["i"][..., None], x["f"][..., None], **states, use_scan=True)
    np.testing.assert_array_equal(h4, scan[0])


@pytest.mark.slow
def test_sequence_length_one_is_one_step():
    x = make_inputs(4, 2, 2, 6, 8, 12, with_state=True)
    first = {n: a[:, :, :1] for n, a in x.items() if n not in STATES}
    h, (c, n, m) = recurrent_sequence_fw(*_seq(first), **_states(x), return_last_states=True)
    assert (h.shape, m.shape) == ((2, 2, 1, 12), (2, 2))
    h6, _ = recurrent_sequence_fw(*_seq(x), **_states(x), return_last_states=True, use_scan=True)
    np.testing.assert_allclose(h[:, :, 0], h6[:, :, 0], rtol=1e-6, atol=1e-7)
    assert_matches_reference((h, (c, n, m)), None, reference_outputs_and_grads(dict(first, **_states(x)))[0], None,
                             fw_tol=F32_FW_TOL, bw_tol=F32_BW_TOL)


@pytest.mark.slow
def test_sequence_state_dtype_rules():
    x = make_inputs(5, 1, 2, 3, 8, 8, with_state=True)
    f16 = {n: x[n].astype(np.float16) for n in "if"}
    _, states = recurrent_sequence_fw(*_seq(dict(x, **f16)), return_last_states=True)
    assert [s.dtype for s in states] == [jnp.float16] * 3, "zero states take the forget gate's dtype"
    _, states = recurrent_sequence_fw(*_seq(dict(x, **f16)), return_last_states=True, state_dtype="float32")
    assert [s.dtype for s in states] == [jnp.float32] * 3
    bf16_states = {n: jnp.asarray(x[n], jnp.bfloat16) for n in STATES}
    mixed = dict(bf16_states, m_initial=jnp.asarray(x["m_initial"]))
    _, states = recurrent_sequence_fw(*_seq(x), **mixed, return_last_states=True)
    assert [s.dtype for s in states] == [jnp.bfloat16, jnp.bfloat16, jnp.float32], "initial dtypes are kept"
    h32, states = recurrent_sequence_fw(*_seq(x), **bf16_states, return_last_states=True, state_dtype=jnp.float32)
    assert [s.dtype for s in states] == [jnp.bfloat16] * 3, "returned states are cast back to the initial dtypes"
    rounded = {n: np.asarray(a, np.float32) for n, a in bf16_states.items()}
    (rh, _), _ = reference_outputs_and_grads(dict(x, **rounded))
    assert_rel_close(h32, rh, F32_FW_TOL, "h with float32 states from bf16 initial states")
    with pytest.raises(TypeError, match="state_dtype must be a floating dtype"):
        recurrent_sequence_fw(*_seq(x), state_dtype="int32")


def test_sequence_errors():
    x = make_inputs(6, 1, 2, 3, 8, 8, with_state=True)
    with pytest.raises(ValueError, match="missing n_initial, m_initial"):
        recurrent_sequence_fw(*_seq(x), c_initial=x["c_initial"])
    with pytest.raises(ValueError, match=r"m_initial must have shape \(1, 2\), got shape \(1, 2, 1\)"):
        recurrent_sequence_fw(*_seq(x), **dict(_states(x), m_initial=x["m_initial"][..., None]))
    with pytest.raises(ValueError, match=r"i must have shape \(B, NH, S\)"):
        recurrent_sequence_fw(*_seq(x)[:3], x["i"][:, :, :2], x["f"])


def test_custom_step_fn_gets_keyword_arguments():
    x = make_inputs(7, 1, 2, 4, 8, 8)
    calls = []

    def step(*, matC_state, vecN_state, scaM_state, vecQ, vecK, vecV, scaI, scaF, eps):
        calls.append(eps)
        return recurrent_step_fw(matC_state, vecN_state, scaM_state, vecQ, vecK, vecV, scaI, scaF, eps=eps)

    h = recurrent_sequence_fw(*_seq(x), eps=1e-5, mlstm_step_fn=step)
    assert calls == [1e-5] * 4
    np.testing.assert_array_equal(h, recurrent_sequence_fw(*_seq(x), eps=1e-5))


@pytest.mark.slow
def test_sequence_loop_gradients_match_reference():
    x = make_inputs(8, 1, 2, 4, 8, 12, with_state=True)
    w = make_weights(8, x)

    def fn(**a):
        return recurrent_sequence_fw(*_seq(a), **_states(a), return_last_states=True)

    out, grads = outputs_and_grads(fn, x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w)
    assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=F32_FW_TOL, bw_tol=F32_BW_TOL)


# ---- the backend ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_backend_factory_config_and_call():
    backend = create_mlstm_backend("recurrent", use_scan=True, eps=TINY_EPS, state_dtype="float32")
    assert isinstance(backend, mLSTMBackendRecurrent)
    assert (backend.config.use_scan, backend.config.eps, backend.config.state_dtype) == (True, TINY_EPS, "float32")
    built = create_mlstm_backend("recurrent", model_config=types.SimpleNamespace(context_length=64))
    assert built.config.context_length == 64
    with pytest.raises(ValueError, match="chunk_size"):
        create_mlstm_backend("recurrent", chunk_size=16)
    x = make_inputs(9, 2, 2, 12, 16, 8, with_state=True)
    bf16_states = {n: jnp.asarray(x[n], jnp.bfloat16) for n in STATES}
    h, states = backend(*_seq(x), **bf16_states, return_last_states=True)
    assert [s.dtype for s in states] == [jnp.bfloat16] * 3
    rounded = {n: np.asarray(a, np.float32) for n, a in bf16_states.items()}
    (rh, _), _ = reference_outputs_and_grads(dict(x, **rounded), eps=0.0)
    assert_rel_close(h, rh, F32_FW_TOL, "h")
    h_only = backend(*_seq(x)[:3], x["i"][..., None], x["f"][..., None], **bf16_states)
    np.testing.assert_array_equal(h_only, h)


# ---- xlstm_jax.mlstm(backend="native_recurrent") -------------------------------------------------------------

@pytest.mark.slow
def test_unified_prefill_then_step_decoding():
    """States are interchangeable: a native_parallel prefill continued by recurrent steps equals one pass."""
    x = make_inputs(16, 2, 2, 20, 16, 16)
    ref_out, _ = reference_outputs_and_grads(x)
    prefill = {n: a[:, :, :15] for n, a in x.items()}
    h1, states = xlstm_jax.mlstm(*_seq(prefill), backend="native_parallel", return_last_states=True)
    hs = [h1]
    for t in range(15, 20):
        step = {n: a[:, :, t:t + 1] for n, a in x.items()}
        h_t, states = xlstm_jax.mlstm(*_seq(step), backend="native_recurrent", return_last_states=True,
                                      **dict(zip(STATES, states)))
        hs.append(h_t)
    assert_matches_reference((jnp.concatenate(hs, axis=2), states), None, ref_out, None, fw_tol=F32_FW_TOL,
                             bw_tol=F32_BW_TOL)
