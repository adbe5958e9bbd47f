"""Packed documents: `segment_ids` (B, S) int, a new document wherever the id differs from the previous position's.

The exact reset is a forget gate of -inf at each document start: log σ(-inf) floors to base.LOG_FORGET_FLOOR, so
the carried state is multiplied by exactly 0 and every later decay inside the document is kept exact (the Triton
kernels carry the log decay as a two-float sum for this; docs/math.md). Every backend therefore runs packed rows
unchanged, and the result is each document run on its own from a zero state (the first one from the given initial
states), up to eps·e^m in the denominator, where the max-state m of a document's first step can differ; the last
states are those of the last document. Gradients of the gates at document starts are 0, as in a separate run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_segment_ids(segment_ids: Any, shape: tuple[int, int]) -> jax.Array:
    """segment_ids as an int array of `shape` (B, S); ValueError / TypeError naming it otherwise."""
    if not (hasattr(segment_ids, "shape") and hasattr(segment_ids, "dtype")):
        raise TypeError(f"segment_ids must be an integer array (B, S), got {type(segment_ids).__name__}.")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}.")
    if tuple(np.shape(segment_ids)) != tuple(shape):
        raise ValueError(f"segment_ids must be (B, S) = {tuple(shape)}, got shape {tuple(np.shape(segment_ids))}.")
    return jnp.asarray(segment_ids)


def document_starts(segment_ids: jax.Array, sequence_axis_name: Any = None, *, first: bool = False) -> jax.Array:
    """(B, S) bool: True where a document begins after another one (the id differs from the previous position's).
    Position 0 of the sequence is `first`. With `sequence_axis_name` (inside shard_map, S split along that axis)
    position 0 of a later shard compares with the last id of the shard before it."""
    head = jnp.full_like(segment_ids[:, :1], first, dtype=bool)
    if sequence_axis_name is not None:
        P = jax.lax.axis_size(sequence_axis_name)
        before = jax.lax.ppermute(segment_ids[:, -1:], sequence_axis_name, [(d, d + 1) for d in range(P - 1)])
        head = jnp.where(jax.lax.axis_index(sequence_axis_name) == 0, head, segment_ids[:, :1] != before)
    return jnp.concatenate([head, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def cut_forget_gates(f: jax.Array, starts: jax.Array) -> jax.Array:
    """f (B, NH, S) with -inf at the document starts (B, S): the exact reset."""
    return jnp.where(starts[:, None, :], jnp.asarray(-jnp.inf, f.dtype), f)


def from_cu_seqlens(cu_seqlens: Any, seq_len: int) -> np.ndarray:
    """flash-linear-attention's convention -> segment_ids (1, S): `cu_seqlens` [0, l1, l1 + l2, ..., S] are the
    document offsets of one packed row."""
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] != seq_len or np.any(np.diff(cu) <= 0):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to S = {seq_len}, got {cu.tolist()}.")
    return np.repeat(np.arange(cu.size - 1, dtype=np.int32), np.diff(cu))[None, :]
