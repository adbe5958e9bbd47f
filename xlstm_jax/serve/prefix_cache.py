"""Prefix reuse: the recurrent state after a token prefix is a constant-size snapshot (one (C, n, m) per block),
so a prompt that starts with a prefix seen before (a system prompt, an earlier turn) can start from it instead of
from zeros. The snapshots live in an LRU bounded in bytes; they are device arrays, never donated or changed. Used by the engine's thread only."""

from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

from xlstm_jax.serve.steps import states_bytes


def _key(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, np.int32).tobytes()


class PrefixCache:
    """token prefix -> state after it, least recently used first out once the snapshots exceed `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[bytes, tuple[Any, int]] = collections.OrderedDict()
        self._lengths: collections.Counter[int] = collections.Counter()  # prefix length -> entries of that length

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: Sequence[int], state: Any) -> None:
        """Store the state after `tokens` (a snapshot larger than the whole budget is not stored)."""
        size = states_bytes(state)
        key = _key(tokens)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = (state, size)
        self._lengths[len(tokens)] += 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            old, (_, old_size) = self._entries.popitem(last=False)
            self.bytes -= old_size
            length = len(old) // 4
            self._lengths[length] -= 1
            if not self._lengths[length]:
                del self._lengths[length]

    def longest(self, tokens: Sequence[int]) -> tuple[int, Any]:
        """(L, state after tokens[:L]) for the longest stored prefix of `tokens`, or (0, None)."""
        for length in sorted((n for n in self._lengths if n <= len(tokens)), reverse=True):
            key = _key(tokens[:length])
            if key in self._entries:
                self._entries.move_to_end(key)
                return length, self._entries[key][0]
        return 0, None
