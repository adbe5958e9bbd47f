"""`xlstm-jax serve` as a command: a model directory that does not load is one error line and exit status 2; the
real command serves, and SIGTERM lets a running stream finish, then shuts the app down and ends the process by the
signal (uvicorn re-raises it after its graceful shutdown, so a shell sees status 143)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from xlstm_jax import cli

httpx = pytest.importorskip("httpx")


def test_a_directory_that_does_not_load_is_one_error_line(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MODEL: cannot load") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("mesh,reason", [("bogus=2", "unknown axis 'bogus'"), ("data=2", "multiply to 2"),
                                         ("sequence=1,fsdp=1,data=1,tensor=1", None)])
def test_a_mesh_that_does_not_fit_is_one_error_line(model_dir, mesh, reason, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)  # a mesh that fits: no server is started
    status = cli.main(["serve", model_dir, "--mesh", mesh, "--max-slots", "2", "--prefill-chunk", "16"])
    err = capsys.readouterr().err
    if reason is None:
        assert status == 0
    else:
        assert status == 2 and err.startswith("error: --mesh:") and reason in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_drains_a_running_stream_and_exits(model_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "xlstm_jax.cli", "serve", model_dir, "--port", str(port), "--max-slots", "2",
               "--prefill-chunk", "16", "--max-new-tokens-limit", "300"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": [5, 6, 7], "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            payloads = [next(line for line in lines if line.startswith("data: "))]
            process.send_signal(signal.SIGTERM)
            payloads += [line for line in lines if line.startswith("data: ")]
        assert payloads[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in payloads[:-1]]
        finish = chunks[-1]["choices"][0]["finish_reason"]
        tokens = sum(len(c["choices"][0]["token_ids"]) for c in chunks)
        assert finish == "length" and tokens == 300 or finish == "stop" and tokens < 300
        assert process.wait(60) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert "serving 'serve-tiny-xlstm' (text and token ids, with chat)" in output, output
    assert "Application shutdown complete" in output, output
