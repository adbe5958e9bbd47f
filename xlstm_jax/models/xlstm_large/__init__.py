"""The xLSTM-7B ("xlstm_large" / mLSTMv1) language model in Flax NNX on the `xlstm_jax.mlstm` backends.

`xLSTMLargeConfig` (config), `xLSTMLarge` (model), `from_pretrained` / `save_pretrained` / `state_dict`
(safetensors checkpoints in the HF and plain layouts; `CheckpointError`, a ValueError, for checkpoints that
cannot be loaded exactly; the tokenizer saved next to the weights: `load_tokenizer`, `special_token_ids`),
`generate` (batched prefill + recurrent decoding; `Generator` keeps one model split for repeated calls).
Attributes load lazily: importing the package does not import flax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "xLSTMLargeConfig": "xlstm_jax.models.xlstm_large.config",
    "xLSTMLarge": "xlstm_jax.models.xlstm_large.model",
    "zero_states": "xlstm_jax.models.xlstm_large.model",
    "CheckpointError": "xlstm_jax.models.xlstm_large.checkpoint_files",
    "save_pretrained": "xlstm_jax.models.xlstm_large.checkpoint",
    "state_dict": "xlstm_jax.models.xlstm_large.checkpoint",
    "load_state_dict": "xlstm_jax.models.xlstm_large.checkpoint",
    "load_tokenizer": "xlstm_jax.models.xlstm_large.tokenizer",
    "special_token_ids": "xlstm_jax.models.xlstm_large.tokenizer",
    "generate": "xlstm_jax.models.xlstm_large.generation",
    "GenerationOutput": "xlstm_jax.models.xlstm_large.generation",
    "Generator": "xlstm_jax.models.xlstm_large.generation",
}
__all__ = sorted([*_EXPORTS, "from_pretrained"])


def from_pretrained(path: str, dtype: Any = None, **overrides: Any) -> Any:
    """Load an xLSTM-7B checkpoint directory (HF `xLSTM-7b` or plain `xlstm_large` safetensors layout).

    dtype: the matmul compute dtype (None: the checkpoint's dtype, e.g. float32 for the hub checkpoint). Keyword
    overrides: param_dtype, weight_mode, backend, chunk_size, allow_nonfinite (see
    `xlstm_jax.models.xlstm_large.checkpoint.from_pretrained`). Returns an `xLSTMLarge` whose call on int tokens
    (B, S) gives float32 logits (B, S, V). A checkpoint that cannot be loaded exactly as saved raises
    `CheckpointError` (a ValueError); path problems raise OSErrors.
    """
    from xlstm_jax.models.xlstm_large.checkpoint import from_pretrained as load

    return load(path, dtype, **overrides)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'xlstm_jax.models.xlstm_large' has no attribute {name!r}")
