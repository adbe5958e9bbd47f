"""`xlstm_jax.train`: train xLSTM-7B-architecture models on multi-query associative recall (MQAR) or on token /
text corpora.

`train(TrainConfig(...))` runs a job; `add_train_arguments` / `run_train` wire `xlstm-jax train`. Attributes load
lazily, so importing the package (or its CLI helpers) does not import jax, flax, optax or orbax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "xlstm_jax.train.config",
    "MQARConfig": "xlstm_jax.train.config",
    "mqar_batch": "xlstm_jax.train.mqar",
    "train": "xlstm_jax.train.loop",
    "TrainResult": "xlstm_jax.train.loop",
    "add_train_arguments": "xlstm_jax.train.cli",
    "run_train": "xlstm_jax.train.cli",
    "TRAIN_DESCRIPTION": "xlstm_jax.train.cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'xlstm_jax.train' has no attribute {name!r}")
