"""Two replicas over real HTTP on 127.0.0.1, sharing one adapter store directory: an upload to
one is served by the other, a replacement on the second is served by the first, a delete is a 404
on both, and a request running on one replica finishes on its version while the other replaces
it; the retired version's files go once the retention has passed."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings
from server.model.config import ModelConfig
from tests.test_api_admin import ADMIN_TOKEN, AUTH, adapter_files

RETENTION_S = 10.0


@pytest.fixture(scope="module")
def replicas(default_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("shared") / "adapters"
    settings = Settings.from_env(
        device="cpu", max_num_seqs=4, num_kv_blocks=64, max_model_len=256, max_loras=2, max_lora_rank=8,
        admin_token=ADMIN_TOKEN, adapter_store=str(store), served_model_name="base",
        adapter_store_shared=True, max_request_seconds=RETENTION_S - 1, adapter_store_retention_seconds=RETENTION_S,
        adapter_store_poll_seconds=0.2)
    with BackgroundServer(create_app(settings)) as first, BackgroundServer(create_app(settings)) as second:
        with httpx.Client(base_url=first.url, timeout=60) as a, httpx.Client(base_url=second.url, timeout=60) as b:
            yield a, b, store


@pytest.fixture(scope="module")
def adapters(default_model_dir):
    """Two adapters whose greedy completions differ (strong B, so the tokens change)."""
    model = ModelConfig.from_dir(default_model_dir)
    return [adapter_files(model, rank=rank, config={"lora_alpha": 512 * rank}) for rank in (4, 8)]


def _put(http: httpx.Client, customer: str, files: tuple[bytes, bytes]) -> dict:
    config, weights = files
    response = http.put(f"/admin/adapters/{customer}", headers=AUTH,
                        files={"adapter_config": ("adapter_config.json", config),
                               "adapter_model": ("adapter_model.safetensors", weights)})
    assert response.status_code == 201, response.text
    return response.json()


def _complete(http: httpx.Client, customer: str) -> httpx.Response:
    return http.post("/v1/completions", headers={"X-Customer-Id": customer},
                     json={"model": "base", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})


def _text(http: httpx.Client, customer: str) -> str:
    response = _complete(http, customer)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_upload_replace_and_delete_are_seen_by_both_replicas(replicas, adapters):
    a, b, store = replicas
    first = _put(a, "acme", adapters[0])
    assert b.get("/admin/adapters/acme", headers=AUTH).json()["version"] == first["version"] == 1
    v1_text = _text(b, "acme")
    assert _text(a, "acme") == v1_text

    second = _put(b, "acme", adapters[1])
    assert second["version"] == 2 and a.get("/admin/adapters/acme", headers=AUTH).json()["sha256"] == second["sha256"]
    v2_text = _text(a, "acme")
    assert v2_text != v1_text  # the first replica serves the new weights, not its cached version 1
    assert _text(b, "acme") == v2_text

    assert a.delete("/admin/adapters/acme", headers=AUTH).status_code == 200
    for http in (a, b):
        assert _complete(http, "acme").status_code == 404
        assert http.get("/admin/adapters/acme", headers=AUTH).status_code == 404


def test_a_request_on_one_replica_finishes_while_the_other_replaces_its_adapter(replicas, adapters):
    a, b, store = replicas
    old = _put(a, "beta", adapters[0])
    body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "stream": True,
            "ignore_eos": True}
    events = []
    with a.stream("POST", "/v1/completions", headers={"X-Customer-Id": "beta"}, json=body) as stream:
        lines = stream.iter_lines()
        events.append(next(line for line in lines if line.startswith("data: ")))  # running on version `old`
        new = _put(b, "beta", adapters[1])  # meanwhile, through the other replica
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert not [c for c in chunks if "error" in c]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    old_dir = store / "beta" / f"v{old['version']}"
    assert old_dir.is_dir()  # retired too recently: a request elsewhere may still run on it
    deadline = time.monotonic() + RETENTION_S + 10
    while old_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not old_dir.exists(), "the retired version was never pruned"
    assert (store / "beta" / f"v{new['version']}").is_dir()
    assert a.get("/admin/adapters/beta", headers=AUTH).json()["version"] == new["version"]
    assert _complete(b, "beta").status_code == 200
