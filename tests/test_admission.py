"""Admission control: the bookkeeping (server/admission.py) and, over real HTTP, the 429 that a
full queue answers at once, with Retry-After and OpenAI's rate-limit envelope."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from server.admission import Admission, AdmissionLimits, Overloaded
from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings

PROMPT = "Write a long story about a lighthouse keeper."


def test_bounds_count_generations_and_a_refusal_counts_nothing():
    admission = Admission(AdmissionLimits(max_queued=6, max_queued_per_tenant=3, max_in_flight_per_tenant=4))
    a = admission.admit("a", 2)
    with pytest.raises(Overloaded) as refused:
        admission.admit("a", 2)  # 4 queued for tenant a > 3
    assert refused.value.reason == "tenant_queue_full" and refused.value.retry_after_s >= 1
    b = admission.admit("b", 3)
    with pytest.raises(Overloaded, match="at most 6") as refused:
        admission.admit("c", 2)  # 7 queued server-wide > 6
    assert refused.value.reason == "queue_full"
    a.started()  # a's prompt went through: it no longer counts as queued, still in flight
    a.started()
    assert admission.num_queued == 3
    a2 = admission.admit("a", 2)
    with pytest.raises(Overloaded) as refused:
        admission.admit("a", 1)  # 2 running + 2 queued + 1 > 4 in flight
    assert refused.value.reason == "tenant_concurrency"
    for ticket in (a, a2, b, a, b):  # closing twice is harmless
        ticket.close()
    assert admission.num_queued == 0
    assert not admission._queued_by_tenant and not admission._in_flight_by_tenant  # no entries left behind


def test_queued_prompt_tokens_are_bounded_too():
    admission = Admission(AdmissionLimits(max_queued_tokens=1000, max_queued_tokens_per_tenant=600))
    a = admission.admit("a", 1, prompt_tokens=500)
    with pytest.raises(Overloaded) as refused:
        admission.admit("a", 1, prompt_tokens=200)  # 700 of tenant a's > 600
    assert refused.value.reason == "tenant_queued_tokens"
    b = admission.admit("b", 2, prompt_tokens=450)
    with pytest.raises(Overloaded) as refused:
        admission.admit("c", 1, prompt_tokens=100)  # 1050 > 1000 server-wide
    assert refused.value.reason == "queued_tokens"
    a.started()  # prefilled: its tokens no longer wait
    c = admission.admit("c", 1, prompt_tokens=500)
    for ticket in (a, b, c):
        ticket.close()
    assert admission._queued_tokens == 0 and not admission._queued_tokens_by_tenant


def test_zero_means_no_bound():
    admission = Admission(AdmissionLimits())
    tickets = [admission.admit("a", 100) for _ in range(50)]
    assert admission.num_queued == 5000
    for ticket in tickets:
        ticket.close()
    assert admission.num_queued == 0


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    """One sequence runs at a time, so later requests stay queued behind it."""
    settings = Settings.from_env(device="cpu", max_num_seqs=1, num_kv_blocks=128, max_model_len=512,
                                 max_queued_requests=2, max_queued_requests_per_tenant=0,
                                 adapter_store=str(tmp_path_factory.mktemp("adapters")), served_model_name="")
    with BackgroundServer(create_app(settings)) as running:
        yield running


def _waiting(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("loraplex_num_requests_waiting "):
            return float(line.split()[1])
    raise AssertionError("no loraplex_num_requests_waiting in /metrics")


def test_a_full_queue_answers_429_at_once_and_the_queued_requests_still_finish(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPT, "max_tokens": 48, "ignore_eos": True, "temperature": 0}
        results: list[httpx.Response] = []

        def send(**extra):
            with httpx.Client(base_url=server.url, timeout=120) as own:
                results.append(own.post("/v1/completions", json={**body, **extra}))

        first_token = threading.Event()

        def stream_long():
            with httpx.Client(base_url=server.url, timeout=120) as own:
                with own.stream("POST", "/v1/completions", json={**body, "max_tokens": 160, "stream": True}) as r:
                    lines = []
                    for line in r.iter_lines():
                        if line:
                            first_token.set()
                            lines.append(line)
            results.append(httpx.Response(r.status_code if lines[-1] == "data: [DONE]" else 599))

        running = threading.Thread(target=stream_long)
        running.start()
        assert first_token.wait(60)  # the first request runs (and is no longer queued)
        deadline = time.monotonic() + 60
        queued = [threading.Thread(target=send) for _ in range(2)]
        for thread in queued:
            thread.start()
        while _waiting(client) < 2:  # both queued behind the running one
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.05)

        start = time.monotonic()
        refused = client.post("/v1/completions", json=body)
        assert time.monotonic() - start < 1.0  # answered at once, not after the queue
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full" and "at most 2" in error["message"]
        official = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            official.completions.create(model=model, prompt=PROMPT, max_tokens=4)

        for thread in [running, *queued]:
            thread.join(120)
        assert [r.status_code for r in results] == [200, 200, 200]  # nothing admitted was lost
        assert client.post("/v1/completions", json=body).status_code == 200  # room again
        metrics = client.get("/metrics").text
        assert 'loraplex_requests_rejected_total{reason="queue_full"} 2.0' in metrics


def test_the_bounds_come_from_flags_and_the_environment(monkeypatch):
    from server.cli import build_parser, serve_settings

    monkeypatch.setenv("LORAPLEX_MAX_QUEUED_REQUESTS_PER_TENANT", "9")
    settings = serve_settings(build_parser().parse_args(["serve", "--max-queued-requests", "7",
                                                         "--max-queued-tokens-per-tenant", "0"]))
    assert (settings.max_queued_requests, settings.max_queued_requests_per_tenant) == (7, 9)
    assert (settings.max_queued_tokens_per_tenant, settings.max_requests_per_tenant) == (0, 0)
    with pytest.raises(ValueError, match="admission bounds"):
        Settings(max_queued_requests=-1).validate()


def test_an_oversized_request_body_gets_413_and_uvicorn_bounds_connections(server):
    """Generation request bodies past LORAPLEX_MAX_REQUEST_BODY_BYTES (here the default, 16 MiB)
    are refused on the declared size, and a chunked one as soon as it passes the limit."""
    from server.api.app import uvicorn_limits

    assert uvicorn_limits(Settings(max_connections=12)) == {"limit_concurrency": 12}
    assert uvicorn_limits(Settings(max_connections=0)) == {"limit_concurrency": None}
    limit = Settings().max_request_body_bytes
    with httpx.Client(base_url=server.url, timeout=60) as client:
        big = b'{"model": "x", "prompt": "' + b"a" * limit + b'"}'
        response = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"

        def chunked():
            yield b'{"model": "x", "prompt": "'
            for _ in range(20):
                yield b"a" * (1 << 20)
            yield b'"}'

        response = client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and "LORAPLEX_MAX_REQUEST_BODY_BYTES" in response.json()["error"]["message"]
        assert client.get("/health").status_code == 200
