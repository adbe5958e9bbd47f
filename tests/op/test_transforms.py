"""Every backend composes with jax.jit, jax.grad, jax.vmap (extra leading axis), jax.checkpoint and lax.scan,
and the transformed function gives the values of the plain call; gradients are checked against the float64
reference (generic loss on h and every last state)."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.backend_cases import BACKENDS, assert_trees_close, backend_fn
from tests.support.devices import fake_cpu_env, script_path
from tests.support.helpers import (
    DOCTOR_BW_TOL,
    DOCTOR_FW_TOL,
    _loss,
    assert_matches_reference,
    make_inputs,
    make_weights,
    reference_outputs_and_grads,
)

pytestmark = pytest.mark.slow  # jit / grad / vmap / checkpoint / scan of every backend: seconds each, and a subprocess

B, NH, S, DHQK, DHHV = 1, 2, 20, 16, 32
STATE = ("c_initial", "n_initial", "m_initial")
CUSTOM_VJP_BACKENDS = tuple(n for n in BACKENDS if n not in ("native_parallel", "native_recurrent"))


def _args(seed):
    return {n: jnp.asarray(a) for n, a in make_inputs(seed, B, NH, S, DHQK, DHHV, with_state=True).items()}


WEIGHTS = make_weights(0, make_inputs(0, B, NH, S, DHQK, DHHV, with_state=True))


def _value_and_grad(run):
    """jit(value_and_grad) of the generic loss of `run(args) -> (h, (C, n, m))`, with the outputs as aux."""
    return jax.jit(jax.value_and_grad(lambda a: (lambda out: (_loss(*out, WEIGHTS), out))(run(a)), has_aux=True))


@functools.cache
def _baseline(backend):
    """The jitted forward and (loss, outputs), gradients of `backend` on the shared problem (computed once)."""
    fn = backend_fn(backend)
    forward = jax.jit(lambda a: fn(**a))
    return forward, _value_and_grad(lambda a: fn(**a)), _value_and_grad(lambda a: fn(**a))(_args(0))


@pytest.fixture(scope="module")
def reference():
    x = make_inputs(0, B, NH, S, DHQK, DHHV, with_state=True)
    return reference_outputs_and_grads(x, WEIGHTS)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_jit_and_grad_match_the_reference(backend, reference):
    fn = backend_fn(backend)
    args = _args(0)
    plain = fn(**args)
    forward, _, ((value, out), grads) = _baseline(backend)
    ref_out, ref_grads = reference
    assert set(grads) == set(ref_grads)
    assert_matches_reference(_np(plain), _np(grads), ref_out, ref_grads, fw_tol=DOCTOR_FW_TOL, bw_tol=DOCTOR_BW_TOL)
    assert_trees_close(forward(args), plain, what="jit")
    assert_trees_close(out, plain, what="forward inside value_and_grad")
    np.testing.assert_allclose(float(value), float(_loss(*plain, WEIGHTS)), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_matches_the_plain_call(backend):
    fn = backend_fn(backend)
    _, _, expected = _baseline(backend)
    remat = jax.checkpoint(lambda a: fn(**a), policy=jax.checkpoint_policies.nothing_saveable)
    assert_trees_close(_value_and_grad(remat)(_args(0)), expected, rtol=1e-4, what="value_and_grad of checkpoint")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_an_extra_leading_axis(backend):
    """vmap of the forward over every argument, and of value_and_grad with shared (unbatched) initial states."""
    forward, value_and_grad, _ = _baseline(backend)
    problems = [_args(seed) for seed in (3, 4)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *problems)
    batched = jax.jit(jax.vmap(forward))(stacked)
    shared = {n: problems[0][n] for n in STATE}
    batched_vg = jax.jit(jax.vmap(lambda a, s: value_and_grad({**a, **s}), in_axes=(0, None)))(
        {n: stacked[n] for n in "qkvif"}, shared
    )
    for index, args in enumerate(problems):
        element = functools.partial(jax.tree.map, lambda a: a[index])
        assert_trees_close(element(batched), forward(args), what=f"vmap element {index}")
        assert_trees_close(
            element(batched_vg), value_and_grad({**args, **shared}), rtol=1e-4, what=f"vmap(value_and_grad) {index}"
        )


@pytest.mark.parametrize("backend", CUSTOM_VJP_BACKENDS)
def test_scan_over_layers(backend):
    """The backend inside lax.scan (layers feeding h forward as the next v), forward and backward, equals the
    unrolled loop. Run for the backends with a hand-written backward (the others are plain XLA autodiff)."""
    fn = backend_fn(backend)
    args = _args(10)
    gates = jnp.stack([args["i"], args["i"] - 1.0])

    def layer(a, v, i_layer):
        h, (c, n, m) = fn(a["q"], a["k"], v, i_layer, a["f"], *(a[name] for name in STATE))
        return h, (c, n, m)

    def scanned(a):
        def body(v, i_layer):
            h, states = layer(a, v, i_layer)
            return h, states

        h, states = jax.lax.scan(body, a["v"], gates)
        return h, jax.tree.map(lambda s: s[-1], states)

    def unrolled(a):
        v = a["v"]
        for i_layer in gates:
            v, states = layer(a, v, i_layer)
        return v, states

    assert_trees_close(
        _value_and_grad(scanned)(args), _value_and_grad(unrolled)(args), rtol=1e-4, what="scan value_and_grad"
    )


def test_shard_map_over_batch_and_heads_with_and_without_initial_states():
    """Every backend under `shard_map` on a 2 x 2 mesh (batch x heads), with and without initial states: outputs,
    last states and gradients equal the unsharded call (zero states vary over the mesh axes like the inputs)."""
    result = subprocess.run([sys.executable, script_path("shard_map_batch_heads.py")], capture_output=True, text=True,
                            env=fake_cpu_env(4), timeout=900)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]
