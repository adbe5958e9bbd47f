"""Native chunkwise backend: the XLA chunkwise mLSTM (kernels/mlstm_chunkwise/native_chunkwise.py) behind the
backend interface; runs everywhere, O(S) memory, exact custom backward."""

from __future__ import annotations

import dataclasses

import jax

from xlstm_jax.kernels.mlstm_chunkwise.native_chunkwise import mlstm_chunkwise_native
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, register_backend


@dataclasses.dataclass
class mLSTMBackendChunkwiseConfig:
    """Configuration of the native chunkwise backend."""

    chunk_size: int = 64
    """Chunk size, a power of two in 16..512."""
    eps: float = 1e-6
    """Denominator epsilon."""
    autocast_dtype: str | None = None
    """Matmul operand dtype; None uses q's dtype."""

    def assign_model_config_params(self, model_config) -> None:
        """Nothing to take from the model config: any sequence length works."""


@register_backend("chunkwise")
class mLSTMBackendChunkwise(mLSTMBackend):
    """Native (XLA) chunkwise mLSTM on (B, NH, S, ·) inputs."""

    config_class = mLSTMBackendChunkwiseConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) or (B, NH, S, 1). Returns h (B, NH, S, DHHV)
        or (h, (C, n, m)) with float32 states."""
        cfg = self.config
        return mlstm_chunkwise_native(
            q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states=return_last_states, eps=cfg.eps,
            chunk_size=cfg.chunk_size, autocast_dtype=cfg.autocast_dtype,
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension: False, it takes the heads axis itself."""
        return False
