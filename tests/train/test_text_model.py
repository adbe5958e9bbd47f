"""A model trained on text speaks text: a byte-level BPE tokenizer trained here on code made here, a short
`xlstm-jax train --data *.txt --tokenizer`, and then the export's tokenizer files (loaded by `tokenizers` and by
`transformers.AutoTokenizer`), its special-token ids, `xlstm-jax generate --prompt` (the text of the id-level
generation; the printed `generate RUN` line; a transformers-saved directory) and `xlstm-jax eval` (the run's own
held-out evaluation, again)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys

import numpy as np
import pytest

from xlstm_jax import cli
from xlstm_jax.generate_cli import continuation
from xlstm_jax.models.xlstm_large import generation, load_tokenizer, special_token_ids
from xlstm_jax.models.xlstm_large.tokenizer import TOKENIZER_FILES
from xlstm_jax.train.cli import parse_separator
from xlstm_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # a training run, then the command on its output
END = "<|endoftext|>"
PROMPT = "def alpha_3(beta):\n    "
TINY = ["--seq-len", "32", "--batch-size", "4", "--embedding-dim", "32", "--num-heads", "2", "--num-blocks", "1",
        "--dtype", "float32", "--no-progress", "--json"]


def code_text(seed: int, functions: int = 60) -> str:
    """Python-looking source: functions with indented bodies and blank lines between them."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "total"]
    parts = []
    for number in range(functions):
        name, arg, k = rng.choice(names), rng.choice(names), rng.randint(1, 9)
        parts.append(f"def {name}_{number}({arg}):\n    if {arg} > {k}:\n        return {arg} - {k}\n"
                     f"    return {arg} * {k}\n\n\n")
    return "".join(parts)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, tokenizer, data files, the training job's JSON summary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("text")
    files = []
    for seed in range(2):
        files.append(str(root / f"code{seed}.txt"))
        with open(files[-1], "w", encoding="utf-8") as fh:
            fh.write(code_text(seed))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train(files, trainers.BpeTrainer(vocab_size=300, special_tokens=[END],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(root / "tokenizer.json"))
    out = str(root / "run")
    assert cli.main(["train", "--data", *files, "--tokenizer", str(root / "tokenizer.json"), "--eos-id", "0",
                     "--steps", "4", "--eval-every", "4", "--eval-batches", "2", "--eval-fraction", "0.2", *TINY,
                     "--output-dir", out]) == 0
    return out, tokenizer, files


def test_the_export_carries_the_tokenizer_with_the_special_ids_of_the_run(run, tmp_path):
    out, tokenizer, _ = run
    model_dir = os.path.join(out, "model")
    assert set(TOKENIZER_FILES) <= set(os.listdir(model_dir))
    assert load_tokenizer(out).to_str() == tokenizer.to_str() == load_tokenizer(model_dir).to_str()
    with open(os.path.join(model_dir, "config.json")) as fh:
        config = json.load(fh)
    # --eos-id 0 (<|endoftext|>): bos and pad follow it, as the tokenizer has no tokens of their own
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)
    with open(os.path.join(model_dir, "tokenizer_config.json")) as fh:
        settings = json.load(fh)
    assert settings["eos_token"] == settings["bos_token"] == settings["pad_token"] == END
    assert load_tokenizer(str(tmp_path)) is None  # a directory without one


def test_special_token_ids_follow_the_tokenizer_and_eos_id():
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "cat": 3, "[UNK]": 4},
                                           unk_token="[UNK]"))
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>", "[UNK]"])
    assert special_token_ids(tokenizer) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert special_token_ids(tokenizer, eos_id=3)["eos_token_id"] == 3
    assert special_token_ids(None, eos_id=5) == {"bos_token_id": 5, "eos_token_id": 5, "pad_token_id": 5}
    assert special_token_ids(None) == {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def test_transformers_autotokenizer_loads_the_export_and_encodes_as_tokenizers_does(run):
    transformers = pytest.importorskip("transformers")
    out, tokenizer, _ = run
    auto = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "model"))
    assert auto.eos_token == END and auto.eos_token_id == 0 and auto.pad_token_id == 0
    for text in (PROMPT, code_text(7, functions=3), "  x = [1, 2]\n\n\tpass  "):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert auto.encode(text, add_special_tokens=False) == ids
        assert auto.decode(ids) == text


def _generate(capsys, *argv):
    assert cli.main(["generate", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr()


def test_generate_prints_the_text_of_the_id_level_generation_and_stops_at_the_end_of_text(run, capsys,
                                                                                          monkeypatch):
    out, tokenizer, _ = run
    calls, pieces = [], []

    def spy(model, prompts, **options):
        calls.append(options["stop_tokens"])
        return real(model, prompts, **options)

    real = generation.generate
    monkeypatch.setattr(generation, "generate", spy)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the continuation is streamed
    monkeypatch.setattr(sys.stdout, "write", lambda text, write=sys.stdout.write: pieces.append(text) or write(text))
    text = _generate(capsys, out, "--prompt", PROMPT, "--max-new-tokens", "12").out
    assert pieces[0] == PROMPT and len(pieces) > 3 and "".join(pieces) == text  # streamed token after token
    monkeypatch.undo()
    monkeypatch.setattr(generation, "generate", spy)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    by_ids = _generate(capsys, out, "--prompt-ids", " ".join(map(str, ids)), "--max-new-tokens", "12").out
    generated = json.loads(by_ids.split(" -> ")[1])
    assert text == PROMPT + continuation(tokenizer, ids, generated) + "\n"
    assert calls == [[0], [0]]  # both stop at <|endoftext|> by default

    # a batch of two prompts, one from a file: each under its own line; '' stops at nothing
    prompt_file = os.path.join(os.path.dirname(out), "prompt.txt")
    with open(prompt_file, "w", encoding="utf-8") as fh:
        fh.write("def gamma_1(delta):\n")
    both = _generate(capsys, out, "--prompt", PROMPT, "--prompt-file", prompt_file, "--max-new-tokens", "12",
                     "--stop-ids", "").out
    assert calls[-1] == []
    first, second = both.split("=== 2/2 ===\n")
    assert first.startswith("=== 1/2 ===\n" + PROMPT) and second.startswith("def gamma_1(delta):\n")


def test_the_printed_generate_line_writes_from_the_start_of_a_document(run, capsys):
    out, _, _ = run
    printed = _generate(capsys, out, "--max-new-tokens", "8")
    assert "generating from <|endoftext|>" in printed.err and printed.out.strip()


def test_generate_on_a_transformers_saved_directory_prints_the_same_text(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out, _, _ = run
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(out, "model", name), tmp_path / name)
    saved = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "model", "tokenizer.json"),
                                                 eos_token=END)
    saved.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "tokenizer.json")
    argv = ("--prompt", PROMPT, "--max-new-tokens", "6")
    assert _generate(capsys, str(tmp_path), *argv).out == _generate(capsys, out, *argv).out


def test_a_text_prompt_without_a_tokenizer_is_one_error_line(run, tmp_path, capsys):
    out, _, _ = run
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(out, "model", name), tmp_path / name)
    assert cli.main(["generate", str(tmp_path), "--prompt", "def"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prompt:") and "no tokenizer" in err[0]


def test_eval_of_the_run_equals_its_own_held_out_evaluation(run, capsys):
    out, _, files = run
    [record] = [r for r in read_metrics(out) if "eval_loss" in r]
    assert cli.main(["eval", out, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["loss"] == pytest.approx(record["eval_loss"], rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(record["eval_perplexity"], rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(record["eval_accuracy"], rel=1e-6)
    assert metrics["rows"] == 8 and 0 < metrics["bytes"]  # 2 batches of 4 held-out rows, as the run evaluated
    assert metrics["bits_per_byte"] == pytest.approx(metrics["loss"] * metrics["tokens"] / math.log(2)
                                                     / metrics["bytes"])
    # every row of a file, with the tokenizer saved with the model
    assert cli.main(["eval", out, "--data", files[1], "--batch-size", "8"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("eval: ") and " rows of 32 from 1 file(s): loss " in line and "bits per byte" in line


def test_a_token_file_run_generates_from_its_held_out_data_and_evaluates_without_bytes(run, tmp_path, capsys):
    """The run as if it had trained on a token file of the ids its text became (the same stream: --eos-id 0 ends
    each document), without a tokenizer: `generate RUN` continues the start of the held-out data, in ids."""
    from xlstm_jax.train.data import DataSpec, load_corpus

    out, _, files = run
    saved = os.path.join(out, "model", "tokenizer.json")
    text = load_corpus(DataSpec(tuple(files), tokenizer=saved, eos_id=0, eval_fraction=0.2), 32)  # as the run
    np.save(tmp_path / "tokens.npy", np.asarray(text._tokens(0, text.num_tokens), np.uint16))
    tokens_run = str(tmp_path / "run")
    shutil.copytree(out, tokens_run, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    with open(os.path.join(tokens_run, "train_config.json")) as fh:
        config = json.load(fh)
    config.update(data=[str(tmp_path / "tokens.npy")], tokenizer=None)
    with open(os.path.join(tokens_run, "train_config.json"), "w") as fh:
        json.dump(config, fh)

    shown = _generate(capsys, tokens_run, "--max-new-tokens", "4")
    held_out = text.row(text.num_train_rows)["inputs"]
    prompt, goes_on = shown.out.splitlines()
    assert prompt.startswith(f"prompt {held_out[:16].tolist()} -> ") and "no tokenizer" in shown.err
    assert goes_on == f"the data goes on {held_out[16:20].tolist()}"
    assert cli.main(["eval", tokens_run, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["bits_per_byte"] is None and metrics["bytes"] is None
    [record] = [r for r in read_metrics(out) if "eval_loss" in r]  # the same rows as the text run's evaluation
    assert metrics["loss"] == pytest.approx(record["eval_loss"], rel=1e-6)


def test_doc_separator_reads_backslash_escapes():
    assert parse_separator(r"\n\n") == "\n\n" and parse_separator(r"<|doc|>\t") == "<|doc|>\t"
    assert parse_separator(r"\\n") == "\\n"
