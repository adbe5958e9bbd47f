"""What a request to the serving engine is: its sampling settings, the events it receives, the request object the
engine's thread and the HTTP side share (`xlstm_jax.serve.engine`), and the decode step's per-slot arrays built from
the requests of a step (`decode_inputs`)."""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Callable, Sequence

import numpy as np


class QueueFull(Exception):
    """The waiting queue cannot take the request (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated. temperature 0: greedy; top_k None: all tokens; seed None: a random one;
    choice: which of a request's n sequences this is (folded into the sampling key, so the n differ)."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    choice: int = 0
    stop_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request receives from the engine's thread: its next token, and with the last one the finish reason
    ("stop", "length", "error"; `error` then says why, with no token)."""

    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None


class Request:
    """One sequence to generate after `prompt` (token ids). `on_event(Event)` is called from the engine's thread for
    every token and must not block (hand the event over, e.g. with `loop.call_soon_threadsafe`). A cancelled request
    gets no further events."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None]):
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.on_event = on_event
        seed = secrets.randbits(64) if params.seed is None else params.seed % 2**64
        self.key_data = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
        self.arrived = time.monotonic()
        self.last_token_at: float | None = None
        self.generated = 0
        self.finished = False
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled


def decode_inputs(rows: Sequence[tuple[int, Request, int]], slots: int, vocab: int) -> tuple:
    """The decode step's per-slot arrays for `slots` slots from `rows` (slot, request, steps dispatched for it before;
    at 0 its input is the prompt's last token), and the requests by slot (None where inactive): fresh tokens, fresh,
    active, key data, choice, position, temperature, top_k, top_p, requests."""
    fresh_tokens, choice, position, top_k = (np.zeros((slots,), np.int32) for _ in range(4))
    fresh, active = np.zeros((slots,), bool), np.zeros((slots,), bool)
    key_data = np.zeros((slots, 2), np.uint32)
    temperature, top_p = np.zeros((slots,), np.float32), np.ones((slots,), np.float32)
    top_k += vocab
    requests: list[Request | None] = [None] * slots
    for i, request, dispatched in rows:
        params = request.params
        active[i], fresh[i], fresh_tokens[i] = True, dispatched == 0, request.prompt[-1]
        key_data[i], choice[i], position[i] = request.key_data, params.choice, dispatched
        temperature[i], top_p[i] = params.temperature, params.top_p
        top_k[i] = min(params.top_k or vocab, vocab)
        requests[i] = request
    return fresh_tokens, fresh, active, key_data, choice, position, temperature, top_k, top_p, requests
