"""Real-data input pipeline of `xlstm-jax train`: token or text files packed into rows for next-token prediction.

Inputs (`DataSpec.paths`, all token files or all text files):
- token files: `.npy` (1-D integer array) or raw `.bin` (`token_dtype` uint16 or uint32), memory-mapped and read in
  the given order as one stream. With `eos_id` the token after each `eos_id` starts a new document (file boundaries
  do not); without it each file is one document.
- text files: `.txt` (documents separated by blank lines) or `.jsonl` (one `{"text": ...}` object per line),
  tokenized into memory with a `tokenizers` `tokenizer.json`; `eos_id`, if given, is appended to every document.

Packing: the stream is cut into rows of seq_len + 1 tokens with stride seq_len (the tail that fills no row is
dropped); the last max(1, ceil(eval_fraction * rows)) rows are held out for evaluation. A batch is a dict of numpy
arrays, each (B, seq_len): inputs and targets (int32, targets = the next token), segment_ids (int32, document number
inside the row, 0 at position 0, +1 at each document start) and mask (float32, 0 where the target lies in the next
document).

Training batches come from a grain `MapDataset` whose element t is the batch of step t (the training rows shuffled
anew each epoch, batched globally, then sliced per process), so it does not depend on the process count and a run
resumed at step t sees the batches of an uninterrupted run. Importing this module imports neither jax, grain nor
tokenizers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "BatchIterator", "Corpus", "DataSpec", "EvalBatches", "TrainBatches", "eval_batches", "load_corpus",
    "train_batches",
]

TOKEN_SUFFIXES = (".npy", ".bin")
TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_DTYPES = ("uint16", "uint32")
_ACCEPTED = "token files (.npy, .bin) or text files (.txt, .jsonl)"
_SCAN_BLOCK = 1 << 22  # tokens per block when scanning a memory-mapped file for its smallest and largest id
_DOCUMENT_SEPARATOR = re.compile(r"\n\s*\n")

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What `--data` asked for: the files (in stream order), the tokenizer.json for text, the item type of raw .bin
    files, the end-of-document token id and the held-out fraction of rows."""

    paths: tuple[str, ...]
    tokenizer: str | None = None
    token_dtype: str = "uint16"
    eos_id: int | None = None
    eval_fraction: float = 0.01


class Corpus:
    """A token stream packed into rows of seq_len + 1 tokens. Rows 0..num_train_rows-1 are the training split, the
    num_eval_rows after them the held-out split. Build it with `load_corpus`."""

    def __init__(self, arrays: list[np.ndarray], *, seq_len: int, vocab_size: int, eos_id: int | None,
                 doc_index: np.ndarray | None, eval_fraction: float):
        self._arrays = arrays  # 1-D integer arrays, memory-mapped token files or one in-memory uint32 array
        self._offsets = np.cumsum([0, *map(len, arrays)], dtype=np.int64)  # stream position of each array's start
        self._eos_id = eos_id
        self._doc_index = doc_index  # text: document number of each stream position; None for token files
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.num_tokens = int(self._offsets[-1])
        self.num_rows = (self.num_tokens - 1) // seq_len
        self.num_eval_rows = max(1, math.ceil(eval_fraction * self.num_rows - 1e-9))
        self.num_train_rows = self.num_rows - self.num_eval_rows

    @property
    def num_documents(self) -> int | None:
        """Documents in the stream: text documents, or token-file pieces split by eos_id (counted for streams up to
        2^28 tokens; None above, where counting would read the whole files), or one per token file."""
        if self._doc_index is not None:
            return int(self._doc_index[-1]) + 1 if len(self._doc_index) else 0
        if self._eos_id is None:
            return len(self._arrays)
        if self.num_tokens > 2**28:
            return None
        ends = sum(int(np.count_nonzero(np.asarray(a) == self._eos_id)) for a in self._arrays)
        last = self._arrays[-1]
        return ends + int(len(last) > 0 and int(last[-1]) != self._eos_id)

    def _tokens(self, start: int, stop: int) -> np.ndarray:
        """Stream positions start..stop-1, (stop - start,) int64, read across file boundaries."""
        index = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            base, end = int(self._offsets[index]), min(stop, int(self._offsets[index + 1]))
            pieces.append(self._arrays[index][start - base:end - base])
            start, index = end, index + 1
        return np.concatenate(pieces).astype(np.int64)

    def row(self, row: int) -> Batch:
        """Row `row` (0 <= row < num_rows): inputs, targets, segment_ids (seq_len,) int32 and mask (seq_len,)
        float32."""
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} is outside 0..{self.num_rows - 1}")
        start, stop = row * self.seq_len, (row + 1) * self.seq_len + 1
        tokens = self._tokens(start, stop)
        if self._doc_index is not None:
            documents = self._doc_index[start:stop]
            starts = documents[1:] != documents[:-1]  # (seq_len,): row position i + 1 starts a document
        elif self._eos_id is not None:
            starts = tokens[:-1] == self._eos_id
        else:
            files = np.searchsorted(self._offsets, np.arange(start, stop), side="right")
            starts = files[1:] != files[:-1]
        segment_ids = np.concatenate([[0], np.cumsum(starts[:-1])]).astype(np.int32)
        return {"inputs": tokens[:-1].astype(np.int32), "targets": tokens[1:].astype(np.int32),
                "segment_ids": segment_ids, "mask": (~starts).astype(np.float32)}


def load_corpus(spec: DataSpec, seq_len: int, vocab_size: int | None = None) -> Corpus:
    """Check `spec`'s files and pack them into rows of seq_len + 1 tokens. Token files stay memory-mapped; text is
    tokenized into memory. vocab_size: the model's vocabulary (token ids are checked against it); None takes the
    tokenizer's size for text and the largest id + 1 for token files. Raises ValueError naming the bad input."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if not 0 < spec.eval_fraction < 1:
        raise ValueError(f"the held-out fraction eval_fraction must be in (0, 1), got {spec.eval_fraction}")
    if not spec.paths:
        raise ValueError("no data files given")
    for path in spec.paths:
        if not os.path.isfile(path):
            raise ValueError(f"{path} does not exist" + (" as a file" if os.path.exists(path) else ""))
        if _suffix(path) not in TOKEN_SUFFIXES + TEXT_SUFFIXES:
            raise ValueError(f"{path}: unknown file type {_suffix(path)!r}; accepted are {_ACCEPTED}")
    text = [path for path in spec.paths if _suffix(path) in TEXT_SUFFIXES]
    if text and len(text) < len(spec.paths):
        token_file = next(path for path in spec.paths if path not in text)
        raise ValueError(f"all files must be of one kind, {_ACCEPTED}; got {token_file} and {text[0]}")
    if text:
        arrays, doc_index, vocab = _load_text(spec, vocab_size)
    else:
        arrays, vocab = _load_token_files(spec, vocab_size)
        doc_index = None
    num_tokens = sum(map(len, arrays))
    if num_tokens < seq_len + 1:
        raise ValueError(f"the data holds {num_tokens} tokens in all ({len(spec.paths)} file(s)); one row needs "
                         f"seq_len + 1 = {seq_len + 1}")
    _check_eos(spec.eos_id, vocab)
    corpus = Corpus(arrays, seq_len=seq_len, vocab_size=vocab, eos_id=spec.eos_id, doc_index=doc_index,
                    eval_fraction=spec.eval_fraction)
    if corpus.num_train_rows < 1:
        raise ValueError(f"the data makes only {corpus.num_rows} row(s) of seq_len + 1 = {seq_len + 1} tokens "
                         f"({num_tokens} tokens) and the held-out split takes {corpus.num_eval_rows}, leaving none "
                         "for training; add data or lower seq_len")
    return corpus


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _check_eos(eos_id: int | None, vocab_size: int) -> None:
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary (vocab_size {vocab_size})")


def _load_token_files(spec: DataSpec, vocab_size: int | None) -> tuple[list[np.ndarray], int]:
    """Memory-mapped token files and the vocabulary size; checks every id is in 0..vocab_size-1."""
    if spec.token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"token_dtype must be one of {', '.join(TOKEN_DTYPES)}, got {spec.token_dtype!r}")
    limit = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
    arrays, largest = [], -1
    for path in spec.paths:
        array = _open_token_file(path, spec.token_dtype)
        _refuse_wider_ids(path, array, spec.token_dtype)
        if len(array):
            low, high = _id_range(array)
            if low < 0:
                raise ValueError(f"{path}: negative id {low}: token ids must be >= 0")
            if high >= limit:
                raise ValueError(f"{path}: token id {high} is outside the vocabulary (vocab_size {limit})")
            largest = max(largest, high)
        arrays.append(array)
    return arrays, vocab_size if vocab_size is not None else largest + 1


def _refuse_wider_ids(path: str, array: np.ndarray, token_dtype: str) -> None:
    """ValueError when a raw uint16 .bin file reads like little-endian uint32 ids: every second uint16 (the high
    halves) 0 in its first 2^20 items while the others are not all 0."""
    if _suffix(path) != ".bin" or token_dtype != "uint16" or len(array) < 64 or len(array) % 2:
        return
    head = np.asarray(array[: 2**20])
    if not np.any(head[1::2]) and np.any(head[0::2]):
        raise ValueError(f"{path} looks like uint32 token ids (every second uint16 is 0, as the high halves of "
                         "small uint32 ids are); pass --token-dtype uint32")


def _open_token_file(path: str, token_dtype: str) -> np.ndarray:
    """A token file as a read-only memory-mapped 1-D integer array."""
    if _suffix(path) == ".npy":
        try:
            array = np.load(path, mmap_mode="r")
        except Exception as err:  # numpy raises several types for files that are not .npy arrays
            raise ValueError(f"{path}: not a readable .npy array ({err})") from err
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{path}: a .npy token file must hold a 1-D integer array, got shape {array.shape} "
                             f"dtype {array.dtype}")
        return array
    itemsize, size = np.dtype(token_dtype).itemsize, os.path.getsize(path)
    if size % itemsize:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of the {token_dtype} item size "
                         f"({itemsize} bytes)")
    return np.memmap(path, dtype=token_dtype, mode="r") if size else np.zeros(0, token_dtype)


def _id_range(array: np.ndarray) -> tuple[int, int]:
    """Smallest and largest id of a non-empty 1-D array, read in blocks so memory stays bounded."""
    blocks = (array[start:start + _SCAN_BLOCK] for start in range(0, len(array), _SCAN_BLOCK))
    ranges = [(int(block.min()), int(block.max())) for block in blocks]
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def _load_text(spec: DataSpec, vocab_size: int | None) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Tokenized text: [tokens (N,) uint32], the document number of each token (N,) int32 or int64, vocab size."""
    if spec.tokenizer is None:
        raise ValueError(f"text data needs --tokenizer tokenizer.json ({spec.paths[0]} is text)")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(spec.tokenizer)
    except Exception as err:  # tokenizers raises plain Exception for missing or malformed files
        raise ValueError(f"tokenizer {spec.tokenizer} does not load: {err}") from err
    vocab = vocab_size if vocab_size is not None else tokenizer.get_vocab_size()
    _check_eos(spec.eos_id, vocab)
    eos = [] if spec.eos_id is None else [spec.eos_id]
    tokens, lengths = [], []
    for path in spec.paths:
        documents = [encoding.ids + eos for encoding in
                     tokenizer.encode_batch(_read_documents(path), add_special_tokens=False)]
        file_tokens = np.fromiter(itertools.chain.from_iterable(documents), np.int64)
        if len(file_tokens) and file_tokens.max() >= vocab:
            raise ValueError(f"{path}: tokenizer {spec.tokenizer} gives token id {file_tokens.max()}, outside the "
                             f"vocabulary (vocab_size {vocab})")
        tokens.append(file_tokens.astype(np.uint32))
        lengths.extend(map(len, documents))
    index_dtype = np.int32 if len(lengths) <= np.iinfo(np.int32).max else np.int64
    doc_index = np.repeat(np.arange(len(lengths), dtype=index_dtype), lengths)
    return [np.concatenate(tokens)], doc_index, vocab


def _read_documents(path: str) -> list[str]:
    """The documents of a .txt file (split at blank lines, stripped, empty ones dropped) or a .jsonl file."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    if _suffix(path) == ".txt":
        return [document.strip() for document in _DOCUMENT_SEPARATOR.split(text) if document.strip()]
    documents = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}, line {number}: expected a JSON object with a string field "text"')
        documents.append(record["text"])
    return documents


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


def train_batches(corpus: Corpus, batch_size: int, *, seed: int, process_index: int | None = None,
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
    """Held-out batches of this process (dicts of (LB, seq_len) arrays) and num_tokens, the number of real targets
    (mask 1) in them summed over all processes: the denominator of the held-out loss."""

    batches: list[Batch]
    num_tokens: int


def eval_batches(corpus: Corpus, batch_size: int, max_batches: int, *, process_index: int | None = None,
                 process_count: int | None = None) -> EvalBatches:
    """Up to `max_batches` fixed held-out batches of global size `batch_size`, in order: held-out rows
    b * batch_size .. (b + 1) * batch_size - 1 make batch b. A last batch short of rows is filled with padding rows
    (zeros, mask 0), so there is at least one batch."""
    local = _local_rows(batch_size, process_index, process_count)
    if max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    num_batches = min(max_batches, math.ceil(corpus.num_eval_rows / batch_size))
    num_real = min(corpus.num_eval_rows, num_batches * batch_size)
    padding = {key: np.zeros(corpus.seq_len, np.float32 if key == "mask" else np.int32)
               for key in ("inputs", "targets", "segment_ids", "mask")}
    batches = []
    for rows in np.arange(num_batches * batch_size).reshape(num_batches, batch_size):
        batches.append(_stack([corpus.row(corpus.num_train_rows + int(row)) if row < num_real else padding
                               for row in rows[local]]))
    num_tokens = sum(int(corpus.row(corpus.num_train_rows + row)["mask"].sum()) for row in range(num_real))
    return EvalBatches(batches, num_tokens)
