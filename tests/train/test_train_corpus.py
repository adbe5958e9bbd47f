"""`xlstm-jax train --data`: a language model on a text file with a tokenizer trained here, packed with segment ids;
a run resumed mid-epoch follows the uninterrupted one step for step; bad data gets one `error:` line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xlstm_jax import cli
from xlstm_jax.train.metrics import read_metrics

WORDS = "the cat sat on a mat dog ran far away bird sang loud song tree grew tall".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file of 60 short documents and a word-level tokenizer trained on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(3, 20))) for _ in range(60)]
    text = root / "docs.txt"
    text.write_text("\n\n".join(docs) + "\n")
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train([str(text)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    tokenizer.save(str(root / "tokenizer.json"))
    return root


def _train(corpus, out, *extra):
    args = ["train", "--data", str(corpus / "docs.txt"), "--tokenizer", str(corpus / "tokenizer.json"),
            "--eos-id", "1", "--seq-len", "16", "--batch-size", "4", "--steps", "8", "--eval-every", "4",
            "--eval-batches", "2", "--eval-fraction", "0.1", "--log-every", "1", "--dtype", "float32",
            "--embedding-dim", "32", "--num-heads", "2", "--num-blocks", "1", "--no-progress", "--json",
            "--output-dir", str(out), *extra]
    return cli.main(args)


@pytest.mark.slow
def test_a_text_corpus_trains_and_resumes_mid_epoch_on_the_same_batches(corpus, tmp_path, capsys):
    # 60 documents of ~11 words: ~700 tokens, ~43 rows of 16, 38 training rows: an epoch is ~9 steps of 4 rows
    assert _train(corpus, tmp_path / "whole") == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = read_metrics(tmp_path / "whole")
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert [r["step"] for r in evals] == [4, 8]
    assert np.isclose(evals[-1]["eval_perplexity"], np.exp(evals[-1]["eval_loss"]))
    assert whole["eval_loss"] == evals[-1]["eval_loss"] and whole["chance_accuracy"] is None
    assert list((tmp_path / "whole" / "tensorboard").glob("events.out.tfevents.*"))  # tensorboardX: test extra
    config = json.loads((tmp_path / "whole" / "train_config.json").read_text())
    assert config["model"]["vocab_size"] == 19  # 17 words + [UNK] + [EOS], from the tokenizer

    # stop at step 4 (checkpoint), then resume to 8: the same batches, so the same losses
    assert _train(corpus, tmp_path / "split", "--steps", "8", "--checkpoint-every", "4") == 0
    capsys.readouterr()
    import shutil

    shutil.rmtree(tmp_path / "split" / "checkpoints" / "8")
    assert _train(corpus, tmp_path / "split", "--resume") == 0
    capsys.readouterr()
    resumed = read_metrics(tmp_path / "split")
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 9))  # steps 5..8 were replaced
    np.testing.assert_allclose([r["loss"] for r in resumed if "loss" in r], losses, rtol=1e-5)
    assert list((tmp_path / "split").glob("metrics-*.jsonl")), "the records it replaced are kept aside"


def _one_error(capsys, flag: str, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}:"), err
    for needle in needles:
        assert needle in err[0], err


def test_text_without_a_tokenizer_is_one_error_line(corpus, capsys):
    assert cli.main(["train", "--data", str(corpus / "docs.txt"), "--steps", "2", "--no-progress"]) == 2
    _one_error(capsys, "--tokenizer", "--tokenizer tokenizer.json")


def test_token_ids_outside_the_vocabulary_are_one_error_line(tmp_path, capsys):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(200, dtype=np.int32) % 50)
    assert cli.main(["train", "--data", str(tokens), "--vocab-size", "40", "--seq-len", "8", "--steps", "2",
                     "--no-progress", "--output-dir", str(tmp_path / "run")]) == 2
    _one_error(capsys, "--data", "49", "40")
    assert not (tmp_path / "run").exists(), "nothing is written for a run that cannot start"


def test_a_missing_data_file_is_one_error_line(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "nope.bin"), "--steps", "2", "--no-progress",
                     "--output-dir", str(tmp_path / "run")]) == 2
    _one_error(capsys, "--data", "nope.bin")
