"""Checkpoints load exactly what was saved, or refuse (issue 15): saving replaces an earlier checkpoint and is
atomic, a directory holding more than one layout is refused, index entries stay inside the directory, and bad
tensors and config files raise one-line errors naming the file, the key, the value and what was expected."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from tests.support.xlstm_large_helpers import random_model, tiny_config
from xlstm_jax.models.xlstm_large import checkpoint as ckpt

SHARDED, SINGLE = 6000, 10**9  # max_shard_size: several shards / one model.safetensors


def _save(path, seed: int = 1, layout: str = "hf", max_shard_size: int = SINGLE, **changes):
    model = random_model(tiny_config(num_blocks=1, **changes), seed=seed)
    names = ckpt.save_pretrained(model, str(path), layout=layout, max_shard_size=max_shard_size)
    return model, names


def _load(path, **kwargs):
    return ckpt.from_pretrained(str(path), "float32", backend="native_chunkwise", chunk_size=16, **kwargs)


def _same(loaded, model, layout: str = "hf") -> bool:
    """The loaded model has the saved config and every saved tensor, bit for bit."""
    want, got = ckpt.state_dict(model, layout), ckpt.state_dict(loaded, layout)
    return loaded.config == model.config and list(got) == list(want) and all(
        got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)


def _refused(error, path, *parts, **kwargs) -> None:
    """from_pretrained(path) raises exactly `error` with a one-line message that names every part."""
    with pytest.raises(error) as info:
        _load(path, **kwargs)
    message = str(info.value)
    assert type(info.value) is error and "\n" not in message, message
    assert all(str(part) in message for part in parts), (parts, message)


def _tensors(file) -> dict[str, np.ndarray]:
    with safe_open(str(file), framework="np") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}


def _edit_config(path, **changes):
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))


USER_FILES = ("README.md", "tokenizer.json", "generation_config.json")


@pytest.mark.parametrize("first, second", [
    (("hf", SHARDED), ("hf", SINGLE)),  # a stale index and its shards used to win over the newer model.safetensors
    (("hf", SINGLE), ("plain", SHARDED)),  # a stale model.safetensors and config.json used to win
    (("plain", SHARDED), ("hf", SHARDED)),
], ids=["hf-shards-then-single", "hf-single-then-plain-shards", "plain-shards-then-hf-shards"])
def test_save_removes_the_files_of_an_earlier_checkpoint_and_keeps_user_files(tmp_path, first, second):
    _save(tmp_path, seed=1, layout=first[0], max_shard_size=first[1])
    for name in USER_FILES:
        (tmp_path / name).write_text("user data")
    (tmp_path / "logs").mkdir()
    model, names = _save(tmp_path, seed=2, layout=second[0], max_shard_size=second[1])
    assert sorted(os.listdir(tmp_path)) == sorted([*names, *USER_FILES, "logs"])
    assert all((tmp_path / name).read_text() == "user data" for name in USER_FILES)
    assert _same(_load(tmp_path), model, second[0])


def test_interrupted_save_leaves_the_old_checkpoint_or_one_that_refuses_to_load(tmp_path, monkeypatch):
    """A failure while the config is written, or at any rename, never leaves a directory that loads a mix of the
    old and the new checkpoint (here: new weights with the old config's norm_eps)."""
    old, _ = _save(tmp_path, seed=1)
    new = random_model(tiny_config(num_blocks=1, norm_eps=1e-5), seed=2)
    real_open, real_replace = open, os.replace

    def open_failing_on_config(file, mode="r", *args, **kwargs):
        if "w" in mode and "config" in os.path.basename(str(file)):
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    def replace_failing_after(k: int):
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) > k:
                raise OSError(5, "Input/output error")
            real_replace(src, dst)

        return replace

    attempts = [("builtins.open", open_failing_on_config)]
    attempts += [("os.replace", replace_failing_after(k)) for k in range(20)]  # 10 shards, index, config
    for target, failing in attempts:
        with monkeypatch.context() as patch:
            patch.setattr(target, failing)
            try:
                ckpt.save_pretrained(new, str(tmp_path), max_shard_size=SHARDED)
                break
            except OSError:
                pass
            finally:
                assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
        try:
            loaded = _load(tmp_path)
        except (ckpt.CheckpointError, FileNotFoundError):
            continue
        assert _same(loaded, old) or _same(loaded, new), target
    assert _same(_load(tmp_path), new)


def _copy_of_a_shard(path, name):
    shard = next(n for n in sorted(os.listdir(path)) if n.endswith(".safetensors"))
    shutil.copy(path / shard, path / name)


@pytest.mark.parametrize("layout, max_shard_size, damage, error, named", [
    ("hf", SHARDED, lambda p: _copy_of_a_shard(p, "model.safetensors"), ckpt.CheckpointError, "model.safetensors"),
    ("hf", SHARDED, lambda p: _copy_of_a_shard(p, "extra.safetensors"), ckpt.CheckpointError, "extra.safetensors"),
    ("plain", SHARDED, lambda p: _copy_of_a_shard(p, "model-00001-of-00002.safetensors"), ckpt.CheckpointError,
     "model-00001-of-00002.safetensors"),
    ("hf", SINGLE, lambda p: (p / "config.yaml").write_text("num_heads: 2\n"), ckpt.CheckpointError, "config.yaml"),
    ("hf", SHARDED, lambda p: os.remove(p / ckpt.INDEX_FILE), ckpt.CheckpointError, ckpt.INDEX_FILE),
    ("plain", SHARDED, lambda p: os.remove(p / "model_1.safetensors"), FileNotFoundError, "model_1.safetensors"),
    ("hf", SINGLE, lambda p: os.rename(p / "config.json", p / "config.yaml"), ckpt.CheckpointError, "config.json"),
], ids=["index-and-model.safetensors", "unreferenced-by-index", "plain-and-hf-shard-names", "both-configs",
        "hf-shards-without-index", "gap-in-plain-shards", "config-of-the-other-layout"])
def test_a_directory_with_more_or_less_than_one_layout_is_refused(tmp_path, layout, max_shard_size, damage, error,
                                                                   named):
    _save(tmp_path, layout=layout, max_shard_size=max_shard_size)
    damage(tmp_path)
    _refused(error, tmp_path, named)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "sub/outside.safetensors", "SYMLINK"])
def test_index_entries_are_confined_to_the_checkpoint_directory(tmp_path, entry):
    """Today's `../x.safetensors` entry, an absolute path, a subfolder, and a shard that is a symlink to a file
    outside the directory are all refused, naming the index and the entry."""
    path, outside = tmp_path / "ckpt", tmp_path / "outside.safetensors"
    _save(path, max_shard_size=SHARDED)
    index = json.loads((path / ckpt.INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    if entry == "SYMLINK":
        shutil.move(path / first, outside)
        os.symlink(outside, path / first)
        _refused(ckpt.CheckpointError, path, ckpt.INDEX_FILE, first, "symlink", os.path.realpath(outside))
        return
    if entry == "sub/outside.safetensors":
        (path / "sub").mkdir()
        outside = path / "sub" / "outside.safetensors"
    shutil.move(path / first, outside)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    index["weight_map"] = {k: (entry if v == first else v) for k, v in index["weight_map"].items()}
    (path / ckpt.INDEX_FILE).write_text(json.dumps(index))
    _refused(ckpt.CheckpointError, path, ckpt.INDEX_FILE, repr(entry), "not a file name inside")


def test_index_entries_that_are_missing_or_disagree_with_the_shards_are_refused(tmp_path):
    _save(tmp_path, max_shard_size=SHARDED)
    index = json.loads((tmp_path / ckpt.INDEX_FILE).read_text())
    key, shard = next(iter(index["weight_map"].items()))
    other = next(v for v in index["weight_map"].values() if v != shard)
    (tmp_path / ckpt.INDEX_FILE).write_text(json.dumps({"weight_map": {**index["weight_map"], key: other}}))
    _refused(ckpt.CheckpointError, tmp_path, ckpt.INDEX_FILE, repr(key), repr(other), shard)
    gone = {**index["weight_map"], "x": "gone.safetensors"}
    (tmp_path / ckpt.INDEX_FILE).write_text(json.dumps({"weight_map": gone}))
    _refused(FileNotFoundError, tmp_path, ckpt.INDEX_FILE, "'gone.safetensors' does not exist")


@pytest.mark.parametrize("text, named", [
    ("[1, 2]", "[1, 2]"), ('"weights"', "'weights'"), ("", "is empty"), ("{", "cannot be parsed"),
    ('{"metadata": {}}', "'weight_map' is None"), ('{"weight_map": ["a"]}', "['a']"),
    ('{"weight_map": {"lm_head.weight": 3}}', "{'lm_head.weight': 3}"),
])
def test_an_index_that_is_not_a_weight_map_is_refused(tmp_path, text, named):
    _save(tmp_path, max_shard_size=SHARDED)
    (tmp_path / ckpt.INDEX_FILE).write_text(text)
    _refused(ckpt.CheckpointError, tmp_path, ckpt.INDEX_FILE, named)


def test_symlinks_of_a_hugging_face_cache_snapshot_into_its_blobs_load(tmp_path):
    source = tmp_path / "saved"
    model, names = _save(source, max_shard_size=SHARDED)
    blobs, snapshot = tmp_path / "models--x--y" / "blobs", tmp_path / "models--x--y" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for n, name in enumerate(names):
        shutil.copy(source / name, blobs / f"blob{n}")
        os.symlink(f"../../blobs/blob{n}", snapshot / name)
    assert _same(_load(snapshot), model)


def _no_weights_read(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("weights were read before the checks")

    monkeypatch.setattr(ckpt, "read_tensors", fail, raising=False)


def _rewrite(path, **tensors):
    """Replace (None: drop) tensors of the single-file checkpoint in `path`."""
    stored = _tensors(path / "model.safetensors")
    stored.update(tensors)
    save_file({k: v for k, v in stored.items() if v is not None}, str(path / "model.safetensors"))


Q = "backbone.blocks.0.mlstm_layer.q.weight"


@pytest.mark.parametrize("change, named", [
    ({"lm_head.weight": None}, ["is missing 'lm_head.weight'", "(40, 32)", "tie_word_embeddings is false"]),
    ({"extra.weight": np.zeros(3, np.float32)}, ["does not use", "'extra.weight'", "model.safetensors"]),
    ({Q: np.zeros((16, 32), np.int32)}, [repr(Q), "model.safetensors", "dtype int32", "float32, bfloat16"]),
    ({Q: np.zeros((16, 32), bool)}, [repr(Q), "dtype bool"]),
    ({Q: np.zeros((16, 32), np.float64)}, [repr(Q), "dtype float64"]),
    ({Q: np.zeros((16, 33), np.float32)}, [repr(Q), "model.safetensors", "shape (16, 33)", "expected (16, 32)"]),
], ids=["missing-lm-head", "unexpected", "int32", "bool", "float64", "shape"])
def test_missing_unexpected_wrongly_typed_or_shaped_tensors_are_refused_before_reading(tmp_path, monkeypatch,
                                                                                       change, named):
    _save(tmp_path)
    _rewrite(tmp_path, **change)
    _no_weights_read(monkeypatch)
    _refused(ckpt.CheckpointError, tmp_path, *named)


def test_the_lm_head_of_a_config_with_tied_embeddings_is_unexpected(tmp_path, monkeypatch):
    model, _ = _save(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in _tensors(tmp_path / "model.safetensors")
    assert _same(_load(tmp_path), model)
    _rewrite(tmp_path, **{"lm_head.weight": np.zeros((40, 32), np.float32)})
    _no_weights_read(monkeypatch)
    _refused(ckpt.CheckpointError, tmp_path, "'lm_head.weight'", "does not use", "tie_word_embeddings is true")


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    _save(tmp_path, layout="plain", max_shard_size=SHARDED)
    first, second = _tensors(tmp_path / "model_0.safetensors"), _tensors(tmp_path / "model_1.safetensors")
    key = next(iter(first))
    save_file({**second, key: first[key]}, str(tmp_path / "model_1.safetensors"))
    _refused(ckpt.CheckpointError, tmp_path, repr(key), "stored twice", "model_0.safetensors", "model_1.safetensors")


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    _save(tmp_path)
    weight = _tensors(tmp_path / "model.safetensors")[Q].copy()
    weight[0, :2] = [np.nan, np.inf]
    _rewrite(tmp_path, **{Q: weight})
    _refused(ckpt.CheckpointError, tmp_path, repr(Q), "model.safetensors", "2 non-finite", "allow_nonfinite=True")
    loaded = _load(tmp_path, allow_nonfinite=True)
    assert np.array_equal(ckpt.state_dict(loaded)[Q], weight, equal_nan=True)


@pytest.mark.parametrize("key, value, named", [
    ("num_heads", 2.5, ["num_heads = 2.5", "positive integer"]),
    ("num_heads", True, ["num_heads = True", "positive integer"]),
    ("vocab_size", "40", ["vocab_size = '40'", "positive integer"]),
    ("norm_eps", 0.0, ["norm_eps = 0.0", "positive finite number"]),
    ("eps", -1e-6, ["eps = -1e-06", "positive finite number"]),
    ("eps", float("nan"), ["eps = nan", "positive finite number"]),
    ("gate_soft_cap", float("inf"), ["gate_soft_cap = inf", "positive finite number or null"]),
    ("ffn_proj_factor", 0, ["ffn_proj_factor = 0", "positive finite number"]),
    ("use_bias", 1, ["use_bias = 1", "true or false"]),
    ("weight_mode", "split", ["weight_mode", "'split'"]),
    ("hidden_size", 64, ["embedding_dim = 32", "hidden_size = 64", "disagree"]),
    ("model_type", "llama", ["model_type = 'llama'", "expected 'xlstm'"]),
    ("model_type", None, ["model_type = None", "expected 'xlstm'"]),
])
def test_config_json_values_are_validated(tmp_path, key, value, named):
    _save(tmp_path)
    _edit_config(tmp_path, **{key: value})
    _refused(ckpt.CheckpointError, tmp_path, tmp_path / "config.json", *named)


@pytest.mark.parametrize("name, text, named", [
    ("config.json", "[1, 2]", "the top level is [1, 2]"),
    ("config.json", '"xlstm"', "the top level is 'xlstm'"),
    ("config.json", "{}", "the top level is {}"),
    ("config.json", "", "is empty"),
    ("config.json", '{"num_heads": 2,', "cannot be parsed"),
    ("config.yaml", "- embedding_dim\n- 32\n", "the top level is ['embedding_dim', 32]"),
    ("config.yaml", "just text", "the top level is 'just text'"),
    ("config.yaml", "  \n", "is empty"),
    ("config.yaml", "num_heads: [2\n", "cannot be parsed"),
])
def test_config_files_whose_top_level_is_not_a_mapping_are_refused(tmp_path, name, text, named):
    _save(tmp_path, layout="hf" if name == "config.json" else "plain")
    (tmp_path / name).write_text(text)
    _refused(ckpt.CheckpointError, tmp_path, tmp_path / name, named)


def test_integral_floats_and_yaml_number_strings_are_accepted(tmp_path):
    model, _ = _save(tmp_path / "hf")
    _edit_config(tmp_path / "hf", num_heads=2.0, embedding_dim=32.0)
    assert _same(_load(tmp_path / "hf"), model)
    model, _ = _save(tmp_path / "plain", layout="plain")
    config = (tmp_path / "plain" / "config.yaml").read_text()
    (tmp_path / "plain" / "config.yaml").write_text(config.replace("norm_eps: 1e-06", 'norm_eps: "1e-06"'))
    assert _same(_load(tmp_path / "plain"), model, "plain")


def test_soft_caps_of_none_round_trip(tmp_path):
    model, _ = _save(tmp_path, gate_soft_cap=None, output_logit_soft_cap=None)
    assert _same(_load(tmp_path), model)


def test_path_problems_raise_os_errors(tmp_path):
    model, _ = _save(tmp_path / "ckpt")
    _refused(NotADirectoryError, tmp_path / "ckpt" / "config.json", "is a file; pass the checkpoint directory")
    with pytest.raises(NotADirectoryError, match="is a file"):
        ckpt.save_pretrained(model, str(tmp_path / "ckpt" / "config.json"))
    _refused(FileNotFoundError, tmp_path / "nowhere", "does not exist")
    os.remove(tmp_path / "ckpt" / "config.json")
    _refused(FileNotFoundError, tmp_path / "ckpt", "neither config.json nor config.yaml")
    os.rename(tmp_path / "ckpt" / "model.safetensors", tmp_path / "weights")
    os.mkdir(tmp_path / "ckpt" / "model.safetensors")
    _refused(IsADirectoryError, tmp_path / "ckpt", "model.safetensors", "not a regular file")


def test_checkpoint_error_is_a_value_error_exported_by_the_package():
    from xlstm_jax.models.xlstm_large import CheckpointError

    assert CheckpointError is ckpt.CheckpointError and issubclass(CheckpointError, ValueError)


# Config fields a checkpoint does not store, and why: everything else changes what the model computes and must round
# trip. A new field fails the test below until it is saved or listed here.
NOT_SAVED = {
    "backend": "the kernel is the loader's choice",
    "step_backend": "the kernel is the loader's choice",
    "compute_dtype": "the loader's choice (default: the stored tensors' dtype)",
    "param_dtype": "the stored tensors' dtype",
    "igate_bias_init": "initialisation only",
    "fgate_bias_init_range": "initialisation only",
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hf", "plain"])
def test_every_field_that_changes_the_function_round_trips(tmp_path, layout):
    """A model with a non-default value in every stored field (mLSTMsig gates, the forget-gate document reset,
    soft caps, epsilons, biases, widths, token ids) comes back with the same config and the same logits on packed
    documents, in both layouts."""
    import dataclasses

    import jax.numpy as jnp

    from xlstm_jax.models.xlstm_large.config import _ALIASES, xLSTMLargeConfig

    fields = {f.name for f in dataclasses.fields(xLSTMLargeConfig)}
    assert fields == set(_ALIASES) | set(NOT_SAVED), fields ^ (set(_ALIASES) | set(NOT_SAVED))
    changes = dict(input_gate="sigmoid", document_reset="forget_gate", reset_fgate_value=-7.5, gate_soft_cap=9.0,
                   output_logit_soft_cap=20.0, norm_eps=1e-5, eps=1e-5, add_out_norm=False, use_bias=True,
                   qk_dim_factor=0.25, v_dim_factor=0.5, ffn_proj_factor=2.0, ffn_round_up_to_multiple_of=16,
                   mlstm_round_up_to_multiple_of=1 if layout == "plain" else 64, num_heads=4, bos_token_id=3,
                   pad_token_id=4, eos_token_id=5, weight_mode="fused")
    model = random_model(tiny_config(**changes), seed=3, scale=1.0)
    ckpt.save_pretrained(model, str(tmp_path), layout=layout)
    loaded = _load(tmp_path)
    for name in _ALIASES:
        assert getattr(loaded.config, name) == getattr(model.config, name), name
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 32)), jnp.int32)
    segments = jnp.asarray(np.repeat([[0, 1, 2, 3], [0, 0, 1, 1]], 8, axis=1), jnp.int32)
    want, got = model(tokens, segment_ids=segments), loaded(tokens, segment_ids=segments)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(want), np.asarray(model(tokens)))  # the reset is exercised


@pytest.mark.slow
def test_a_config_that_transformers_writes_with_num_blocks_loads_as_transformers_builds_it(tmp_path):
    """transformers' xLSTMConfig(num_blocks=1, ...) saves num_blocks 1 beside its default num_hidden_layers 32 and
    builds one block: so do we. A block count the tensors do not hold is refused."""
    model, _ = _save(tmp_path)
    _edit_config(tmp_path, num_blocks=1, num_hidden_layers=32)
    loaded = _load(tmp_path)
    assert loaded.config.num_blocks == 1
    import jax.numpy as jnp

    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))
    _edit_config(tmp_path, num_blocks=2, num_hidden_layers=1)
    _refused(ckpt.CheckpointError, tmp_path, "backbone.blocks.1")
    _edit_config(tmp_path, num_blocks=None, num_hidden_layers=1)
    assert _load(tmp_path).config.num_blocks == 1
