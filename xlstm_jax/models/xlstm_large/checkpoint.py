"""Safetensors checkpoints of the xLSTM-7B model, without torch (xlstm_model_spec.md §3).

Two layouts, both torch state dicts (Linear weights (out, in), transposed into Dense kernels (in, out)):
- "hf": the HF hub `NX-AI/xLSTM-7b` layout: `backbone.embeddings.weight`, `backbone.blocks.{i}.…`,
  `backbone.out_norm.weight`, `lm_head.weight`, plus `config.json` (model_type "xlstm"); sharded files
  `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, or one `model.safetensors`.
- "plain": the torch `xlstm_large` layout: the same keys except `embedding.weight`, plus `config.yaml`; one
  `model.safetensors` or shards `model_0.safetensors`, `model_1.safetensors`, … .
Either may use "fused" weight keys (`qkv_opreact`, `ifgate_preact`, `proj_up_gate_z`); they are split or fused to
match the model's `weight_mode`. Loading then saving in the same layout and weight mode reproduces every tensor
bit for bit.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from xlstm_jax.models.xlstm_large.config import (
    config_from_checkpoint_dict,
    config_to_checkpoint_dict,
    xLSTMLargeConfig,
)
from xlstm_jax.models.xlstm_large.model import xLSTMLarge

LAYOUTS = ("hf", "plain")
INDEX_FILE = "model.safetensors.index.json"
_EMBEDDING_KEY = {"hf": "backbone.embeddings.weight", "plain": "embedding.weight"}
# fused key -> the single keys concatenated along the output axis, in this order (spec §3.3).
_FUSED = {
    "mlstm_layer.qkv_opreact": ("mlstm_layer.q", "mlstm_layer.k", "mlstm_layer.v", "mlstm_layer.ogate_preact"),
    "mlstm_layer.ifgate_preact": ("mlstm_layer.igate_preact", "mlstm_layer.fgate_preact"),
    "ffn.proj_up_gate_z": ("ffn.proj_up_gate", "ffn.proj_up"),
}


def _checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory, in order."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        return [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    shards = glob.glob(os.path.join(path, "model_*.safetensors"))
    if shards:
        return sorted(shards, key=lambda p: int(os.path.basename(p)[6:-12]))
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not found:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {path!r}.")
    return found


def _iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    for file in _checkpoint_files(path):
        with safe_open(file, framework="np") as fh:
            for key in fh.keys():
                yield key, fh.get_tensor(key)


def _parse_flat_yaml(text: str) -> dict[str, Any]:
    """A flat `key: value` YAML file (what the torch `xlstm_large` config is)."""
    try:
        import yaml
    except ImportError:
        out: dict[str, Any] = {}
        literals = {"true": True, "false": False, "null": None, "~": None, "": None}
        for line in text.splitlines():
            line = line.split(" #")[0].rstrip()
            if not line or line.lstrip().startswith("#") or ":" not in line:
                continue
            key, raw = (s.strip() for s in line.split(":", 1))
            if raw.lower() in literals:
                out[key] = literals[raw.lower()]
                continue
            try:
                out[key] = json.loads(raw)
            except json.JSONDecodeError:
                out[key] = raw.strip("'\"")
        return out
    return yaml.safe_load(text) or {}


def read_checkpoint_config(path: str, layout: str) -> xLSTMLargeConfig:
    """The model config of a checkpoint directory (`config.json`, or `config.yaml` for the plain layout)."""
    json_path, yaml_path = os.path.join(path, "config.json"), os.path.join(path, "config.yaml")
    if os.path.exists(json_path):
        with open(json_path) as fh:
            data = json.load(fh)
        hf = data.get("model_type") == "xlstm" or (layout == "hf" and "model_type" not in data)
    elif os.path.exists(yaml_path):
        with open(yaml_path) as fh:
            data, hf = _parse_flat_yaml(fh.read()), False
    else:
        raise FileNotFoundError(f"checkpoint directory {path!r} has neither config.json nor config.yaml.")
    return config_from_checkpoint_dict(data, hf=hf)


def detect_layout(keys: Any) -> str:
    """"hf" or "plain" from the embedding key of a state dict."""
    keys = set(keys)
    for layout, key in _EMBEDDING_KEY.items():
        if key in keys:
            return layout
    raise ValueError(f"not an xLSTM-7B state dict: neither of {sorted(_EMBEDDING_KEY.values())} is among its keys.")


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
    """The model's parameters as a torch state dict (numpy, parameter dtype) in `layout`, in module order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
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


def load_state_dict(config: xLSTMLargeConfig, tensors: dict[str, Any], layout: str) -> xLSTMLarge:
    """A model built from a torch state dict in `layout`; every key must be used and every shape must match."""
    tensors = convert_weight_mode(tensors, config, config.weight_mode)
    abstract = nnx.eval_shape(lambda: xLSTMLarge(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat = []
    used = set()
    for path, variable in nnx.to_flat_state(abstract_state):
        if not isinstance(variable, nnx.Param):
            flat.append((path, variable))
            continue
        key, transpose = _model_key(path, layout)
        if key not in tensors:
            raise ValueError(f"checkpoint is missing {key!r} (expected shape "
                             f"{tuple(reversed(variable.shape)) if transpose else variable.shape}).")
        value = np.asarray(tensors[key])
        value = value.T if transpose else value
        if value.shape != variable.shape:
            stored = value.T.shape if transpose else value.shape
            raise ValueError(f"checkpoint tensor {key!r} has shape {stored}, the config "
                             f"(D={config.embedding_dim}, NH={config.num_heads}, qk_dim={config.qk_dim}, "
                             f"v_dim={config.v_dim}, F={config.ffn_dim}) needs "
                             f"{tuple(reversed(variable.shape)) if transpose else variable.shape}.")
        used.add(key)
        flat.append((path, variable.replace(jnp.asarray(value, dtype=variable.dtype))))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"checkpoint has {len(unused)} tensors the model does not use, e.g. {unused[:4]}.")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(
    path: str,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    weight_mode: str | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> xLSTMLarge:
    """Load an xLSTM-7B checkpoint directory in the HF or plain layout (detected from the keys).

    dtype: the compute dtype of the matmuls ("bfloat16" / "float32" / "float16"; None: the checkpoint's dtype,
    float32 for the hub checkpoint). param_dtype: the parameter dtype (None: the checkpoint's, float32 for the hub). weight_mode:
    "single" or "fused" (None: whatever the checkpoint stores). backend / chunk_size: the mLSTM backend (None: "auto").
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist.")
    tensors = dict(_iter_tensors(path))
    layout = detect_layout(tensors)
    config = read_checkpoint_config(path, layout)
    fused_keys = any(".qkv_opreact." in key for key in tensors)
    changes: dict[str, Any] = {"weight_mode": weight_mode or ("fused" if fused_keys else "single")}
    stored = np.asarray(tensors[_EMBEDDING_KEY[layout]]).dtype
    changes["param_dtype"] = jnp.dtype(param_dtype).name if param_dtype is not None else jnp.dtype(stored).name
    changes["tie_word_embeddings"] = "lm_head.weight" not in tensors
    changes["compute_dtype"] = jnp.dtype(stored if dtype is None else dtype).name
    if backend is not None:
        changes["backend"] = backend
    if chunk_size is not None:
        changes["chunk_size"] = chunk_size
    return load_state_dict(config.replace(**changes), tensors, layout)


def save_pretrained(
    model: xLSTMLarge,
    path: str,
    *,
    layout: str = "hf",
    max_shard_size: int = 5 * 1024**3,
) -> list[str]:
    """Write the model as a checkpoint directory in `layout` (weights in the model's weight mode and parameter
    dtype). Shards hold at most `max_shard_size` bytes (one tensor may exceed it); HF shards get an index file.
    Returns the written file names."""
    tensors = state_dict(model, layout)
    os.makedirs(path, exist_ok=True)
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
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    written = list(names)
    if layout == "hf" and len(shards) > 1:
        index = {
            "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        with open(os.path.join(path, INDEX_FILE), "w") as fh:
            json.dump(index, fh, indent=2)
        written.append(INDEX_FILE)
    data = config_to_checkpoint_dict(model.config, hf=layout == "hf")
    if layout == "hf":
        with open(os.path.join(path, "config.json"), "w") as fh:
            json.dump(data, fh, indent=2)
        written.append("config.json")
    else:
        with open(os.path.join(path, "config.yaml"), "w") as fh:
            fh.writelines(f"{key}: {json.dumps(value)}\n" for key, value in data.items())
        written.append("config.yaml")
    return written
