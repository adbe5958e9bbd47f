"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own (one per engine)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RATE_WINDOW_S = 10.0  # tokens/s is measured over this many seconds
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP_BUCKETS = tuple(sorted({*_LATENCY_BUCKETS, 0.0075, 0.0125, 0.015, 0.02, 0.035}))
STEP_KINDS = ("decode", "mixed", "prefill")  # a decode step alone, one with a prefill chunk, prefill chunks alone


class Metrics:
    """Queue depth, slots in use, tokens (generated, prompt, read from the prefix cache), finished and refused
    requests, generated tokens/s over the last RATE_WINDOW_S seconds, time to first token and inter-token latency
    histograms, and the engine's iterations by kind (`step_seconds`, children by STEP_KINDS; see `Engine.step_log`).
    Updated from the engine's thread, read by the scrape."""

    def __init__(self, max_slots: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("xlstm_serve_queue_depth", "requests waiting for a slot", registry=r)
        self.active_slots = Gauge("xlstm_serve_active_slots", "slots holding a request (prefill or decode)",
                                  registry=r)
        Gauge("xlstm_serve_slots", "slots in the state pool", registry=r).set(max_slots)
        self.generated_tokens = Counter("xlstm_serve_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("xlstm_serve_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.prefix_hit_tokens = Counter("xlstm_serve_prefix_cache_hit_tokens",
                                         "prompt tokens whose state came from the prefix cache", registry=r)
        self.finished = Counter("xlstm_serve_requests", "finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("xlstm_serve_rejected_requests", "requests refused with 429 (queue full)",
                                registry=r)
        Gauge("xlstm_serve_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(self.tokens_per_second)
        self.time_to_first_token = Histogram("xlstm_serve_time_to_first_token_seconds",
                                             "from the request's arrival to its first generated token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("xlstm_serve_inter_token_latency_seconds",
                                             "between consecutive generated tokens of a request",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        steps = Histogram("xlstm_serve_step_seconds", "engine iterations by kind: decode or mixed, from the previous "
                          "step's tokens to this step's; prefill, prefill chunks run alone", ["kind"],
                          buckets=_STEP_BUCKETS, registry=r)
        self.step_seconds = {kind: steps.labels(kind=kind) for kind in STEP_KINDS}
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def generated(self, count: int) -> None:
        """`count` tokens came out of a decode step now."""
        self.generated_tokens.inc(count)
        with self._lock:
            self._recent.append((time.monotonic(), count))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(count for _, count in self._recent) / RATE_WINDOW_S

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
