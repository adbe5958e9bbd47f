"""`xlstm_jax.mlstm`: one signature for every mLSTM implementation (README.md, "Usage"); picks and runs a backend.

`mlstm` checks its inputs once (kernels/base.py) and runs the chosen implementation as `run(x, o, chunk_size)`: x
the checked `MLSTMInputs` (gates shaped (B, NH, S)), o the `MLSTMOptions` (return_last_states, eps, autocast_dtype),
chunk_size checked against the implementation's range. Each returns h (B, NH, S, DHHV) in q's dtype, or
`(h, (C, n, m))` with float32 states.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from xlstm_jax.kernels.base import (
    MLSTMInputs,
    MLSTMOptions,
    check_chunk_size,
    check_eps,
    checked_inputs,
    resolve_compute_dtype,
)
from xlstm_jax.kernels.launch import triton_availability
from xlstm_jax.kernels.mlstm_chunkwise.native.api import chunkwise_native
from xlstm_jax.kernels.mlstm_parallel import mlstm_parallel
from xlstm_jax.kernels.mlstm_recurrent import mlstm_recurrent
from xlstm_jax.mlstm import context_parallel, input_gates, on_mesh, segments


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of the op: what it accepts, and `run(x, o, chunk_size)` on checked inputs (chunk_size
    checked against `chunk_sizes`, None for the unchunked forms)."""

    needs_triton: bool
    chunk_sizes: tuple[int, int] | None  # (min, max) power-of-two chunk sizes; None: no chunking
    default_chunk_size: int | None
    description: str
    context_parallel: bool = False  # takes sequence_axis_name (context_parallel.py)

    def run(self, x: MLSTMInputs, o: MLSTMOptions, chunk_size: int | None):
        raise NotImplementedError


class NativeParallel(Implementation):
    def run(self, x: MLSTMInputs, o: MLSTMOptions, chunk_size: int | None):
        return mlstm_parallel(x, o, chunk_size)


class NativeRecurrent(Implementation):
    def run(self, x: MLSTMInputs, o: MLSTMOptions, chunk_size: int | None):
        return mlstm_recurrent(x, o, chunk_size)


class NativeChunkwise(Implementation):
    def run(self, x: MLSTMInputs, o: MLSTMOptions, chunk_size: int | None):
        return chunkwise_native(x, o, chunk_size)


class TritonLimitChunk(Implementation):
    def run(self, x: MLSTMInputs, o: MLSTMOptions, chunk_size: int | None):
        # Triton is optional: the family's modules are imported on the first call
        from xlstm_jax.kernels.mlstm_chunkwise.triton_stablef.triton_fwbw import mlstm_triton_limit_chunk

        return mlstm_triton_limit_chunk(x, o, chunk_size)


class TritonXlChunk(Implementation):
    def run(self, x: MLSTMInputs, o: MLSTMOptions, chunk_size: int | None):
        from xlstm_jax.kernels.mlstm_chunkwise.max_triton_fwbw_v5xlchunksize.triton_fwbw import mlstm_triton_xl_chunk

        return mlstm_triton_xl_chunk(x, o, chunk_size)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "native_parallel": NativeParallel(False, None, None, "quadratic parallel form in XLA (O(S^2) memory), autodiff"),
    "native_recurrent": NativeRecurrent(False, None, None, "step-by-step recurrence under lax.scan in XLA, autodiff"),
    "native_chunkwise": NativeChunkwise(
        False, (16, 512), 64, "chunkwise form in XLA with a hand-written backward, O(S) memory", True
    ),
    "triton_limit_chunk": TritonLimitChunk(
        True, (16, 128), 64, "Triton limit-chunk kernels (one L x L tile per chunk), fused backward", True
    ),
    "triton_xl_chunk": TritonXlChunk(
        True, (16, 2048), 64, "Triton TFLA xl-chunk kernels (tiled chunks of any size), exact backward", True
    ),
}

BACKEND_NAMES = ("auto", *IMPLEMENTATIONS)
# "auto" runs sequences of at most this many steps (without a chunk size) step by step (native_recurrent), not in a
# chunkwise kernel padded to a whole chunk. H200, B=16, NH=8, 256/512, bf16 forward (docs/benchmarks.md, "Decoding"):
# S=1 108 us against the limit-chunk kernel's 281 us, but S=4 328 against 270 us (each scan step copies C).
SHORT_SEQUENCE = 1


def triton_status() -> tuple[bool, str]:
    """Whether Triton kernels can run here, and why not."""
    return triton_availability()


def resolve_backend(backend: str, chunk_size: int | None = None, seq_len: int | None = None) -> str:
    """Map a backend name (or "auto") to a runnable implementation name; raise with the alternatives if it can't run.

    "auto" for a sequence of at most SHORT_SEQUENCE steps and no chunk size: native_recurrent. Otherwise, on a CUDA
    GPU with Triton: triton_limit_chunk, the faster family at the 7B heads and on par at 16 heads
    (docs/benchmarks.md, "Issue 15"), or triton_xl_chunk for a chunk_size beyond limit-chunk's range; elsewhere
    native_chunkwise.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown mLSTM backend {backend!r}; expected one of {list(BACKEND_NAMES)}.")
    if backend == "auto":
        if seq_len is not None and seq_len <= SHORT_SEQUENCE and chunk_size is None:
            return "native_recurrent"
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
    sequence_axis_name: Any = None,
    sequence_combine: str = "auto",
    mesh_axes: Any = None,
    segment_ids: Any = None,
    input_gate: str = "exp",
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The mLSTM cell over a whole sequence.

    q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) or (B, NH, S, 1) gate pre-activations; optional
    initial states c (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH), all three or none. q is scaled by DHQK**-0.5
    inside. `autocast_dtype` is the matmul operand dtype (None: q's dtype); gate math and states are float32.
    Returns h (B, NH, S, DHHV) in q's dtype, or `(h, (C, n, m))` float32 with `return_last_states=True`.

    Context parallelism: inside `jax.shard_map`, with q, k, v, i, f split along S over the mesh axis
    `sequence_axis_name` (device d holds the d-th shard; initial states replicated), the call computes the whole
    sequence's mLSTM; h is the local shard's, the last states are those after the whole sequence on every device.
    `sequence_combine`: "all_gather" or "ppermute" (a log-step scan) for the shards' incoming states; "auto" takes
    the all-gather up to 8 devices (context_parallel.py). native_chunkwise and the Triton backends only.
    Under jit, inputs whose types carry a sharding (explicit mesh axes) run per device the same way, a sharded S
    axis as context parallelism; on meshes with Auto axes, `mesh_axes=(B axes, NH axes, S axes)` (mesh axis names,
    a tuple of names or None each) under `jax.set_mesh(mesh)` splits the inputs as named (on_mesh.py).

    Packed documents: `segment_ids` (B, S) int (the local shard's with `sequence_axis_name`) starts a new document
    wherever the id changes; each document runs as if alone from a zero state, the first one from the initial
    states, and the last states are those after the last document (segments.py: an exact reset, every backend).

    `input_gate` "sigmoid": the mLSTMsig cell (σ(i) input gate, no max-state; input_gates.py) on every backend; its
    states are the true (C, n) with m returned as 0, and a given m_initial is ignored.
    """
    x, _ = checked_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    if input_gates.check_input_gate(input_gate) == "sigmoid":
        i, m0 = input_gates.as_exp_gate(x.i, x.m_initial)
        x = x._replace(i=i, m_initial=m0)
    if segment_ids is not None:
        ids = segments.check_segment_ids(segment_ids, (x.q.shape[0], x.q.shape[2]))
        x = x._replace(f=segments.cut_forget_gates(x.f, segments.document_starts(ids, sequence_axis_name)))
    eps = check_eps(eps)
    resolve_compute_dtype(autocast_dtype, x.q.dtype)  # a float64 q under 64-bit JAX is refused here, naming q
    name = resolve_backend(backend, chunk_size, None if sequence_axis_name is not None else x.q.shape[2])
    impl: Implementation = IMPLEMENTATIONS[name]
    if impl.chunk_sizes is None:
        if chunk_size is not None:
            raise ValueError(f"backend {name!r} does not take a chunk_size, got chunk_size={chunk_size}.")
    elif chunk_size is None:
        chunk_size = impl.default_chunk_size
    else:
        chunk_size = check_chunk_size(chunk_size, minimum=impl.chunk_sizes[0], maximum=impl.chunk_sizes[1])
    options = MLSTMOptions(bool(return_last_states), eps, autocast_dtype, max_state=input_gate == "exp")
    combine = context_parallel.check_combine(sequence_combine)
    out = _run(impl, name, x, options, chunk_size, sequence_axis_name, mesh_axes, combine)
    if input_gate == "sigmoid" and return_last_states:
        return out[0], input_gates.true_states(out[1])
    return out


def _run(impl: Implementation, name: str, x: MLSTMInputs, options: MLSTMOptions, chunk_size: int | None,
         sequence_axis_name: Any, mesh_axes: Any, combine: str):
    """The implementation on one device, per device of a mesh, or context-parallel."""
    if mesh_axes is not None:
        if sequence_axis_name is not None:
            raise ValueError("pass mesh_axes (the op splits its inputs) or sequence_axis_name (inside shard_map), "
                             "not both.")
        return on_mesh.run(impl, x, options, chunk_size, *on_mesh.named_layout(x, mesh_axes), combine)
    if sequence_axis_name is None:
        sharded = on_mesh.layout(x)
        if sharded is not None:
            return on_mesh.run(impl, x, options, chunk_size, *sharded, combine)
        return impl.run(x, options, chunk_size)
    if not impl.context_parallel:
        able = [n for n, other in IMPLEMENTATIONS.items() if other.context_parallel]
        raise ValueError(f"backend {name!r} cannot split a sequence over devices (sequence_axis_name="
                         f"{sequence_axis_name!r}); use one of {able}.")
    return context_parallel.run(impl, x, options, chunk_size, sequence_axis_name, combine)
