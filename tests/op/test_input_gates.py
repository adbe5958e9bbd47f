"""mLSTMsig, `input_gate="sigmoid"`: every backend equals the float64 mLSTMsig recurrence (its own reference: no
max-state) for outputs, last states (the true C, n; m 0) and the gradients of every input and the initial states;
with packed documents; the step; the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax import mlstm, mlstm_step
from xlstm_jax.mlstm.reference import mlstm_sig_reference

B, NH, S, DHQK, DHHV = 2, 2, 40, 8, 16
BACKENDS = [("native_parallel", None), ("native_recurrent", None), ("native_chunkwise", 16),
            ("triton_limit_chunk", 16), ("triton_xl_chunk", 16)]


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, NH, S, DHQK)) for _ in range(2))
    v = rng.standard_normal((B, NH, S, DHHV))
    i, f = rng.standard_normal((B, NH, S)) * 3, rng.standard_normal((B, NH, S)) * 2 + 2
    c, n = rng.standard_normal((B, NH, DHQK, DHHV)), rng.standard_normal((B, NH, DHQK))
    return [np.asarray(x, np.float32) for x in (q, k, v, i, f, c, n)]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _assert_matches_the_mlstmsig_recurrence(args, backend, chunk_size, seed=1):
    """mlstm(input_gate="sigmoid") on float32 `args` (q, k, v, i, f, c, n) against the float64 mLSTMsig reference:
    h, the last C and n (m 0), and the gradients of all seven under a loss weighting h and both states."""
    b, nh, s, dhv = args[2].shape
    rng = np.random.default_rng(seed)
    w_h, w_c, w_n = (rng.standard_normal(x.shape) for x in (args[2], args[5], args[6]))
    m_ignored = jnp.full((b, nh), 5.0)  # accepted and ignored

    def ours(q, k, v, i, f, c, n):
        h, (c1, n1, m1) = mlstm(q, k, v, i, f, c_initial=c, n_initial=n, m_initial=m_ignored, backend=backend,
                                chunk_size=chunk_size, return_last_states=True, input_gate="sigmoid")
        return jnp.sum(h * w_h) + jnp.sum(c1 * w_c) + jnp.sum(n1 * w_n), (h, c1, n1, m1)

    (_, (h, c, n, m)), grads = jax.jit(jax.value_and_grad(ours, argnums=tuple(range(7)), has_aux=True))(*args)
    with jax.enable_x64(True):
        def reference(*a):
            h, (c1, n1) = mlstm_sig_reference(*a)
            return jnp.sum(h * w_h) + jnp.sum(c1 * w_c) + jnp.sum(n1 * w_n), (h, c1, n1)

        (_, want), want_grads = jax.value_and_grad(reference, argnums=tuple(range(7)), has_aux=True)(
            *(np.float64(a) for a in args))
        want, want_grads = [np.asarray(x) for x in want], [np.asarray(g) for g in want_grads]
    assert np.all(np.asarray(m) == 0)
    for name, got, ref in zip("hcn", (h, c, n), want):
        assert _rel(got, ref) < 2e-5, (name, _rel(got, ref))
    for name, g, ref in zip(("q", "k", "v", "i", "f", "c", "n"), grads, want_grads):
        assert np.all(np.isfinite(np.asarray(g))), name
        assert _rel(g, ref) < 1e-4, (name, _rel(g, ref))


@pytest.mark.slow
@pytest.mark.parametrize("backend, chunk_size", BACKENDS)
def test_sigmoid_gate_equals_the_mlstmsig_recurrence(backend, chunk_size):
    _assert_matches_the_mlstmsig_recurrence(_inputs(0), backend, chunk_size)


@pytest.mark.slow
def test_triton_sigmoid_runs_without_the_max_state(monkeypatch):
    """mLSTMsig on the Triton backends holds the stabilizer at 0: every kernel with a running max (the forward
    state recurrence, both families' output kernels) is launched with MAX_STATE off; the exponential gate keeps it."""
    from xlstm_jax.kernels.triton import core as triton_core
    from xlstm_jax.kernels.triton.xl import family as xl_family
    from xlstm_jax.kernels.triton.limit import family as limit_family

    seen = []
    for module in (triton_core, xl_family, limit_family):
        def recording(kernel, *args, _real=module.launch, **kwargs):
            if "MAX_STATE" in kwargs:
                seen.append((kernel.__name__, kwargs["MAX_STATE"]))
            return _real(kernel, *args, **kwargs)

        monkeypatch.setattr(module, "launch", recording)
    q, k, v, i, f = _inputs(5)[:5]
    for backend in ("triton_limit_chunk", "triton_xl_chunk"):
        for gate in ("sigmoid", "exp"):
            seen.clear()
            jax.grad(lambda q: mlstm(q, k, v, i, f, backend=backend, chunk_size=16, input_gate=gate).sum())(q)
            names = {name for name, _ in seen}
            assert {"mlstm_fw_recurrent_kernel"} < names and len(names) == 2, names
            assert {flag for _, flag in seen} == {gate == "exp"}, (backend, gate, seen)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton_limit_chunk", "triton_xl_chunk"])
def test_triton_sigmoid_in_sequence_groups_with_extreme_gates(backend, monkeypatch):
    """The state recurrences in 4 groups, with input gates at -100 (nothing written) from a reset (a forget gate at
    -100) to the end of the second group, more resets and forget gates at +100 (keep all), against
    the float64 recurrence. The combine hands the third group m of about -110: unless its incoming states are
    folded to m = 0, its walk's weights e^{a - m} overflow."""
    from xlstm_jax.kernels.triton import core as triton_core, sequence_groups

    table = triton_core.launch_params

    def four_groups(*args):
        params = table(*args)
        return {**params, "recurrent": params["recurrent"].replaced({"programs": 4 * B * NH}, "recurrent")}

    monkeypatch.setattr(triton_core, "launch_params", four_groups)
    rng = np.random.default_rng(6)
    S_long = 256
    q, k = (rng.standard_normal((B, NH, S_long, DHQK)) for _ in range(2))
    v = rng.standard_normal((B, NH, S_long, DHHV))
    i, f = rng.standard_normal((B, NH, S_long)) * 3, rng.standard_normal((B, NH, S_long)) * 2 + 2
    i[:, :, 40:128] = -100.0
    f[:, :, [40, 130, 131]] = -100.0
    f[:, :, 180:200] = 100.0
    c, n = rng.standard_normal((B, NH, DHQK, DHHV)), rng.standard_normal((B, NH, DHQK))
    args = [np.asarray(x, np.float32) for x in (q, k, v, i, f, c, n)]
    assert sequence_groups.num_groups(B * NH, S_long // 16, 4 * B * NH) == 4
    _assert_matches_the_mlstmsig_recurrence(args, backend, 16, seed=7)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["limit", "xl"])
def test_the_triton_core_without_max_state_returns_a_constant_stabilizer(family):
    """KernelConfig.max_state False: the returned m_S is 0 whatever the gates and m_0, so its cotangent reaches no
    gate and no initial state."""
    from xlstm_jax.kernels.triton import core as triton_core, families as triton_families

    cfg = triton_families.config(family, 16, "float32", max_state=False)
    q, k, v, i, f, c, n = (jnp.asarray(x) for x in _inputs(8))
    i = jax.nn.log_sigmoid(i)

    def m_last(i, f, c, n, m):
        return jnp.sum(triton_core.mlstm_triton_core(q, k, v, i, f, c, n, m, cfg)[3] * jnp.arange(1.0, 1 + B * NH)
                       .reshape(B, NH))

    m0 = jnp.full((B, NH), -2.0)
    assert float(jnp.max(jnp.abs(triton_core.mlstm_triton_core(q, k, v, i, f, c, n, m0, cfg)[3]))) == 0.0
    for name, g in zip("ifcnm", jax.grad(m_last, argnums=tuple(range(5)))(i, f, c, n, m0)):
        assert float(jnp.max(jnp.abs(g))) == 0.0, name


@pytest.mark.slow
def test_sigmoid_gate_with_packed_documents():
    q, k, v, i, f, _, _ = _inputs(2)
    seg = np.repeat([[0, 1, 2]], [13, 20, 7], axis=1).repeat(B, axis=0).astype(np.int32)
    h = mlstm(q, k, v, i, f, backend="native_chunkwise", chunk_size=16, input_gate="sigmoid", segment_ids=seg)
    with jax.enable_x64(True):
        want = np.concatenate([np.asarray(mlstm_sig_reference(*(x[:, :, a:b] for x in (q, k, v, i, f)))[0])
                               for a, b in ((0, 13), (13, 33), (33, 40))], axis=2)
    assert _rel(h, want) < 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_sigmoid_step(backend):
    q, k, v, i, f, c, n = (x[:, :, 0] if x.ndim > 2 and x.shape[2] == S else x for x in _inputs(3))
    h, (c1, n1, m1) = mlstm_step(q, k, v, i, f, c, n, jnp.full((B, NH), 3.0), backend=backend, input_gate="sigmoid")
    with jax.enable_x64(True):
        want_h, (want_c, want_n) = mlstm_sig_reference(*(x[:, :, None] for x in (q, k, v, i, f)), c, n)
        want_h, want_c, want_n = (np.asarray(x) for x in (want_h[:, :, 0], want_c, want_n))
    assert _rel(h, want_h) < 2e-5 and _rel(c1, want_c) < 2e-6 and _rel(n1, want_n) < 2e-6
    assert np.all(np.asarray(m1) == 0)


def test_unknown_input_gate_is_refused():
    with pytest.raises(ValueError, match="input_gate must be one of"):
        mlstm(*_inputs(4)[:5], input_gate="tanh")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton_limit_chunk", "triton_xl_chunk"])
def test_gpu_sigmoid_gate_at_a_realistic_shape(backend):
    """B=1, NH=4, S=2048, 128/256, float32, with initial states: h and the last (C, n) against the float64 mLSTMsig
    recurrence; every gradient at S=512."""
    rng = np.random.default_rng(6)
    shape = (1, 4, 2048)
    q, k = (rng.standard_normal((*shape, 128)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((*shape, 256)).astype(np.float32)
    i, f = (rng.standard_normal(shape).astype(np.float32) * 3 + s for s in (0.0, 2.0))
    c0, n0 = rng.standard_normal((1, 4, 128, 256)).astype(np.float32), rng.standard_normal((1, 4, 128)).astype(
        np.float32)

    def ours(*a):
        q, k, v, i, f, c, n = a
        return mlstm(q, k, v, i, f, c_initial=c, n_initial=n, m_initial=jnp.zeros((1, 4)), backend=backend,
                     return_last_states=True, input_gate="sigmoid")

    h, (c, n, _) = ours(q, k, v, i, f, c0, n0)
    with jax.enable_x64(True):
        want = [np.asarray(x) for x in jax.tree.leaves(mlstm_sig_reference(*(np.float64(x) for x in (
            q, k, v, i, f, c0, n0))))]
    for got, ref in zip((h, c, n), want):
        assert _rel(got, ref) < 1e-4
    short = [x[:, :, :512] for x in (q, k, v, i, f)] + [c0, n0]
    w = rng.standard_normal((1, 4, 512, 256))

    def loss(*a):
        return jnp.sum(ours(*a)[0] * w)

    got = jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*short)
    with jax.enable_x64(True):
        want = jax.grad(lambda *a: jnp.sum(mlstm_sig_reference(*a)[0] * w), argnums=tuple(range(7)))(
            *(np.float64(x) for x in short))
    for g, ref in zip(got, want):
        assert _rel(g, ref) < 1e-3
