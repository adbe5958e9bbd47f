"""`xlstm_jax.mlstm`: the one door into the kernels (README.md, "Usage"; docs/design.md, "One door").

`mlstm` checks its inputs once (`kernels.base.validated`), describes the call (`MLSTMCall`) and hands it to
`dispatch`, which runs the chosen implementation (implementations.py) on one device, per device of a mesh, or
context-parallel. The documented backend classes build an `MLSTMCall` from their configs and call `dispatch` too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from xlstm_jax.kernels.base import MLSTMInputs, MLSTMOptions, validated
from xlstm_jax.kernels.launch import triton_availability
from xlstm_jax.mlstm import context_parallel, input_gates, on_mesh, segments
from xlstm_jax.mlstm.implementations import IMPLEMENTATIONS


BACKEND_NAMES = ("auto", *IMPLEMENTATIONS)
# "auto" runs sequences of at most this many steps (without a chunk size) step by step (native_recurrent), not in a
# chunkwise kernel padded to a whole chunk: faster at one step, slower from four on, as each scan step copies C
# (docs/benchmarks.md, "Short sequences").
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
        ok, why = IMPLEMENTATIONS[backend].supports()
        if not ok:
            native = [n for n, impl in IMPLEMENTATIONS.items() if not impl.needs_triton]
            raise RuntimeError(f"backend {backend!r} cannot run here: {why}. Use one of {native} instead.")
    return backend


def planned_backend(backend: str, chunk_size: int | None, seq_len: int | None = None) -> tuple[str, int | None]:
    """A model's backend and preferred chunk size -> (the implementation `resolve_backend` picks, the chunk size it
    runs with): the preference is kept where the implementation chunks and dropped where it does not."""
    name = resolve_backend(backend, chunk_size, seq_len)
    return name, None if IMPLEMENTATIONS[name].chunk_sizes is None else chunk_size


@dataclasses.dataclass(frozen=True)
class MLSTMCall:
    """One call of the op, described: checked inputs (gates (B, NH, S)) and semantic options; `backend` a name of
    IMPLEMENTATIONS or "auto"; its chunk_size (None: the default) and tuning (None: its defaults); where it runs
    (`sequence_axis_name` inside shard_map, `mesh_axes` under a mesh context, `sequence_combine`); the input gate
    ("exp" or "sigmoid") and packed-document `segment_ids` (B, S)."""

    inputs: MLSTMInputs
    options: MLSTMOptions
    backend: str = "auto"
    chunk_size: int | None = None
    tuning: Any = None
    input_gate: str = "exp"
    segment_ids: Any = None
    sequence_axis_name: Any = None
    sequence_combine: str = "auto"
    mesh_axes: Any = None


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
    tuning: Any = None,
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

    `tuning`: the implementation's own knobs (the same math for every value): `TritonTuning` for the Triton
    backends (tiles, warps, state buffers), `RecurrentTuning` for native_recurrent; None: their defaults.
    """
    x, options = validated(q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states=return_last_states,
                           eps=eps, autocast_dtype=autocast_dtype)
    return dispatch(MLSTMCall(x, options, backend, chunk_size, tuning, input_gate, segment_ids, sequence_axis_name,
                              sequence_combine, mesh_axes))


def dispatch(call: MLSTMCall):
    """Run a described call (inputs already validated): the input gate and document resets folded into the gates,
    the implementation resolved and checked, then run on one device, per device of a mesh, or context-parallel.
    Returns h (B, NH, S, DHHV) in q's dtype, or (h, (C, n, m)) with `options.return_last_states`."""
    x, sigmoid = call.inputs, input_gates.check_input_gate(call.input_gate) == "sigmoid"
    if sigmoid:
        i, m0 = input_gates.as_exp_gate(x.i, x.m_initial)
        x = x._replace(i=i, m_initial=m0)
    if call.segment_ids is not None:
        ids = segments.check_segment_ids(call.segment_ids, (x.q.shape[0], x.q.shape[2]))
        x = x._replace(f=segments.cut_forget_gates(x.f, segments.document_starts(ids, call.sequence_axis_name)))
    name = resolve_backend(call.backend, call.chunk_size,
                           None if call.sequence_axis_name is not None else x.q.shape[2])
    impl = IMPLEMENTATIONS[name]
    chunk_size = impl.chunk_size_for(call.chunk_size)
    options = dataclasses.replace(call.options, max_state=not sigmoid)
    impl.check(options, call.tuning)
    if not options.standard_denominator and (call.sequence_axis_name is not None or call.mesh_axes is not None):
        raise ValueError("sequence_axis_name and mesh_axes run the standard denominator: norm_val must be 1.0 and "
                         f"stabilize_correctly True, got {options.norm_val} and {options.stabilize_correctly}.")
    combine = context_parallel.check_combine(call.sequence_combine)

    kernel = functools.partial(impl.run, chunk_size=chunk_size, tuning=call.tuning)
    if call.mesh_axes is not None:
        if call.sequence_axis_name is not None:
            raise ValueError("pass mesh_axes (the op splits its inputs) or sequence_axis_name (inside shard_map), "
                             "not both.")
        out = on_mesh.run(kernel, impl.context_parallel, x, options, *on_mesh.named_layout(x, call.mesh_axes),
                          combine)
    elif call.sequence_axis_name is not None:
        if not impl.context_parallel:
            able = [n for n, other in IMPLEMENTATIONS.items() if other.context_parallel]
            raise ValueError(f"backend {name!r} cannot split a sequence over devices (sequence_axis_name="
                             f"{call.sequence_axis_name!r}); use one of {able}.")
        out = context_parallel.run(kernel, x, options, call.sequence_axis_name, combine)
    elif (sharded := on_mesh.layout(x)) is not None:
        out = on_mesh.run(kernel, impl.context_parallel, x, options, *sharded, combine)
    else:
        out = kernel(x, options)
    if sigmoid and options.return_last_states:
        return out[0], input_gates.true_states(out[1])
    return out
