"""What the cross-backend test files share: the backend names, which shapes each backend takes, and a uniform
`(q, k, v, i, f, c_initial=, n_initial=, m_initial=) -> (h, (C, n, m))` callable per backend through
`xlstm_jax.mlstm`. Chunked backends run with chunk 16 (several chunks at small S; fast in Triton's interpreter).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.helpers import _loss
from xlstm_jax.kernels.triton.tuning import MAX_HEAD_DIM
from xlstm_jax.mlstm import IMPLEMENTATIONS, mlstm
from xlstm_jax.mlstm.api import triton_status

BACKENDS = tuple(IMPLEMENTATIONS)
NATIVE_BACKENDS = tuple(n for n, impl in IMPLEMENTATIONS.items() if not impl.needs_triton)
CHUNKED_BACKENDS = tuple(n for n, impl in IMPLEMENTATIONS.items() if impl.chunk_sizes is not None)




def head_dims_ok(name: str, DHQK: int, DHHV: int) -> bool:
    """Triton kernels take any head dims up to 1024 (`triton_core.check_head_dims`); native backends take any."""
    if IMPLEMENTATIONS[name].needs_triton:
        return max(DHQK, DHHV) <= MAX_HEAD_DIM
    return True


def skip_unless_runnable(name: str) -> None:
    """Skip a test of a Triton backend when Triton cannot run here (no GPU and no interpreter)."""
    if IMPLEMENTATIONS[name].needs_triton:
        ok, why = triton_status()
        if not ok:
            pytest.skip(f"{name}: {why}")


def default_chunk(name: str) -> int | None:
    return 16 if IMPLEMENTATIONS[name].chunk_sizes is not None else None


def backend_fn(name: str, *, chunk_size: int | None = None, **kwargs):
    """`fn(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None) -> (h, (C, n, m))` for one backend."""
    skip_unless_runnable(name)
    chunk = default_chunk(name) if chunk_size is None else chunk_size

    def fn(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None):
        return mlstm(
            q, k, v, i, f, backend=name, chunk_size=chunk, c_initial=c_initial, n_initial=n_initial,
            m_initial=m_initial, return_last_states=True, **kwargs,
        )

    return fn


def assert_trees_close(actual, expected, *, rtol: float = 2e-5, what: str = "") -> None:
    """Leaf by leaf: finite, and relative Frobenius error ||a - e|| / max(||e||, 1e-6) at most rtol."""
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e, (what, tree_a, tree_e)
    for index, (a, e) in enumerate(zip(leaves_a, leaves_e)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, (what, index, a.shape, e.shape)
        assert np.all(np.isfinite(a)), f"{what} leaf {index}: non-finite values"
        err = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-6)
        assert err <= rtol, f"{what} leaf {index}: relative error {err:.2e} > {rtol:.0e}"


def assert_grads_close(grads, ref_grads, tol: float, floor: float = 1e-2) -> None:
    """Each gradient's RMS error at most tol * max(its reference RMS, floor * the largest reference RMS).

    The floor covers gradients that vanish in exact arithmetic (e.g. dq when C is rank one, df when no forget
    gate matters): there float32 leaves cancellation residue at the scale of the other gradients, so they are
    compared at that scale instead of relative to ~0.
    """
    assert set(grads) == set(ref_grads), (sorted(grads), sorted(ref_grads))
    rms = {n: float(np.sqrt(np.mean(np.square(np.asarray(g, np.float64))))) for n, g in ref_grads.items()}
    scale = max(rms.values())
    for name, g in grads.items():
        g = np.asarray(g, np.float64)
        assert np.all(np.isfinite(g)), f"d{name}: non-finite values"
        err = float(np.sqrt(np.mean(np.square(g - ref_grads[name]))))
        bound = tol * max(rms[name], floor * scale)
        assert err <= bound, f"d{name}: RMS error {err:.2e} > {bound:.2e} (reference RMS {rms[name]:.2e})"


@functools.cache
def jitted_forward(name: str, chunk_size: int | None = None):
    """jit of `args -> (h, (C, n, m))` for one backend; cached, so tests with equal shapes share one compile."""
    fn = backend_fn(name, chunk_size=chunk_size)
    return jax.jit(lambda args: fn(**args))


@functools.cache
def jitted_vjp(name: str, chunk_size: int | None = None):
    """jit of `(args, cotangents of (h, (C, n, m))) -> gradients w.r.t. args` for one backend; cached."""
    fn = backend_fn(name, chunk_size=chunk_size)

    def vjp(args, cotangents):
        _, pullback = jax.vjp(lambda a: fn(**a), args)
        return pullback(cotangents)[0]

    return jax.jit(vjp)


@functools.cache
def jitted_outputs_and_grads(name: str, chunk_size: int | None = None):
    """jit of `(args, weights) -> ((h, (C, n, m)), gradients of the generic loss)`; cached."""
    fn = backend_fn(name, chunk_size=chunk_size)

    def run(args, weights):
        def loss(a):
            h, states = fn(**a)
            return _loss(h.astype(jnp.float32), states, weights), (h, states)

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(args)
        return out, grads

    return jax.jit(run)


def as_numpy(tree):
    """A pytree of arrays as float64 numpy arrays (for the helpers' comparisons)."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def sharded_matches_plain(backend: str, sharded: dict, plain: dict, weights: dict, rtol: float = 2e-5, **options):
    """jit(value_and_grad) of a loss on h and the last states (helpers._loss) on sharded and on plain copies of the
    same inputs: asserts the two agree; returns (the jitted step, its result on the sharded inputs). `options`: more
    keywords of `mlstm` (e.g. mesh_axes)."""
    fn = functools.partial(mlstm, backend=backend, chunk_size=default_chunk(backend),
                           return_last_states=True, **options)

    def loss(a):
        h, states = fn(**a)
        return _loss(h, states, weights), (h, states)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    got = step(sharded)
    assert_trees_close(got, step(plain), rtol=rtol, what=backend)
    return step, got
