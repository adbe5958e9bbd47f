"""Batched generation: one chunkwise prefill that returns the mLSTM states, then single-token recurrent steps
carrying them, inside one jitted `lax.while_loop` (no per-token recompilation).

Prompts of different lengths are left-padded; padded steps get neutral gates, so they leave the states exactly
unchanged and every row continues from its own last prompt token. Sampling: greedy (temperature 0), temperature,
top-k, top-p; a row stops after emitting one of `stop_tokens` and is filled with the pad token afterwards (0 for a
model without one). `on_token` receives each step's tokens as the loop produces them (streaming).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from xlstm_jax.models.xlstm_large.model import xLSTMLarge
from xlstm_jax.models.xlstm_large.quantize import quantize

F32 = jnp.float32
STATE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """tokens (B, max_new_tokens) int32, pad-filled after a stop token; lengths (B,) int32 counts the generated
    tokens up to and including the stop token; logits (B, max_new_tokens, V) float32 (the distribution each token
    was drawn from, before temperature / top-k / top-p) when requested, else None."""

    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray | None


def filter_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """Temperature-scaled logits (B, V) with everything outside the top-k / top-p set at -inf. The largest logit is
    subtracted before the division (the softmax is the same), so a temperature in float32's denormal range keeps
    the most likely tokens at 0 and sends the rest to -inf, the greedy limit, instead of overflowing to inf - inf."""
    logits = logits.astype(F32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
    """One token per row of logits (B, V): argmax when temperature == 0, else a draw from the filtered softmax."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def _first_bad(bad_at: jax.Array, logits: jax.Array, step: jax.Array, active: jax.Array) -> jax.Array:
    """bad_at (B,) int32 (-1: none yet) updated with `step` for the active rows whose logits (B, V) hold a NaN or
    +inf."""
    bad = active & jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)
    return jnp.where((bad_at < 0) & bad, step, bad_at)


def _carried(states: list, dtype: str) -> list:
    """The states the decode loop carries: (C, n, m) per block with C and n in `dtype`, m float32."""
    return [(c.astype(dtype), n.astype(dtype), m) for c, n, m in states]


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "stop_tokens", "pad_token",
                     "prefill_backend", "step_backend", "chunk_size", "return_logits", "state_dtype", "on_token"),
)
def _generate(params, prompt, mask, key, *, graphdef, max_new_tokens, temperature, top_k, top_p, stop_tokens,
              pad_token, prefill_backend, step_backend, chunk_size, return_logits, state_dtype, on_token):
    model = nnx.merge(graphdef, params)
    B = prompt.shape[0]
    V = model.config.vocab_size
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    logits, states = model(prompt, token_mask=mask, return_states=True, backend=prefill_backend,
                           chunk_size=chunk_size, last_logits_only=True)
    states = _carried(states, state_dtype)
    key, sub = jax.random.split(key)
    first_logits = logits[:, -1]
    token = sample_tokens(first_logits, sub, temperature, top_k, top_p)
    if on_token is not None:
        io_callback(on_token, None, token, ordered=True)
    tokens = jnp.full((B, max_new_tokens), pad_token, jnp.int32).at[:, 0].set(token)
    all_logits = jnp.zeros((B, max_new_tokens if return_logits else 0, V), F32)
    if return_logits:
        all_logits = all_logits.at[:, 0].set(first_logits)
    done = jnp.isin(token, stops)
    lengths = jnp.ones((B,), jnp.int32)
    bad_at = _first_bad(jnp.full((B,), -1, jnp.int32), first_logits, jnp.asarray(0, jnp.int32), jnp.ones((B,), bool))

    def cond(carry):
        step, _, _, done, _, _, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, states, done, tokens, all_logits, lengths, key, bad_at = carry
        logits, states = model(token[:, None], states=states, return_states=True, backend=step_backend)
        states = _carried(states, state_dtype)
        key, sub = jax.random.split(key)
        step_logits = logits[:, 0]
        bad_at = _first_bad(bad_at, step_logits, step, ~done)
        new = jnp.where(done, pad_token, sample_tokens(step_logits, sub, temperature, top_k, top_p))
        if on_token is not None:
            io_callback(on_token, None, new, ordered=True)
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, step))
        if return_logits:
            all_logits = jax.lax.dynamic_update_slice(all_logits, step_logits[:, None], (0, step, 0))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(new, stops)
        return step + 1, new, states, done, tokens, all_logits, lengths, key, bad_at

    carry = (jnp.asarray(1, jnp.int32), token, states, done, tokens, all_logits, lengths, key, bad_at)
    _, _, _, _, tokens, all_logits, lengths, _, bad_at = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths, all_logits, bad_at


def _token_ids(values: Any, what: str) -> np.ndarray:
    """`values` as an int64 array of token ids; ValueError unless every element is an integer (numpy integers
    included; floats, bools and ints beyond int64 are refused, never truncated)."""
    array = np.asarray(values)
    flags = isinstance(values, (list, tuple)) and any(isinstance(t, (bool, np.bool_)) for t in values)
    if array.size and (flags or array.dtype == bool or not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what} must hold integer token ids, got {array.dtype} values "
                         f"{array.ravel()[:4].tolist()}.")
    return array.astype(np.int64)


def left_pad(prompts: Sequence[Sequence[int]], pad_token: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists of any lengths -> (tokens (B, P) int64 left-padded with `pad_token`, mask (B, P) bool)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token sequences.")
    rows = [_token_ids(prompt, f"prompt {row}") for row, prompt in enumerate(prompts)]
    if any(r.ndim != 1 for r in rows):
        raise ValueError("prompts must be a list of flat token sequences.")
    P = max(len(r) for r in rows)
    tokens = np.full((len(rows), P), pad_token, np.int64)
    mask = np.zeros((len(rows), P), bool)
    for row, prompt in enumerate(rows):
        tokens[row, P - len(prompt):] = prompt
        mask[row, P - len(prompt):] = True
    return tokens, mask


def _integer(value: Any, name: str, *, minimum: int = 1, maximum: int = 2**31 - 1, optional: bool = False
             ) -> int | None:
    """`value` as an int in [minimum, maximum] (numpy integers too, `operator.index`; bools refused), or None if
    `optional`; ValueError naming `name` otherwise."""
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int{' or None' if optional else ''}, got {value!r}.") from None
    if not minimum <= number <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {number}.")
    return number


def _check_fits(nbytes: int, what: str) -> None:
    """ValueError when a buffer of `nbytes` cannot fit the first device's memory (or the host's, on a CPU)."""
    device = jax.devices()[0]
    limit = None
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # memory_stats is not implemented on every platform
        limit = None
    if limit is None:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > limit:
        raise ValueError(f"{what} needs {nbytes / 2**30:,.1f} GiB, more than the {limit / 2**30:,.1f} GiB of "
                         f"{device.platform} memory; ask for fewer tokens.")


@functools.cache
def _split_shares_variables() -> bool:
    """Whether this flax's `nnx.split` hands out the module's own Variables (so values updated in place show in
    a state split earlier) rather than copies."""
    layer = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    _, state = nnx.split(layer)
    return state["kernel"] is layer.kernel


class Generator:
    """Generation with one model, for any number of calls (serving): the model is split into its graph and
    parameters once, not at every call (milliseconds of host time per call at 7B; docs/benchmarks.md, "Time to the first
    token").
    Each call reads the parameters from the model's own Variables, so updates made in place (an optimizer step,
    `nnx.update`, loaded weights) are seen; a model whose structure changes afterwards (new submodules or
    Variables) needs a new Generator. `generate(model, prompts, ...)` is one call of a new Generator.
    weights "int8" / "fp8": decode with a weight-only quantized copy of the model (`quantize.quantize`: 8-bit
    projections and LM head, one scale per output channel; docs/precision.md has the error), made once here, so
    later in-place updates of `model` are not seen; None: the model as it is (quantized or not)."""

    def __init__(self, model: xLSTMLarge, weights: str | None = None):
        self.model = model if weights is None else quantize(model, weights)
        self._split = nnx.split(self.model) if _split_shares_variables() else None

    def __call__(
        self,
        prompts: Any,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Sequence[int] = (),
        seed: int = 0,
        prefill_backend: str | None = None,
        step_backend: str | None = None,
        chunk_size: int | None = None,
        return_logits: bool = False,
        state_dtype: str = "float32",
        on_token: Callable[[np.ndarray], None] | None = None,
    ) -> GenerationOutput:
        """Generate up to `max_new_tokens` tokens after each prompt.

        prompts: int array (B, P) (all rows full length) or a list of token lists of any lengths (left-padded).
        prefill_backend: the chunkwise backend of the prompt pass (None: the config's `backend`); step_backend: the
        backend of the one-token steps (None: the config's `step_backend`, "mlstm_step": the fused Triton step on a
        GPU). state_dtype "bfloat16" carries C and n in bfloat16 from step to step (m stays float32): half the
        memory a step streams for its states, for memory-bound serving at large batches, at bfloat16's precision
        (each step still computes in float32). on_token: called from the decode loop with each step's tokens (B,)
        int32 as they are generated (pad for rows that have stopped); the compilation is keyed on it, so keep one
        function for repeated calls. Returns a `GenerationOutput`.
        """
        config = self.model.config
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {state_dtype!r}.")
        max_new_tokens = _integer(max_new_tokens, "max_new_tokens")
        top_k = _integer(top_k, "top_k", optional=True)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
                or not 0.0 <= float(temperature) < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
        if float(temperature) < np.finfo(np.float32).tiny:  # float32 flushes it to 0: the greedy limit
            temperature = 0.0
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                                  or not 0.0 < float(top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}.")
        stops = _token_ids(list(stop_tokens), "stop_tokens").ravel()
        if stops.size and (stops.min() < 0 or stops.max() >= config.vocab_size):
            raise ValueError(f"stop_tokens must be token ids in [0, {config.vocab_size}), got {stops.tolist()}.")
        seed = _integer(seed, "seed", minimum=-(2**63), maximum=2**64 - 1)
        pad_token = 0 if config.pad_token_id is None else int(config.pad_token_id)
        if isinstance(prompts, (list, tuple)):
            tokens, mask = left_pad(prompts, pad_token)
        else:
            tokens = np.asarray(prompts)
            if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.dtype == bool:
                raise ValueError(f"prompts must be an int array (B, P) or a list of token lists, got "
                                 f"{tokens.dtype} array of shape {tokens.shape}.")
            mask = np.ones(tokens.shape, bool)
        if tokens.min() < 0 or tokens.max() >= config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {config.vocab_size}), got range "
                             f"[{tokens.min()}, {tokens.max()}].")
        B = tokens.shape[0]
        _check_fits(B * max_new_tokens * 4, f"the generated tokens ({B} x {max_new_tokens} int32)")
        if return_logits:
            _check_fits(B * max_new_tokens * config.vocab_size * 4,
                        f"return_logits ({B} x {max_new_tokens} x {config.vocab_size} float32)")
        graphdef, params = self._split or nnx.split(self.model)
        out_tokens, lengths, logits, bad_at = _generate(
            params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), jax.random.key(seed),
            graphdef=graphdef, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
            top_p=None if top_p is None else float(top_p), stop_tokens=tuple(int(t) for t in stops),
            pad_token=pad_token, prefill_backend=prefill_backend or config.backend,
            step_backend=step_backend or config.step_backend, chunk_size=chunk_size, return_logits=return_logits,
            state_dtype=state_dtype, on_token=on_token,
        )
        bad_at = np.asarray(bad_at)
        if np.any(bad_at >= 0):
            row = int(np.argmax(bad_at >= 0))
            raise FloatingPointError(f"the model's logits hold NaN or inf at generated token {int(bad_at[row])} of "
                                     f"prompt {row} ({int(np.sum(bad_at >= 0))} of {B} prompts affected): its "
                                     "weights or inputs are not finite, or it overflowed in its compute dtype.")
        return GenerationOutput(np.asarray(out_tokens), np.asarray(lengths),
                                np.asarray(logits) if return_logits else None)


def generate(model: xLSTMLarge, prompts: Any, *, weights: str | None = None, **options: Any) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens after each prompt: `Generator(model, weights)(prompts, **options)`
    (its keywords: max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, prefill_backend, step_backend,
    chunk_size, return_logits, state_dtype, on_token). For many calls on one model, keep a `Generator`."""
    return Generator(model, weights)(prompts, **options)
