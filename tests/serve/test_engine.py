"""The serving engine without HTTP: slots are reused, nothing compiles after warm-up, a request waiting for a slot is
prefilled before one frees, a prefix from the cache gives
the tokens of a full prefill, inactive slots keep their states exactly, the per-row sampling filter is
`filter_logits` row by row, and a request whose receiver fails does not disturb the others."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.serve.conftest import ENGINE
from xlstm_jax.models.xlstm_large.generation import filter_logits
from xlstm_jax.serve import steps
from xlstm_jax.serve.cli import load_served
from xlstm_jax.serve.engine import Engine, prefill_buckets
from xlstm_jax.serve.requests import Event, Request, SamplingParams
from xlstm_jax.serve.sampling import filter_rows



@pytest.fixture(scope="module")
def model(model_dir):
    return load_served(model_dir)[0]


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, **ENGINE, prefix_cache_mb=1)
    engine.warm_up()
    engine.start()
    yield engine
    engine.stop()


class Collector:
    """Receives one request's events; `wait()` returns (tokens, finish reason)."""

    def __init__(self):
        self.tokens, self.finish, self.done = [], None, threading.Event()

    def __call__(self, event: Event) -> None:
        self.tokens += event.token_ids
        if event.finish_reason is not None:
            self.finish = event.finish_reason
            self.done.set()

    def wait(self):
        assert self.done.wait(60), "the request did not finish"
        return self.tokens, self.finish


def run(engine, prompts, **params):
    """Submit every prompt at once; (tokens, finish reason) of each."""
    collectors = [Collector() for _ in prompts]
    engine.submit([Request(p, SamplingParams(**{"max_tokens": 5, **params}), c) for p, c in zip(prompts, collectors)])
    return [c.wait() for c in collectors]


def prompts_of(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


def test_slots_are_reused_and_nothing_compiles_after_warm_up(engine):
    """12 requests through 4 slots (prompts of 1 to 75 tokens: one and several chunks, both buckets; greedy and
    sampled rows mixed) finish with max_tokens tokens each, equal to each one run alone; no compilation."""
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    compiled = (engine._decode_step, engine._prefill_chunk, engine._mixed_step, steps.insert)
    sizes = [f._cache_size() for f in compiled]
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        prompts = prompts_of([1, 2, 7, 16, 17, 31, 32, 33, 50, 64, 65, 75], engine.config.vocab_size)
        together = run(engine, prompts, max_tokens=6)
        sampled = run(engine, prompts[:3], max_tokens=3, temperature=0.8, top_k=5, top_p=0.9, seed=1)
        alone = [run(engine, [p], max_tokens=6)[0] for p in prompts[::3]]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert [f._cache_size() for f in compiled] == sizes and compiles == []
    assert all(len(tokens) == 6 and finish == "length" for tokens, finish in together)
    assert all(len(tokens) == 3 for tokens, _ in sampled)
    assert alone == together[::3]
    assert engine.stats()["active"] == 0 and engine.stats()["waiting"] == 0


def test_a_request_waiting_for_a_slot_is_prefilled_before_one_frees(engine):
    """Four slots busy for 12 tokens each and a fifth request with a 75-token prompt (three chunks): it prefills in
    the staging slot while the four decode, so when the first slot frees its state is complete; its tokens are those
    it gets alone."""
    busy = prompts_of([3, 4, 5, 6], engine.config.vocab_size, seed=2)
    (late,) = prompts_of([75], engine.config.vocab_size, seed=3)
    seen = []

    class FirstToFinish(Collector):
        def __call__(self, event):
            if event.finish_reason is not None and not seen:
                stage = engine._slots[engine.max_slots]
                seen.append((stage.request is not None and stage.request.prompt == late, stage.position))
            super().__call__(event)

    collectors = [FirstToFinish() for _ in busy] + [Collector()]
    engine.submit([Request(p, SamplingParams(max_tokens=12 if p in busy else 5), c)
                   for p, c in zip(busy + [late], collectors)])
    results = [c.wait() for c in collectors]
    assert seen == [(True, len(late) - 1)]
    assert results[-1] == run(engine, [late])[0]


@pytest.mark.parametrize("prefill_backend,prefill_chunk", [("mlstm_prefill", 32), (None, 28), ("mlstm_prefill", 28)])
def test_other_prefill_settings_give_the_same_tokens(model, engine, prefill_backend, prefill_chunk):
    """An engine whose prompt chunks run through `mlstm_prefill`, or in chunks of 28 tokens (4 decode rows + 28 =
    32 matmul rows; buckets 16 and 28), alone and beside decode steps, answers as the default one: prompts of one
    to three chunks, several at once."""
    prompts = prompts_of([5, 40, 75, 33], engine.config.vocab_size, seed=4)
    config = {**ENGINE, "prefill_chunk": prefill_chunk}
    fused = Engine(model, **config, prefix_cache_mb=0, prefill_backend=prefill_backend)
    fused.warm_up()
    fused.start()
    try:
        assert run(fused, prompts, max_tokens=6) == run(engine, prompts, max_tokens=6)
    finally:
        fused.stop()


def test_prefix_reuse_gives_the_tokens_of_a_full_prefill(model, engine):
    """A prompt sharing 64 tokens (two chunks) with an earlier one starts from the stored state at 64; one that
    extends an earlier prompt starts from the state after that prompt[:-1]; both give the tokens of an engine
    without a prefix cache."""
    first, tail, more = prompts_of([70, 9, 6], engine.config.vocab_size, seed=1)
    shares_chunks = first[:64] + tail
    extends = first + more
    hits = engine.metrics.prefix_hit_tokens._value.get()
    run(engine, [first])
    cached = run(engine, [shares_chunks]) + run(engine, [extends])
    assert engine.metrics.prefix_hit_tokens._value.get() - hits == 64 + 69
    fresh = Engine(model, **ENGINE, prefix_cache_mb=0)
    fresh.warm_up()
    fresh.start()
    try:
        assert run(fresh, [shares_chunks]) + run(fresh, [extends]) == cached
        assert fresh.stats()["prefix_entries"] == 0
    finally:
        fresh.stop()


def test_inactive_slots_keep_their_states_exactly(model):
    """One decode step with slots 1 and 3 inactive: their C, n, m come back bit for bit (neutral gates)."""
    engine = Engine(model, **ENGINE)
    M, V = engine.max_slots, engine.config.vocab_size
    rng = np.random.default_rng(0)
    before = [tuple(rng.standard_normal(x.shape).astype(np.float32) for x in block) for block in engine._pool]
    pool = jax.tree.map(jnp.asarray, before)
    active = np.array([True, False, True, False])
    ints = np.arange(M, dtype=np.int32)
    _, after, _ = engine._decode_step(engine._params, pool, jnp.zeros((M,), jnp.int32), ints + 5, np.ones(M, bool),
                                      active, np.zeros((M, 2), np.uint32), ints, ints, np.zeros(M, np.float32),
                                      ints * 0 + V, np.ones(M, np.float32))
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(after))):
        assert np.array_equal(old[~active], new[~active])
        assert not np.array_equal(old[active], new[active])


@pytest.mark.parametrize("chunk_backend,L", [(None, 16), ("mlstm_prefill", 16), (None, 12), ("mlstm_prefill", 12)])
def test_decode_and_prefill_in_one_pass_equal_them_apart(model, chunk_backend, L):
    """`decode_and_prefill`: the pool's logits and states (slot 1 inactive, kept exactly) and a left-padded chunk's
    state equal a decode step and a prefill run on their own; the chunk's cell on the config's backend or on
    `mlstm_prefill`; a chunk of L = 12 tokens (not a power of two) too."""
    rng = np.random.default_rng(3)
    V = model.config.vocab_size
    _, pool = model(jnp.asarray(rng.integers(0, V, (4, 9))), return_states=True)
    _, state = model(jnp.asarray(rng.integers(0, V, (1, 5))), return_states=True)
    tokens, active = jnp.asarray(rng.integers(0, V, (4,)), jnp.int32), jnp.asarray([True, False, True, True])
    chunk, mask = jnp.asarray(rng.integers(0, V, (1, L)), jnp.int32), jnp.asarray(np.arange(L) >= 3)[None]
    backends = dict(step_backend=model.config.step_backend, backend=chunk_backend or model.config.backend,
                    chunk_size=model.config.chunk_size)
    graphdef, params = nnx.split(model)

    @jax.jit
    def both(params, pool, state):  # one compilation: op-by-op calls on a CPU compile every op
        model = nnx.merge(graphdef, params)
        together = steps.decode_and_prefill(model, tokens, active, pool, chunk, mask, state, **backends)
        alone = model(tokens[:, None], states=pool, token_mask=active[:, None], return_states=True,
                      backend=model.config.step_backend)
        return together, alone, model(chunk, states=state, token_mask=mask, return_states=True)[1]

    (logits, new_pool, new_state), (alone, alone_pool), alone_state = both(params, pool, state)
    np.testing.assert_allclose(logits, alone[:, 0], rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves((new_pool, new_state)), jax.tree.leaves((alone_pool, alone_state))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, old in zip(jax.tree.leaves(new_pool), jax.tree.leaves(pool)):
        assert np.array_equal(got[1], old[1])


def test_step_log_and_histogram_record_each_iteration_by_kind(engine):
    """A stream of 20 tokens (its 19-token prefill runs alone) and, submitted at its first token, a 75-token prompt
    whose three chunks ride on its steps 3 to 5: the steps delivered after one delivered before (2 to 20) are 3 mixed
    and 16 decode, each with its positive wait; the `xlstm_serve_step_seconds` histogram counts the same."""
    while engine._busy() or engine.stats()["waiting"]:  # the shared engine idle: no other request's steps here
        time.sleep(0.01)
    stream_prompt, late_prompt = prompts_of([20, 75], engine.config.vocab_size, seed=7)
    late = Collector()

    class SubmitsLate(Collector):
        def __call__(self, event):
            if not self.tokens:
                engine.submit([Request(late_prompt, SamplingParams(max_tokens=4), late)])
            super().__call__(event)

    def counts():
        get = engine.metrics.registry.get_sample_value
        return {kind: get("xlstm_serve_step_seconds_count", {"kind": kind}) for kind in ("decode", "mixed", "prefill")}

    before, logged = counts(), len(engine.step_log)
    stream = SubmitsLate()
    engine.submit([Request(stream_prompt, SamplingParams(max_tokens=20), stream)])
    assert len(stream.wait()[0]) == 20 and len(late.wait()[0]) == 4
    new = list(engine.step_log)[logged:]
    by_kind = {kind: [s for k, s in new if k == kind] for kind in ("decode", "mixed", "prefill")}
    assert {kind: len(s) for kind, s in by_kind.items()} == {"decode": 16, "mixed": 3, "prefill": 1}
    assert all(s > 0 for _, s in new)
    assert {kind: counts()[kind] - before[kind] for kind in by_kind} == {k: len(s) for k, s in by_kind.items()}
    assert b'xlstm_serve_step_seconds_bucket{kind="mixed",le="0.0075"}' in engine.metrics.text()


def test_a_failing_combined_pass_runs_apart_and_ends_only_the_failing_prefill(engine, monkeypatch):
    """While a request decodes, a prompt's chunks ride on its steps; when that combined pass fails, the step and the
    chunk run apart: the decoding request goes on and the request whose chunk fails ends alone with an error."""
    chunk = engine._chunk
    passes = []

    def mixed_fails(*args, **kwargs):
        passes.append(1)
        raise RuntimeError("out of memory (a stand-in)")

    def fails_on_sevens(state, tokens, mask):
        if tokens[0, -1] == 7:
            raise RuntimeError("out of memory (a stand-in)")
        return chunk(state, tokens, mask)

    monkeypatch.setattr(engine, "_mixed_step", mixed_fails)
    monkeypatch.setattr(engine, "_chunk", fails_on_sevens)
    running, bad, good = Collector(), Collector(), Collector()
    stream = Request([8] * 3, SamplingParams(max_tokens=10**6), running)  # decodes until cancelled
    engine.submit([stream])
    while not running.tokens:
        running.done.wait(0.01)
    engine.submit([Request([7] * 40, SamplingParams(max_tokens=4), bad),
                   Request([9] * 40, SamplingParams(max_tokens=4), good)])
    assert bad.wait() == ([], "error") and len(good.wait()[0]) == 4
    assert passes and not running.done.is_set()
    engine.cancel(stream)
    deadline = time.monotonic() + 30
    while engine.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["active"] == 0


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                     (0.5, 3, 0.6), (2.0, 40, 0.999)])
def test_filter_rows_is_filter_logits_row_by_row(temperature, top_k, top_p):
    logits = jax.random.normal(jax.random.key(4), (3, 40)) * 3
    logits = logits.at[1, :4].set(logits[1, 4])  # ties at the top-k threshold
    rows = jax.jit(filter_rows)(logits, jnp.full((3,), temperature), jnp.full((3,), top_k or 40, jnp.int32),
                                jnp.full((3,), top_p or 1.0))
    whole = jax.jit(filter_logits, static_argnums=(1, 2, 3))(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(rows, whole)


def test_a_failing_receiver_cancels_only_its_request(engine):
    def broken(event):
        raise RuntimeError("gone")

    good = Collector()
    prompts = prompts_of([5, 12], engine.config.vocab_size, seed=2)
    engine.submit([Request(prompts[0], SamplingParams(max_tokens=20), broken),
                   Request(prompts[1], SamplingParams(max_tokens=20), good)])
    tokens, finish = good.wait()
    assert len(tokens) == 20 and finish == "length"
    assert engine.metrics.finished.labels(finish_reason="cancelled")._value.get() >= 1


def test_a_failing_prefill_ends_only_its_request(engine, monkeypatch):
    chunk = engine._chunk

    def fails_on_sevens(state, tokens, mask):
        if tokens[0, -1] == 7:
            raise RuntimeError("out of memory (a stand-in)")
        return chunk(state, tokens, mask)

    monkeypatch.setattr(engine, "_chunk", fails_on_sevens)
    bad, good = Collector(), Collector()
    engine.submit([Request([7] * 10, SamplingParams(max_tokens=4), bad),
                   Request([8] * 10, SamplingParams(max_tokens=4), good)])
    assert bad.wait() == ([], "error") and len(good.wait()[0]) == 4
    assert engine.stats()["active"] == 0


def test_bad_settings_and_prompts_are_refused(model, engine):
    assert prefill_buckets(64) == (16, 32, 64) and prefill_buckets(8) == (8,)
    assert prefill_buckets(240) == (16, 32, 64, 128, 240) and prefill_buckets(20) == (16, 20)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        prefill_buckets(0)
    with pytest.raises(ValueError, match="state_dtype"):
        Engine(model, state_dtype="float16")
    with pytest.raises(ValueError, match="prefill_backend must be one of"):
        Engine(model, prefill_backend="cuda")
    with pytest.raises(ValueError, match="chunks of 1 to 512"):
        Engine(model, prefill_backend="mlstm_prefill", prefill_chunk=600)
    with pytest.raises(ValueError, match="token id"):
        engine.submit([Request([engine.config.vocab_size], SamplingParams(max_tokens=1), print)])
    with pytest.raises(ValueError, match="token id"):
        engine.submit([Request([], SamplingParams(max_tokens=1), print)])


def test_warm_up_freezes_what_is_alive_and_stop_returns_it_to_the_collector(model):
    """After warm_up the process's objects are frozen out of the cyclic collector (a full collection while serving
    does not scan them again); after stop they are back (a stopped engine can be collected)."""
    import gc

    engine = Engine(model, **ENGINE)
    engine.warm_up()
    assert gc.get_freeze_count() > 10_000
    engine.start()
    engine.stop()
    assert gc.get_freeze_count() == 0
