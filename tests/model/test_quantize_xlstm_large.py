"""Weight-only int8 / fp8 decoding of the xLSTM-7B model (`xlstm_jax.models.xlstm_large.quantize`): a quantized
model generates exactly what a float model holding its dequantized weights generates (XLA path: the same logits
bit for bit; the Triton kernel through the interpreter: within float32 rounding); what is and is not quantized;
clear errors for bad input, from `quantize`, `Generator` and `xlstm-jax generate --weights`; `xlstm-jax eval
--weights`."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.support.xlstm_large_helpers import random_model, tiny_config
from xlstm_jax import cli
from xlstm_jax.generate_cli import WEIGHT_SCHEMES
from xlstm_jax.kernels.quantized_matmul import SCHEMES
from xlstm_jax.models.xlstm_large.checkpoint import save_pretrained
from xlstm_jax.models.xlstm_large.generation import Generator, generate
from xlstm_jax.models.xlstm_large.model import Dense
from xlstm_jax.models.xlstm_large.quantize import QuantizedDense, dequantized, quantize, quantized_scheme

PROMPTS = [[3, 1, 4, 1, 5], [9, 2]]


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(weight_mode="fused", compute_dtype="bfloat16", igate_bias_init=0.0), seed=5,
                        scale=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_generation_equals_the_dequantized_float_model(model, scheme):
    """On the XLA path a QuantizedDense computes what a Dense holding wq * scale computes: same logits, bit for bit,
    through the prefill and the decode steps."""
    quantized = quantize(model, scheme, backend="xla")
    out = generate(quantized, PROMPTS, max_new_tokens=5, return_logits=True)
    want = generate(dequantized(quantized), PROMPTS, max_new_tokens=5, return_logits=True)
    assert np.array_equal(out.tokens, want.tokens)
    assert np.array_equal(out.logits, want.logits)
    float_out = generate(model, PROMPTS, max_new_tokens=5, return_logits=True)
    assert not np.array_equal(out.logits, float_out.logits)  # the weights did change


@pytest.mark.slow
def test_triton_decode_steps_equal_the_dequantized_float_model():
    """Decode steps (2 rows) through the dequantizing kernel in Triton's interpreter, float32 compute: the logits
    of the dequantized float model within float32 rounding, the same tokens."""
    float_model = random_model(tiny_config(weight_mode="fused"), seed=6, scale=0.1)
    quantized = quantize(float_model, "fp8", backend="triton")
    out = generate(quantized, PROMPTS, max_new_tokens=3, return_logits=True)
    want = generate(dequantized(quantized), PROMPTS, max_new_tokens=3, return_logits=True)
    assert np.array_equal(out.tokens, want.tokens)
    np.testing.assert_allclose(out.logits, want.logits, rtol=0, atol=2e-5 * np.max(np.abs(want.logits)))


@pytest.mark.parametrize("weight_mode", ["single", "fused"])
def test_what_is_quantized(weight_mode):
    """Projections and the LM head become 8-bit with float32 scales per output channel; the embedding, gate
    pre-activations and norms keep their arrays; the input model is unchanged."""
    float_model = random_model(tiny_config(weight_mode=weight_mode), seed=7)
    quantized = quantize(float_model, "int8")
    layer, ffn = quantized.backbone.blocks[0].mlstm_layer, quantized.backbone.blocks[0].ffn
    names = (["q", "k", "v", "ogate_preact"] if weight_mode == "single" else ["qkv_opreact"]) + ["out_proj"]
    for module, name in [(layer, n) for n in names] + [(ffn, "proj_down"), (quantized, "lm_head")]:
        dense = getattr(module, name)
        assert isinstance(dense, QuantizedDense), name
        assert dense.weight[...].dtype == jnp.int8 and dense.scale[...].dtype == jnp.float32
        assert dense.scale[...].shape == (dense.weight[...].shape[1],)
    gates = ["igate_preact", "fgate_preact"] if weight_mode == "single" else ["ifgate_preact"]
    for name in gates:
        assert isinstance(getattr(layer, name), Dense)
    original = float_model.backbone
    assert quantized.backbone.embeddings.weight[...] is original.embeddings.weight[...]
    assert quantized.backbone.blocks[1].norm_ffn.weight[...] is original.blocks[1].norm_ffn.weight[...]
    assert quantized_scheme(float_model) is None and quantized_scheme(quantized) == "int8"
    assert all(not isinstance(node, QuantizedDense) for _, node in nnx.iter_graph(float_model))
    assert isinstance(quantize(float_model, "fp8", lm_head=False).lm_head, Dense)
    generator = Generator(float_model, weights="fp8")  # decodes a quantized copy, split once
    assert quantized_scheme(generator.model) == "fp8" and quantized_scheme(float_model) is None
    assert generator._split is None or generator._split[0] == nnx.graphdef(generator.model)


def test_bad_input_gets_clear_errors(model):
    with pytest.raises(ValueError, match=r"unknown weight quantization scheme 'int4'; expected one of \['int8', "
                                         r"'fp8'\]"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match="unknown weight quantization scheme 'INT8'"):
        Generator(model, weights="INT8")
    with pytest.raises(ValueError, match=r"already quantized \('fp8'\)"):
        Generator(quantize(model, "fp8"), weights="int8")
    with pytest.raises(ValueError, match="takes an xLSTMLarge model, got Linear"):
        quantize(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "int8")
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'xla', 'triton'\], got 'gpu'"):
        quantize(model, "int8", backend="gpu")


def test_a_quantized_model_is_not_saved_without_its_weights(model, tmp_path):
    """The 8-bit weights are not parameters: saving would drop them, so it is refused and nothing is written."""
    from xlstm_jax.models.xlstm_large.checkpoint import save_pretrained

    with pytest.raises(ValueError, match="holds int8 weights .* save the float model and quantize it after loading"):
        save_pretrained(quantize(model, "int8"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_cli_weights_option(model, tmp_path, capsys):
    """A bad --weights value is one error line and exit 2 before anything loads; --weights int8 decodes what
    `Generator(model, weights="int8")` does."""
    assert WEIGHT_SCHEMES == tuple(SCHEMES)
    assert cli.main(["generate", str(tmp_path / "absent"), "--prompt-ids", "1 2", "--weights", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("error: --weights: must be one of ['int8', 'fp8'] (leave it out for the checkpoint's float "
                    "weights), got 'int4'.")]
    save_pretrained(model, str(tmp_path / "model"))
    assert cli.main(["generate", str(tmp_path / "model"), "--prompt-ids", "3 1 4", "--weights", "int8",
                     "--max-new-tokens", "3"]) == 0
    want = Generator(model, weights="int8")([[3, 1, 4]], max_new_tokens=3).tokens[0].tolist()
    assert capsys.readouterr().out.strip() == f"prompt [3, 1, 4] -> {want}"


def test_eval_refuses_a_bad_weights_value_before_anything_loads(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "absent"), "--data", "absent.npy", "--weights", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("error: --weights: must be one of ['int8', 'fp8'] (leave it out for the checkpoint's float "
                    "weights), got 'bf16'.")]


@pytest.mark.slow
def test_eval_with_int8_weights_evaluates_the_quantized_model(model, tmp_path, capsys):
    """`xlstm-jax eval --weights int8`: the loss of the float model holding the dequantized weights, near the float
    loss and not equal to it."""
    tokens = str(tmp_path / "tokens.npy")
    np.save(tokens, np.random.default_rng(0).integers(0, model.config.vocab_size, 600, dtype=np.int32))
    save_pretrained(model, str(tmp_path / "float"))
    save_pretrained(dequantized(quantize(model, "int8")), str(tmp_path / "dequantized"))

    def loss(name, *weights):
        argv = ["eval", str(tmp_path / name), "--data", tokens, "--seq-len", "32", "--batch-size", "4", "--json"]
        assert cli.main([*argv, *weights]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)["loss"]

    float_loss, int8_loss = loss("float"), loss("float", "--weights", "int8")
    assert int8_loss == loss("dequantized")
    assert int8_loss != float_loss and abs(int8_loss - float_loss) < 1e-3 * float_loss
