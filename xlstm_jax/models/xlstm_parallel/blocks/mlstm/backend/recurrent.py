"""The documented recurrent backend and its documented functions `recurrent_step_fw` and `recurrent_sequence_fw`
(which live with the `native_recurrent` implementation in xlstm_jax/kernels/native/recurrent.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from xlstm_jax.kernels.native.recurrent import RecurrentTuning, recurrent_sequence_fw, recurrent_step_fw
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import (
    ContextLengthFromModel,
    mLSTMBackend,
    register_backend,
)

__all__ = ["mLSTMBackendRecurrent", "mLSTMBackendRecurrentConfig", "recurrent_sequence_fw", "recurrent_step_fw"]


@dataclasses.dataclass
class mLSTMBackendRecurrentConfig(ContextLengthFromModel):
    """Configuration of the recurrent backend."""

    context_length: int = -1
    """Context length of the model (informational here: any S runs)."""
    eps: float = 1e-6
    """Denominator epsilon."""
    state_dtype: str | None = None
    """dtype of the states (name); None: see `recurrent_sequence_fw`."""
    use_scan: bool = False
    """lax.scan over time instead of an unrolled Python loop."""
    mesh_axes: Any = None
    """Under `jax.set_mesh`, the mesh axes (B, NH, S) to split the cell's inputs over (as in `xlstm_jax.mlstm`)."""

@register_backend("recurrent")
class mLSTMBackendRecurrent(mLSTMBackend):
    """Step-by-step mLSTM on (B, NH, S, ·) inputs."""

    config_class = mLSTMBackendRecurrentConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """As `recurrent_sequence_fw` (the op's `native_recurrent`); eps, state_dtype and use_scan come from the
        config."""
        cfg = self.config
        tuning = RecurrentTuning(cfg.state_dtype, cfg.use_scan)
        out = self._through_op("native_recurrent", q, k, v, i, f, c_initial, n_initial, m_initial,
                               return_last_states, tuning=tuning)
        if return_last_states and c_initial is not None:  # as recurrent_sequence_fw: back to the initial dtypes
            h, states = out
            return h, tuple(s.astype(jnp.result_type(x)) for s, x in zip(states, (c_initial, n_initial, m_initial)))
        return out

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        The backend was not written to be independent of the heads dimension, and thus cannot be vmapped.

        Returns:
            bool: False
        """
        return False
