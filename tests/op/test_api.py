"""The unified `xlstm_jax.mlstm` contract: bad input is refused before any backend code runs, with an error that
names the argument; backend names and chunk sizes are checked; `auto` resolves; the backend registry/factory."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.support.backend_cases import BACKENDS, CHUNKED_BACKENDS, default_chunk, skip_unless_runnable
from tests.support.devices import python_path
from tests.support.helpers import (
    DOCTOR_FW_TOL,
    assert_rel_close,
    make_inputs,
    native_chunkwise,
    reference_outputs_and_grads,
    xl_chunk,
)
from xlstm_jax.kernels.mlstm_chunkwise.triton_stablef.triton_fwbw import mlstm_chunkwise_triton_stablef
from xlstm_jax.mlstm import IMPLEMENTATIONS, api, mlstm, resolve_backend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import (
    create_mlstm_backend,
    mLSTMBackendNameAndKwargs,
    registered_backends,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent import recurrent_sequence_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.simple import parallel_stabilized_simple

B, NH, S, DHQK, DHHV = 2, 2, 8, 16, 24


def _inputs():
    return make_inputs(0, B, NH, S, DHQK, DHHV, with_state=True)


def _drop(*names):
    return lambda x: {n: a for n, a in x.items() if n not in names}


def _set(name, fn):
    return lambda x: {**x, name: fn(x[name])}


# (id, mutation of the inputs, exception type, substrings the message must contain)
BAD_INPUTS = [
    ("q_rank3", _set("q", lambda a: a[0]), ValueError, ["q", "(2, 8, 16)"]),
    ("k_batch", _set("k", lambda a: a[:1]), ValueError, ["k", "(1, 2, 8, 16)"]),
    ("k_headdim", _set("k", lambda a: a[..., :8]), ValueError, ["k", "(2, 2, 8, 8)"]),
    ("v_heads", _set("v", lambda a: a[:, :1]), ValueError, ["v", "(2, 1, 8, 24)"]),
    ("v_seq", _set("v", lambda a: a[:, :, :7]), ValueError, ["v", "(2, 2, 7, 24)"]),
    ("v_rank5", _set("v", lambda a: a[None]), ValueError, ["v", "(1, 2, 2, 8, 24)"]),
    ("i_seq", _set("i", lambda a: a[..., :7]), ValueError, ["i", "(2, 2, 7)"]),
    ("f_rank2", _set("f", lambda a: a[0]), ValueError, ["f", "(2, 8)"]),
    ("f_rank5", _set("f", lambda a: a[..., None, None]), ValueError, ["f", "(2, 2, 8, 1, 1)"]),
    ("q_int", _set("q", lambda a: a.astype(np.int32)), TypeError, ["q", "int32"]),
    ("v_bool", _set("v", lambda a: a > 0), TypeError, ["v", "bool"]),
    ("i_int", _set("i", lambda a: a.astype(np.int32)), TypeError, ["i", "int32"]),
    ("qkv_mixed", _set("k", lambda a: a.astype(np.float16)), TypeError, ["q, k and v", "float16", "float32"]),
    ("only_c", _drop("n_initial", "m_initial"), ValueError, ["n_initial", "m_initial", "all three"]),
    ("no_n", _drop("n_initial"), ValueError, ["n_initial"]),
    ("c_transposed", _set("c_initial", lambda a: a.swapaxes(-1, -2)), ValueError, ["c_initial", "(2, 2, 24, 16)"]),
    ("n_wrong", _set("n_initial", lambda a: np.zeros((B, NH, DHHV), a.dtype)), ValueError, ["n_initial", "(2, 2, 24)"]),
    ("m_extra_axis", _set("m_initial", lambda a: a[..., None]), ValueError, ["m_initial", "(2, 2, 1)"]),
    ("c_int", _set("c_initial", lambda a: a.astype(np.int32)), TypeError, ["c_initial", "int32"]),
    ("empty_seq", lambda x: {**x, **{n: x[n][:, :, :0] for n in "qkvif"}}, ValueError, [">= 1", "(2, 2, 0, 16)"]),
    ("q_list", _set("q", lambda a: a.tolist()), TypeError, ["q must be an array", "list"]),
    ("f_list", _set("f", lambda a: a.tolist()), TypeError, ["f must be an array", "list"]),
    ("m_tuple", _set("m_initial", lambda a: tuple(a.tolist())), TypeError, ["m_initial must be an array", "tuple"]),
]


@pytest.fixture
def no_backend_reached(monkeypatch):
    """Make reaching any backend implementation a test failure: input checks must fire first."""

    for name, impl in api.IMPLEMENTATIONS.items():
        def reached(x, o, chunk_size, tuning, name=name):
            raise AssertionError(f"{name} was reached with bad input")

        monkeypatch.setitem(api.IMPLEMENTATIONS, name, dataclasses.replace(impl, run=reached))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_before_the_backend(case, backend, no_backend_reached):
    _, mutate, exc_type, needles = case
    x = mutate(_inputs())
    with pytest.raises(exc_type) as info:
        mlstm(**x, backend=backend)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize("case", BAD_INPUTS[:4] + BAD_INPUTS[9:10] + BAD_INPUTS[13:14] + BAD_INPUTS[-3:],
                         ids=lambda c: c[0])
def test_bad_input_is_refused_by_registry_backends(case):
    _, mutate, exc_type, needles = case
    x = mutate(_inputs())
    for name in registered_backends():
        backend = create_mlstm_backend(name)
        with pytest.raises(exc_type) as info:
            backend(x["q"], x["k"], x["v"], x["i"], x["f"], x.get("c_initial"), x.get("n_initial"), x.get("m_initial"))
        assert needles[0] in str(info.value), (name, str(info.value))


def test_a_list_gets_a_short_message(no_backend_reached):
    x = _inputs()
    with pytest.raises(TypeError) as info:
        mlstm(x["q"].tolist(), x["k"], x["v"], x["i"], x["f"])
    assert len(str(info.value)) < 120, str(info.value)


BAD_EPS = [0.0, -1e-6, float("nan"), float("inf"), True, "1e-6", None]


@pytest.mark.parametrize("eps", BAD_EPS, ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_must_be_a_positive_finite_float(backend, eps, no_backend_reached):
    with pytest.raises((TypeError, ValueError), match="eps must be a positive finite float"):
        mlstm(**_inputs(), backend=backend, eps=eps)


@pytest.mark.parametrize("eps", BAD_EPS, ids=repr)
def test_eps_is_checked_by_the_seed_functions_and_backends(eps):
    x = _inputs()
    qkvif = [x[n] for n in "qkvif"]
    gates = [x["q"], x["k"], x["v"], x["i"][..., None], x["f"][..., None]]
    calls = [
        lambda: parallel_stabilized_simple(*gates, eps=eps),
        lambda: recurrent_sequence_fw(*qkvif, eps=eps),
        lambda: native_chunkwise(*qkvif, eps=eps),
        lambda: mlstm_chunkwise_triton_stablef(*qkvif, eps=eps, chunk_size=16),
        lambda: xl_chunk(*qkvif, eps=eps, chunk_size=16),
        lambda: create_mlstm_backend("recurrent", eps=eps)(*qkvif),
        lambda: create_mlstm_backend("triton_kernels", eps=eps, chunk_size=16)(*qkvif),
    ]
    for call in calls:
        with pytest.raises((TypeError, ValueError), match="eps must be a positive finite float"):
            call()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_compute_as_float32_while_64_bit_jax_is_off(backend):
    """Under 32-bit JAX a float64 numpy array is a float32 array (JAX's rule), on every backend alike."""
    skip_unless_runnable(backend)
    x = _inputs()
    run = functools.partial(mlstm, backend=backend, chunk_size=default_chunk(backend), return_last_states=True)
    h, states = run(**{n: a.astype(np.float64) for n, a in x.items()})
    h32, states32 = run(**x)
    assert h.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h32))
    for s, s32 in zip(states, states32):
        np.testing.assert_array_equal(np.asarray(s), np.asarray(s32))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_under_64_bit_jax_name_q_and_what_to_pass(backend):
    """Under 64-bit JAX float64 q, k, v are refused before any backend runs, on every backend alike, unless the
    caller asks for a compute dtype; then they are computed in it under the precision contract (h in q's dtype)."""
    skip_unless_runnable(backend)
    x = _inputs()
    h32 = mlstm(**x, backend=backend, chunk_size=default_chunk(backend))
    with jax.enable_x64(True):
        x64 = {n: jax.numpy.asarray(a, np.float64) for n, a in x.items()}
        with pytest.raises(TypeError, match=r"q has dtype float64.*float32.*autocast_dtype='float32'"):
            mlstm(**x64, backend=backend, chunk_size=default_chunk(backend))
        h = mlstm(**x64, backend=backend, chunk_size=default_chunk(backend), autocast_dtype="float32")
        assert h.dtype == np.float64
    np.testing.assert_allclose(np.asarray(h), np.asarray(h32), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_triton_interpreter_whatever_was_imported_first():
    """triton.language imported before xlstm_jax, and the interpreter switched on only after xlstm_jax was
    imported: the Triton backends still run in the interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLSTM_JAX_TRITON_INTERPRET", "TRITON_INTERPRET")}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "triton_import_order.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True,
                            env={**env, "PYTHONPATH": python_path()}, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_with_trailing_unit_axis_are_accepted(backend):
    skip_unless_runnable(backend)
    x = make_inputs(1, 1, 2, 20, 16, 16)
    chunk = 16 if backend in CHUNKED_BACKENDS else None
    run = jax.jit(functools.partial(mlstm, backend=backend, chunk_size=chunk))
    h3 = run(x["q"], x["k"], x["v"], x["i"], x["f"])
    h4 = run(x["q"], x["k"], x["v"], x["i"][..., None], x["f"][..., None])
    np.testing.assert_array_equal(np.asarray(h3), np.asarray(h4))


@pytest.mark.parametrize("backend", CHUNKED_BACKENDS)
@pytest.mark.parametrize("chunk_size", [48, 8, 0, -16, 24, 16.0, "64", True])
def test_bad_chunk_size(backend, chunk_size, no_backend_reached):
    skip_unless_runnable(backend)
    x = make_inputs(0, 1, 1, 20, 16, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm(x["q"], x["k"], x["v"], x["i"], x["f"], backend=backend, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", CHUNKED_BACKENDS)
def test_chunk_size_above_the_backend_maximum(backend, no_backend_reached):
    skip_unless_runnable(backend)
    x = make_inputs(0, 1, 1, 20, 16, 16)
    too_big = 2 * IMPLEMENTATIONS[backend].chunk_sizes[1]
    with pytest.raises(ValueError, match=f"chunk_size.*{too_big}"):
        mlstm(x["q"], x["k"], x["v"], x["i"], x["f"], backend=backend, chunk_size=too_big)


@pytest.mark.parametrize("backend", [n for n in BACKENDS if n not in CHUNKED_BACKENDS])
def test_chunk_size_for_a_non_chunked_backend(backend, no_backend_reached):
    x = _inputs()
    with pytest.raises(ValueError, match=f"{backend}.*chunk_size"):
        mlstm(**x, backend=backend, chunk_size=16)


@pytest.mark.parametrize("name", ["chunkwise", "Native_Parallel", "", "triton_xl_chunk_typo"])
def test_unknown_backend_name(name, no_backend_reached):
    with pytest.raises(ValueError, match="unknown mLSTM backend") as info:
        mlstm(**_inputs(), backend=name)
    for known in IMPLEMENTATIONS:
        assert known in str(info.value)


def test_auto_is_native_chunkwise_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("auto picks a Triton family on a GPU")
    assert resolve_backend("auto") == "native_chunkwise"
    # short sequences run step by step, unless a chunk size is asked for
    assert resolve_backend("auto", seq_len=1) == "native_recurrent" and resolve_backend("auto", 64, 1) != \
        "native_recurrent" and resolve_backend("auto", seq_len=2) == "native_chunkwise"
    x = make_inputs(2, 1, 2, 20, 16, 16, with_state=True)
    auto = jax.jit(functools.partial(mlstm, return_last_states=True))(**x)
    chunkwise = jax.jit(functools.partial(mlstm, backend="native_chunkwise", return_last_states=True))(**x)
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(chunkwise)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_auto_on_a_gpu_picks_the_triton_family_for_the_chunk_size(monkeypatch):
    monkeypatch.setattr(api, "triton_status", lambda: (True, "jax-triton on CUDA"))
    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    assert resolve_backend("auto") == resolve_backend("auto", 64) == "triton_limit_chunk"
    assert resolve_backend("auto", 128) == "triton_limit_chunk"
    assert resolve_backend("auto", 256) == resolve_backend("auto", 2048) == "triton_xl_chunk"


def test_triton_backend_without_gpu_or_interpreter_names_the_native_backends(monkeypatch):
    if jax.default_backend() == "gpu":
        pytest.skip("Triton runs on the GPU here")
    from xlstm_jax.kernels.launch import INTERPRET_ENV

    monkeypatch.setenv(INTERPRET_ENV, "0")
    for name, impl in IMPLEMENTATIONS.items():
        if impl.needs_triton:
            with pytest.raises(RuntimeError, match="native_chunkwise"):
                resolve_backend(name)


@pytest.mark.slow
def test_return_values_and_dtypes():
    x = make_inputs(3, 1, 2, 20, 16, 24, dtype="bfloat16")
    run = jax.jit(mlstm, static_argnames=("backend", "chunk_size", "return_last_states"))
    h = run(x["q"], x["k"], x["v"], x["i"], x["f"], backend="native_chunkwise", chunk_size=16)
    assert h.shape == (1, 2, 20, 24) and h.dtype == x["q"].dtype
    h, (c, n, m) = run(x["q"], x["k"], x["v"], x["i"], x["f"], backend="native_chunkwise", return_last_states=True)
    assert h.dtype == x["q"].dtype
    assert (c.shape, n.shape, m.shape) == ((1, 2, 16, 24), (1, 2, 16), (1, 2))
    assert c.dtype == n.dtype == m.dtype == np.float32


# ---- backend registry and factory -------------------------------------------------------------------------


def test_registry_lists_the_seed_backends():
    names = set(registered_backends())
    assert {"parallel_stabilized", "recurrent", "chunkwise", "triton_kernels"} <= names


def test_factory_unknown_name():
    with pytest.raises(ValueError, match="unknown mLSTM backend 'nope'") as info:
        create_mlstm_backend("nope")
    assert "parallel_stabilized" in str(info.value)


@pytest.mark.parametrize("name", ["parallel_stabilized", "recurrent", "chunkwise", "triton_kernels"])
def test_factory_unknown_config_key(name):
    with pytest.raises(ValueError, match="not_a_field"):
        create_mlstm_backend(name, not_a_field=1)


def test_factory_builds_from_name_and_kwargs_and_from_a_config():
    triton = registered_backends()["triton_kernels"]
    built = create_mlstm_backend(mLSTMBackendNameAndKwargs("triton_kernels", {"chunk_size": 32}))
    assert isinstance(built, triton) and built.config.chunk_size == 32
    config = triton.config_class(chunk_size=16, eps=1e-5)
    assert create_mlstm_backend(mLSTMBackendNameAndKwargs("triton_kernels", config)).config is config
    with pytest.raises(ValueError, match="not both"):
        create_mlstm_backend(mLSTMBackendNameAndKwargs("triton_kernels", {}), chunk_size=16)
    with pytest.raises(TypeError, match="mLSTMBackendTritonConfig"):
        triton(dataclasses.make_dataclass("Other", [])())
    with pytest.raises(ValueError, match="backend_name"):
        create_mlstm_backend("triton_kernels", backend_name="max_triton_v9")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["parallel_stabilized", "recurrent", "chunkwise", "triton_kernels"])
def test_factory_backends_match_the_reference(name):
    if name == "triton_kernels":
        skip_unless_runnable("triton_limit_chunk")
    kwargs = {"chunk_size": 16} if name in ("chunkwise", "triton_kernels") else {}
    backend = create_mlstm_backend(name, **kwargs)
    x = make_inputs(4, 2, 2, 20, 16, 32, with_state=True)
    h, (c, n, m) = backend(
        x["q"], x["k"], x["v"], x["i"][..., None], x["f"][..., None],
        x["c_initial"], x["n_initial"], x["m_initial"], return_last_states=True,
    )
    (rh, (rc, rn, rm)), _ = reference_outputs_and_grads(x)
    assert_rel_close(h, rh, DOCTOR_FW_TOL, f"{name} h")
    assert_rel_close(c, rc, DOCTOR_FW_TOL, f"{name} C")
    assert_rel_close(n, rn, DOCTOR_FW_TOL, f"{name} n")
    np.testing.assert_allclose(np.asarray(m), rm, atol=1e-5)
