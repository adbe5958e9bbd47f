"""Tests of `xlstm_jax.train.data` and `xlstm_jax.train.batches`: packing of token and text files into rows (a .txt
file is one document, or split at --doc-separator, its text kept as it is), training batches (epochs, seeds,
process counts, resume), held-out batches and the errors for bad input. All data is written to tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from xlstm_jax.train import data
from xlstm_jax.train.batches import eval_batches, row_batches, train_batches
from xlstm_jax.train.data import DataSpec, load_corpus

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "bird", "sang", "loud", "song"]
TEXT_DOCS = ["the cat sat on a mat", "dog ran", "bird sang a loud\nsong far away the cat", "mat", "on a dog"]
JSONL_DOCS = ["far away", "the bird sang on a mat the dog ran", "cat"]
KEYS = ("inputs", "targets", "segment_ids", "mask")


def reference_rows(documents: list[list[int]], seq_len: int) -> list[dict[str, list]]:
    """Slow pure-Python packing of documents (token lists, in stream order) into every full row."""
    stream, document_of = [], []
    for number, document in enumerate(documents):
        stream += document
        document_of += [number] * len(document)
    rows = []
    for start in range(0, len(stream) - seq_len, seq_len):
        segment, segment_ids, mask = 0, [], []
        for i in range(start, start + seq_len):
            if i > start and document_of[i] != document_of[i - 1]:
                segment += 1
            segment_ids.append(segment)
            mask.append(1.0 if document_of[i + 1] == document_of[i] else 0.0)
        rows.append({"inputs": stream[start:start + seq_len], "targets": stream[start + 1:start + seq_len + 1],
                     "segment_ids": segment_ids, "mask": mask})
    return rows


def split_after_eos(tokens: list[int], eos_id: int) -> list[list[int]]:
    documents = [[]]
    for token in tokens:
        documents[-1].append(token)
        if token == eos_id:
            documents.append([])
    return documents


def assert_rows_match(corpus, expected: list[dict[str, list]]) -> None:
    """corpus.row(r) equals the reference for every row, and the reference has the cases worth checking: a document
    start inside a row, a row that starts in the middle of a document, and a masked target."""
    assert corpus.num_rows == len(expected)
    assert any(max(row["segment_ids"]) > 0 for row in expected)
    assert any(previous["mask"][-1] == 1.0 for previous in expected[:-1])
    assert any(0.0 in row["mask"] for row in expected)
    for number, row in enumerate(expected):
        got = corpus.row(number)
        for key in KEYS:
            dtype = np.float32 if key == "mask" else np.int32
            assert got[key].dtype == dtype and got[key].shape == (corpus.seq_len,)
            np.testing.assert_array_equal(got[key], np.asarray(row[key], dtype), err_msg=f"row {number} {key}")


@pytest.fixture
def tokenizer(tmp_path):
    """A word-level tokenizer trained on WORDS (ids 0 and 1 are [UNK] and [EOS]) and the path it is saved at."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return tokenizer, str(path)


SEPARATOR = "\n<doc>\n"


def write_text_files(tmp_path) -> list[str]:
    """TEXT_DOCS in a .txt file between SEPARATORs (with an empty and an all-whitespace piece, which are dropped),
    JSONL_DOCS in a .jsonl file."""
    txt = tmp_path / "docs.txt"
    txt.write_text(SEPARATOR + SEPARATOR.join(TEXT_DOCS) + SEPARATOR + " \n\t", encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": JSONL_DOCS[0], "id": 7}), "", json.dumps({"text": JSONL_DOCS[1]}), "  ",
             json.dumps({"text": JSONL_DOCS[2]})]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [str(txt), str(jsonl)]


@pytest.mark.parametrize("seq_len", [4, 7])
@pytest.mark.parametrize("with_eos", [False, True])
def test_text_packing_matches_reference(tmp_path, tokenizer, seq_len, with_eos):
    tok, tok_path = tokenizer
    eos_id = tok.token_to_id("[EOS]") if with_eos else None
    spec = DataSpec(tuple(write_text_files(tmp_path)), tokenizer=tok_path, eos_id=eos_id, doc_separator=SEPARATOR)
    corpus = load_corpus(spec, seq_len)
    documents = [[tok.token_to_id(word) for word in doc.split()] + ([eos_id] if with_eos else [])
                 for doc in TEXT_DOCS + JSONL_DOCS]
    assert corpus.vocab_size == tok.get_vocab_size() == len(WORDS) + 2
    assert corpus.num_tokens == sum(map(len, documents))
    assert_rows_match(corpus, reference_rows(documents, seq_len))


def test_a_txt_file_is_one_document_kept_as_it_is_unless_a_separator_splits_it(tmp_path, tokenizer):
    code = "import os\r\n\n\ndef main():\n    x = 1\n\n    return x  \n\n\n\nclass A:\n\tpass\n"
    (tmp_path / "a.txt").write_bytes(code.encode())
    (tmp_path / "b.txt").write_text("the cat\n\nsat on a mat\n", encoding="utf-8")
    assert data._read_documents(str(tmp_path / "a.txt")) == [code]  # indentation, blank lines, \r\n: all kept
    assert data._read_documents(str(tmp_path / "a.txt"), "\n\n\n") == [
        "import os\r", "def main():\n    x = 1\n\n    return x  ", "\nclass A:\n\tpass\n"]
    assert data._read_documents(str(tmp_path / "a.txt"), "\n\n") == [  # the empty piece is dropped
        "import os\r", "\ndef main():\n    x = 1", "    return x  ", "class A:\n\tpass\n"]
    paths = (str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    assert load_corpus(DataSpec(paths, tokenizer=tokenizer[1]), 2).num_documents == 2
    assert load_corpus(DataSpec(paths, tokenizer=tokenizer[1], doc_separator="\n\n"), 2).num_documents == 6


def test_byte_counts_cover_the_text_once(tmp_path, tokenizer):
    """Each token counts the UTF-8 bytes from the end of the one before it to its own end (what the tokenizer
    skips and a character of two bytes included); the counts of a document add up to its bytes."""
    text = "the cat  s\u00e4t\n\n  on a mat\r\n"  # s\u00e4t is not in the vocabulary: one [UNK] of 4 bytes
    assert data._token_bytes(text, tokenizer[0].encode(text).offsets) == [3, 4, 6, 6, 2, 6]
    assert sum([3, 4, 6, 6, 2, 6]) == len(text.encode())
    (tmp_path / "t.txt").write_text(text, encoding="utf-8", newline="")
    corpus = load_corpus(DataSpec((str(tmp_path / "t.txt"),), tokenizer=tokenizer[1]), 5, training=False,
                         byte_counts=True)
    assert corpus.num_rows == 1 and corpus.row(0)["bytes"].tolist() == [4, 6, 6, 2, 6]  # of the targets
    [batch] = row_batches(corpus, 0, 1, 2, process_index=0, process_count=1).batches
    assert batch["bytes"].tolist() == [[4, 6, 6, 2, 6], [0] * 5] and batch["mask"][1].sum() == 0  # a padding row


def test_token_files_one_document_per_file(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, 13).astype(np.int32), rng.integers(0, 60000, 7).astype(np.uint16),
             np.zeros(0, np.uint16), rng.integers(0, 1000, 11)]
    paths = [tmp_path / "a.npy", tmp_path / "b.bin", tmp_path / "empty.bin", tmp_path / "c.npy"]
    np.save(paths[0], parts[0])
    parts[1].tofile(paths[1])
    parts[2].tofile(paths[2])
    np.save(paths[3], parts[3])
    corpus = load_corpus(DataSpec(tuple(map(str, paths))), 5)
    assert corpus.vocab_size == max(int(part.max()) for part in parts if len(part)) + 1
    assert corpus.num_tokens == 31 and corpus.num_rows == 6
    assert_rows_match(corpus, reference_rows([part.tolist() for part in parts], 5))


def test_token_files_uint32_with_eos(tmp_path):
    eos_id = 70000  # above the uint16 range: read as uint16 the ids would differ
    rng = np.random.default_rng(1)
    stream = rng.integers(65536, 100000, 40).astype(np.uint32)
    stream[[3, 4, 11, 19, 20, 33]] = eos_id  # documents of one token, a file boundary inside a document
    paths = [tmp_path / "x.bin", tmp_path / "y.bin"]
    stream[:17].tofile(paths[0])
    stream[17:].tofile(paths[1])
    corpus = load_corpus(DataSpec(tuple(map(str, paths)), token_dtype="uint32", eos_id=eos_id), 6,
                         vocab_size=100000)
    assert corpus.vocab_size == 100000
    assert_rows_match(corpus, reference_rows(split_after_eos(stream.tolist(), eos_id), 6))


def test_npy_with_eos_and_default_uint16_bin(tmp_path):
    eos_id = 0
    stream = np.array([5, 6, 0, 7, 8, 9, 0, 0, 4, 3, 2, 1, 0, 9, 9, 8, 7, 0, 1, 2, 3], np.int64)
    np.save(tmp_path / "a.npy", stream[:8])
    stream[8:].astype(np.uint16).tofile(tmp_path / "b.bin")
    spec = DataSpec((str(tmp_path / "a.npy"), str(tmp_path / "b.bin")), eos_id=eos_id)
    corpus = load_corpus(spec, 3, vocab_size=10)
    assert_rows_match(corpus, reference_rows(split_after_eos(stream.tolist(), eos_id), 3))


@pytest.fixture
def counting_corpus(tmp_path):
    """Stream 0..152 in one file, seq_len 4: 38 rows (row r starts with token 4 r), 37 training rows, 1 held out."""
    np.save(tmp_path / "count.npy", np.arange(153, dtype=np.int32))
    corpus = load_corpus(DataSpec((str(tmp_path / "count.npy"),)), 4)
    assert (corpus.num_rows, corpus.num_train_rows, corpus.num_eval_rows) == (38, 37, 1)
    return corpus


def row_numbers(batch) -> list[int]:
    return (batch["inputs"][:, 0] // 4).tolist()


def assert_batches_equal(got, expected) -> None:
    for key in KEYS:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_every_training_row_once_per_epoch(counting_corpus):
    batches = train_batches(counting_corpus, 8, seed=0, process_index=0, process_count=1)
    first = batches[0]
    assert {key: (first[key].shape, first[key].dtype) for key in KEYS} == {
        "inputs": ((8, 4), np.int32), "targets": ((8, 4), np.int32), "segment_ids": ((8, 4), np.int32),
        "mask": ((8, 4), np.float32)}
    order = [row for step in range(14) for row in row_numbers(batches[step])]  # 112 rows: 3 epochs of 37 and 1
    epochs = [order[i * 37:(i + 1) * 37] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(37))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])


def test_seed_decides_the_order(counting_corpus):
    def steps(seed):
        batches = train_batches(counting_corpus, 8, seed=seed, process_index=0, process_count=1)
        return [row_numbers(batches[step]) for step in range(6)]

    assert steps(3) == steps(3)
    assert steps(3) != steps(4)


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_does_not_depend_on_process_count(counting_corpus, process_count):
    single = train_batches(counting_corpus, 8, seed=5, process_index=0, process_count=1)
    locals_ = [train_batches(counting_corpus, 8, seed=5, process_index=i, process_count=process_count)
               for i in range(process_count)]
    for step in range(6):
        parts = [batches[step] for batches in locals_]
        assert parts[0]["inputs"].shape == (8 // process_count, 4)
        assert_batches_equal({key: np.concatenate([part[key] for part in parts]) for key in KEYS}, single[step])


def test_default_process_is_jax_process(counting_corpus):
    assert_batches_equal(train_batches(counting_corpus, 8, seed=2)[3],
                         train_batches(counting_corpus, 8, seed=2, process_index=0, process_count=1)[3])


@pytest.mark.parametrize("saved_at", [3, 5])  # steps 3..9 and 5..9 cross the epoch ends at rows 37 and 74
def test_resume_sees_the_uninterrupted_batches(counting_corpus, saved_at):
    batches = train_batches(counting_corpus, 8, seed=1, process_index=1, process_count=2)
    uninterrupted = batches.iterator(num_threads=2, prefetch=3)
    run = [next(uninterrupted) for _ in range(10)]
    uninterrupted.close()
    for step, batch in enumerate(run):
        assert_batches_equal(batch, batches[step])
    assert row_numbers(run[saved_at]) != row_numbers(run[0])

    interrupted = batches.iterator()
    for _ in range(saved_at):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))
    interrupted.close()
    resumed = train_batches(counting_corpus, 8, seed=1, process_index=1, process_count=2).iterator()
    resumed.set_state(state)
    for step in range(saved_at, 10):
        assert_batches_equal(next(resumed), run[step])
    assert resumed.get_state() == {"step": 10}
    resumed.close()

    started = batches.iterator(saved_at)
    for step in range(saved_at, 10):
        assert_batches_equal(next(started), run[step])
    started.close()


def test_eval_rows_are_held_out_in_order_and_padded(tmp_path):
    np.save(tmp_path / "count.npy", np.arange(153, dtype=np.int32))
    corpus = load_corpus(DataSpec((str(tmp_path / "count.npy"),), eval_fraction=0.25), 4)
    assert (corpus.num_train_rows, corpus.num_eval_rows) == (28, 10)  # ceil(0.25 * 38) = 10
    train = train_batches(corpus, 4, seed=0, process_index=0, process_count=1)
    trained = {row for step in range(7) for row in row_numbers(train[step])}
    assert trained == set(range(28))

    held_out = eval_batches(corpus, 4, max_batches=10, process_index=0, process_count=1)
    assert len(held_out.batches) == 3 and held_out.num_tokens == 10 * 4
    assert [row_numbers(batch) for batch in held_out.batches[:2]] == [[28, 29, 30, 31], [32, 33, 34, 35]]
    last = held_out.batches[2]
    assert row_numbers(last)[:2] == [36, 37]
    np.testing.assert_array_equal(last["mask"].sum(axis=1), [4, 4, 0, 0])
    real = {row for batch in held_out.batches
            for row, count in zip(row_numbers(batch), batch["mask"].sum(axis=1), strict=True) if count > 0}
    assert real == set(range(28, 38)) and not real & trained

    limited = eval_batches(corpus, 4, max_batches=2, process_index=0, process_count=1)
    assert len(limited.batches) == 2 and limited.num_tokens == 8 * 4


def test_eval_with_fewer_held_out_rows_than_the_batch(counting_corpus):
    single = eval_batches(counting_corpus, 8, max_batches=5, process_index=0, process_count=1)
    assert len(single.batches) == 1 and single.num_tokens == 4
    batch = single.batches[0]
    assert batch["inputs"].shape == (8, 4) and row_numbers(batch)[0] == 37
    np.testing.assert_array_equal(batch["mask"].sum(axis=1), [4] + [0] * 7)
    parts = [eval_batches(counting_corpus, 8, 5, process_index=i, process_count=2) for i in range(2)]
    assert [part.num_tokens for part in parts] == [4, 4]
    assert_batches_equal({key: np.concatenate([part.batches[0][key] for part in parts]) for key in KEYS}, batch)


def test_eval_num_tokens_counts_only_same_document_targets(tmp_path):
    stream = np.array([1, 2, 0, 3, 4, 5, 0, 6, 0, 7, 8, 9, 9, 0, 1, 2, 3], np.uint16)
    stream.tofile(tmp_path / "t.bin")
    corpus = load_corpus(DataSpec((str(tmp_path / "t.bin"),), eos_id=0, eval_fraction=0.5), 4)
    held_out = eval_batches(corpus, 2, 1, process_index=0, process_count=1)
    assert corpus.num_eval_rows == 2 and held_out.num_tokens == 6  # the targets after the eos at positions 8, 13
    assert held_out.num_tokens == int(held_out.batches[0]["mask"].sum())


@pytest.mark.slow
def test_import_loads_neither_jax_grain_nor_tokenizers():
    code = ("import sys, xlstm_jax.train.data, xlstm_jax.train.batches; "
            "print(sorted({'jax', 'grain', 'tokenizers'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def bad_input_cases(tmp_path, tokenizer_path):
    """(spec, seq_len, vocab_size, message pattern) for every rejected input."""
    def npy(name, array):
        np.save(tmp_path / name, array)
        return str(tmp_path / name)

    def raw(name, content: str | bytes):
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(tmp_path / name)

    tokens = npy("tokens.npy", np.arange(20, dtype=np.int32))
    text = raw("doc.txt", "the cat\n\nsat on a mat")
    return [
        (DataSpec((str(tmp_path / "missing.npy"),)), 4, None, r"missing\.npy does not exist"),
        (DataSpec((str(tmp_path),)), 4, None, r"does not exist as a file"),
        (DataSpec((raw("table.csv", "1,2"),)), 4, None, r"table\.csv: unknown file type '\.csv'.*\.npy, \.bin.*\.txt"),
        (DataSpec((tokens, text), tokenizer=tokenizer_path), 4, None, r"one kind.*tokens\.npy and .*doc\.txt"),
        (DataSpec((text,)), 4, None, r"text data needs --tokenizer tokenizer\.json"),
        (DataSpec((text,), tokenizer=raw("broken.json", "{not json")), 4, None, r"broken\.json does not load"),
        (DataSpec((text,), tokenizer=str(tmp_path / "absent.json")), 4, None, r"absent\.json does not exist"),
        (DataSpec((tokens,), doc_separator="\n\n"), 4, None, r"doc_separator .* splits \.txt files.*tokens\.npy"),
        (DataSpec((text,), tokenizer=tokenizer_path, doc_separator=""), 4, None, r"doc_separator must be a non-empty"),
        (DataSpec((raw("odd.bin", b"\x01\x00\x02"),)), 4, None, r"odd\.bin: size 3 bytes .*uint16 item size"),
        (DataSpec((raw("odd32.bin", b"\x01" * 6),), token_dtype="uint32"), 4, None, r"odd32\.bin: .*uint32"),
        (DataSpec((tokens,), token_dtype="int8"), 4, None, r"token_dtype must be one of uint16, uint32"),
        (DataSpec((npy("matrix.npy", np.zeros((4, 5), np.int32)),)), 2, None, r"matrix\.npy: .*1-D integer"),
        (DataSpec((npy("floats.npy", np.zeros(30, np.float32)),)), 2, None, r"floats\.npy: .*1-D integer"),
        (DataSpec((raw("junk.npy", b"not numpy at all"),)), 2, None, r"junk\.npy: not a readable \.npy"),
        (DataSpec((tokens,)), 4, 19, r"tokens\.npy: token id 19 is outside the vocabulary \(vocab_size 19\)"),
        (DataSpec((npy("negative.npy", np.array([3, 1, -4, 2] * 5)),)), 4, None, r"negative\.npy: negative id -4"),
        (DataSpec((text,), tokenizer=tokenizer_path), 2, 3, r"doc\.txt: tokenizer .* gives token id \d+, outside"),
        (DataSpec((tokens,)), 20, None, r"holds 20 tokens .*one row needs seq_len \+ 1 = 21"),
        (DataSpec((text,), tokenizer=tokenizer_path), 8, None, r"holds 6 tokens"),
        (DataSpec((tokens,)), 10, None, r"only 1 row\(s\).*leaving none for training"),
        (DataSpec((tokens,), eos_id=20), 4, None, r"eos_id 20 is outside the vocabulary \(vocab_size 20\)"),
        (DataSpec((tokens,), eos_id=-1), 4, 50, r"eos_id -1 is outside"),
        (DataSpec((text,), tokenizer=tokenizer_path, eos_id=16), 2, None, r"eos_id 16 is outside .*vocab_size 16"),
        (DataSpec((tokens,), eval_fraction=0.0), 4, None, r"eval_fraction must be in \(0, 1\)"),
        (DataSpec((tokens,), eval_fraction=1.0), 4, None, r"eval_fraction must be in \(0, 1\)"),
        (DataSpec((raw("bad.jsonl", '{"text": "cat"}\n\n{"text": "dog"\n'),), tokenizer=tokenizer_path), 2, None,
         r"bad\.jsonl, line 3: not valid JSON"),
        (DataSpec((raw("notext.jsonl", '{"text": "cat"}\n{"body": "dog"}\n'),), tokenizer=tokenizer_path), 2, None,
         r'notext\.jsonl, line 2: expected a JSON object with a string field "text"'),
        (DataSpec((raw("number.jsonl", '{"text": 5}\n'),), tokenizer=tokenizer_path), 2, None,
         r"number\.jsonl, line 1: expected"),
        (DataSpec(()), 4, None, r"no data files"),
        (DataSpec((raw("wide.bin", np.arange(1, 200, dtype=np.uint32).tobytes()),)), 4, None,
         r"wide\.bin looks like uint32 token ids .*--token-dtype uint32"),
    ]


def test_bad_input_raises_value_error_naming_the_problem(tmp_path, tokenizer):
    cases = bad_input_cases(tmp_path, tokenizer[1])
    for spec, seq_len, vocab_size, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            load_corpus(spec, seq_len, vocab_size)


def test_vocabulary_check_reads_memory_mapped_files_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_SCAN_BLOCK", 3)
    tokens = np.arange(20, dtype=np.uint16)[::-1].copy()
    tokens[13] = 40  # the largest id, in the fifth block
    tokens.tofile(tmp_path / "t.bin")
    spec = DataSpec((str(tmp_path / "t.bin"),))
    with pytest.raises(ValueError, match=r"t\.bin: token id 40 is outside the vocabulary \(vocab_size 30\)"):
        load_corpus(spec, 4, vocab_size=30)
    assert load_corpus(spec, 4).vocab_size == 41


def test_batch_size_must_divide_among_processes(counting_corpus):
    with pytest.raises(ValueError, match=r"batch size 6 .*process count 4.*not divisible"):
        train_batches(counting_corpus, 6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"batch size 6 .*process count 4.*not divisible"):
        eval_batches(counting_corpus, 6, 1, process_index=0, process_count=4)
