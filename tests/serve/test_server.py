"""`xlstm-jax serve` over HTTP: a real uvicorn server in a thread, on a free port, driven by `httpx` and the
`openai` client. Greedy results equal `Generator` on each prompt alone; seeded sampling is the same alone and among
other requests; streaming, stop strings, n > 1, chat, cancellation, a full queue and malformed bodies."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time

import numpy as np
import pytest

from tests.serve.conftest import ENGINE
from xlstm_jax.models.xlstm_large.generation import Generator
from xlstm_jax.serve.app import create_app
from xlstm_jax.serve.cli import load_served
from xlstm_jax.serve.engine import Engine

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

REF_TOKENS = 8  # every Generator reference runs this many new tokens (one compilation per prompt length)
TEXT = "The cat sat on the mat and"
LIMITS = dict(max_prompt_tokens=100, max_new_tokens_limit=512)


class Server:
    """The engine, the served model, the base URL and a reference `Generator` of the same model."""

    def __init__(self, model_dir: str):
        self.model, self.served = load_served(model_dir, **LIMITS)
        self.engine = Engine(self.model, **ENGINE, prefix_cache_mb=1)
        self.engine.warm_up()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.engine, self.served), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.openai = openai.OpenAI(base_url=self.url + "/v1", api_key="unused")
        self.name = self.served.name
        self._generator, self._references = Generator(self.model), {}

    def reference(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens of `Generator` on this prompt alone, stopping at the end of text as the server does."""
        key = tuple(prompt)
        if key not in self._references:
            out = self._generator([prompt], max_new_tokens=REF_TOKENS, stop_tokens=self.served.stop_token_ids)
            self._references[key] = out.tokens[0, :out.lengths[0]].tolist()
        return self._references[key][:max_tokens]

    def encode(self, text: str) -> list[int]:
        return self.served.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.served.tokenizer.decode(ids, skip_special_tokens=True)

    def wait_idle(self) -> None:
        deadline = time.monotonic() + 30
        while self.engine.stats()["active"] or self.engine.stats()["waiting"]:
            assert time.monotonic() < deadline, f"the engine is still busy: {self.engine.stats()}"
            time.sleep(0.01)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(model_dir):
    server = Server(model_dir)
    yield server
    server.close()


def sse(response) -> list:
    """The JSON payloads of a server-sent event stream; asserts it ends with [DONE]."""
    lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_models_health_and_metrics(server):
    assert server.http.get("/v1/models").json()["data"][0]["id"] == server.name
    assert [m.id for m in server.openai.models.list()] == [server.name]
    assert server.http.get("/health").json()["status"] == "ok"
    text = server.http.get("/metrics").text
    for name in ("xlstm_serve_queue_depth", "xlstm_serve_active_slots", "xlstm_serve_generated_tokens_total",
                 "xlstm_serve_tokens_per_second", "xlstm_serve_time_to_first_token_seconds_bucket",
                 "xlstm_serve_inter_token_latency_seconds_bucket"):
        assert name in text


def test_a_text_completion_equals_the_generator_on_its_prompt_alone(server):
    out = server.openai.completions.create(model=server.name, prompt=TEXT, max_tokens=REF_TOKENS, temperature=0)
    want = server.reference(server.encode(TEXT), REF_TOKENS)
    assert out.choices[0].token_ids == want and out.choices[0].text == server.decode(want)
    assert out.choices[0].finish_reason == ("length" if len(want) == REF_TOKENS else "stop")
    prompt_tokens = len(server.encode(TEXT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (prompt_tokens, len(want), prompt_tokens + len(want))


def test_token_prompts_and_n_choices(server):
    """Two token-id prompts with n = 2 greedy: four choices, prompt by prompt, each the prompt's tokens alone."""
    prompts = [server.encode(TEXT), [5, 6, 7]]
    body = {"prompt": prompts, "max_tokens": 5, "temperature": 0, "n": 2}
    out = server.http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for choice, prompt in zip(out["choices"], [prompts[0], prompts[0], prompts[1], prompts[1]]):
        assert choice["token_ids"] == server.reference(prompt, 5)
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts))
    assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in out["choices"])


def test_streaming_gives_the_same_tokens_and_text(server):
    body = {"prompt": TEXT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse(response)
    *tokens, usage = chunks
    want = server.reference(server.encode(TEXT), 6)
    assert [t for c in tokens for t in c["choices"][0]["token_ids"]] == want
    assert "".join(c["choices"][0]["text"] for c in tokens) == server.decode(want)
    assert [c["choices"][0]["finish_reason"] for c in tokens][-1] in ("length", "stop")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(want)


def test_chat_renders_the_template_and_streams(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The dog ran"}]
    prompt = server.encode(server.served.chat_template.render(messages))
    assert server.decode(prompt) == "<|system|>Be brief.\n<|user|>The dog ran\n<|assistant|>"
    want = server.reference(prompt, 6)
    out = server.openai.chat.completions.create(model=server.name, messages=messages, max_tokens=6, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == server.decode(want)
    assert out.usage.prompt_tokens == len(prompt)
    stream = server.openai.chat.completions.create(model=server.name, messages=messages, max_tokens=6,
                                                   temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == server.decode(want)


def test_stop_strings_cut_the_text_and_end_the_sequence(server):
    full = server.decode(server.reference(server.encode(TEXT), REF_TOKENS))
    start = next(i for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    want = full[:full.find(stop)]
    body = {"prompt": TEXT, "max_tokens": REF_TOKENS, "temperature": 0, "stop": [stop, "never in the text"]}
    out = server.http.post("/v1/completions", json=body).json()["choices"][0]
    assert (out["text"], out["finish_reason"]) == (want, "stop")
    with server.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = sse(response)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    server.wait_idle()


def test_seeded_sampling_is_the_same_alone_and_among_others(server):
    seeded = {"prompt": TEXT, "max_tokens": 8, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 1234}
    alone = server.http.post("/v1/completions", json=seeded).json()["choices"][0]["token_ids"]
    others = [{"prompt": list(range(3, 3 + n)), "max_tokens": 10, "temperature": t, "seed": n}
              for n, t in ((4, 0.0), (30, 0.7), (11, 1.5), (60, 1.0))]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            replies = await asyncio.gather(*(client.post("/v1/completions", json=b)
                                             for b in [*others[:2], seeded, *others[2:]]))
        return [r.json()["choices"][0]["token_ids"] for r in replies]

    assert asyncio.run(together())[2] == alone
    choices = server.http.post("/v1/completions", json={**seeded, "n": 3}).json()["choices"]
    assert choices[0]["token_ids"] == alone and len({tuple(c["token_ids"]) for c in choices}) > 1


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    cancelled = server.engine.metrics.finished.labels(finish_reason="cancelled")
    before = cancelled._value.get()
    body = {"prompt": TEXT, "max_tokens": 512, "temperature": 0, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    server.wait_idle()
    assert cancelled._value.get() == before + 1


def test_a_full_queue_answers_429_at_once_and_a_dropped_request_is_cancelled(server):
    """32 sequences (2 prompts x n = 16) fill the 4 slots and the queue; the next request gets 429; closing the
    first request's connection (no streaming) cancels all its sequences."""
    cancelled = server.engine.metrics.finished.labels(finish_reason="cancelled")
    before = cancelled._value.get()
    body = json.dumps({"prompt": [[5, 6, 7], [8, 9]], "n": 16, "max_tokens": 200, "temperature": 0}).encode()
    raw = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while server.engine.stats()["waiting"] < 20:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    refused = server.http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "n": 16})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    raw.close()
    server.wait_idle()
    assert cancelled._value.get() == before + 32


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": 2, "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 513}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": [[1, 2]] * 3, "n": 16}, "n"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": list(range(1, 102))}, "prompt"),
    ({"prompt": [1, 100000]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
])
def test_malformed_bodies_get_a_400_naming_the_field(server, body, param):
    reply = server.http.post("/v1/completions", json=body)
    assert reply.status_code == (404 if param == "model" else 400), reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_bad_chat_bodies_and_invalid_json(server):
    for body, param in (({"messages": []}, "messages"),
                        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 600},
                         "max_completion_tokens")):
        reply = server.http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    reply = server.http.post("/v1/completions", json={"prompt": [1, True]})
    assert reply.json()["error"]["message"] == "prompt must be one of: str, list[str], list[int], list[list[int]]"
    reply = server.http.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="echo"):
        server.openai.completions.create(model=server.name, prompt="x", echo=True)


def test_32_concurrent_clients_each_get_their_prompt_alone(server):
    """32 clients at once (half streaming), prompts of 3, 16 and 46 tokens (one, one and two prefill chunks; the
    lengths of the other tests' prompts, whose Generator runs are compiled already) with different tokens, greedy:
    each result equals the Generator on that prompt alone, through 4 slots."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, server.engine.config.vocab_size, (3, 16, 46)[i % 3]).tolist() for i in range(32)]

    async def one(client, number, prompt):
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": number % 2 == 1}
        if not body["stream"]:
            return (await client.post("/v1/completions", json=body)).json()["choices"][0]["token_ids"]
        async with client.stream("POST", "/v1/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
        return [t for line in lines for t in json.loads(line[6:])["choices"][0]["token_ids"]]

    async def everyone():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, n, p) for n, p in enumerate(prompts)))

    results = asyncio.run(everyone())
    for prompt, tokens in zip(prompts, results):
        assert tokens == server.reference(prompt, 6)
    server.wait_idle()


def test_a_model_without_tokenizer_takes_token_ids_only(server):
    """The same model served without a tokenizer (as a token-file run exports it): token ids in, token ids out;
    text, stop strings and chat are refused naming the field."""
    from fastapi.testclient import TestClient

    served = dataclasses.replace(server.served, tokenizer=None, chat_template=None, stop_token_ids=())
    engine = Engine(server.model, **ENGINE)
    engine.warm_up()
    with TestClient(create_app(engine, served)) as client:
        out = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}).json()
        assert out["choices"][0]["text"] == "" and len(out["choices"][0]["token_ids"]) == 4
        for route, body, param in (("/v1/completions", {"prompt": "text"}, "prompt"),
                                   ("/v1/completions", {"prompt": [5], "stop": ["x"]}, "stop"),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                                    "messages")):
            reply = client.post(route, json=body)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
