"""The tokenizer that travels with a model: `tokenizer.json` (the `tokenizers` file) next to the weights, with the
`tokenizer_config.json` and `special_tokens_map.json` entries that let `transformers.AutoTokenizer.from_pretrained`
load the directory as a fast tokenizer.

The special tokens are named by the model config's `bos_token_id`, `eos_token_id` and `pad_token_id` (None: no
such token). `special_token_ids(tokenizer, eos_id)` derives those ids from a tokenizer's own special tokens (an
end-of-text token such as `<|endoftext|>` or `</s>`, a begin and a padding token), which is what the training
job writes into the config of the model it exports.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from xlstm_jax.models.xlstm_large.checkpoint_files import training_export

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)

# Spellings of each role among the special tokens of common tokenizers, most usual first.
_ROLE_NAMES = {
    "eos": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eos|>"),
    "bos": ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[BOS]", "<|bos|>"),
    "pad": ("<|padding|>", "<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}


def read_tokenizer(path: str) -> Any:
    """The `tokenizers.Tokenizer` of a tokenizer.json file; ValueError naming the file when it does not load."""
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {path} does not exist" + (" as a file" if os.path.exists(path) else ""))
    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises plain Exception for malformed files
        raise ValueError(f"tokenizer {path} does not load: {err}") from err


def load_tokenizer(path: str) -> Any:
    """The `tokenizers.Tokenizer` saved with the model in directory `path` (`path/tokenizer.json`; for an
    `xlstm-jax train` output directory, that of its `model/` export), or None when the directory has none."""
    file = os.path.join(training_export(os.fspath(path)), TOKENIZER_FILE)
    return read_tokenizer(file) if os.path.exists(file) else None


def _role_tokens(tokenizer: Any) -> dict[str, int]:
    """role -> id of the tokenizer's special token for it (eos, bos, pad, unk), for the roles it has."""
    special = {token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()
               if token.special}
    found = {}
    for role, names in _ROLE_NAMES.items():
        token_id = next((special[name] for name in names if name in special), None)
        if token_id is not None:
            found[role] = token_id
    return found


def special_token_ids(tokenizer: Any = None, eos_id: int | None = None) -> dict[str, int | None]:
    """bos_token_id, eos_token_id and pad_token_id for a model config: the end of text is `eos_id` when given, else
    the tokenizer's end-of-text token; begin and padding are the tokenizer's own tokens for them, else the end of
    text (as GPT-2's tokenizer does). None where there is no such token (no tokenizer and no eos_id)."""
    roles = _role_tokens(tokenizer) if tokenizer is not None else {}
    eos = eos_id if eos_id is not None else roles.get("eos")
    return {"bos_token_id": roles.get("bos", eos), "eos_token_id": eos, "pad_token_id": roles.get("pad", eos)}


def end_of_text_id(tokenizer: Any, directory: str | None = None) -> int | None:
    """The id of the tokenizer's end-of-text token, or None: the `eos_token` of `directory/tokenizer_config.json`
    (as `transformers` saves it) when that names a token of the tokenizer, else its special token spelled as an end
    of text (`<|endoftext|>`, `</s>`, ...). ValueError when that file is not a JSON object."""
    file = None if directory is None else os.path.join(directory, TOKENIZER_CONFIG_FILE)
    if file is not None and os.path.isfile(file):
        try:
            with open(file, encoding="utf-8") as fh:
                settings = json.load(fh)
        except ValueError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None
        if not isinstance(settings, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(settings).__name__}")
        eos = settings.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return tokenizer.token_to_id(eos)
    return _role_tokens(tokenizer).get("eos")


def tokenizer_writers(tokenizer: Any, config: Any) -> dict[str, Callable[[str], None]]:
    """File name -> function writing it, for the tokenizer files saved next to a model with `config`
    (`xLSTMLargeConfig`). ValueError when the tokenizer has ids beyond the model's vocabulary."""
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"tokenizer: its {tokenizer.get_vocab_size()} tokens do not fit the model's vocabulary "
                         f"(vocab_size {config.vocab_size}).")
    roles = {"bos": config.bos_token_id, "eos": config.eos_token_id, "pad": config.pad_token_id,
             "unk": _role_tokens(tokenizer).get("unk")}
    special = {f"{role}_token": tokenizer.id_to_token(token_id) for role, token_id in roles.items()
               if token_id is not None and tokenizer.id_to_token(token_id) is not None}
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 10**30,
                "clean_up_tokenization_spaces": False, **special}

    def text(content: str) -> Callable[[str], None]:
        def write(file: str) -> None:
            with open(file, "w", encoding="utf-8") as fh:
                fh.write(content)

        return write

    return {TOKENIZER_FILE: text(tokenizer.to_str()),
            TOKENIZER_CONFIG_FILE: text(json.dumps(settings, indent=2)),
            SPECIAL_TOKENS_FILE: text(json.dumps(special, indent=2))}
