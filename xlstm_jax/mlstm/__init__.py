"""The mLSTM op, the one door into the kernels: `mlstm` (and `dispatch` of a described `MLSTMCall`), the
implementations as data (`IMPLEMENTATIONS`) with their tuning classes, and the float64 reference (reference.py)."""

from xlstm_jax.kernels.native.recurrent import RecurrentTuning
from xlstm_jax.kernels.triton.tuning import TritonTuning
from xlstm_jax.mlstm.api import BACKEND_NAMES, MLSTMCall, dispatch, mlstm, resolve_backend
from xlstm_jax.mlstm.implementations import IMPLEMENTATIONS, Implementation

__all__ = ["BACKEND_NAMES", "IMPLEMENTATIONS", "Implementation", "MLSTMCall", "RecurrentTuning", "TritonTuning",
           "dispatch", "mlstm", "resolve_backend"]
