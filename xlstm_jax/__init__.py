"""xlstm_jax: mLSTM kernels (native JAX and Triton), backends and xLSTM models for JAX.

The names below load on first use, so `import xlstm_jax` (and with it `xlstm-jax --help`) does not import jax.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["BACKEND_NAMES", "from_pretrained", "load_tokenizer", "mlstm", "mlstm_step", "__version__"]


class _Package(types.ModuleType):
    """`xlstm_jax.mlstm` is the function, although a subpackage has that name: importing the subpackage assigns
    it to this attribute, and the setter leaves the function in place."""

    @property
    def mlstm(self) -> Any:
        from xlstm_jax.mlstm.api import mlstm

        return mlstm

    @mlstm.setter
    def mlstm(self, _subpackage: Any) -> None:
        pass


def __getattr__(name: str) -> Any:
    if name == "BACKEND_NAMES":
        from xlstm_jax.mlstm.api import BACKEND_NAMES

        return BACKEND_NAMES
    if name == "mlstm_step":
        from xlstm_jax.mlstm.step import mlstm_step

        return mlstm_step
    if name == "from_pretrained":
        from xlstm_jax.models.xlstm_large import from_pretrained

        return from_pretrained
    if name == "load_tokenizer":
        from xlstm_jax.models.xlstm_large.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'xlstm_jax' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
