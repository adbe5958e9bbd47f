"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI): `POST /v1/completions`, `POST /v1/chat/completions`
(models with a chat template), server-sent events with `stream: true`, `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus text).

Requests become engine requests (one per prompt and choice); their tokens come back from the engine's thread
through `loop.call_soon_threadsafe` into one asyncio queue per HTTP request, so the event loop never waits on the
engine and the engine never waits on a client. Stop strings are found here, in the decoded text, and cancel their
sequence in the engine; a client that disconnects cancels all of its sequences. Errors are JSON bodies
`{"error": {"message", "type", "param", "code"}}`: 400 naming the field, 429 when the queue is full, 500 for a
failed sequence, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
import uuid
from typing import Any, AsyncIterator

import jinja2
import numpy as np
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from xlstm_jax.serve.engine import Engine
from xlstm_jax.serve.requests import Event, QueueFull, Request, SamplingParams
from xlstm_jax.serve.schemas import MAX_STOP, ChatRequest, CompletionRequest
from xlstm_jax.serve.text import ChatTemplate, TextStream


@dataclasses.dataclass(frozen=True)
class Served:
    """The model as the API shows it: the name clients address it by, its tokenizer (None: token ids only), the
    stop token ids every request gets (the end of text), the chat template (None: no chat), and the limits."""

    name: str
    tokenizer: Any
    stop_token_ids: tuple[int, ...]
    chat_template: ChatTemplate | None
    max_prompt_tokens: int
    max_new_tokens_limit: int


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.+\]|dict\[.+\])$")  # pydantic's tag of a union's branch


def _path(error: dict) -> list[str]:
    return [str(part) for part in error.get("loc", ()) if part != "body"]


def _validation_error(err: RequestValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the top-level field (for a value that fits none of a
    field's types, the types it may have)."""
    errors = err.errors()
    first, path = errors[0], _path(errors[0])
    if first.get("type") == "json_invalid" or not path:
        return ApiError(400, f"the request body is not a valid JSON object: {first.get('msg')}")
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown field {'.'.join(path)!r}", param=path[0], code="unknown_field")
    tag = next((i for i, part in enumerate(path) if _UNION_MEMBER.match(part)), None)
    if tag is not None:
        kinds = dict.fromkeys(p[tag] for p in map(_path, errors) if len(p) > tag and p[:tag] == path[:tag])
        return ApiError(400, f"{'.'.join(path[:tag])} must be one of: {', '.join(kinds)}", param=path[0],
                        code="invalid_type")
    return ApiError(400, f"{'.'.join(path)}: {first.get('msg')}", param=path[0], code="invalid_value")


@dataclasses.dataclass
class _Sequence:
    request: Request
    prompt_index: int
    text: TextStream | None
    ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


def create_app(engine: Engine, served: Served) -> FastAPI:
    """The app; its lifespan starts the engine's thread and, at shutdown, drains and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="xlstm-jax serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, err: RequestValidationError) -> JSONResponse:
        problem = _validation_error(err)
        return JSONResponse(problem.body(), status_code=problem.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served.name, "object": "model", "created": 0, "owned_by": "xlstm-jax"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest) -> Any:
        params = _check(body, body.max_tokens or 16)
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], str)):
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            prompts = [_encode(text, "prompt") for text in texts]
        else:
            prompts = [body.prompt] if not body.prompt or isinstance(body.prompt[0], int) else body.prompt
        return await _respond("text_completion", body, params, _checked(prompts, body.n, "prompt"), http)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest) -> Any:
        params = _check(body, body.max_completion_tokens or body.max_tokens or served.max_new_tokens_limit)
        if served.chat_template is None:
            raise ApiError(400, f"model {served.name!r} has no chat template (tokenizer_config.json 'chat_template' "
                                "or chat_template.jinja); use /v1/completions.", "messages", "no_chat_template")
        try:
            text = served.chat_template.render([m.as_template_input() for m in body.messages])
        except jinja2.TemplateError as err:  # the template's raise_exception, or an error in the template
            raise ApiError(400, f"the chat template refused the messages: {err}", "messages") from None
        return await _respond("chat.completion", body, params, _checked([_encode(text, "messages")], body.n,
                                                                        "messages"), http)

    def _check(body: Any, max_tokens: int) -> SamplingParams:
        """The sampling parameters of a request body (ApiError for what the schema cannot say)."""
        refused = body.unsupported()
        if refused is not None:
            raise ApiError(400, refused[1], refused[0], "unsupported")
        if body.model is not None and body.model != served.name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {served.name!r}.",
                           "model", "model_not_found")
        if max_tokens > served.max_new_tokens_limit:
            name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(400, f"{name} must be at most {served.max_new_tokens_limit} (--max-new-tokens-limit), "
                                f"got {max_tokens}.", name)
        stops = body.stop_strings()
        if len(stops) > MAX_STOP or not all(stops):
            raise ApiError(400, f"stop takes at most {MAX_STOP} non-empty strings, got {stops!r}.", "stop")
        if stops and served.tokenizer is None:
            raise ApiError(400, "stop strings need a tokenizer, and this model has none.", "stop")
        temperature = body.temperature if body.temperature >= np.finfo(np.float32).tiny else 0.0
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=body.top_k, top_p=body.top_p,
                              seed=body.seed, stop_token_ids=served.stop_token_ids)

    def _encode(text: str, field: str) -> list[int]:
        if served.tokenizer is None:
            raise ApiError(400, f"model {served.name!r} has no tokenizer (tokenizer.json), so text cannot be "
                                "encoded; send token ids.", field, "no_tokenizer")
        return served.tokenizer.encode(text, add_special_tokens=False).ids

    def _checked(prompts: list[list[int]], n: int, field: str) -> list[list[int]]:
        vocab = engine.config.vocab_size
        if not prompts:
            raise ApiError(400, f"{field} holds no prompt.", field)
        for number, prompt in enumerate(prompts):
            if not prompt:
                raise ApiError(400, f"{field} {number} holds no tokens.", field)
            if len(prompt) > served.max_prompt_tokens:
                raise ApiError(400, f"{field} {number} has {len(prompt)} tokens, more than the limit of "
                                    f"{served.max_prompt_tokens} (--max-prompt-tokens).", field, "prompt_too_long")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ApiError(400, f"{field} {number} holds token ids outside [0, {vocab}).", field)
        if len(prompts) * n > engine.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts x n = {n} sequences exceed the queue of "
                                f"{engine.max_queue} (--max-queue).", "n")
        return prompts

    async def _respond(kind: str, body: Any, params: SamplingParams, prompts: list[list[int]],
                       http: HttpRequest) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        sequences = []
        for prompt_index, prompt in enumerate(prompts):
            for choice in range(body.n):
                index = len(sequences)

                def on_event(event: Event, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))

                request = Request(prompt, dataclasses.replace(params, choice=choice), on_event)
                text = None if served.tokenizer is None else TextStream(served.tokenizer, prompt,
                                                                        body.stop_strings())
                sequences.append(_Sequence(request, prompt_index, text))
        try:
            engine.submit([s.request for s in sequences])
        except QueueFull as err:
            raise ApiError(429, str(err), None, "queue_full", "rate_limit_error") from None
        except RuntimeError as err:
            raise ApiError(503, str(err), None, "unavailable", "server_error") from None
        reply = _Reply(kind, served.name, sequences, prompts)
        updates = _updates(engine, sequences, events)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(engine, reply, updates, usage), media_type="text/event-stream")
        collect = asyncio.create_task(_drain(updates))
        gone = asyncio.create_task(_disconnected(http))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():  # the client left
                collect.cancel()
                return Response(status_code=499)
            collect.result()
        finally:
            gone.cancel()
            _cancel(engine, sequences)
        return JSONResponse(reply.whole())

    return app


async def _updates(engine: Engine, sequences: list[_Sequence], events: asyncio.Queue
                   ) -> AsyncIterator[tuple[int, str, list[int], str | None]]:
    """(sequence, new text, new token ids, finish reason or None) as the engine's events arrive; a stop string
    ends its sequence (cancelled in the engine); an engine error raises ApiError (500)."""
    open_ = set(range(len(sequences)))
    while open_:
        index, event = await events.get()
        if index not in open_:
            continue
        seq = sequences[index]
        if event.error is not None:
            raise ApiError(500, event.error, None, "generation_failed", "server_error")
        delta, new, finish = "", [], event.finish_reason
        for token in event.token_ids:
            new.append(token)
            if seq.text is not None:
                delta += seq.text.add(token)
                if seq.text.stopped:
                    finish = "stop"
                    engine.cancel(seq.request)
                    break
        if finish is not None and seq.text is not None and not seq.text.stopped:
            delta += seq.text.rest()
        seq.ids += new
        if finish is not None:
            seq.finish_reason = finish
            open_.discard(index)
        yield index, delta, new, finish


async def _drain(updates: AsyncIterator) -> None:
    async for _ in updates:
        pass


async def _disconnected(http: HttpRequest) -> None:
    """Returns once the client has gone (the ASGI server's http.disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _cancel(engine: Engine, sequences: list[_Sequence]) -> None:
    for seq in sequences:
        if not seq.request.done:
            engine.cancel(seq.request)


async def _stream(engine: Engine, reply: _Reply, updates: AsyncIterator, usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per update, the usage chunk when asked for, `data: [DONE]`; the sequences
    are cancelled when the client goes away (the response task is cancelled here)."""
    try:
        for chunk in reply.opening():
            yield _sse(chunk)
        try:
            async for index, delta, new, finish in updates:
                yield _sse(reply.chunk(index, delta, new, finish))
        except ApiError as err:
            yield _sse(err.body())
        else:
            if usage:
                yield _sse(reply.chunk_usage())
        yield "data: [DONE]\n\n"
    finally:
        _cancel(engine, reply.sequences)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Reply:
    """The response objects of one request, in OpenAI's shapes; each choice also carries its generated
    `token_ids` (an extension that OpenAI clients ignore)."""

    def __init__(self, kind: str, model: str, sequences: list[_Sequence], prompts: list[list[int]]):
        self.kind, self.model, self.sequences, self.prompts = kind, model, sequences, prompts
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(s.ids) for s in self.sequences)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _text(self, seq: _Sequence) -> str:
        return "" if seq.text is None else seq.text.text

    def whole(self) -> dict:
        choices = []
        for index, seq in enumerate(self.sequences):
            choice = {"index": index, "logprobs": None, "finish_reason": seq.finish_reason, "token_ids": seq.ids}
            if self.kind == "chat.completion":
                choice["message"] = {"role": "assistant", "content": self._text(seq)}
            else:
                choice["text"] = self._text(seq)
            choices.append(choice)
        return {**self._head(self.kind), "choices": choices, "usage": self.usage()}

    def opening(self) -> list[dict]:
        """Chat streams open every choice with the assistant's role; completion streams have no opening."""
        if self.kind != "chat.completion":
            return []
        return [{**self._head("chat.completion.chunk"), "choices": [
            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]} for index in range(len(self.sequences))]

    def chunk(self, index: int, delta: str, new: list[int], finish: str | None) -> dict:
        choice = {"index": index, "logprobs": None, "finish_reason": finish, "token_ids": new}
        if self.kind == "chat.completion":
            choice["delta"] = {"content": delta} if delta else {}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice["text"] = delta
        return {**self._head("text_completion"), "choices": [choice]}

    def chunk_usage(self) -> dict:
        name = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {**self._head(name), "choices": [], "usage": self.usage()}
