"""Safetensors checkpoints of the xLSTM-7B model, without torch.

Two layouts, both torch state dicts (Linear weights (out, in), transposed into Dense kernels (in, out)):
- "hf": the HF hub `NX-AI/xLSTM-7b` layout: `backbone.embeddings.weight`, `backbone.blocks.{i}.…`,
  `backbone.out_norm.weight`, `lm_head.weight`, plus `config.json` (model_type "xlstm"); sharded files
  `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, or one `model.safetensors`.
- "plain": the torch `xlstm_large` layout: the same keys except `embedding.weight`, plus `config.yaml`; one
  `model.safetensors` or shards `model_0.safetensors`, `model_1.safetensors`, … .
Either may use "fused" weight keys (`qkv_opreact`, `ifgate_preact`, `proj_up_gate_z`); they are split or fused to
match the model's `weight_mode`. Loading then saving in the same layout and weight mode reproduces every tensor
bit for bit.

Loading yields exactly what was saved or raises: `checkpoint_files` refuses directories with more than one layout
and files outside the directory; the config file, the tensor names, shapes and dtypes are checked before any weight
is read, and NaN/inf weights are refused. Errors are `CheckpointError` (a ValueError) or an OSError for paths.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from xlstm_jax.models.xlstm_large.checkpoint_files import (
    FLOAT_DTYPES,
    INDEX_FILE,
    CheckpointError,
    TensorInfo,
    check_directory,
    config_file,
    read_headers,
    read_mapping,
    read_tensors,
    training_export,
    write_checkpoint,
)
from xlstm_jax.models.xlstm_large.config import (
    config_from_checkpoint_dict,
    config_to_checkpoint_dict,
    xLSTMLargeConfig,
)
from xlstm_jax.models.xlstm_large.model import xLSTMLarge
from xlstm_jax.models.xlstm_large.quantize import quantized_scheme
from xlstm_jax.models.xlstm_large.tokenizer import read_tokenizer, tokenizer_writers

LAYOUTS = ("hf", "plain")
_EMBEDDING_KEY = {"hf": "backbone.embeddings.weight", "plain": "embedding.weight"}
# fused key -> the single keys concatenated along the output axis, in this order (upstream's fused weight mode).
_FUSED = {
    "mlstm_layer.qkv_opreact": ("mlstm_layer.q", "mlstm_layer.k", "mlstm_layer.v", "mlstm_layer.ogate_preact"),
    "mlstm_layer.ifgate_preact": ("mlstm_layer.igate_preact", "mlstm_layer.fgate_preact"),
    "ffn.proj_up_gate_z": ("ffn.proj_up_gate", "ffn.proj_up"),
}


def _parse_flat_yaml(text: str) -> Any:
    """A flat `key: value` YAML file (what the torch `xlstm_large` config is); ValueError if it cannot be parsed."""
    try:
        import yaml
    except ImportError:
        out: dict[str, Any] = {}
        literals = {"true": True, "false": False, "null": None, "~": None, "": None}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split(" #")[0].rstrip()
            if not line or line.lstrip().startswith("#"):
                continue
            if ":" not in line:
                raise ValueError(f"line {number} ({line.strip()!r}) is not a `key: value` pair")
            key, raw = (s.strip() for s in line.split(":", 1))
            if raw.lower() in literals:
                out[key] = literals[raw.lower()]
                continue
            try:
                out[key] = json.loads(raw)
            except json.JSONDecodeError:
                out[key] = raw.strip("'\"")
        return out
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from err


def read_checkpoint_config(path: str, layout: str) -> xLSTMLargeConfig:
    """The validated model config of checkpoint directory `path` whose weights are in `layout`: `config.json`
    (model_type "xlstm") for the HF layout, `config.yaml` for the plain one. Errors name the file and the key."""
    file = config_file(path)
    want = "config.json" if layout == "hf" else "config.yaml"
    if os.path.basename(file) != want:
        raise CheckpointError(f"{file}: the weights are in the {layout} layout ({_EMBEDDING_KEY[layout]}), whose "
                              f"config is {want}.")
    data = read_mapping(file, json.loads if layout == "hf" else _parse_flat_yaml)
    if layout == "hf" and data.get("model_type") != "xlstm":
        raise CheckpointError(f"{file}: model_type = {data.get('model_type')!r}, expected 'xlstm'.")
    try:
        return config_from_checkpoint_dict(data, hf=layout == "hf")
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from err


def detect_layout(keys: Any, source: str = "the state dict") -> str:
    """"hf" or "plain" from the embedding key of a state dict."""
    keys = set(keys)
    for layout, key in _EMBEDDING_KEY.items():
        if key in keys:
            return layout
    raise CheckpointError(f"{source}: not an xLSTM-7B state dict; neither of {sorted(_EMBEDDING_KEY.values())} is "
                          f"among its keys.")


def _split_sizes(config: xLSTMLargeConfig, fused: str) -> list[int]:
    return {
        "mlstm_layer.qkv_opreact": [config.qk_dim, config.qk_dim, config.v_dim, config.v_dim],
        "mlstm_layer.ifgate_preact": [config.num_heads, config.num_heads],
        "ffn.proj_up_gate_z": [config.ffn_dim, config.ffn_dim],
    }[fused]


def convert_weight_mode(tensors: dict[str, Any], config: xLSTMLargeConfig, weight_mode: str) -> dict[str, Any]:
    """Fuse or split the q|k|v|o, i|f and gate|up weights (and biases) of a torch-keyed state dict.

    Concatenation is along axis 0 (the torch output axis), in the `_FUSED` order."""
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if parts[:2] != ["backbone", "blocks"] or len(parts) < 6:
            out[key] = value
            continue
        prefix, local, leaf = ".".join(parts[:3]), ".".join(parts[3:-1]), parts[-1]
        if weight_mode == "single" and local in _FUSED:
            pieces = np.split(np.asarray(value), np.cumsum(_split_sizes(config, local))[:-1], axis=0)
            for name, piece in zip(_FUSED[local], pieces):
                out[f"{prefix}.{name}.{leaf}"] = piece
        elif weight_mode == "fused" and any(local in names for names in _FUSED.values()):
            fused = next(f for f, names in _FUSED.items() if local in names)
            if local == _FUSED[fused][0]:
                pieces = [tensors[f"{prefix}.{name}.{leaf}"] for name in _FUSED[fused]]
                out[f"{prefix}.{fused}.{leaf}"] = np.concatenate([np.asarray(p) for p in pieces], axis=0)
        else:
            out[key] = value
    return out


def _model_key(path: tuple[Any, ...], layout: str) -> tuple[str, bool]:
    """Checkpoint key of a model parameter path, and whether the tensor is transposed (Dense kernels)."""
    if path == ("backbone", "embeddings", "weight"):
        return _EMBEDDING_KEY[layout], False
    names = [str(p) for p in path]
    if names[-1] == "kernel":
        return ".".join(names[:-1] + ["weight"]), True
    return ".".join(names), False


def state_dict(model: xLSTMLarge, layout: str = "hf") -> dict[str, np.ndarray]:
    """The model's parameters as a torch state dict (numpy, parameter dtype) in `layout`, in module order.
    ValueError for a model with quantized weights (they are not parameters: the dict would miss them)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    scheme = quantized_scheme(model)
    if scheme is not None:
        raise ValueError(f"the model holds {scheme} weights (`quantize`), which a checkpoint does not store; save "
                         "the float model and quantize it after loading.")
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, transpose = _model_key(path, layout)
        value = np.asarray(jax.device_get(variable[...]))
        out[key] = np.ascontiguousarray(value.T) if transpose else value
    prefixes = _module_order(model.config, layout)

    def rank(key: str) -> int:
        return next((n for n, p in enumerate(prefixes) if key == p or key.startswith(p + ".")), len(prefixes))

    return dict(sorted(out.items(), key=lambda kv: rank(kv[0])))


def _module_order(config: xLSTMLargeConfig, layout: str) -> list[str]:
    """Key prefixes in torch module order (embedding, then each block's norm, layer, norm, FFN, then the head)."""
    keys = [_EMBEDDING_KEY[layout]]
    for b in range(config.num_blocks):
        for name in ("norm_mlstm", "mlstm_layer", "norm_ffn", "ffn"):
            keys.append(f"backbone.blocks.{b}.{name}")
    return keys + ["backbone.out_norm", "lm_head"]


def _stored_weight_mode(keys: Any) -> str:
    return "fused" if any(".qkv_opreact." in key for key in keys) else "single"


def _check_tensors(found: dict[str, TensorInfo], config: xLSTMLargeConfig, layout: str, source: str) -> None:
    """Refuse missing, unexpected, non-float or wrongly shaped tensors for a model with `config` (its weight mode
    being the stored one), from their metadata only; messages name the key, the file and the shapes."""
    abstract = nnx.eval_shape(lambda: xLSTMLarge(config, rngs=nnx.Rngs(0)))
    expected = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        key, transpose = _model_key(path, layout)
        expected[key] = tuple(reversed(variable.shape)) if transpose else tuple(variable.shape)
    tie = f"tie_word_embeddings is {str(config.tie_word_embeddings).lower()}"
    missing = [key for key in expected if key not in found]
    if missing:
        more = f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""
        hint = f" ({tie} in the config)" if missing[0] == "lm_head.weight" else ""
        raise CheckpointError(f"{source} is missing {missing[0]!r} (expected shape {expected[missing[0]]}){more}"
                              f"{hint}.")
    unexpected = [key for key in found if key not in expected]
    if unexpected:
        hint = f" ({tie} in the config)" if "lm_head.weight" in unexpected else ""
        raise CheckpointError(f"{source} has {len(unexpected)} tensors the model does not use, e.g. "
                              f"{unexpected[:4]} in {found[unexpected[0]].file}{hint}.")
    for key, info in found.items():
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {key!r} in {info.file} has dtype {info.dtype}, expected one of "
                                  f"{', '.join(FLOAT_DTYPES)}.")
        if info.shape != expected[key]:
            raise CheckpointError(
                f"tensor {key!r} in {info.file} has shape {info.shape}, expected {expected[key]} for the config "
                f"(D={config.embedding_dim}, NH={config.num_heads}, qk_dim={config.qk_dim}, v_dim={config.v_dim}, "
                f"F={config.ffn_dim}, vocab={config.vocab_size}).")


def _build(config: xLSTMLargeConfig, tensors: dict[str, Any], layout: str) -> xLSTMLarge:
    """The model with `config` holding `tensors` (checked, in the config's weight mode)."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: xLSTMLarge(config, rngs=nnx.Rngs(0))))
    flat = []
    for path, variable in nnx.to_flat_state(abstract_state):
        if isinstance(variable, nnx.Param):
            key, transpose = _model_key(path, layout)
            value = np.asarray(tensors[key])
            variable = variable.replace(jnp.asarray(value.T if transpose else value, dtype=variable.dtype))
        flat.append((path, variable))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_state_dict(config: xLSTMLargeConfig, tensors: dict[str, Any], layout: str) -> xLSTMLarge:
    """A model built from a torch state dict in `layout` (either weight mode; converted to the config's): every
    tensor must be used, float and of the right shape, and none may be missing (else CheckpointError)."""
    found = {}
    for key, value in tensors.items():
        value = np.asarray(value)
        found[key] = TensorInfo("the state dict", tuple(value.shape), value.dtype.name)
    _check_tensors(found, config.replace(weight_mode=_stored_weight_mode(tensors)), layout, "the state dict")
    return _build(config, convert_weight_mode(tensors, config, config.weight_mode), layout)


def from_pretrained(
    path: str,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    weight_mode: str | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
    allow_nonfinite: bool = False,
) -> xLSTMLarge:
    """Load an xLSTM-7B checkpoint directory in the HF or plain layout (detected from the keys).

    dtype: the compute dtype of the matmuls ("bfloat16" / "float32" / "float16"; None: the checkpoint's dtype,
    float32 for the hub checkpoint). param_dtype: the parameter dtype (None: the checkpoint's, float32 for the
    hub). weight_mode: "single" or "fused" (None: whatever the checkpoint stores). backend / chunk_size: the mLSTM
    backend (None: "auto"). allow_nonfinite: load NaN/inf weights instead of refusing them.

    Loads exactly what was saved or raises: the directory must hold one layout (`checkpoint_files`); the config
    file is validated (types, ranges, model_type); the LM head is needed unless the config ties the embeddings;
    missing, unexpected, non-float or wrongly shaped tensors raise CheckpointError before any weight is read.
    Paths raise FileNotFoundError / NotADirectoryError / IsADirectoryError. The output directory of
    `xlstm-jax train` loads its exported model (`path/model`).
    """
    path = training_export(os.fspath(path))
    check_directory(path)
    headers = read_headers(path)
    layout = detect_layout(headers, path)
    config = read_checkpoint_config(path, layout)
    stored_mode = _stored_weight_mode(headers)
    _check_tensors(headers, config.replace(weight_mode=stored_mode), layout, path)
    stored = headers[_EMBEDDING_KEY[layout]].dtype
    changes: dict[str, Any] = {
        "weight_mode": weight_mode or stored_mode,
        "param_dtype": jnp.dtype(stored if param_dtype is None else param_dtype).name,
        "compute_dtype": jnp.dtype(stored if dtype is None else dtype).name,
    }
    if backend is not None:
        changes["backend"] = backend
    if chunk_size is not None:
        changes["chunk_size"] = chunk_size
    config = config.replace(**changes)
    tensors = read_tensors(headers, allow_nonfinite=allow_nonfinite)
    return _build(config, convert_weight_mode(tensors, config, config.weight_mode), layout)


def _text_writer(text: str) -> Callable[[str], None]:
    def write(file: str) -> None:
        with open(file, "w", encoding="utf-8") as fh:
            fh.write(text)

    return write


def save_pretrained(
    model: xLSTMLarge,
    path: str,
    *,
    layout: str = "hf",
    max_shard_size: int = 5 * 1024**3,
    tokenizer: Any = None,
) -> list[str]:
    """Write the model as a checkpoint directory in `layout` (weights in the model's weight mode and parameter
    dtype). Shards hold at most `max_shard_size` bytes (one tensor may exceed it); HF shards get an index file.
    tokenizer: a `tokenizers.Tokenizer` or the path of a tokenizer.json, saved next to the weights with the
    entries `transformers.AutoTokenizer` reads (`xlstm_jax.models.xlstm_large.tokenizer`; its special tokens are
    those the config's bos/eos/pad ids name, `special_token_ids` derives them from a tokenizer); `load_tokenizer`
    reads it back. Without one, tokenizer files already in the directory are kept.

    The directory then holds this checkpoint only: checkpoint files of an earlier save that this one does not
    write (`*.safetensors`, the index, the other layout's config) are removed, other files are kept; files are
    written under temporary names and renamed, the config last, so an interrupted save never leaves a mix that
    loads (`checkpoint_files.write_checkpoint`). Returns the written file names."""
    tensors = state_dict(model, layout)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    elif layout == "hf":
        names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
    else:
        names = [f"model_{n}.safetensors" for n in range(len(shards))]
    writers = {name: functools.partial(save_file, shard, metadata={"format": "pt"})
               for name, shard in zip(names, shards)}
    if layout == "hf" and len(shards) > 1:
        index = {
            "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        writers[INDEX_FILE] = _text_writer(json.dumps(index, indent=2))
    data = config_to_checkpoint_dict(model.config, hf=layout == "hf")
    if layout == "hf":
        writers["config.json"] = _text_writer(json.dumps(data, indent=2))
    else:
        writers["config.yaml"] = _text_writer("".join(f"{key}: {json.dumps(value)}\n" for key, value in data.items()))
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = read_tokenizer(os.fspath(tokenizer))
        writers.update(tokenizer_writers(tokenizer, model.config))
    write_checkpoint(os.fspath(path), writers)
    return list(writers)
