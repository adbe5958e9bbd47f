"""The documented Triton chunkwise backend: runs the Triton kernel family named by `backend_name` through the op
(`xlstm_jax.mlstm.dispatch`).

`max_triton`, `max_triton_noslice` and `triton_stablef` run the limit-chunk kernels (`triton_limit_chunk`),
`max_triton_xlchunksize` the TFLA xl-chunk kernels (`triton_xl_chunk`). Every config field is honoured
(upstream silently ignores several): `autocast_dtype`, `chunk_size`, `eps`, `norm_val` and `stabilize_correctly`
reach the kernels for every backend name. `reduce_slicing` (limit-chunk) selects whether the chunk-border state
buffers are passed whole to the output and backward kernels (True) or with the last state sliced off in XLA first
(False); the results are identical, True avoids a copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from xlstm_jax.kernels.triton.tuning import TritonTuning
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend, register_backend

BackendNameType = Literal["max_triton_xlchunksize", "max_triton_noslice", "max_triton", "triton_stablef"]

# Newer upstream spells kernels "<module>--<kernel>"; both spellings are accepted.
_ALIASES = {
    "chunkwise--triton_limit_chunk": "max_triton_noslice",
    "chunkwise--triton_xl_chunk": "max_triton_xlchunksize",
}


@dataclasses.dataclass
class mLSTMBackendTritonConfig:
    """Configuration of the Triton chunkwise backend."""

    autocast_dtype: str | None = None
    """Dtype to use for the kernel computation. If None, uses the query dtype."""
    chunk_size: int = 64
    """Chunk size for the kernel computation."""
    reduce_slicing: bool = True
    """Whether to reduce slicing operations before the kernel computation (identical results, less copying)."""
    backend_name: BackendNameType = "max_triton_noslice"
    """Backend name for the kernel type used."""
    eps: float = 1e-6
    """Epsilon value used in the kernel."""
    norm_val: float = 1.0
    """Lower bound of the normalizer: max(norm_val e^-m, |n q|)."""
    stabilize_correctly: bool = True
    """Whether to stabilize correctly, i.e. scale norm_val with the maximizer state - see above."""
    sequence_axis_name: str | None = None
    """Mesh axis the sequence is split over, inside shard_map (context parallelism, as in `xlstm_jax.mlstm`; with
    the standard denominator: norm_val 1.0, stabilize_correctly True)."""
    sequence_combine: str = "auto"
    """How the shards' incoming states are combined: "auto", "all_gather" or "ppermute"."""
    mesh_axes: Any = None
    """Under `jax.set_mesh`, the mesh axes (B, NH, S) to split the cell's inputs over (as in `xlstm_jax.mlstm`)."""

    def __post_init__(self):
        name = _ALIASES.get(self.backend_name, self.backend_name)
        if name not in get_args(BackendNameType):
            raise ValueError(
                f"backend_name must be one of {list(get_args(BackendNameType)) + list(_ALIASES)}, "
                f"got {self.backend_name!r}."
            )

    def assign_model_config_params(self, model_config) -> None:
        """Nothing to take from the model config: the kernels work for any sequence length."""


@register_backend("triton_kernels")
class mLSTMBackendTriton(mLSTMBackend):
    """mLSTM backend running Triton chunkwise kernels on (B, NH, S, ·) inputs."""

    config_class = mLSTMBackendTritonConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) or (B, NH, S, 1).

        Returns h (B, NH, S, DHHV), or `(h, (C, n, m))` with float32 states when `return_last_states`.
        """
        cfg = self.config
        name = _ALIASES.get(cfg.backend_name, cfg.backend_name)
        implementation = "triton_xl_chunk" if name == "max_triton_xlchunksize" else "triton_limit_chunk"
        return self._through_op(
            implementation, q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states,
            chunk_size=cfg.chunk_size, tuning=TritonTuning(reduce_slicing=cfg.reduce_slicing),
            autocast_dtype=cfg.autocast_dtype, norm_val=cfg.norm_val, stabilize_correctly=cfg.stabilize_correctly,
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        Triton kernels already handle the head dimension, hence not to be vmaped over.

        Returns:
            bool: False
        """
        return False
