"""The documented recurrent backend and its documented functions `recurrent_step_fw` and `recurrent_sequence_fw`
(which live with the `native_recurrent` implementation in xlstm_jax/kernels/mlstm_recurrent.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from xlstm_jax.kernels.mlstm_recurrent import recurrent_sequence_fw, recurrent_step_fw
from xlstm_jax.mlstm.api import mlstm
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, register_backend

__all__ = ["mLSTMBackendRecurrent", "mLSTMBackendRecurrentConfig", "recurrent_sequence_fw", "recurrent_step_fw"]


@dataclasses.dataclass
class mLSTMBackendRecurrentConfig:
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

    def assign_model_config_params(self, model_config: Any) -> None:
        """Take `context_length` from the model config when it has one."""
        self.context_length = getattr(model_config, "context_length", self.context_length)


@register_backend("recurrent")
class mLSTMBackendRecurrent(mLSTMBackend):
    """Step-by-step mLSTM on (B, NH, S, ·) inputs."""

    config_class = mLSTMBackendRecurrentConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """See `recurrent_sequence_fw`; eps, state_dtype and use_scan come from the config."""
        cfg = self.config
        if cfg.mesh_axes is not None:
            return mlstm(q, k, v, i, f, c_initial=c_initial, n_initial=n_initial, m_initial=m_initial,
                         return_last_states=return_last_states, eps=cfg.eps, backend="native_recurrent",
                         mesh_axes=cfg.mesh_axes)
        return recurrent_sequence_fw(
            q, k, v, i, f, c_initial=c_initial, n_initial=n_initial, m_initial=m_initial,
            return_last_states=return_last_states, eps=cfg.eps, state_dtype=cfg.state_dtype, use_scan=cfg.use_scan,
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        The backend was not written to be independent of the heads dimension, and thus cannot be vmapped.

        Returns:
            bool: False
        """
        return False
