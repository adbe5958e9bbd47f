"""The files of a safetensors checkpoint directory (`checkpoint.py` maps their tensors to the model).

Loading accepts exactly one layout and refuses anything ambiguous: an index `model.safetensors.index.json` and
exactly the files it lists, or one `model.safetensors`, or the plain shards `model_0.safetensors` …
`model_{n-1}.safetensors`; any other `*.safetensors` file, or both `config.json` and `config.yaml`, is an error.
Every file must be a plain file name inside the directory; a symlink may point outside only into the `blobs/`
folder of a Hugging Face hub cache snapshot (`…/snapshots/<revision>/`). Saving replaces a checkpoint in place
(`write_checkpoint`). Malformed content raises `CheckpointError`, path problems the matching `OSError`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "config.yaml")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_PLAIN_SHARD = re.compile(r"model_(\d+)\.safetensors")
_PARTIAL = ".partial"


class CheckpointError(ValueError):
    """A checkpoint directory whose contents are malformed, ambiguous or do not fit the model."""


class TensorInfo(NamedTuple):
    """Where a tensor is stored, its shape and its dtype (a numpy name, or the safetensors code of other dtypes)."""

    file: str
    shape: tuple[int, ...]
    dtype: str


def check_directory(path: str) -> None:
    """Raise NotADirectoryError / FileNotFoundError unless `path` is an existing directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path!r} is a file; pass the checkpoint directory.")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist.")


def _roots(path: str) -> list[str]:
    """Where the files of checkpoint directory `path` may live after resolving symlinks."""
    real = os.path.realpath(path)
    snapshots = os.path.dirname(real)
    if os.path.basename(snapshots) == "snapshots":  # huggingface_hub cache: snapshots/<rev>/x -> ../../blobs/<hash>
        return [real, os.path.join(os.path.dirname(snapshots), "blobs")]
    return [real]


def resolve(path: str, name: str, source: str) -> str:
    """The regular file `name` of checkpoint directory `path`, which `source` (a file or the directory) names."""
    if name in ("", ".", "..") or os.path.isabs(name) or os.path.basename(name) != name:
        raise CheckpointError(f"{source}: {name!r} is not a file name inside the checkpoint directory {path!r} "
                              f"(absolute paths, '..' and subfolders are refused).")
    full = os.path.join(path, name)
    if not os.path.lexists(full):
        raise FileNotFoundError(f"{source}: {name!r} does not exist in {path!r}.")
    real = os.path.realpath(full)
    if not any(os.path.commonpath([real, root]) == root for root in _roots(path)):
        raise CheckpointError(f"{source}: {full!r} is a symlink to {real!r}, outside the checkpoint directory.")
    if not os.path.isfile(real):
        error = IsADirectoryError if os.path.isdir(real) else FileNotFoundError
        raise error(f"{source}: {full!r} is not a regular file (a directory or a broken symlink).")
    return full


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_mapping(file: str, parse: Callable[[str], Any] = json.loads) -> dict[str, Any]:
    """The top level of a JSON file (or of another format with `parse`): a non-empty mapping, else CheckpointError."""
    with open(file, "rb") as fh:
        raw = fh.read()
    if not raw.strip():
        raise CheckpointError(f"{file} is empty; expected a mapping of keys to values.")
    try:
        data = parse(raw.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, YAML errors (see checkpoint._parse_flat_yaml)
        raise CheckpointError(f"{file} cannot be parsed: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{file}: the top level is {_brief(data)}, expected a non-empty mapping.")
    return data


def _read_index(path: str) -> dict[str, str]:
    """The weight map (tensor name -> file name) of the index file of `path`."""
    index = resolve(path, INDEX_FILE, path)
    data = read_mapping(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' is {_brief(weight_map)}, expected a non-empty mapping "
                              f"{{tensor name: file name}} (both strings).")
    return weight_map


def checkpoint_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of checkpoint directory `path` in order, and the index's weight map (None without
    an index); refuses a directory that holds more than one layout (see the module docstring)."""
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    weight_map = None
    if os.path.lexists(os.path.join(path, INDEX_FILE)):
        weight_map = _read_index(path)
        source = os.path.join(path, INDEX_FILE)
        expected, what = list(dict.fromkeys(weight_map.values())), f"the files listed in {INDEX_FILE}"
    elif "model.safetensors" in names:
        source, expected, what = path, ["model.safetensors"], "model.safetensors"
    elif any(_PLAIN_SHARD.fullmatch(n) for n in names):
        last = max(int(m[1]) for n in names if (m := _PLAIN_SHARD.fullmatch(n)))
        source, expected = path, [f"model_{k}.safetensors" for k in range(last + 1)]
        what = f"the plain shards model_0 … model_{last}.safetensors"
    elif names:
        raise CheckpointError(f"{path!r} holds {names} but neither {INDEX_FILE}, model.safetensors nor "
                              f"model_0.safetensors, so which files form the checkpoint is unknown.")
    else:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {path!r}.")
    files = [resolve(path, name, source) for name in expected]
    extra = sorted(set(names) - set(expected))
    if extra:
        raise CheckpointError(f"{path!r} holds more than one checkpoint layout: {extra} besides "
                              f"{what}; remove the stale files or save the checkpoint again.")
    return files, weight_map


def config_file(path: str) -> str:
    """The one config file (`config.json` or `config.yaml`) of checkpoint directory `path`."""
    present = [name for name in CONFIG_FILES if os.path.lexists(os.path.join(path, name))]
    if len(present) > 1:
        raise CheckpointError(f"{path!r} holds both config.json (HF layout) and config.yaml (plain layout); "
                              f"remove the stale one or save the checkpoint again.")
    if not present:
        raise FileNotFoundError(f"checkpoint directory {path!r} has neither config.json nor config.yaml.")
    return resolve(path, present[0], path)


def read_headers(path: str) -> dict[str, TensorInfo]:
    """File, shape and dtype of every tensor of checkpoint directory `path`, from the safetensors headers only;
    a tensor stored twice, or elsewhere than the index says, is refused."""
    files, weight_map = checkpoint_files(path)
    index = os.path.join(path, INDEX_FILE)
    out: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(file, framework="np") as fh:
                for key in fh.keys():
                    info = fh.get_slice(key)
                    dtype = info.get_dtype()
                    if key in out:
                        raise CheckpointError(f"tensor {key!r} is stored twice, in {out[key].file} and {file}.")
                    if weight_map is not None and weight_map.get(key) != os.path.basename(file):
                        raise CheckpointError(f"{index} maps {key!r} to {weight_map.get(key)!r}, but it is "
                                              f"stored in {file}.")
                    out[key] = TensorInfo(file, tuple(info.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype))
        except SafetensorError as err:
            raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err
    absent = [key for key in weight_map or () if key not in out]
    if absent:
        raise CheckpointError(f"{index} maps {absent[0]!r} to {weight_map[absent[0]]!r}, which does not hold it.")
    return out


def read_tensors(headers: dict[str, TensorInfo], *, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """The tensors listed in `headers`; NaN or inf values raise unless `allow_nonfinite`."""
    out = {}
    for file in dict.fromkeys(info.file for info in headers.values()):
        with safe_open(file, framework="np") as fh:
            for key in fh.keys():
                value = fh.get_tensor(key)
                bad = 0 if allow_nonfinite else value.size - int(np.count_nonzero(np.isfinite(value)))
                if bad:
                    raise CheckpointError(f"tensor {key!r} in {file} has {bad} non-finite values (NaN or inf); "
                                          f"pass allow_nonfinite=True to load it anyway.")
                out[key] = value
    return out


def _is_checkpoint_file(name: str) -> bool:
    """Whether `save_pretrained` owns file `name`: weights, index, config, or a leftover of an interrupted save."""
    if name.startswith(".") and name.endswith(_PARTIAL):
        name = name[1:-len(_PARTIAL)]
    return name.endswith(".safetensors") or name in (INDEX_FILE, *CONFIG_FILES)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: str, writers: dict[str, Callable[[str], None]]) -> None:
    """Make directory `path` hold exactly the checkpoint files of `writers` (file name -> function writing that
    file to a given path); files that are not checkpoint files (`_is_checkpoint_file`) are left alone.

    Each file is written to a hidden temporary name and synced first. Then the old config files and every other
    checkpoint file the new checkpoint does not own are removed, and the new files are renamed into place, the
    config last: an interrupted save leaves the old checkpoint, a directory without a config (which loading
    refuses), or the new checkpoint."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path!r} is a file; pass a directory to save the checkpoint in.")
    os.makedirs(path, exist_ok=True)
    partial = {name: os.path.join(path, f".{name}{_PARTIAL}") for name in writers}
    try:
        for name, write in writers.items():
            write(partial[name])
            _fsync(partial[name])
        keep = {os.path.basename(p) for p in partial.values()} | (set(writers) - set(CONFIG_FILES))
        for name in sorted(os.listdir(path), key=lambda n: n not in CONFIG_FILES):
            full = os.path.join(path, name)
            if _is_checkpoint_file(name) and name not in keep and (os.path.islink(full) or not os.path.isdir(full)):
                os.remove(full)
        for name in sorted(writers, key=lambda n: n in CONFIG_FILES):
            os.replace(partial[name], os.path.join(path, name))
        _fsync(path)
    finally:
        for file in partial.values():
            if os.path.lexists(file):
                os.remove(file)


def training_export(path: str) -> str:
    """`path/model` when `path` is an `xlstm-jax train` output directory (its run config and an exported model, no
    checkpoint config of its own), else `path`."""
    export = os.path.join(path, "model")
    if not os.path.isfile(os.path.join(path, "train_config.json")) or os.path.exists(os.path.join(path, "config.json")):
        return path
    if not os.path.isdir(export):
        raise FileNotFoundError(f"{path!r} holds an xlstm-jax training run without an exported model/ yet (it is "
                                "written when the run finishes; `xlstm-jax train --output-dir DIR --resume` "
                                "finishes it).")
    return export
