"""The authorization matrix over real HTTP (issue 12, item 5): every route, every kind of caller
(no credentials, a wrong token, tenant A's key, tenant B's key, a base-model-only key, the admin
token). Only the owner or the admin gets through; another tenant gets 401, 403 or 404 and learns
nothing (an adapter that exists and one that does not answer alike); no secret reaches the logs."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings
from server.model.config import ModelConfig
from tests.test_api_admin import adapter_files

ADMIN = "admin-token-for-the-matrix-0123456789"
KEYS = {"A": "tenant-key-of-alpha-0123456789", "B": "tenant-key-of-bravo-0123456789",
        "base": "tenant-key-base-only-0123456789"}
CUSTOMERS = {"A": "alpha", "B": "bravo", "base": None}
CALLERS = {"none": None, "wrong": "not-a-real-token-0123456789", "A": KEYS["A"], "B": KEYS["B"],
           "base": KEYS["base"], "admin": ADMIN}


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({KEYS[name]: CUSTOMERS[name] for name in KEYS}))
    settings = Settings.from_env(device="cpu", max_num_seqs=4, num_kv_blocks=64, max_model_len=256, max_loras=2,
                                 max_lora_rank=8, admin_token=ADMIN, api_keys_file=str(keys),
                                 adapter_store=str(tmp_path_factory.mktemp("store")), served_model_name="")
    with BackgroundServer(create_app(settings)) as running:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            config = ModelConfig.from_dir(default_model_dir)
            for customer in ("alpha", "bravo"):
                files = dict(zip(("adapter_config", "adapter_model"), adapter_files(config, rank=4)))
                response = client.put(f"/admin/adapters/{customer}", headers=_auth("admin"),
                                      files={k: (k, v) for k, v in files.items()})
                assert response.status_code == 201, response.text
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _auth(caller: str) -> dict:
    token = CALLERS[caller]
    return {"Authorization": f"Bearer {token}"} if token else {}


def _completion(http, caller: str, model: str):
    return http.post("/v1/completions", headers=_auth(caller),
                     json={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})


def test_ops_routes_are_open_to_everyone(http):
    for caller in CALLERS:
        assert http.get("/health", headers=_auth(caller)).status_code == 200
        assert http.get("/ready", headers=_auth(caller)).status_code == 200


@pytest.mark.parametrize("caller", ["none", "wrong", "admin"])
def test_inference_needs_a_tenant_key(http, caller):
    """The admin token is no tenant key: the two kinds of secret open different doors."""
    base = http.get("/v1/models", headers=_auth("A")).json()["data"][0]["id"]
    for response in (_completion(http, caller, base), http.get("/v1/models", headers=_auth(caller)),
                     http.get("/v1/models/alpha", headers=_auth(caller))):
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_each_tenant_reaches_its_own_adapter_and_the_base_model_only(http):
    base = http.get("/v1/models", headers=_auth("A")).json()["data"][0]["id"]
    for caller, own in (("A", "alpha"), ("B", "bravo"), ("base", None)):
        listed = [m["id"] for m in http.get("/v1/models", headers=_auth(caller)).json()["data"]]
        assert listed == [base] + ([own] if own else [])
        assert _completion(http, caller, base).status_code == 200
        if own:
            assert _completion(http, caller, own).status_code == 200
            assert http.get(f"/v1/models/{own}", headers=_auth(caller)).status_code == 200


@pytest.mark.parametrize("caller, other", [("A", "bravo"), ("B", "alpha"), ("base", "alpha")])
def test_another_tenants_adapter_looks_like_one_that_does_not_exist(http, caller, other):
    def shape(response, name: str):
        error = response.json()["error"]
        return response.status_code, error["type"], error["code"], error["message"].replace(name, "<id>")

    for request in (lambda model: _completion(http, caller, model),
                    lambda model: http.get(f"/v1/models/{model}", headers=_auth(caller))):
        existing = request(other)
        assert existing.status_code in (403, 404)
        assert shape(existing, other) == shape(request("nosuchcustomer"), "nosuchcustomer")
    header = http.post("/v1/completions", headers={**_auth(caller), "X-Customer-Id": other},
                       json={"prompt": "Hello", "max_tokens": 1})
    assert header.status_code == 403 and header.json()["error"]["code"] == "customer_mismatch"


@pytest.mark.parametrize("caller", ["none", "wrong", "A", "B", "base"])
def test_only_the_admin_reaches_the_admin_api(http, caller):
    calls = [("GET", "/admin/adapters"), ("GET", "/admin/adapters/alpha"), ("DELETE", "/admin/adapters/alpha"),
             ("PUT", "/admin/adapters/alpha"), ("POST", "/admin/adapters/alpha/compose"),
             ("GET", "/admin/adapters/alpha/merged")]
    for method, path in calls:
        response = http.request(method, path, headers=_auth(caller))
        assert response.status_code == 401, (method, path, response.text)
        assert "alpha" not in response.text  # nothing about the adapter
    assert http.get("/admin/adapters/alpha", headers=_auth("admin")).status_code == 200  # still there
    assert [a["customer_id"] for a in http.get("/admin/adapters", headers=_auth("admin")).json()["data"]] == \
        ["alpha", "bravo"]


def test_no_secret_reaches_the_logs(http, caplog):
    caplog.set_level(logging.DEBUG)
    for caller in CALLERS:
        _completion(http, caller, "alpha")
        http.get("/admin/adapters", headers=_auth(caller))
        http.get("/v1/models", headers=_auth(caller))
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (ADMIN, *KEYS.values()):
        assert secret not in logged


# every route the app answers, and the door it belongs to: a new route fails here until placed
MATRIX = {
    ("GET", "/health"): "open", ("GET", "/ready"): "open", ("GET", "/metrics"): "open",
    ("GET", "/openapi.json"): "open", ("GET", "/docs"): "open", ("GET", "/docs/oauth2-redirect"): "open",
    ("GET", "/redoc"): "open",
    ("POST", "/v1/completions"): "tenant", ("POST", "/v1/chat/completions"): "tenant",
    ("GET", "/v1/models"): "tenant", ("GET", "/v1/models/{model_id}"): "tenant",
    ("GET", "/admin/adapters"): "admin", ("PUT", "/admin/adapters/{customer_id}"): "admin",
    ("GET", "/admin/adapters/{customer_id}"): "admin", ("DELETE", "/admin/adapters/{customer_id}"): "admin",
    ("POST", "/admin/adapters/{customer_id}/compose"): "admin", ("GET", "/admin/adapters/{customer_id}/merged"): "admin",
}


def test_the_matrix_covers_every_route(server):
    """The app's routes: its own (every one is in its OpenAPI schema) and FastAPI's docs pages."""
    routes = {(method.upper(), path) for path, operations in server.app.openapi()["paths"].items()
              for method in operations}
    routes |= {(method, route.path) for route in server.app.routes for method in getattr(route, "methods", None) or ()
               if method != "HEAD"}
    assert routes == set(MATRIX)


def test_chat_follows_the_same_rules(http):
    def chat(caller, model):
        return http.post("/v1/chat/completions", headers=_auth(caller),
                         json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})

    assert chat("A", "alpha").status_code == 200
    assert chat("none", "alpha").status_code == 401 and chat("admin", "alpha").status_code == 401
    assert chat("B", "alpha").status_code == chat("B", "nosuchcustomer").status_code == 403


def test_metrics_name_no_secret(http):
    text = http.get("/metrics").text
    for secret in (ADMIN, *KEYS.values()):
        assert secret not in text
