"""SIGTERM on the real server (`python -m server.cli serve`, the default model on the CPU) drains it
(server/api/drain.py): /ready turns 503 at once, new requests get 503 with Retry-After, a stream
in flight finishes whole, or, past LORAPLEX_DRAIN_SECONDS, ends with an explicit error event
instead of a cut connection; then the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from loadtest.server_process import ServerProcess, free_port

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


@pytest.fixture
def start_server(tmp_path, default_model_dir):
    servers = []

    def start(drain_seconds: float) -> ServerProcess:
        env = dict(os.environ, LORAPLEX_DRAIN_SECONDS=str(drain_seconds), PYTHONPATH=str(REPO))
        server = ServerProcess(["--device", "cpu", "--model", str(default_model_dir), "--home", str(tmp_path / "home"),
                                "--adapter-store", str(tmp_path / "adapters"), "--max-num-seqs", "4"],
                               env, tmp_path / "server.log", REPO, HOST, free_port())
        servers.append(server)
        server.start()
        server.wait_ready(240)
        return server

    yield start
    for server in servers:
        server.stop()


class Stream(threading.Thread):
    """One streaming completion read to its end on a thread: its data payloads, parsed."""

    def __init__(self, server: ServerProcess, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.model = f"{server.base_url}/v1/completions", max_tokens, _model_name(server)
        self.events: list = []
        self.first_token = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        body = {"model": self.model, "prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", self.url, json=body, timeout=120) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        payload = line.removeprefix("data: ")
                        self.events.append(payload if payload == "[DONE]" else json.loads(payload))
                        self.first_token.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.failure = exc
            self.first_token.set()


def _model_name(server: ServerProcess) -> str:
    return httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def _signal_and_check_draining(server: ServerProcess, model: str) -> None:
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2.0
    while True:  # the signal is handled within a few event-loop turns
        ready = httpx.get(f"{server.base_url}/ready", timeout=5)
        if ready.status_code == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert ready.status_code == 503 and ready.json() == {"status": "draining"}
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200  # alive, only not ready
    refused = httpx.post(f"{server.base_url}/v1/completions", timeout=5,
                         json={"model": model, "prompt": "hi", "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "shutting down" in refused.json()["error"]["message"]


def test_sigterm_lets_a_stream_in_flight_finish_then_exits_0(start_server):
    server = start_server(drain_seconds=60)
    stream = Stream(server, max_tokens=40)
    stream.start()
    assert stream.first_token.wait(60) and stream.failure is None
    signalled = time.monotonic()
    _signal_and_check_draining(server, stream.model)
    stream.join(60)
    assert not stream.is_alive() and stream.failure is None
    *chunks, usage, done = stream.events
    assert done == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["usage"]["completion_tokens"] == 40  # every token, none cut
    assert server.proc.wait(30) == 0
    assert time.monotonic() - signalled < 30
    assert "drained in" in server.log_path.read_text()


def test_past_the_drain_period_a_stream_ends_with_an_error_event_and_the_server_exits_0(start_server):
    server = start_server(drain_seconds=1)
    stream = Stream(server, max_tokens=3000)  # minutes of CPU decoding: far past the drain period
    stream.start()
    assert stream.first_token.wait(60) and stream.failure is None
    signalled = time.monotonic()
    _signal_and_check_draining(server, stream.model)
    stream.join(30)
    assert not stream.is_alive() and stream.failure is None  # the stream ended; the connection was not cut
    errors = [e for e in stream.events if isinstance(e, dict) and "error" in e]
    assert errors and "shutting down" in errors[0]["error"]["message"]
    assert stream.events[-1] == "[DONE]"
    assert server.proc.wait(30) == 0
    assert time.monotonic() - signalled < 20
