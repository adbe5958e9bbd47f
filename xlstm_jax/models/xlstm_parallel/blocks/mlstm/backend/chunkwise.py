"""Native chunkwise backend: the XLA chunkwise mLSTM (kernels/native/) behind the backend interface.
Runs on every platform, any sequence length, O(S) memory, exact hand-written backward."""

from __future__ import annotations

import dataclasses
from typing import Any

from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, register_backend


@dataclasses.dataclass
class mLSTMBackendChunkwiseConfig:
    """Configuration of the native chunkwise backend."""

    chunk_size: int = 64
    """Chunk size L, a power of two in 16..512; S need not be a multiple of it."""
    eps: float = 1e-6
    """Denominator epsilon, added after max(|q·n|, e^{-m})."""
    autocast_dtype: str | None = None
    """Matmul operand dtype ("float32" | "bfloat16" | "float16"); None uses q's dtype."""
    sequence_axis_name: str | None = None
    """Mesh axis the sequence is split over, inside shard_map (context parallelism, as in `xlstm_jax.mlstm`)."""
    sequence_combine: str = "auto"
    """How the shards' incoming states are combined: "auto", "all_gather" or "ppermute"."""
    mesh_axes: Any = None
    """Under `jax.set_mesh`, the mesh axes (B, NH, S) to split the cell's inputs over (as in `xlstm_jax.mlstm`)."""

    def assign_model_config_params(self, model_config) -> None:
        """Nothing to take from the model config: any sequence length works."""


@register_backend("chunkwise")
class mLSTMBackendChunkwise(mLSTMBackend):
    """Native (XLA) chunkwise mLSTM on (B, NH, S, ·) inputs."""

    config_class = mLSTMBackendChunkwiseConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) or (B, NH, S, 1); optional initial states
        (B, NH, DHQK, DHHV), (B, NH, DHQK), (B, NH). Returns h (B, NH, S, DHHV) in q's dtype, or (h, (C, n, m))
        with float32 states."""
        cfg = self.config
        return self._through_op("native_chunkwise", q, k, v, i, f, c_initial, n_initial, m_initial,
                                return_last_states, chunk_size=cfg.chunk_size, autocast_dtype=cfg.autocast_dtype)

    @property
    def can_vmap_over_heads(self) -> bool:
        """False: the backend takes the heads axis itself."""
        return False
