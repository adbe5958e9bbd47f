"""Safetensors checkpoints of the xLSTM-7B model: exact save -> load round trips in the HF and plain layouts
(sharded and single-file, single and fused weights), and hand-written checkpoints in the upstream layouts that
load and match an independent float64 numpy forward pass."""

from __future__ import annotations

import json
import os
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from tests.support.xlstm_large_helpers import numpy_forward, random_model, random_tokens, tiny_config
from xlstm_jax import from_pretrained
from xlstm_jax.models.xlstm_large import checkpoint as ckpt


def _files(path: str) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="np") as fh:
                out.update({key: fh.get_tensor(key) for key in fh.keys()})
    return out


@pytest.mark.parametrize("layout", ["hf", "plain"])
@pytest.mark.parametrize("weight_mode", ["single", "fused"])
@pytest.mark.parametrize("max_shard_size", [6000, 10**9])
def test_save_load_save_round_trip_is_exact(tmp_path, layout, weight_mode, max_shard_size):
    model = random_model(tiny_config(weight_mode=weight_mode), seed=1)
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    written = ckpt.save_pretrained(model, first, layout=layout, max_shard_size=max_shard_size)
    sharded = max_shard_size < 10**9
    assert (ckpt.INDEX_FILE in written) == (sharded and layout == "hf")
    assert ("model.safetensors" in written) == (not sharded)
    loaded = from_pretrained(first, "float32", chunk_size=16, backend="native_chunkwise")
    assert loaded.config == model.config
    want = ckpt.state_dict(model, layout)
    got = ckpt.state_dict(loaded, layout)
    assert list(got) == list(want)
    assert list(want)[0] == {"hf": "backbone.embeddings.weight", "plain": "embedding.weight"}[layout]
    assert list(want)[-1] == "lm_head.weight"  # torch module order
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
    on_disk = _files(first)
    assert set(on_disk) == set(want) and all(np.array_equal(on_disk[k], want[k]) for k in want)
    ckpt.save_pretrained(loaded, second, layout=layout, max_shard_size=max_shard_size)
    assert sorted(os.listdir(first)) == sorted(os.listdir(second))
    for name in os.listdir(first):
        if name.endswith(".safetensors") or name == ckpt.INDEX_FILE:
            with open(os.path.join(first, name), "rb") as a, open(os.path.join(second, name), "rb") as b:
                assert a.read() == b.read(), name


@pytest.mark.slow
def test_bfloat16_and_tied_checkpoints_round_trip(tmp_path):
    model = random_model(tiny_config(tie_word_embeddings=True, param_dtype="bfloat16"), seed=2)
    ckpt.save_pretrained(model, str(tmp_path), layout="hf")
    tensors = _files(str(tmp_path))
    assert "lm_head.weight" not in tensors
    assert tensors["backbone.embeddings.weight"].dtype == ml_dtypes.bfloat16
    loaded = from_pretrained(str(tmp_path), "float32")
    assert loaded.config.tie_word_embeddings and loaded.config.param_dtype == "bfloat16"
    assert loaded.config.compute_dtype == "float32"
    assert from_pretrained(str(tmp_path)).config.compute_dtype == "bfloat16"  # default: the checkpoint's dtype
    want = ckpt.state_dict(model)
    assert all(np.array_equal(ckpt.state_dict(loaded)[k], want[k]) for k in want)


def _torch_tensors(c, seed: int) -> dict[str, np.ndarray]:
    """A random state dict with the HF key names and torch (out, in) shapes, built from the spec's table."""
    rng = np.random.default_rng(seed)
    D, NH, F, QK, V = c.embedding_dim, c.num_heads, c.ffn_dim, c.qk_dim, c.v_dim
    shapes = {"backbone.embeddings.weight": (c.vocab_size, D)}
    for b in range(c.num_blocks):
        p = f"backbone.blocks.{b}."
        shapes.update({
            p + "norm_mlstm.weight": (D,), p + "mlstm_layer.q.weight": (QK, D), p + "mlstm_layer.k.weight": (QK, D),
            p + "mlstm_layer.v.weight": (V, D), p + "mlstm_layer.ogate_preact.weight": (V, D),
            p + "mlstm_layer.igate_preact.weight": (NH, D), p + "mlstm_layer.igate_preact.bias": (NH,),
            p + "mlstm_layer.fgate_preact.weight": (NH, D), p + "mlstm_layer.fgate_preact.bias": (NH,),
            p + "mlstm_layer.multihead_norm.weight": (V,), p + "mlstm_layer.out_proj.weight": (D, V),
            p + "norm_ffn.weight": (D,), p + "ffn.proj_up_gate.weight": (F, D), p + "ffn.proj_up.weight": (F, D),
            p + "ffn.proj_down.weight": (D, F),
        })
    shapes.update({"backbone.out_norm.weight": (D,), "lm_head.weight": (c.vocab_size, D)})
    out = {}
    for key, shape in shapes.items():
        scale = 0.5 if len(shape) == 1 else 1.0 / np.sqrt(shape[-1])
        base = 1.0 if key.endswith("norm.weight") or "norm_" in key else 0.0
        out[key] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return out


@pytest.mark.slow
def test_handwritten_hf_sharded_checkpoint_loads_and_matches_the_spec(tmp_path):
    """HF layout as on the hub: config.json (model_type xlstm, hidden_size / num_hidden_layers, widths rounded up
    to 64), fp32 shards named model-0000k-of-0000n with model.safetensors.index.json."""
    config = {"model_type": "xlstm", "architectures": ["xLSTMForCausalLM"], "vocab_size": 30, "hidden_size": 96,
              "num_hidden_layers": 2, "num_heads": 2, "qk_dim_factor": 0.5, "v_dim_factor": 1.0,
              "ffn_proj_factor": 0.66, "ffn_round_up_to_multiple_of": 64, "gate_soft_cap": 15.0,
              "output_logit_soft_cap": 30.0, "norm_eps": 1e-6, "eps": 1e-6, "use_bias": False,
              "weight_mode": "single", "chunkwise_kernel": "chunkwise--native_autograd", "mode": "inference",
              "chunk_size": 64, "torch_dtype": "float32"}
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(config, fh)
    c = tiny_config(embedding_dim=96, num_heads=2, vocab_size=30, ffn_proj_factor=0.66,
                    mlstm_round_up_to_multiple_of=64)
    assert (c.qk_dim, c.v_dim, c.ffn_dim) == (64, 128, 64)
    tensors = _torch_tensors(c, seed=3)
    keys = list(tensors)
    shards = [keys[:9], keys[9:22], keys[22:]]
    names = [f"model-{n + 1:05d}-of-00003.safetensors" for n in range(3)]
    for name, part in zip(names, shards):
        save_file({k: tensors[k] for k in part}, str(tmp_path / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {k: name for name, part in zip(names, shards) for k in part}}
    with open(tmp_path / ckpt.INDEX_FILE, "w") as fh:
        json.dump(index, fh)
    model = from_pretrained(str(tmp_path), backend="native_chunkwise")  # computes in the checkpoint's float32
    assert model.config.qk_dim == 64 and model.config.param_dtype == model.config.compute_dtype == "float32"
    tokens = random_tokens(3, (2, 7), 30)
    want = numpy_forward(tensors, model.config, tokens)
    got = model(jnp.asarray(tokens))
    assert got.dtype == jnp.float32 and got.shape == (2, 7, 30)
    assert np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)) < 2e-5


@pytest.mark.slow
def test_handwritten_plain_checkpoint_with_fused_weights_loads(tmp_path):
    """Plain `xlstm_large` layout: config.yaml, key `embedding.weight`, one model.safetensors; here with the
    fused q|k|v|o, i|f and gate|up keys of weight_mode "fused"."""
    c = tiny_config(embedding_dim=32, num_heads=2, vocab_size=24, num_blocks=1)
    tensors = _torch_tensors(c, seed=4)
    plain = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in tensors.items()}
    fused = ckpt.convert_weight_mode(plain, c, "fused")
    assert "backbone.blocks.0.mlstm_layer.qkv_opreact.weight" in fused
    assert fused["backbone.blocks.0.ffn.proj_up_gate_z.weight"].shape == (2 * c.ffn_dim, 32)
    save_file(fused, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.yaml").write_text(
        "embedding_dim: 32\nnum_heads: 2\nnum_blocks: 1\nvocab_size: 24\nuse_bias: false\nnorm_eps: 1e-06\n"
        "qk_dim_factor: 0.5\nv_dim_factor: 1.0\nffn_proj_factor: 1.5\nffn_round_up_to_multiple_of: 64\n"
        "gate_soft_cap: 15.0\noutput_logit_soft_cap: 30.0\nweight_mode: fused\n"
        "chunkwise_kernel: chunkwise--triton_limit_chunk\nmode: inference\nreturn_last_states: true\n")
    model = from_pretrained(str(tmp_path), "float32", backend="native_recurrent")
    assert model.config.weight_mode == "fused"
    single = from_pretrained(str(tmp_path), "float32", backend="native_recurrent", weight_mode="single")
    tokens = random_tokens(5, (1, 9), 24)
    want = numpy_forward(tensors, model.config, tokens)
    for m in (model, single):
        assert np.max(np.abs(np.asarray(m(jnp.asarray(tokens))) - want)) / np.max(np.abs(want)) < 2e-5
    assert ckpt.state_dict(model, "plain").keys() == fused.keys()


def test_flat_yaml_is_read_without_pyyaml(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    parsed = ckpt._parse_flat_yaml("# comment\nembedding_dim: 64\nuse_bias: false\nnorm_eps: 1e-06\n"
                                   "mode: inference\ngate_soft_cap: null\nrange: [3.0, 6.0]\n")
    assert parsed == {"embedding_dim": 64, "use_bias": False, "norm_eps": 1e-6, "mode": "inference",
                      "gate_soft_cap": None, "range": [3.0, 6.0]}


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    model = random_model(tiny_config(num_blocks=1), seed=6)
    ckpt.save_pretrained(model, str(tmp_path), layout="hf")
    tensors = ckpt.state_dict(model)
    missing = dict(tensors)
    del missing["backbone.blocks.0.mlstm_layer.q.weight"]
    with pytest.raises(ValueError, match="missing 'backbone.blocks.0.mlstm_layer.q.weight'"):
        ckpt.load_state_dict(model.config, missing, "hf")
    wrong = dict(tensors, **{"backbone.blocks.0.mlstm_layer.q.weight": np.zeros((3, 32), np.float32)})
    with pytest.raises(ValueError, match=r"has shape \(3, 32\)"):
        ckpt.load_state_dict(model.config, wrong, "hf")
    with pytest.raises(ValueError, match="does not use"):
        ckpt.load_state_dict(model.config, dict(tensors, extra=np.zeros(2, np.float32)), "hf")
    with pytest.raises(ValueError, match="not an xLSTM-7B state dict"):
        ckpt.detect_layout(["foo.weight"])
    with pytest.raises(FileNotFoundError):
        from_pretrained(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_save_pretrained_writes_the_tokenizer_with_the_special_tokens_the_config_names(tmp_path):
    """save_pretrained(tokenizer=path or Tokenizer) puts the tokenizer files beside the weights, the special tokens
    being those the config's ids name (None: left out); a later save without one keeps them; a tokenizer larger
    than the vocabulary is refused before anything is written."""
    from tokenizers import Tokenizer, models

    from xlstm_jax import load_tokenizer

    words = {"<|endoftext|>": 0, "<pad>": 1, "cat": 2, "[UNK]": 3}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tokenizer.add_special_tokens(["<|endoftext|>", "<pad>", "[UNK]"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    model = random_model(tiny_config(bos_token_id=None, eos_token_id=0, pad_token_id=1), seed=2)
    written = ckpt.save_pretrained(model, str(tmp_path / "model"), tokenizer=str(tmp_path / "tokenizer.json"))
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(written)
    assert load_tokenizer(str(tmp_path / "model")).to_str() == tokenizer.to_str()
    with open(tmp_path / "model" / "special_tokens_map.json") as fh:
        assert json.load(fh) == {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "unk_token": "[UNK]"}
    loaded = from_pretrained(str(tmp_path / "model"))
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id, loaded.config.pad_token_id) == (None, 0, 1)
    ckpt.save_pretrained(model, str(tmp_path / "model"))
    assert load_tokenizer(str(tmp_path / "model")).to_str() == tokenizer.to_str()
    large = Tokenizer(models.WordLevel({f"w{n}": n for n in range(41)}, unk_token="w0"))
    with pytest.raises(ValueError, match="tokenizer: its 41 tokens do not fit .*vocab_size 40"):
        ckpt.save_pretrained(model, str(tmp_path / "large"), tokenizer=large)
    assert not (tmp_path / "large").exists()
