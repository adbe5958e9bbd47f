"""Batches of a packed corpus (`xlstm_jax.train.data.Corpus`): the training batches of each step and fixed
evaluation batches of a range of rows.

Training batches come from a grain `MapDataset` whose element t is the batch of step t (the training rows shuffled
anew each epoch, batched globally, then sliced per process), so it does not depend on the process count and a run
resumed at step t sees the batches of an uninterrupted run. A batch is a dict of numpy arrays, each (B, seq_len),
as `Corpus.row` gives them. Importing this module imports neither jax nor grain.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

__all__ = ["BatchIterator", "EvalBatches", "TrainBatches", "eval_batches", "row_batches", "train_batches"]

Batch = dict[str, np.ndarray]


def _local_rows(batch_size: int, process_index: int | None, process_count: int | None) -> slice:
    """This process's slice of a global batch; process_index / process_count default to jax's."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"the batch size {batch_size} must be a positive multiple of the process count "
                         f"{process_count} (it is not divisible by it)")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def _stack(rows: list[Batch]) -> Batch:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class BatchIterator:
    """Training batches from a step on, read ahead by grain threads. `step` is the step of the next batch;
    `get_state()` returns {"step": step} (JSON-serialisable) and `set_state(state)` continues from that step."""

    def __init__(self, dataset: Any, start_step: int, *, num_threads: int, prefetch: int):
        import grain

        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._batches = iter(dataset.to_iter_dataset(options))
        self.set_state({"step": start_step})

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        batch = next(self._batches)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._batches.set_state({"next_index": step})  # grain's position in the MapDataset; drops read-ahead
        self.step = step

    def close(self) -> None:
        """Stop the read-ahead threads."""
        self._batches.close()


class TrainBatches:
    """This process's training batches: `batches[t]` is the batch of step t, a dict of (LB, seq_len) arrays (LB =
    batch_size // process_count). `dataset` is the grain MapDataset behind it."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __getitem__(self, step: int) -> Batch:
        return self.dataset[step]

    def iterator(self, start_step: int = 0, *, num_threads: int = 2, prefetch: int = 4) -> BatchIterator:
        """Batches of steps start_step, start_step + 1, ..., up to `prefetch` read ahead by `num_threads` threads."""
        return BatchIterator(self.dataset, start_step, num_threads=num_threads, prefetch=prefetch)


def train_batches(corpus: Any, batch_size: int, *, seed: int, process_index: int | None = None,
                  process_count: int | None = None) -> TrainBatches:
    """Training batches of global size `batch_size`: the training rows in a new seeded order each epoch (seed taken
    modulo 2**32), cut into global batches; this process reads only its slice of each."""
    import grain

    local = _local_rows(batch_size, process_index, process_count)

    def read(rows: np.ndarray) -> Batch:
        return _stack([corpus.row(int(row)) for row in rows[local]])

    order = grain.MapDataset.range(corpus.num_train_rows).shuffle(seed=seed % 2**32).repeat()
    return TrainBatches(order.batch(batch_size).map(read))


class EvalBatches(NamedTuple):
    """Evaluation batches of this process (dicts of (LB, seq_len) arrays) and num_tokens, the number of real
    targets (mask 1) in them summed over all processes: the denominator of the loss."""

    batches: list[Batch]
    num_tokens: int


def row_batches(corpus: Any, first: int, count: int, batch_size: int, max_batches: int | None = None, *,
                process_index: int | None = None, process_count: int | None = None) -> EvalBatches:
    """Fixed batches of global size `batch_size` over rows first .. first + count - 1 of `corpus`, in order (up to
    `max_batches` of them; None: all): rows first + b * batch_size .. first + (b + 1) * batch_size - 1 make batch
    b. A last batch short of rows is filled with padding rows (zeros, mask 0), so there is at least one batch."""
    local = _local_rows(batch_size, process_index, process_count)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    if count < 1 or not 0 <= first <= corpus.num_rows - count:
        raise ValueError(f"rows {first}..{first + count - 1} are not rows of the corpus (0..{corpus.num_rows - 1})")
    num_batches = math.ceil(count / batch_size)
    num_batches = num_batches if max_batches is None else min(max_batches, num_batches)
    num_real = min(count, num_batches * batch_size)
    padding = {key: np.zeros_like(value) for key, value in corpus.row(first).items()}
    batches = []
    for rows in np.arange(num_batches * batch_size).reshape(num_batches, batch_size):
        batches.append(_stack([corpus.row(first + int(row)) if row < num_real else padding for row in rows[local]]))
    num_tokens = sum(int(corpus.row(first + row)["mask"].sum()) for row in range(num_real))
    return EvalBatches(batches, num_tokens)


def eval_batches(corpus: Any, batch_size: int, max_batches: int, *, process_index: int | None = None,
                 process_count: int | None = None) -> EvalBatches:
    """Up to `max_batches` fixed batches of the held-out rows (`row_batches`): what a training run evaluates on."""
    return row_batches(corpus, corpus.num_train_rows, corpus.num_eval_rows, batch_size, max_batches,
                       process_index=process_index, process_count=process_count)
