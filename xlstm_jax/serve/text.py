"""Text around the token ids: the streamed continuation of one generated sequence (stop strings, characters split
across tokens) and the chat template of the tokenizer config (rendered as `transformers` renders it)."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

from xlstm_jax.generate_cli import continuation
from xlstm_jax.models.xlstm_large.tokenizer import TOKENIZER_CONFIG_FILE

CONTEXT_TOKENS = 8  # prompt tokens the continuation is decoded after (a word or character split at the border)
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TextStream:
    """The text of one generated sequence as its tokens arrive: decoded after the prompt's last tokens, cut before
    the first stop string; `add` hands out only text that can no longer change (not the start of a stop string,
    not an unfinished character)."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int], stop: Sequence[str]):
        self.tokenizer, self.context, self.stop = tokenizer, list(prompt[-CONTEXT_TOKENS:]), tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the continuation so far (cut at a stop string)
        self.sent = 0  # characters of it handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text that `token` makes final; sets `stopped` when a stop string appears."""
        self.ids.append(token)
        text = continuation(self.tokenizer, self.context, self.ids)
        hits = [index for index in (text.find(s) for s in self.stop) if index >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self.rest()
        self.text = text
        held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        final = len(text) - held
        while final > self.sent and text[final - 1] == "\ufffd":
            final -= 1
        delta = text[self.sent:final] if final > self.sent else ""
        self.sent = max(self.sent, final)
        return delta

    def rest(self) -> str:
        """The text not handed out yet (at the end of the sequence)."""
        delta, self.sent = self.text[self.sent:], max(self.sent, len(self.text))
        return delta


class ChatTemplate:
    """The Jinja chat template of a model directory (`chat_template` in tokenizer_config.json, or
    chat_template.jinja), rendered in a sandbox with the helpers `transformers` gives templates (`raise_exception`,
    `strftime_now`, a `tojson` that keeps non-ASCII) and the special tokens of the config."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    @classmethod
    def load(cls, directory: str) -> ChatTemplate | None:
        """The directory's template, or None when it has none; ValueError naming the file when it is malformed."""
        config_file = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        settings: dict = {}
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as fh:
                    settings = json.load(fh)
            except ValueError as err:
                raise ValueError(f"{config_file} is not valid JSON: {err}") from None
        source = settings.get("chat_template") if isinstance(settings, dict) else None
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        jinja_file = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if source is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as fh:
                source = fh.read()
        if source is None:
            return None
        if not isinstance(source, str):
            raise ValueError(f"{config_file}: chat_template must be a string, got {type(source).__name__}.")
        special = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = settings.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[name] = value
        import jinja2

        try:
            return cls(source, special)
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template of {directory} does not compile: {err}") from None

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages` ([{"role", "content"}]), ending with the assistant's turn opened; raises
        jinja2's TemplateError (e.g. from the template's raise_exception) for conversations it refuses."""
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
