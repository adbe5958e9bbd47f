"""Configuration of the xLSTM-7B ("xlstm_large" / mLSTMv1) language model.

The defaults are the released xLSTM-7B: D 4096, 32 blocks, 8 heads, vocab 50304, DHQK 256, DHV 512, FFN 10944.
Any size works; the derived dimensions are properties. Conversion to and from the two checkpoint config files
(HF `config.json`, model_type "xlstm", and the plain `xlstm_large` config) lives here too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_MODES = ("single", "fused")
STEP_BACKEND = "mlstm_step"  # decoding steps through `xlstm_jax.mlstm_step` (the fused Triton step on a GPU)
PREFILL_BACKEND = "mlstm_prefill"  # forward-only prompt chunks from a state through `mlstm_prefill` (serving)


def _round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class xLSTMLargeConfig:
    """Architecture, numerics and backend choice of the model.

    Dimensions: qk_dim = round_up(int(D * qk_dim_factor), mlstm_round_up_to_multiple_of) (1: the torch
    `xlstm_large` rule, 64: the HF rule), v_dim likewise, FFN width = ceil(D * ffn_proj_factor / 64) * 64.
    `backend` is any of `xlstm_jax.BACKEND_NAMES` ("auto": a Triton kernel on a CUDA GPU, native_chunkwise
    elsewhere); `step_backend` runs single-token decoding steps: "mlstm_step" (`xlstm_jax.mlstm_step`, the fused
    Triton step kernel on a CUDA GPU) or any backend name. Parameters are stored in `param_dtype`, matmuls
    run in `compute_dtype` with float32 accumulation; gates, norm statistics, mLSTM states and logits are float32.
    `document_reset` is how packed documents (`segment_ids`) are separated: "exact" (each runs as if alone) or
    "forget_gate" (the forget gate set to `reset_fgate_value` at each start: the upstream approximation, for
    checkpoints trained with it). `input_gate` "sigmoid" makes every layer an mLSTMsig cell (σ input gate, no
    max-state; `xlstm_jax.mlstm.input_gates`). Saved configs record both. The token ids (None: the model has no
    such token) are the xLSTM-7B's by default; a model trained here takes them from its tokenizer and --eos-id.
    """

    embedding_dim: int = 4096
    num_heads: int = 8
    num_blocks: int = 32
    vocab_size: int = 50304
    use_bias: bool = False
    norm_eps: float = 1e-6
    add_out_norm: bool = True
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    mlstm_round_up_to_multiple_of: int = 1
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float | None = 15.0
    output_logit_soft_cap: float | None = 30.0
    weight_mode: str = "single"
    tie_word_embeddings: bool = False
    eps: float = 1e-6
    backend: str = "auto"
    chunk_size: int | None = None
    step_backend: str = "mlstm_step"
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    document_reset: str = "exact"
    input_gate: str = "exp"
    reset_fgate_value: float = -25.0
    igate_bias_init: float = -10.0
    fgate_bias_init_range: tuple[float, float] = (3.0, 6.0)
    bos_token_id: int | None = 0
    pad_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_heads", "num_blocks", "vocab_size", "mlstm_round_up_to_multiple_of",
                     "ffn_round_up_to_multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.input_gate not in ("exp", "sigmoid"):
            raise ValueError(f"input_gate must be 'exp' or 'sigmoid' (mLSTMsig), got {self.input_gate!r}.")
        if self.document_reset not in ("exact", "forget_gate"):
            raise ValueError(f"document_reset must be 'exact' or 'forget_gate', got {self.document_reset!r}.")
        if self.weight_mode not in _WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {_WEIGHT_MODES}, got {self.weight_mode!r}.")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}.")
        from xlstm_jax.mlstm.api import BACKEND_NAMES

        for name, names in (("backend", BACKEND_NAMES), ("step_backend", (*BACKEND_NAMES, STEP_BACKEND))):
            if getattr(self, name) not in names:
                raise ValueError(f"{name} must be one of {list(names)}, got {getattr(self, name)!r}.")
        for name, dim in (("qk_dim", self.qk_dim), ("v_dim", self.v_dim)):
            if dim < self.num_heads or dim % self.num_heads:
                raise ValueError(
                    f"{name} = {dim} (embedding_dim {self.embedding_dim} x factor) must be a positive multiple of "
                    f"num_heads = {self.num_heads}."
                )
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            cap = getattr(self, name)
            if cap is not None and not cap > 0:
                raise ValueError(f"{name} must be positive or None, got {cap!r}.")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a token id >= 0 or None, got {value!r}.")
        if len(self.fgate_bias_init_range) != 2:
            raise ValueError(f"fgate_bias_init_range must be (low, high), got {self.fgate_bias_init_range!r}.")

    @property
    def qk_dim(self) -> int:
        """NH * DHQK."""
        return _round_up(int(self.embedding_dim * self.qk_dim_factor), self.mlstm_round_up_to_multiple_of)

    @property
    def v_dim(self) -> int:
        """NH * DHV."""
        return _round_up(int(self.embedding_dim * self.v_dim_factor), self.mlstm_round_up_to_multiple_of)

    @property
    def qk_head_dim(self) -> int:
        """DHQK."""
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        """DHV."""
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """F, the SwiGLU hidden width."""
        return _round_up(int(math.ceil(self.embedding_dim * self.ffn_proj_factor)), self.ffn_round_up_to_multiple_of)

    @property
    def compute_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def param_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "xLSTMLargeConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters (embedding and LM head counted separately unless tied)."""
        D, F, NH = self.embedding_dim, self.ffn_dim, self.num_heads
        bias = 1 if self.use_bias else 0
        mlstm = (2 * self.qk_dim + 2 * self.v_dim) * (D + bias) + 2 * NH * (D + 1) + self.v_dim * (1 + bias)
        mlstm += D * (self.v_dim + bias)
        ffn = 2 * F * (D + bias) + D * (F + bias)
        norms = 2 * D * (1 + bias)
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        out_norm = D * (1 + bias) if self.add_out_norm else 0
        return self.vocab_size * D + self.num_blocks * (mlstm + ffn + norms) + out_norm + head

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field."""
        out = dataclasses.asdict(self)
        out["fgate_bias_init_range"] = list(self.fgate_bias_init_range)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "xLSTMLargeConfig":
        """Inverse of `to_dict`; unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown xLSTMLargeConfig fields {unknown}; known: {sorted(names)}.")
        data = dict(data)
        if "fgate_bias_init_range" in data:
            data["fgate_bias_init_range"] = tuple(data["fgate_bias_init_range"])
        return cls(**data)


# Checkpoint config keys (HF `config.json` and the plain `xlstm_large` config) -> our field names. Several
# spellings exist across upstream revisions.
_ALIASES = {
    "embedding_dim": ("embedding_dim", "hidden_size"),
    "num_blocks": ("num_blocks", "num_hidden_layers"),
    "num_heads": ("num_heads",),
    "vocab_size": ("vocab_size",),
    "use_bias": ("use_bias",),
    "norm_eps": ("norm_eps",),
    "add_out_norm": ("add_out_norm",),
    "qk_dim_factor": ("qk_dim_factor",),
    "v_dim_factor": ("v_dim_factor",),
    "mlstm_round_up_to_multiple_of": ("mlstm_round_up_to_multiple_of",),
    "ffn_proj_factor": ("ffn_proj_factor",),
    "ffn_round_up_to_multiple_of": ("ffn_round_up_to_multiple_of",),
    "gate_soft_cap": ("gate_soft_cap",),
    "output_logit_soft_cap": ("output_logit_soft_cap",),
    "weight_mode": ("weight_mode",),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "eps": ("eps",),
    "chunk_size": ("chunk_size",),
    "bos_token_id": ("bos_token_id",),
    "pad_token_id": ("pad_token_id",),
    "eos_token_id": ("eos_token_id",),
    # ours: they change what the model computes, so a saved model must keep them (absent: the xLSTM-7B defaults)
    "input_gate": ("input_gate",),
    "document_reset": ("document_reset",),
    "reset_fgate_value": ("reset_fgate_value",),
}
# Fields whose spellings may disagree, the first present winning: transformers' xLSTMConfig builds num_blocks blocks
# and keeps num_hidden_layers (its default 32 when only num_blocks is given) for cache sizes and initialisation.
# Whether the tensors hold that many blocks is checked against the weights.
_FIRST_WINS = ("num_blocks",)


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(xLSTMLargeConfig)}  # "int", "float | None", …
_NON_NEGATIVE = ("bos_token_id", "pad_token_id", "eos_token_id")
_SIGNED = ("reset_fgate_value",)


def _number(value: Any, base: str) -> int | float | None:
    """`value` as a finite int (`base` "int"; exactly integral floats too) or float, or None if it is not one."""
    if isinstance(value, str) and base == "float":
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if base == "int":
        return int(value) if value == int(value) else None
    return float(value)


def _checkpoint_value(field: str, key: str, value: Any) -> Any:
    """`value` of checkpoint config key `key` as the type of `field`, or a ValueError naming key, value and type.

    Bools are not numbers; an int field takes an exactly integral float (4.0 -> 4, not 4.5); a float field takes a
    numeric string (YAML 1.1 reads "1e-06" as one). Numbers are finite and positive (token ids: >= 0); null is
    accepted for the optional fields only (the soft caps, chunk_size and the token ids)."""
    kind = _FIELD_TYPES[field]
    base = kind.removesuffix(" | None")
    if value is None and base != kind:
        return None
    if base in ("bool", "str"):
        if type(value) is not {"bool": bool, "str": str}[base]:
            raise ValueError(f"{key} = {value!r}: expected {'true or false' if base == 'bool' else 'a string'}.")
        return value
    number = _number(value, base)
    non_negative = field in _NON_NEGATIVE
    if field in _SIGNED and number is not None:
        return number
    if number is None or number < 0 or (number == 0 and not non_negative):
        noun = "integer" if base == "int" else "finite number"
        or_null = " or null" if base != kind else ""
        sign = "" if field in _SIGNED else "non-negative " if non_negative else "positive "
        raise ValueError(f"{key} = {value!r}: expected a {sign}{noun}{or_null}.")
    return number


def config_from_checkpoint_dict(data: dict[str, Any], *, hf: bool) -> xLSTMLargeConfig:
    """Our config from a checkpoint's config dict (HF `config.json` if `hf`, else the plain `xlstm_large` one).

    Kernel names, modes and dtypes in the file are ignored (the backend is ours to choose); HF rounds the q/k and v
    widths up to a multiple of 64, the plain format does not. Missing fields (and null ones, except the optional
    soft caps, chunk_size and the token ids) keep the xLSTM-7B defaults. Values are checked (`_checkpoint_value`);
    two spellings of one field must agree. Errors are ValueErrors naming the key, the value and what was expected.
    """
    kwargs: dict[str, Any] = {"mlstm_round_up_to_multiple_of": 64 if hf else 1}
    for field, keys in _ALIASES.items():
        optional = _FIELD_TYPES[field].endswith(" | None")
        given = {key: _checkpoint_value(field, key, data[key]) for key in keys
                 if key in data and (optional or data[key] is not None)}
        if len(set(given.values())) > 1 and field not in _FIRST_WINS:
            raise ValueError(" and ".join(f"{key} = {data[key]!r}" for key in given) + " disagree.")
        if given:
            kwargs[field] = next(iter(given.values()))
    return xLSTMLargeConfig(**kwargs)


def config_to_checkpoint_dict(config: xLSTMLargeConfig, *, hf: bool) -> dict[str, Any]:
    """The config file contents for a checkpoint in the HF (`config.json`, model_type "xlstm") or plain layout."""
    out: dict[str, Any] = {field: getattr(config, field) for field in _ALIASES if field != "chunk_size"}
    out["chunk_size"] = config.chunk_size or 64
    out["mode"] = "inference"
    out["return_last_states"] = True
    out["autocast_kernel_dtype"] = "bfloat16"
    out["inference_state_dtype"] = "float32"
    out["norm_reduction_force_float32"] = True
    if hf:
        out.update(
            model_type="xlstm",
            architectures=["xLSTMForCausalLM"],
            hidden_size=config.embedding_dim,
            num_hidden_layers=config.num_blocks,
            torch_dtype=config.param_dtype,
        )
    return out
