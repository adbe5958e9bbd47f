"""Generation: chunkwise prefill + recurrent steps in one jitted while_loop reproduce the logits of one full
forward pass; ragged prompts, stop tokens and the sampling filters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.support.xlstm_large_helpers import jitted, random_model, random_tokens, tiny_config
from xlstm_jax.models.xlstm_large import generation as generate_module
from xlstm_jax.models.xlstm_large.generation import Generator, _generate, filter_logits, generate


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(igate_bias_init=0.0), seed=11)


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.slow
@pytest.mark.parametrize("step_backend", ["native_recurrent", "mlstm_step"])
def test_prefill_plus_steps_equal_the_full_forward(model, step_backend):
    """Steps through the recurrent backend or `xlstm_jax.mlstm_step` (the decode path; Triton's interpreter is not
    used here: on a CPU mlstm_step runs XLA) give the logits and tokens of one full forward pass."""
    prompt = random_tokens(0, (2, 21), model.config.vocab_size)
    out = generate(model, prompt, max_new_tokens=10, return_logits=True, prefill_backend="native_chunkwise",
                   step_backend=step_backend)
    assert out.tokens.shape == (2, 10) and out.logits.shape == (2, 10, model.config.vocab_size)
    assert out.tokens.dtype == np.int32 and out.lengths.tolist() == [10, 10]
    full = jitted(model)(np.concatenate([prompt, out.tokens], axis=1), backend="native_recurrent")
    assert _rel(out.logits, full[:, 20:30]) < 2e-5
    assert np.array_equal(out.tokens, np.argmax(np.asarray(full[:, 20:30]), axis=-1))  # greedy


@pytest.mark.slow
def test_ragged_prompts_are_left_padded_neutrally(model):
    rows = [random_tokens(1, (1, 17), model.config.vocab_size)[0].tolist(),
            random_tokens(2, (1, 6), model.config.vocab_size)[0].tolist()]
    out = generate(model, rows, max_new_tokens=5, return_logits=True)
    for row, prompt in enumerate(rows):
        alone = generate(model, [prompt], max_new_tokens=5, return_logits=True)
        assert np.array_equal(alone.tokens[0], out.tokens[row])
        assert _rel(out.logits[row], alone.logits[0]) < 2e-5


@pytest.mark.slow
def test_stop_tokens_end_rows_and_pad_the_rest(model):
    prompt = random_tokens(3, (2, 9), model.config.vocab_size)
    free = generate(model, prompt, max_new_tokens=8)
    stop = int(free.tokens[0, 2])
    out = generate(model, prompt, max_new_tokens=8, stop_tokens=[stop])
    first = int(np.argmax(free.tokens[0] == stop))
    assert out.lengths[0] == first + 1
    assert np.array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    assert np.all(out.tokens[0, first + 1:] == model.config.pad_token_id)
    hit = np.nonzero(free.tokens[1] == stop)[0]
    assert out.lengths[1] == (hit[0] + 1 if hit.size else 8)


@pytest.mark.slow
def test_one_compilation_serves_every_step(model):
    prompt = random_tokens(4, (1, 5), model.config.vocab_size)
    generate(model, prompt, max_new_tokens=3)
    before = _generate._cache_size()
    generate(model, random_tokens(5, (1, 5), model.config.vocab_size), max_new_tokens=3, seed=1)
    assert _generate._cache_size() == before


@pytest.mark.slow
def test_a_generator_splits_once_and_sees_weights_updated_in_place(monkeypatch):
    """Generator: the model's split happens once, not per call; the outputs equal `generate`'s, also after the
    weights change in place (as an optimizer step or loaded weights change them)."""
    model = random_model(tiny_config(igate_bias_init=0.0), seed=12)
    prompt = random_tokens(6, (2, 7), model.config.vocab_size)
    splits = []
    real_split = nnx.split

    def counted(node, *filters):
        if node is model:
            splits.append(1)
        return real_split(node, *filters)

    monkeypatch.setattr(generate_module.nnx, "split", counted)
    serve = Generator(model)
    first = serve(prompt, max_new_tokens=4, return_logits=True)
    again = serve(prompt, max_new_tokens=4, return_logits=True)
    assert len(splits) == 1
    np.testing.assert_array_equal(first.logits, again.logits)
    np.testing.assert_array_equal(first.tokens, generate(model, prompt, max_new_tokens=4).tokens)
    head = model.lm_head.kernel
    head.value = head.value * 3.0
    updated = serve(prompt, max_new_tokens=4, return_logits=True)
    fresh = generate(model, prompt, max_new_tokens=4, return_logits=True)
    assert _rel(updated.logits, fresh.logits) < 1e-6
    assert _rel(updated.logits, first.logits) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("step_backend", ["native_recurrent", "mlstm_step"])
def test_bfloat16_states_follow_the_float32_decode(model, step_backend):
    """state_dtype="bfloat16": C and n travel between steps in bfloat16 (the logits move, within bfloat16's
    precision); an unknown state dtype is refused."""
    prompt = random_tokens(7, (2, 9), model.config.vocab_size)
    kwargs = dict(max_new_tokens=6, return_logits=True, step_backend=step_backend)
    exact = generate(model, prompt, **kwargs)
    half = generate(model, prompt, **kwargs, state_dtype="bfloat16")
    assert not np.array_equal(half.logits[:, 1:], exact.logits[:, 1:])
    assert _rel(half.logits, exact.logits) < 2e-2
    np.testing.assert_array_equal(half.logits[:, 0], exact.logits[:, 0])  # the prompt pass is float32 either way
    with pytest.raises(ValueError, match="state_dtype"):
        generate(model, prompt, max_new_tokens=2, state_dtype="float16")


@pytest.mark.slow
def test_sampling_filters_and_seeds(model):
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isinf(filter_logits(logits, 1.0, 2, None)[0, 2:]).all()
    assert np.isfinite(filter_logits(logits, 1.0, 2, None)[0, :2]).all()
    top_p = filter_logits(logits, 1.0, None, 0.7)  # 0.5 + 0.3 reaches 0.7: keep two
    assert np.isfinite(top_p[0, :2]).all() and np.isinf(top_p[0, 2:]).all()
    assert np.allclose(filter_logits(logits, 2.0, None, None), (logits - jnp.max(logits)) / 2.0)
    prompt = random_tokens(6, (2, 7), model.config.vocab_size)
    greedy = generate(model, prompt, max_new_tokens=6)
    assert np.array_equal(generate(model, prompt, max_new_tokens=6, temperature=0.7, top_k=1).tokens, greedy.tokens)
    a = generate(model, prompt, max_new_tokens=6, temperature=1.5, top_p=0.95, seed=3)
    b = generate(model, prompt, max_new_tokens=6, temperature=1.5, top_p=0.95, seed=3)
    c = generate(model, prompt, max_new_tokens=6, temperature=1.5, top_p=0.95, seed=4)
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="prompt token ids"):
        generate(model, [[model.config.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, max_new_tokens=0)
    assert jax.numpy.issubdtype(greedy.tokens.dtype, jnp.integer)


@pytest.mark.slow
def test_mlstmsig_model_decodes_like_its_full_forward():
    """An mLSTMsig model (input_gate "sigmoid"): prefill + `mlstm_step` steps give the full forward's logits."""
    sig = random_model(tiny_config(igate_bias_init=0.0, input_gate="sigmoid"), seed=12)
    prompt = random_tokens(1, (2, 9), sig.config.vocab_size)
    out = generate(sig, prompt, max_new_tokens=6, return_logits=True, prefill_backend="native_chunkwise",
                   step_backend="mlstm_step")
    full = jitted(sig)(np.concatenate([prompt, out.tokens], axis=1), backend="native_recurrent")
    assert _rel(out.logits, full[:, 8:14]) < 2e-5


@pytest.mark.slow
def test_argument_types_are_taken_as_integers_are_or_refused(model):
    """numpy integers are integers; floats are never truncated to ids; huge ids, counts and seeds get ValueErrors
    naming the argument (issue 31 / 37)."""
    prompt = [[1, 2, 3]]
    want = generate(model, prompt, max_new_tokens=3).tokens
    got = generate(model, [np.array([1, 2, 3], np.int16)], max_new_tokens=np.int64(3), top_k=np.int32(40),
                   stop_tokens=[np.int64(0)], seed=np.uint8(0))
    assert np.array_equal(got.tokens[:, :got.lengths[0]], want[:, :got.lengths[0]])
    for bad, match in (([[1.7, 2.2]], "integer token ids"), ([[1, True]], "prompt token ids|integer token ids"),
                       ([[2**40]], "prompt token ids"), ([[2**70]], "integer token ids")):
        with pytest.raises(ValueError, match=match):
            generate(model, bad, max_new_tokens=2)
    for kwargs, match in ((dict(max_new_tokens=2**31), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
                          (dict(max_new_tokens=True), "max_new_tokens"), (dict(max_new_tokens=2, top_k=1.5), "top_k"),
                          (dict(max_new_tokens=2, seed=2**64), "seed"), (dict(max_new_tokens=2, seed=1.5), "seed"),
                          (dict(max_new_tokens=2, temperature=float("nan")), "temperature"),
                          (dict(max_new_tokens=2, temperature=float("inf")), "temperature"),
                          (dict(max_new_tokens=2, stop_tokens=[2.5]), "stop_tokens"),
                          (dict(max_new_tokens=2, stop_tokens=[10**6]), "stop_tokens")):
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, **kwargs)


def test_buffers_that_cannot_fit_are_refused_with_their_size(model, monkeypatch):
    monkeypatch.setattr(generate_module.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 2**18)
    with pytest.raises(ValueError, match=r"return_logits \(1 x 100000000 x 40 float32\) needs 14.9 GiB"):
        generate(model, [[1, 2]], max_new_tokens=10**8, return_logits=True)
    with pytest.raises(ValueError, match=r"the generated tokens .* needs"):
        generate(model, [[1, 2]] * 8, max_new_tokens=2**31 - 1)


@pytest.mark.slow
def test_denormal_temperatures_approach_greedy(model):
    """A temperature of 1e-40 (float32 denormal) samples the greedy tokens; it used to give token 0 (inf - inf)."""
    prompt = random_tokens(9, (2, 6), model.config.vocab_size)
    greedy = generate(model, prompt, max_new_tokens=5).tokens
    for temperature in (1e-40, 1e-30, 1e-8):
        assert np.array_equal(generate(model, prompt, max_new_tokens=5, temperature=temperature, seed=1).tokens,
                              greedy), temperature


def test_nan_logits_are_an_error_naming_the_step():
    """A model whose output turns NaN never turns that into tokens: FloatingPointError naming the prompt and the
    generated position."""
    bad = random_model(tiny_config(igate_bias_init=0.0), seed=12)
    graphdef, state = nnx.split(bad)
    state["lm_head"]["kernel"].value = state["lm_head"]["kernel"].value.at[0, 0].set(jnp.nan)
    bad = nnx.merge(graphdef, state)
    with pytest.raises(FloatingPointError, match="generated token 0 of prompt 0"):
        generate(bad, [[1, 2, 3]], max_new_tokens=3)


def test_the_documented_generate_is_the_function_where_the_docs_say():
    """`from xlstm_jax.models.xlstm_large import generate` gives the function, also after the generation module
    was imported (a submodule named generate shadowed it: TypeError 'module' object is not callable)."""
    import importlib

    importlib.import_module("xlstm_jax.models.xlstm_large.generation")
    from xlstm_jax.models.xlstm_large import generate as documented

    assert callable(documented) and documented is generate
