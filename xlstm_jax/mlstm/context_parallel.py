"""Context parallelism: one sequence split along a mesh axis, run inside `shard_map` (docs/design.md, "Context
parallelism").

Device d of the axis holds the d-th contiguous shard of the sequence. Each device computes the summary of its shard
(kernels/native/state_combine.py: what the shard writes from a zero state, its total log forget decay G and
largest input weight M; one matmul over the shard's tokens). The incoming states are an exclusive scan of the summaries along the
axis: by an all-gather (P summaries per device, P = the axis size) or by a log-step `ppermute` scan (memory
independent of P). Every device then runs its shard from the exact incoming state, so h, the last states and the
gradients equal those of the one-device call up to rounding.
Gradients are JAX's: the collectives and the implementations are differentiable, and the state cotangents flow from
later shards to earlier ones by transposition.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import MLSTMInputs, MLSTMOptions, MLSTMShape, initial_states_or_zeros
from xlstm_jax.kernels.native import state_combine
from xlstm_jax.kernels.native.state_combine import apply, compose, identity_like

F32 = jnp.float32
COMBINES = ("auto", "all_gather", "ppermute")
# an implementation bound to its chunk size and tuning: (checked inputs, options) -> h or (h, (C, n, m))
Kernel = Callable[[MLSTMInputs, MLSTMOptions], Any]
ALL_GATHER_MAX_DEVICES = 8  # "auto": all-gather the summaries up to this axis size, a ppermute scan beyond it


def axis_size(axis_name: Any) -> int:
    """The size of mesh axis `axis_name`; ValueError naming sequence_axis_name outside a shard_map over it."""
    try:
        return jax.lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"sequence_axis_name={axis_name!r} is not a mesh axis of the enclosing shard_map ({err}); call "
            "xlstm_jax.mlstm inside jax.shard_map over a mesh with that axis, with q, k, v, i, f split along S."
        ) from err


def check_combine(combine: Any) -> str:
    if combine not in COMBINES:
        raise ValueError(f"sequence_combine must be one of {list(COMBINES)}, got {combine!r}.")
    return combine


def _exclusive_all_gather(summary, axis_name, P: int):
    """The composition of the summaries of devices 0..d-1 on device d, from all P summaries."""
    every = jax.lax.all_gather(summary, axis_name)
    d = jax.lax.axis_index(axis_name)
    prefix = identity_like(summary)
    for j in range(P - 1):
        take = j < d
        composed = compose(prefix, tuple(x[j] for x in every))
        prefix = tuple(jnp.where(take, new, old) for new, old in zip(composed, prefix))
    return prefix


def _exclusive_ppermute(summary, axis_name, P: int):
    """The same by a log-step scan (Hillis-Steele): ceil(log2 P) ppermutes of one summary each, and one shift."""
    d = jax.lax.axis_index(axis_name)
    inclusive, step = summary, 1
    while step < P:
        earlier = jax.lax.ppermute(inclusive, axis_name, [(j, j + step) for j in range(P - step)])
        composed = compose(earlier, inclusive)
        inclusive = tuple(jnp.where(d >= step, new, old) for new, old in zip(composed, inclusive))
        step *= 2
    shifted = jax.lax.ppermute(inclusive, axis_name, [(j, j + 1) for j in range(P - 1)])
    return tuple(jnp.where(d >= 1, s, e) for s, e in zip(shifted, identity_like(summary)))


def _from_incoming_state(x: MLSTMInputs, axis_name, combine: str, P: int):
    """x with the exact state before this device's shard as its initial states."""
    shape = MLSTMShape(*x.q.shape, x.v.shape[-1])
    summary = state_combine.summary(x.k, x.v, x.i, x.f)
    if combine == "auto":
        combine = "all_gather" if P <= ALL_GATHER_MAX_DEVICES else "ppermute"
    scan = _exclusive_all_gather if combine == "all_gather" else _exclusive_ppermute
    prefix = scan(summary, axis_name, P)
    c_in, n_in, m_in = apply(prefix, initial_states_or_zeros(*x[5:], shape, x[:5]))
    return x._replace(c_initial=c_in, n_initial=n_in, m_initial=m_in)


def run(kernel: Kernel, x: MLSTMInputs, o: MLSTMOptions, axis_name, combine: str):
    """`kernel(x, o)` on the local shard of a sequence split along `axis_name` (inside shard_map): h of the shard, or
    (h, (C, n, m)) with the states after the whole sequence (the same on every device of the axis)."""
    P = axis_size(axis_name)
    keep = dataclasses.replace(o, return_last_states=True)
    if P == 1:  # nothing to split: the plain call
        h, last = kernel(x, keep)
    else:
        h, last = kernel(_from_incoming_state(x, axis_name, combine, P), keep)
    if not o.return_last_states:
        return h
    is_last = jax.lax.axis_index(axis_name) == P - 1
    return h, tuple(jax.lax.psum(jnp.where(is_last, s, 0.0), axis_name) for s in last)
