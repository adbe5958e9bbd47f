"""mLSTM backends: a registry name -> backend class, built with `create_mlstm_backend`."""

from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.chunkwise import (
    mLSTMBackendChunkwise,
    mLSTMBackendChunkwiseConfig,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import (
    create_mlstm_backend,
    mLSTMBackend,
    mLSTMBackendNameAndKwargs,
    register_backend,
    registered_backends,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent import (
    mLSTMBackendRecurrent,
    mLSTMBackendRecurrentConfig,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.simple import mLSTMBackendParallel, mLSTMBackendParallelConfig
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.triton_kernels import (
    mLSTMBackendTriton,
    mLSTMBackendTritonConfig,
)

__all__ = [
    "create_mlstm_backend",
    "mLSTMBackend",
    "mLSTMBackendChunkwise",
    "mLSTMBackendChunkwiseConfig",
    "mLSTMBackendNameAndKwargs",
    "mLSTMBackendParallel",
    "mLSTMBackendParallelConfig",
    "mLSTMBackendRecurrent",
    "mLSTMBackendRecurrentConfig",
    "mLSTMBackendTriton",
    "mLSTMBackendTritonConfig",
    "register_backend",
    "registered_backends",
]
