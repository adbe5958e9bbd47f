"""The mLSTM op: one signature (`api.mlstm`), its input contract (`base`) and the float64 reference."""

from xlstm_jax.mlstm.api import BACKEND_NAMES, IMPLEMENTATIONS, mlstm, resolve_backend

__all__ = ["BACKEND_NAMES", "IMPLEMENTATIONS", "mlstm", "resolve_backend"]
