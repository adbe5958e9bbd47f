"""Real-data input pipeline of `xlstm-jax train`: token or text files packed into rows for next-token prediction.

Inputs (`DataSpec.paths`, all token files or all text files):
- token files: `.npy` (1-D integer array) or raw `.bin` (`token_dtype` uint16 or uint32), memory-mapped and read in
  the given order as one stream. With `eos_id` the token after each `eos_id` starts a new document (file boundaries
  do not); without it each file is one document.
- text files: `.txt` (the whole file is one document, or the pieces between occurrences of `doc_separator`; text
  is kept as it is, whitespace and blank lines included, and only pieces that are empty or all whitespace are
  dropped) or `.jsonl` (one `{"text": ...}` object per line), tokenized into memory with a `tokenizers`
  `tokenizer.json`; `eos_id`, if given, is appended to every document.
A tokenizer given with token files travels with the corpus too (`Corpus.tokenizer`: the training job exports it
with the model), and is then the vocabulary the ids are checked against.

Packing: the stream is cut into rows of seq_len + 1 tokens with stride seq_len (the tail that fills no row is
dropped); the last max(1, ceil(eval_fraction * rows)) rows are held out for evaluation. A batch is a dict of numpy
arrays, each (B, seq_len): inputs and targets (int32, targets = the next token), segment_ids (int32, document number
inside the row, 0 at position 0, +1 at each document start) and mask (float32, 0 where the target lies in the next
document); with `byte_counts`, bytes (int32: the UTF-8 bytes of text each target covers, for bits per byte).
`xlstm_jax.train.batches` makes batches of rows. Importing this module imports neither jax, grain nor tokenizers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from typing import Any

import numpy as np

__all__ = ["Corpus", "DataSpec", "load_corpus"]

TOKEN_SUFFIXES = (".npy", ".bin")
TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_DTYPES = ("uint16", "uint32")
_ACCEPTED = "token files (.npy, .bin) or text files (.txt, .jsonl)"
_SCAN_BLOCK = 1 << 22  # tokens per block when scanning a memory-mapped file for its smallest and largest id

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What `--data` asked for: the files (in stream order), the tokenizer.json (for text; optional with token
    files), the item type of raw .bin files, the end-of-document token id, the held-out fraction of rows and the
    string between the documents of a .txt file (None: one document per file)."""

    paths: tuple[str, ...]
    tokenizer: str | None = None
    token_dtype: str = "uint16"
    eos_id: int | None = None
    eval_fraction: float = 0.01
    doc_separator: str | None = None


class Corpus:
    """A token stream packed into rows of seq_len + 1 tokens. Rows 0..num_train_rows-1 are the training split, the
    num_eval_rows after them the held-out split. `tokenizer`: the `tokenizers.Tokenizer` given with the data, or
    None. Build it with `load_corpus`."""

    def __init__(self, arrays: list[np.ndarray], *, seq_len: int, vocab_size: int, eos_id: int | None,
                 doc_index: np.ndarray | None, eval_fraction: float, tokenizer: Any = None,
                 byte_counts: np.ndarray | None = None):
        self._arrays = arrays  # 1-D integer arrays, memory-mapped token files or one in-memory uint32 array
        self._bytes = byte_counts  # text: the UTF-8 bytes each token covers (int32); None: not counted
        self.tokenizer = tokenizer
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
        """Row `row` (0 <= row < num_rows): inputs, targets, segment_ids (seq_len,) int32, mask (seq_len,)
        float32, and bytes (seq_len,) int32 of each target when the corpus counts them."""
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
        out = {"inputs": tokens[:-1].astype(np.int32), "targets": tokens[1:].astype(np.int32),
               "segment_ids": segment_ids, "mask": (~starts).astype(np.float32)}
        if self._bytes is not None:
            out["bytes"] = self._bytes[start + 1:stop]
        return out


def load_corpus(spec: DataSpec, seq_len: int, vocab_size: int | None = None, *, training: bool = True,
                byte_counts: bool = False) -> Corpus:
    """Check `spec`'s files and pack them into rows of seq_len + 1 tokens. Token files stay memory-mapped; text is
    tokenized into memory. vocab_size: the model's vocabulary (token ids are checked against it); None takes the
    tokenizer's size, or for token files without one the largest id + 1. training: the corpus must leave rows for
    training besides the held-out ones (off: every row may be evaluated). byte_counts: count the bytes of text
    each token covers (rows then hold `bytes`). Raises ValueError naming the bad input."""
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
    if spec.doc_separator is not None and (not spec.doc_separator or all(_suffix(p) != ".txt" for p in spec.paths)):
        raise ValueError(f"doc_separator must be a non-empty string and splits .txt files, got {spec.doc_separator!r} "
                         f"for {spec.paths[0]}{', ...' * (len(spec.paths) > 1)}")
    if text and spec.tokenizer is None:
        raise ValueError(f"text data needs --tokenizer tokenizer.json ({spec.paths[0]} is text)")
    tokenizer = None
    if spec.tokenizer is not None:
        from xlstm_jax.models.xlstm_large.tokenizer import read_tokenizer

        tokenizer = read_tokenizer(spec.tokenizer)
        vocab_size = vocab_size if vocab_size is not None else tokenizer.get_vocab_size()
    counts = None
    if text:
        arrays, doc_index, counts, vocab = _load_text(spec, tokenizer, vocab_size, byte_counts)
    else:
        arrays, vocab = _load_token_files(spec, vocab_size)
        doc_index = None
    num_tokens = sum(map(len, arrays))
    if num_tokens < seq_len + 1:
        raise ValueError(f"the data holds {num_tokens} tokens in all ({len(spec.paths)} file(s)); one row needs "
                         f"seq_len + 1 = {seq_len + 1}")
    _check_eos(spec.eos_id, vocab)
    corpus = Corpus(arrays, seq_len=seq_len, vocab_size=vocab, eos_id=spec.eos_id, doc_index=doc_index,
                    eval_fraction=spec.eval_fraction, tokenizer=tokenizer, byte_counts=counts)
    if training and corpus.num_train_rows < 1:
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


def _load_text(spec: DataSpec, tokenizer: Any, vocab: int, byte_counts: bool
               ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None, int]:
    """Tokenized text: [tokens (N,) uint32], the document number of each token (N,) int32 or int64, the bytes of
    text each token covers (N,) int32 (`byte_counts`; else None), vocab size."""
    _check_eos(spec.eos_id, vocab)
    eos = [] if spec.eos_id is None else [spec.eos_id]
    tokens, lengths, counts = [], [], []
    for path in spec.paths:
        texts = _read_documents(path, spec.doc_separator)
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        documents = [encoding.ids + eos for encoding in encodings]
        file_tokens = np.fromiter(itertools.chain.from_iterable(documents), np.int64)
        if len(file_tokens) and file_tokens.max() >= vocab:
            raise ValueError(f"{path}: tokenizer {spec.tokenizer} gives token id {file_tokens.max()}, outside the "
                             f"vocabulary (vocab_size {vocab})")
        tokens.append(file_tokens.astype(np.uint32))
        lengths.extend(map(len, documents))
        if byte_counts:
            counts.extend(n for text, encoding in zip(texts, encodings)
                          for n in _token_bytes(text, encoding.offsets) + [0] * len(eos))
    index_dtype = np.int32 if len(lengths) <= np.iinfo(np.int32).max else np.int64
    doc_index = np.repeat(np.arange(len(lengths), dtype=index_dtype), lengths)
    return [np.concatenate(tokens)], doc_index, np.asarray(counts, np.int32) if byte_counts else None, vocab


def _token_bytes(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """The UTF-8 bytes of `text` each token covers: from where the one before it ended to where it ends (so text
    the tokenizer skips counts towards the next token, and a character split over several tokens counts once);
    what follows the last token counts towards it. They add up to the bytes of `text`."""
    counts, done = [], 0
    for _, end in offsets:
        end = max(end, done)
        counts.append(len(text[done:end].encode("utf-8")))
        done = end
    if counts:
        counts[-1] += len(text[done:].encode("utf-8"))
    return counts


def _read_documents(path: str, separator: str | None = None) -> list[str]:
    """The documents of a .txt file (the whole text, or the pieces between `separator`s; text as it is, pieces that
    are empty or all whitespace dropped) or of a .jsonl file."""
    try:
        with open(path, encoding="utf-8", newline="") as file:
            text = file.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    if _suffix(path) == ".txt":
        return [piece for piece in ([text] if separator is None else text.split(separator)) if piece.strip()]
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
