"""The documented parallel backend (the op's `native_parallel` through `xlstm_jax.mlstm.dispatch`) and its documented
function `parallel_stabilized_simple` (which lives with `native_parallel` in xlstm_jax/kernels/native/parallel.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.native.parallel import parallel_stabilized_simple
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import (
    ContextLengthFromModel,
    mLSTMBackend,
    register_backend,
)

__all__ = ["mLSTMBackendParallel", "mLSTMBackendParallelConfig", "parallel_stabilized_simple"]


@dataclasses.dataclass
class mLSTMBackendParallelConfig(ContextLengthFromModel):
    """Configuration of the parallel backend."""

    context_length: int = -1
    """Longest sequence the backend accepts; -1: any length."""
    eps: float = 1e-6
    """Denominator epsilon, added after max(|q·n|, e^{-m})."""
    mesh_axes: Any = None
    """Under `jax.set_mesh`, the mesh axes (B, NH, S) to split the cell's inputs over (as in `xlstm_jax.mlstm`)."""

@register_backend("parallel_stabilized")
class mLSTMBackendParallel(mLSTMBackend):
    """Parallel stabilized mLSTM on per-head (B, S, ·) inputs (vmapped over heads) or (B, NH, S, ·)."""

    config_class = mLSTMBackendParallelConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """q, k (B, NH, S, DHQK) or per-head (B, S, DHQK); v likewise with DHV; gates (..., S, 1) or (..., S).

        Any S <= context_length (any S when it is -1). Optional initial states (B, [NH,] DHQK, DHV),
        (B, [NH,] DHQK), (B, [NH]). Runs the op's `native_parallel` (the quadratic stabilized form of
        `parallel_stabilized_simple`, with states); returns h, or (h, (C, n, m)) with float32 states.
        """
        if np.ndim(q) not in (3, 4):
            raise ValueError(f"q must be (B, NH, S, DHQK) or per-head (B, S, DHQK), got shape {np.shape(q)}.")
        S, ctx = np.shape(q)[-2], self.config.context_length
        if ctx != -1 and S > ctx:
            raise ValueError(f"sequence length S={S} exceeds the backend's context_length={ctx}.")
        per_head = np.ndim(q) == 3
        args = (q, k, v, i, f, c_initial, n_initial, m_initial)
        if per_head:  # per-head inputs get a head axis of 1
            for name, x in (("k", k), ("v", v)):
                if np.ndim(x) != 3:
                    raise ValueError(f"q has the per-head shape (B, S, DHQK) = {np.shape(q)}, so {name} must be "
                                     f"per-head (B, S, ·) too, got shape {np.shape(x)}.")
            args = tuple(None if x is None else jnp.expand_dims(x, 1) for x in args)
        out = self._through_op("native_parallel", *args, return_last_states)
        return jax.tree.map(lambda x: jnp.squeeze(x, 1), out) if per_head else out

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        The backend is written independent of the heads dimension, and thus can be vmapped.

        Returns:
            bool: True
        """
        return True
