"""Request deadlines over real HTTP: the client's X-Request-Timeout, capped by the server's
LORAPLEX_MAX_REQUEST_SECONDS, ends a generation, running or still queued, with an explicit
error (504 deadline_exceeded, or an error event in a stream), and frees what it held."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings

SERVER_MAX_S = 1.5
PROMPT = "Write a long story about a lighthouse keeper."


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    settings = Settings.from_env(device="cpu", max_num_seqs=1, num_kv_blocks=128, max_model_len=1024,
                                 max_request_seconds=SERVER_MAX_S,
                                 adapter_store=str(tmp_path_factory.mktemp("adapters")), served_model_name="")
    with BackgroundServer(create_app(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def long_body(http):
    model = http.get("/v1/models").json()["data"][0]["id"]
    return {"model": model, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "temperature": 0}


def _gauge(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name}")


def _wait_idle(http) -> None:
    deadline = time.monotonic() + 10
    while _gauge(http, "loraplex_num_requests_running") or _gauge(http, "loraplex_num_requests_waiting"):
        assert time.monotonic() < deadline, "a timed-out request kept running"
        time.sleep(0.05)


@pytest.mark.parametrize("header, expected_s", [("0.4", 0.4), (None, SERVER_MAX_S), ("100", SERVER_MAX_S)])
def test_a_generation_past_its_deadline_gets_504(http, long_body, header, expected_s):
    headers = {"X-Request-Timeout": header} if header else {}
    start = time.monotonic()
    response = http.post("/v1/completions", json=long_body, headers=headers)
    elapsed = time.monotonic() - start
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["type"] == "timeout_error" and error["code"] == "deadline_exceeded" and "deadline" in error["message"]
    assert expected_s <= elapsed < expected_s + 1.5
    _wait_idle(http)  # the sequence is gone, its blocks back


def test_a_stream_past_its_deadline_ends_with_an_error_event(http, long_body):
    with http.stream("POST", "/v1/completions", json={**long_body, "stream": True},
                     headers={"X-Request-Timeout": "0.8"}) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    assert any(json.loads(e).get("choices") for e in events[:-2])  # text streamed before the deadline
    _wait_idle(http)


def test_a_queued_request_times_out_too(http, long_body):
    results = {}

    def run(name, timeout):
        results[name] = http.post("/v1/completions", json=long_body, headers={"X-Request-Timeout": timeout})

    first = threading.Thread(target=run, args=("running", "1.2"))
    first.start()
    time.sleep(0.3)  # the first holds the one sequence slot
    start = time.monotonic()
    run("queued", "0.3")
    assert results["queued"].status_code == 504 and time.monotonic() - start < 1.0  # before the first ends
    first.join(30)
    assert results["running"].status_code == 504
    _wait_idle(http)


@pytest.mark.parametrize("value", ["abc", "-1", "0", "inf", "nan", ""])
def test_a_bad_timeout_header_is_a_400(http, long_body, value):
    response = http.post("/v1/completions", json={**long_body, "max_tokens": 2}, headers={"X-Request-Timeout": value})
    assert response.status_code == 400 and "X-Request-Timeout" in response.json()["error"]["message"]


def test_requests_within_their_deadline_are_untouched(http, long_body):
    response = http.post("/v1/completions", json={**long_body, "max_tokens": 3}, headers={"X-Request-Timeout": "30"})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
