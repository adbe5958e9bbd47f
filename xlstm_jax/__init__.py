"""xlstm_jax: mLSTM kernels (native JAX and Triton), backends and xLSTM models for JAX."""

from xlstm_jax.mlstm import BACKEND_NAMES, mlstm
from xlstm_jax.models.xlstm_large import from_pretrained

__version__ = "0.1.0"
__all__ = ["BACKEND_NAMES", "from_pretrained", "mlstm", "__version__"]
