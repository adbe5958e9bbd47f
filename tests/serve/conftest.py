"""The serving tests' model: a tiny random xLSTM saved with `save_pretrained` next to a byte-level BPE tokenizer
trained here and a chat template in its tokenizer_config.json, made once per test run (pytest-xdist workers share
it under a file lock); the engine settings every test shares (one set, so the compiled shapes are shared too)."""

from __future__ import annotations

import fcntl
import json
import os
import random

import pytest

from tests.support.xlstm_large_helpers import random_model, tiny_config
from xlstm_jax.models.xlstm_large.checkpoint import save_pretrained

END = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ENGINE = dict(max_slots=4, max_queue=32, prefill_chunk=32)  # prefill buckets 16 and 32


def corpus(seed: int, sentences: int = 300) -> str:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "blue", "green", "slowly",
             "recurrent", "state", "token", "model", "serve", "request"]
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ". "
                   for _ in range(sentences))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, the same for every xdist worker
    directory = str(shared / "serve-tiny-xlstm")
    with open(shared / "serve-tiny-xlstm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(directory, "config.json")):
            write_model_dir(directory)
    return directory


def write_model_dir(directory: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text_file = os.path.join(os.path.dirname(directory), "serve-corpus.txt")
    with open(text_file, "w", encoding="utf-8") as fh:
        fh.write(corpus(0))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([text_file], trainers.BpeTrainer(vocab_size=300, special_tokens=[END],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    end = tokenizer.token_to_id(END)
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), num_blocks=1, bos_token_id=end, eos_token_id=end,
                         pad_token_id=end, igate_bias_init=0.0)
    save_pretrained(random_model(config, seed=3), directory, tokenizer=tokenizer)
    settings_file = os.path.join(directory, "tokenizer_config.json")
    with open(settings_file, encoding="utf-8") as fh:
        settings = json.load(fh)
    settings["chat_template"] = CHAT_TEMPLATE
    with open(settings_file, "w", encoding="utf-8") as fh:
        json.dump(settings, fh)
