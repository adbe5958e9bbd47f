"""xlstm_jax: mLSTM kernels (native JAX and Triton), backends and xLSTM models for JAX."""

from xlstm_jax.mlstm import BACKEND_NAMES, mlstm

__version__ = "0.1.0"
__all__ = ["BACKEND_NAMES", "mlstm", "__version__"]
