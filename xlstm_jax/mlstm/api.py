"""`xlstm_jax.mlstm`: one signature for every mLSTM implementation (README.md, "Usage"); picks and runs a backend.

Every implementation registered here is called as
`impl(q, k, v, i, f, c_initial, n_initial, m_initial, *, return_last_states, eps, chunk_size, autocast_dtype)`
with validated inputs and gates already shaped (B, NH, S); it returns h (B, NH, S, DHHV) in q's dtype, or
`(h, (C, n, m))` with float32 states.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from xlstm_jax.mlstm.base import check_chunk_size, check_eps, check_inputs, resolve_compute_dtype


@dataclasses.dataclass(frozen=True)
class Implementation:
    """Where an implementation lives and what it accepts."""

    target: str  # "module:function"
    needs_triton: bool
    chunk_sizes: tuple[int, int] | None  # (min, max) power-of-two chunk sizes; None: no chunking
    default_chunk_size: int | None
    description: str

    def load(self) -> Callable[..., Any]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "native_parallel": Implementation(
        "xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.simple:mlstm_parallel",
        False, None, None, "quadratic parallel form in XLA (O(S^2) memory), autodiff",
    ),
    "native_recurrent": Implementation(
        "xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent:mlstm_recurrent",
        False, None, None, "step-by-step recurrence under lax.scan in XLA, autodiff",
    ),
    "native_chunkwise": Implementation(
        "xlstm_jax.kernels.mlstm_chunkwise.native.api:mlstm_chunkwise_native",
        False, (16, 512), 64, "chunkwise form in XLA with a hand-written backward, O(S) memory",
    ),
    "triton_limit_chunk": Implementation(
        "xlstm_jax.kernels.mlstm_chunkwise.triton_stablef.triton_fwbw:mlstm_triton_limit_chunk",
        True, (16, 128), 64, "Triton limit-chunk kernels (one L x L tile per chunk), fused backward",
    ),
    "triton_xl_chunk": Implementation(
        "xlstm_jax.kernels.mlstm_chunkwise.max_triton_fwbw_v5xlchunksize.triton_fwbw:mlstm_triton_xl_chunk",
        True, (16, 2048), 64, "Triton TFLA xl-chunk kernels (tiled chunks of any size), exact backward",
    ),
}

BACKEND_NAMES = ("auto", *IMPLEMENTATIONS)


def triton_status() -> tuple[bool, str]:
    """Whether Triton kernels can run here, and why not."""
    from xlstm_jax.kernels.launch import triton_availability

    return triton_availability()


def resolve_backend(backend: str, chunk_size: int | None = None) -> str:
    """Map a backend name (or "auto") to a runnable implementation name; raise with the alternatives if it can't run.

    "auto" on a CUDA GPU with Triton: triton_limit_chunk, the faster family at the 7B heads and on par at 16 heads
    (docs/benchmarks.md, "Issue 15"), or triton_xl_chunk for a chunk_size beyond limit-chunk's range; elsewhere
    native_chunkwise.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown mLSTM backend {backend!r}; expected one of {list(BACKEND_NAMES)}.")
    if backend == "auto":
        ok, _ = triton_status()
        if not (ok and jax.default_backend() == "gpu"):
            return "native_chunkwise"
        limit_max = IMPLEMENTATIONS["triton_limit_chunk"].chunk_sizes[1]
        return "triton_xl_chunk" if chunk_size is not None and chunk_size > limit_max else "triton_limit_chunk"
    if IMPLEMENTATIONS[backend].needs_triton:
        ok, why = triton_status()
        if not ok:
            native = [n for n, impl in IMPLEMENTATIONS.items() if not impl.needs_triton]
            raise RuntimeError(f"backend {backend!r} cannot run here: {why}. Use one of {native} instead.")
    return backend


def mlstm(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    c_initial: jax.Array | None = None,
    n_initial: jax.Array | None = None,
    m_initial: jax.Array | None = None,
    return_last_states: bool = False,
    eps: float = 1e-6,
    autocast_dtype: Any = None,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM cell over a whole sequence.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) or (B, NH, S, 1) gate pre-activations; optional
    initial states c (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH), all three or none. q is scaled by DHQK**-0.5
    inside. `autocast_dtype` is the matmul operand dtype (None: q's dtype); gate math and states are float32.
    Returns h (B, NH, S, DHHV) in q's dtype, or `(h, (C, n, m))` float32 with `return_last_states=True`.
    """
    i3, f3, _ = check_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    eps = check_eps(eps)
    # as JAX sees them: numpy float64 arrays are float32 while 64-bit JAX is off
    q, k, v, i3, f3, c_initial, n_initial, m_initial = (
        None if x is None else jnp.asarray(x) for x in (q, k, v, i3, f3, c_initial, n_initial, m_initial)
    )
    resolve_compute_dtype(autocast_dtype, q.dtype)  # a float64 q under 64-bit JAX is refused here, naming q
    name = resolve_backend(backend, chunk_size)
    impl = IMPLEMENTATIONS[name]
    if impl.chunk_sizes is None:
        if chunk_size is not None:
            raise ValueError(f"backend {name!r} does not take a chunk_size, got chunk_size={chunk_size}.")
    elif chunk_size is None:
        chunk_size = impl.default_chunk_size
    else:
        chunk_size = check_chunk_size(chunk_size, minimum=impl.chunk_sizes[0], maximum=impl.chunk_sizes[1])
    return impl.load()(
        q, k, v, i3, f3, c_initial, n_initial, m_initial,
        return_last_states=return_last_states, eps=eps, chunk_size=chunk_size, autocast_dtype=autocast_dtype,
    )
