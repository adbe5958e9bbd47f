"""Continuous batching over a fixed pool of recurrent state slots (no HTTP here; docs/serving.md).

An xLSTM's state is the same size after any number of tokens, so the engine holds `max_slots` states on the device
(the pool: per block C, n, m with a leading slot axis) and never pages anything. Each iteration of its thread:

1. frees the slots of cancelled requests and admits waiting requests into free slots; while every slot is taken,
   the next waiting request is admitted into a staging slot outside the pool (`PREFILL_AHEAD`), prefills there
   and moves into the first slot that frees, so a slot waits one step for a new stream, not for its prefill;
2. while some slots decode: dispatches one decode step of shape (max_slots, 1) for them (per-slot sampling
   settings as arrays) with the oldest admitted request's next prefill chunk in the same pass (`mixed_step`: the
   chunk's tokens share the step's matmuls, so a running stream waits for one slightly longer step, and the chunk
   costs little more than its compute);
   while none does: prefills chunks alone, up to `prefill_chunk` padded tokens, then the first decode step;
3. reads the tokens of the step dispatched before: the device computes step k + 1 while the host hands out the
   tokens of step k, and a request that finished at step k has its token of step k + 1 dropped.

Prefill: prompt[:-1] in chunks ending at multiples of `prefill_chunk` (left-padded to a bucket: a power of two
or `prefill_chunk`; B = 1), from zeros or from the longest prefix in the prefix cache; a finished prefill is copied
into its slot, and the prompt's last token becomes the slot's first decode input.

A request ends at one of its stop tokens ("stop"), at max_tokens ("length"), when cancelled, or with an error (NaN
logits, a failed prefill); its slot is free before its last event is sent, for the next iteration. Compiled shapes:
the decode step, each prefill bucket alone and with the decode step, and the slot copy, all compiled by `warm_up`;
no request compiles anything after it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gc
import itertools
import logging
import os
import threading
import time
import traceback
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from xlstm_jax.mlstm.api import BACKEND_NAMES
from xlstm_jax.mlstm.prefill import MAX_PREFILL
from xlstm_jax.models.xlstm_large.config import PREFILL_BACKEND
from xlstm_jax.models.xlstm_large.model import xLSTMLarge
from xlstm_jax.serve import steps
from xlstm_jax.serve.mesh import mesh_sizes, place_params, place_states
from xlstm_jax.serve.metrics import Metrics
from xlstm_jax.serve.prefix_cache import PrefixCache
from xlstm_jax.serve.requests import Event, QueueFull, Request, decode_inputs

STATE_DTYPES = ("float32", "bfloat16")
MIN_BUCKET = 16  # the shortest prefill shape (shorter chunks are left-padded to it)
PREFILL_AHEAD = 1  # staging slots: requests prefilled while every pool slot is taken
log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Slot:
    """A pool slot: its request, and while prefilling the request's own state (B = 1) after `position` prompt
    tokens; once decoding, the steps dispatched for it (at 0 its next input is the prompt's last token)."""

    request: Request | None = None
    state: list | None = None
    position: int = 0
    decoding: bool = False
    dispatched: int = 0


def prefill_buckets(prefill_chunk: int) -> tuple[int, ...]:
    """The compiled prefill lengths: the powers of two from MIN_BUCKET below `prefill_chunk`, then `prefill_chunk`
    (any length: 240 chunk tokens beside 16 decode rows fill 256-row matmul tiles)."""
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}.")
    powers = itertools.takewhile(lambda b: b < prefill_chunk, (MIN_BUCKET << k for k in itertools.count()))
    return (*powers, prefill_chunk)


class Engine:
    """The slot pool and its step loop for one model; `start()` runs it in a thread, `submit` / `cancel` are
    thread-safe. Sizes: `max_slots` sequences decode together, `max_queue` more wait; `state_dtype` "bfloat16"
    halves the pool (C and n; m stays float32); `prefix_cache_mb` bounds the prefix snapshots; `prefill_backend`
    runs the prompt chunks' mLSTM cells (None: the model's backend; "mlstm_prefill": the forward-only fused
    kernel, `xlstm_jax.mlstm.prefill`). `mesh`: a mesh with
    axes data and tensor (`xlstm_jax.serve.mesh.serving_mesh`): slots split over data, heads over tensor.

    `step_log`: (kind, seconds) of the last 100,000 iterations, as observed by the `xlstm_serve_step_seconds`
    histogram (for benchmarks; clear it between runs): "decode" or "mixed" (a decode step alone or with a prefill
    chunk), from the delivery of the previous step's tokens to this step's, when the iteration before delivered too;
    "prefill", the wall time of a `_prefill()` that ran chunks alone (dispatch only, where the device runs behind)."""

    def __init__(self, model: xLSTMLarge, *, max_slots: int = 16, max_queue: int = 256,
                 state_dtype: str = "float32", prefill_chunk: int = 256, prefix_cache_mb: float = 1024.0,
                 prefill_backend: str | None = None, metrics: Metrics | None = None, mesh: Mesh | None = None):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {state_dtype!r}.")
        for name, value in (("max_slots", max_slots), ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        prefill_backend = prefill_backend or model.config.backend
        if prefill_backend not in (*BACKEND_NAMES, PREFILL_BACKEND):
            raise ValueError(f"prefill_backend must be one of {[*BACKEND_NAMES, PREFILL_BACKEND]}, got "
                             f"{prefill_backend!r}.")
        if prefill_backend == PREFILL_BACKEND and not 1 <= prefill_chunk <= MAX_PREFILL:
            raise ValueError(f"prefill_backend {PREFILL_BACKEND!r} takes chunks of 1 to {MAX_PREFILL} tokens, got "
                             f"prefill_chunk={prefill_chunk}.")
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {prefix_cache_mb}.")
        if mesh is not None and max_slots % mesh_sizes(mesh).get("data", 1):
            raise ValueError(f"max_slots={max_slots} must be divisible by the mesh's data axis "
                             f"({mesh_sizes(mesh)['data']}).")
        self.config = model.config
        self.max_slots, self.max_queue, self.state_dtype = max_slots, max_queue, state_dtype
        self.prefill_chunk, self.buckets = prefill_chunk, prefill_buckets(prefill_chunk)
        self.cache = PrefixCache(int(prefix_cache_mb * 2**20))
        self.metrics = metrics or Metrics(max_slots)
        self.mesh = mesh
        graphdef, params = nnx.split(model)
        if mesh is not None:
            params = place_params(params, mesh)
        self._params_tree, self._params = steps.flat_params(params)
        static = dict(graphdef=graphdef, params_tree=self._params_tree, state_dtype=state_dtype)  # bound once
        self._decode_step = steps.compiled(steps.decode_step, backend=self.config.step_backend, **static)
        self._prefill_chunk = steps.compiled(steps.prefill_chunk, backend=prefill_backend,
                                             chunk_size=self.config.chunk_size, **static)
        self._mixed_step = steps.compiled(steps.mixed_step, step_backend=self.config.step_backend,
                                          backend=prefill_backend, chunk_size=self.config.chunk_size, **static)
        self._pool = self._empty(max_slots)
        self._zero = self._empty(1)
        self._previous = jnp.zeros((max_slots,), jnp.int32)
        self._slots = [_Slot() for _ in range(max_slots + PREFILL_AHEAD)]  # the pool's, then the staging ones
        self._prefilling: collections.deque[int] = collections.deque()  # slot indices in admission order
        self._waiting: collections.deque[Request] = collections.deque()
        self._pending: tuple | None = None  # (tokens, bad, requests, kind) of the step dispatched last, not yet read
        self._delivered_at: float | None = None  # when the iteration before delivered a step's tokens, else None
        self.step_log: collections.deque[tuple[str, float]] = collections.deque(maxlen=100_000)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _empty(self, rows: int) -> list:
        """Zero states for `rows` rows, placed on the mesh (rows split over data when they are the pool's)."""
        states = steps.empty_states(self.config, rows, self.state_dtype)
        return states if self.mesh is None else place_states(states, self.mesh, split_rows=rows > 1)

    # --- the caller's side (any thread) ---

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests, all or none: QueueFull when the waiting queue cannot take them all, ValueError for a
        prompt the model cannot take, RuntimeError when the engine is not running."""
        vocab = self.config.vocab_size
        for request in requests:
            if not request.prompt or min(request.prompt) < 0 or max(request.prompt) >= vocab:
                raise ValueError(f"a prompt must hold at least one token id in [0, {vocab}).")
        with self._cond:
            if self._stopping or self._thread is None:
                raise RuntimeError("the engine is not running.")
            if len(self._waiting) + len(requests) > self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"the queue is full ({len(self._waiting)} of {self.max_queue} waiting); retry "
                                "later.")
            now = time.monotonic()
            for request in requests:
                request.arrived = now
            self._waiting.extend(requests)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request: no further events; its slot is freed at the engine's next iteration."""
        with self._cond:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                request.finished = True
                self.metrics.finished.labels(finish_reason="cancelled").inc()
                self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()

    def stats(self) -> dict:
        """Requests admitted (decoding, prefilling, or prefilled in a staging slot), requests waiting, prefix
        snapshots held."""
        with self._cond:
            return {"active": sum(s.request is not None for s in self._slots), "waiting": len(self._waiting),
                    "slots": self.max_slots, "prefix_entries": len(self.cache), "prefix_bytes": self.cache.bytes}

    def warm_up(self, threads: int | None = None) -> None:
        """Compile every shape the engine runs: the decode step, each prefill bucket alone and with the decode
        step, the slot copy. The shapes are run once each on scratch states placed like the pool's, from
        `threads` threads (None: the CPU count, at most 8): tracing takes turns, XLA's compilations run side by
        side. Then the objects alive (the process's modules, the model, the compiled steps) are frozen out of
        Python's cyclic collector (`gc.freeze`): a full collection while serving scans only what serving
        allocated, not the ~260k objects a JAX process holds (about 0.2 s a full collection on a CI CPU)."""
        idle = self._idle_inputs()

        def decode():
            self._decode_step(self._params, self._empty(self.max_slots), self._previous, *idle)

        def bucket(length: int):
            chunk = (np.zeros((1, length), np.int32), np.zeros((1, length), bool))  # as requests bring them
            self._chunk(self._zero, *chunk)
            self._mixed_step(self._params, self._empty(self.max_slots), self._previous, *idle, self._zero,
                             *map(jnp.asarray, chunk))

        threads = min(8, os.cpu_count() or 1) if threads is None else max(1, threads)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            jobs = [pool.submit(decode)] + [pool.submit(bucket, length) for length in self.buckets]
            for job in jobs:
                job.result()
        self._pool = steps.insert(self._pool, 0, self._zero)
        jax.block_until_ready(self._pool)
        gc.collect()
        gc.freeze()

    def _idle_inputs(self) -> tuple:
        """Decode-step inputs with every slot inactive (they keep their states exactly)."""
        M = self.max_slots
        ints, floats, flags = np.zeros((M,), np.int32), np.zeros((M,), np.float32), np.zeros((M,), bool)
        return ints, flags, flags, np.zeros((M, 2), np.uint32), ints, ints, floats, ints + 1, floats + 1

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine was started already.")
        self._thread = threading.Thread(target=self._run, name="xlstm-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """Stop taking requests; with `drain`, finish those admitted or waiting first, else cancel them. The objects
        `warm_up` froze go back to the cyclic collector (`gc.unfreeze`), so a stopped engine can be collected."""
        with self._cond:
            self._stopping = True
            if not drain:
                for request in [*self._waiting, *(s.request for s in self._slots if s.request is not None)]:
                    request.cancelled = True
                self._waiting.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        gc.unfreeze()

    # --- the engine's thread ---

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._busy()):
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._busy():
                    return
            try:
                self._release_cancelled()
                self._admit()
                self._iterate()
            except Exception as err:  # a failed step: its requests end with the error, the engine goes on
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all(f"the engine step failed: {type(err).__name__}: {err}")
            self.metrics.active_slots.set(sum(s.request is not None for s in self._slots[:self.max_slots]))

    def _busy(self) -> bool:
        return self._pending is not None or any(s.request is not None for s in self._slots)

    def _release_cancelled(self) -> None:
        for index, slot in enumerate(self._slots):
            if slot.request is not None and slot.request.cancelled and not slot.request.finished:
                self._free(index, "cancelled")

    def _admit(self) -> None:
        """Fill free slots: first from the staging slots (admitted earlier), then from the queue; then, while
        requests wait, the free staging slots."""
        free = [i for i, s in enumerate(self._slots[:self.max_slots]) if s.request is None]
        for stage in range(self.max_slots, len(self._slots)):
            if free and self._slots[stage].request is not None:
                self._move(stage, free.pop(0))
        with self._cond:
            for index in free + [i for i in range(self.max_slots, len(self._slots)) if self._slots[i].request is None]:
                if not self._waiting:
                    break
                self._slots[index] = _Slot(request=self._waiting.popleft())
                self._prefilling.append(index)
            self.metrics.queue_depth.set(len(self._waiting))

    def _move(self, stage: int, index: int) -> None:
        """The request of staging slot `stage` into the free pool slot `index`: its prefill goes on there, or its
        finished prefill goes into the pool."""
        self._slots[index], self._slots[stage] = self._slots[stage], _Slot()
        if stage in self._prefilling:
            self._prefilling[self._prefilling.index(stage)] = index
        else:
            self._decode_next(index)

    def _iterate(self) -> None:
        """One pass: while slots decode, one decode step for them with the next prefill chunk riding along
        (`mixed_step`); while none does, prefill chunks alone (up to `prefill_chunk` tokens) and then the first
        decode step of those ready. Then the tokens of the step dispatched before are handed out."""
        pending, self._pending = self._pending, None
        if pending is None:
            self._delivered_at = None  # no step delivered last iteration: the next interval would span an idle gap
        running = self._running()
        if running and self._prefilling:
            self._step_with_chunk(running)
        else:
            began = time.monotonic()
            if self._prefill():
                self._record("prefill", time.monotonic() - began)
            running = self._running()
            if running:
                self._pending = self._dispatch(self._decode_inputs(running))
        if pending is not None:
            self._deliver(*pending)

    def _running(self) -> list[int]:
        return [i for i, s in enumerate(self._slots)
                if s.decoding and not s.request.done and s.dispatched < s.request.params.max_tokens]

    def _prefill(self) -> int:
        """Prefill chunks of admitted requests, oldest first, up to `prefill_chunk` padded tokens in all; a request
        whose prefill fails ends with the error, alone. Returns the padded tokens run."""
        spent = 0
        while self._prefilling:
            index = self._prefilling[0]
            slot = self._slots[index]
            try:
                self._begin(slot)
                while (piece := self._next_chunk(slot)) is not None:
                    tokens, mask, stop = piece
                    if spent and spent + tokens.shape[1] > self.prefill_chunk:
                        return spent
                    self._advance(slot, stop, self._chunk(slot.state, tokens, mask))
                    spent += tokens.shape[1]
                self._decode_next(index)
            except Exception as err:
                self._prefill_failed(index, err)
        return spent

    def _step_with_chunk(self, running: list[int]) -> None:
        """The decode step for `running` with the oldest admitted request's next prefill chunk in the same pass;
        should that pass fail, the step and the chunk run apart (a failing chunk ends only its request)."""
        index = self._prefilling[0]
        slot = self._slots[index]
        inputs = self._decode_inputs(running)
        try:
            self._begin(slot)
            piece = self._next_chunk(slot)
        except Exception as err:
            self._prefill_failed(index, err)
            self._pending = self._dispatch(inputs)
            return
        if piece is None:  # prompt[:-1] came whole from the prefix cache
            self._pending = self._dispatch(inputs)
            self._decode_next(index)
            return
        tokens, mask, stop = piece
        try:
            pending, state = self._mixed(inputs, slot.state, tokens, mask)
        except Exception:
            log.warning("the combined decode and prefill pass failed; running them apart:\n%s",
                        traceback.format_exc())
            self._pending = self._dispatch(inputs)
            try:
                state = self._chunk(slot.state, tokens, mask)
            except Exception as err:
                self._prefill_failed(index, err)
                return
        else:
            self._pending = pending
        self._advance(slot, stop, state)
        if self._next_chunk(slot) is None:
            self._decode_next(index)

    def _begin(self, slot: _Slot) -> None:
        """Before a request's first chunk: start after the longest stored prefix of prompt[:-1]."""
        if slot.state is None:
            prompt = slot.request.prompt
            slot.position, slot.state = self.cache.longest(prompt[:-1])
            slot.state = slot.state or self._zero
            self.metrics.prompt_tokens.inc(len(prompt))
            self.metrics.prefix_hit_tokens.inc(slot.position)

    def _next_chunk(self, slot: _Slot) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(tokens (1, bucket), mask (1, bucket), end position) of the slot's next chunk, left-padded to its bucket
        and ending at a multiple of `prefill_chunk` (so stored prefixes line up) or at prompt[:-1]'s end; None
        when prompt[:-1] is in."""
        prompt, end = slot.request.prompt, len(slot.request.prompt) - 1
        if slot.position >= end:
            return None
        stop = min(end, (slot.position // self.prefill_chunk + 1) * self.prefill_chunk)
        length = stop - slot.position
        bucket = next(b for b in self.buckets if b >= length)
        tokens, mask = np.zeros((1, bucket), np.int32), np.zeros((1, bucket), bool)
        tokens[0, bucket - length:], mask[0, bucket - length:] = prompt[slot.position:stop], True
        return tokens, mask, stop

    def _advance(self, slot: _Slot, stop: int, state: list) -> None:
        slot.state, slot.position = state, stop
        self.cache.put(slot.request.prompt[:stop], state)

    def _decode_next(self, index: int) -> None:
        """Slot `index` is prefilled: its state goes into the pool and it decodes from the next step on (a
        staging slot keeps it until `_admit` moves it to a free pool slot)."""
        if index in self._prefilling:
            self._prefilling.remove(index)
        if index >= self.max_slots:
            return
        slot = self._slots[index]
        self._pool = steps.insert(self._pool, index, slot.state)
        slot.state, slot.decoding = None, True

    def _prefill_failed(self, index: int, err: Exception) -> None:
        request = self._slots[index].request
        log.error("prefill failed:\n%s", traceback.format_exc())
        self._free(index, "error")
        self._emit(request, Event((), "error", f"the prefill failed: {type(err).__name__}: {err}"))

    def _chunk(self, state: list, tokens: np.ndarray, mask: np.ndarray) -> list:
        return self._prefill_chunk(self._params, state, jnp.asarray(tokens), jnp.asarray(mask))

    def _decode_inputs(self, running: list[int]) -> tuple:
        """`decode_inputs` for the slots `running`, each counted as dispatched."""
        rows = [(i, self._slots[i].request, self._slots[i].dispatched) for i in running]
        for i in running:
            self._slots[i].dispatched += 1
        return decode_inputs(rows, self.max_slots, self.config.vocab_size)

    def _mixed(self, inputs: tuple, state: list, tokens: np.ndarray, mask: np.ndarray) -> tuple[tuple, list]:
        """Dispatch the decode step with a prefill chunk from `state` in one pass: ((tokens, bad, requests, "mixed")
        to deliver once it is done, the chunk's last state)."""
        new, self._pool, bad, state = self._mixed_step(self._params, self._pool, self._previous, *inputs[:-1], state,
                                                       jnp.asarray(tokens), jnp.asarray(mask))
        self._previous = new
        return (new, bad, inputs[-1], "mixed"), state

    def _dispatch(self, inputs: tuple) -> tuple:
        """Dispatch the decode step; (tokens, bad, requests, "decode") to deliver once it is done."""
        tokens, self._pool, bad = self._decode_step(self._params, self._pool, self._previous, *inputs[:-1])
        self._previous = tokens
        return tokens, bad, inputs[-1], "decode"

    def _deliver(self, tokens: jax.Array, bad: jax.Array, requests: list[Request | None], kind: str) -> None:
        tokens, bad = np.asarray(tokens), np.asarray(bad)  # waits for that step
        now, count = time.monotonic(), 0
        if self._delivered_at is not None:
            self._record(kind, now - self._delivered_at)
        self._delivered_at = now
        for index, request in enumerate(requests):
            if request is None or request.done:
                continue
            if bad[index]:
                self._free(index, "error")
                self._emit(request, Event((), "error", f"the model's logits hold NaN or inf at generated token "
                                                       f"{request.generated}."))
                continue
            token = int(tokens[index])
            request.generated += 1
            count += 1
            if request.last_token_at is None:
                self.metrics.time_to_first_token.observe(now - request.arrived)
            else:
                self.metrics.inter_token_latency.observe(now - request.last_token_at)
            request.last_token_at = now
            finish = ("stop" if token in request.params.stop_token_ids
                      else "length" if request.generated >= request.params.max_tokens else None)
            if finish is not None:
                self._free(index, finish)
            self._emit(request, Event((token,), finish))
        self.metrics.generated(count)

    def _record(self, kind: str, seconds: float) -> None:
        self.step_log.append((kind, seconds))
        self.metrics.step_seconds[kind].observe(seconds)

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # the receiver is gone: the request is cancelled, the others go on
            log.warning("a request's event handler failed; cancelling it:\n%s", traceback.format_exc())
            request.cancelled = True

    def _free(self, index: int, reason: str) -> None:
        """End the request of slot `index` (counted under `reason`) and free the slot."""
        request = self._slots[index].request
        request.finished = True
        self.metrics.finished.labels(finish_reason=reason).inc()
        self._slots[index] = _Slot()
        if index in self._prefilling:
            self._prefilling.remove(index)

    def _fail_all(self, message: str) -> None:
        """After a failed device call: end every admitted request with `message` and start from an empty pool."""
        for index, slot in enumerate(self._slots):
            request = slot.request
            if request is not None:
                done = request.done
                self._free(index, "error")
                if not done:
                    self._emit(request, Event((), "error", message))
        self._pending = None
        self._pool = self._empty(self.max_slots)
        self._previous = jnp.zeros((self.max_slots,), jnp.int32)
