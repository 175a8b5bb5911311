"""The admin API over real HTTP: auth, adapter upload / list / detail / delete, and every kind of
bad upload refused with a clear 4xx while the server keeps serving and nothing partial is stored.
Tenant API keys and the disabled admin API are checked without loading a model."""

from __future__ import annotations

import errno
import io
import json
import socket
from urllib.parse import quote

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings
from server.model.config import ModelConfig

ADMIN_TOKEN = "admin-token-for-tests-42"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_UPLOAD_BYTES = 4 << 20
MAX_RANK = 8


def adapter_files(model: ModelConfig, *, rank: int = 4, hidden: int | None = None, nan: bool = False,
                  config: dict | None = None) -> tuple[bytes, bytes]:
    """adapter_config.json and adapter_model.safetensors in peft's layout (q_proj and v_proj)."""
    gen = torch.Generator().manual_seed(rank)
    shapes = model.linear_shapes()
    tensors = {}
    for layer in range(model.num_layers):
        for module in ("q_proj", "v_proj"):
            fan_in, fan_out = shapes[module]
            fan_in = hidden or fan_in
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.05
    if nan:
        next(iter(tensors.values()))[0, 0] = float("nan")
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
           "bias": "none", **(config or {})}
    return json.dumps(cfg).encode(), save(tensors)


@pytest.fixture(scope="module")
def model_config(default_model_dir):
    return ModelConfig.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    settings = Settings.from_env(
        device="cpu", max_num_seqs=4, num_kv_blocks=64, max_model_len=512, max_loras=2, max_lora_rank=MAX_RANK,
        admin_token=ADMIN_TOKEN, adapter_store=str(tmp_path_factory.mktemp("store") / "adapters"),
        max_upload_bytes=MAX_UPLOAD_BYTES,
    )
    with BackgroundServer(create_app(settings)) as running:
        running.settings = settings
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _put(http, customer: str, config: bytes, weights: bytes, *, headers=AUTH, weights_name="adapter_model.safetensors",
         extra: dict | None = None) -> httpx.Response:
    files = {"adapter_config": ("adapter_config.json", config), "adapter_model": (weights_name, weights),
             **(extra or {})}
    return http.put(f"/admin/adapters/{customer}", files=files, headers=headers)


def _store_listing(server) -> list[str]:
    root = server.settings.adapter_store_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _assert_error(response: httpx.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


@pytest.fixture(scope="module")
def stored(http, model_config):
    """One good adapter ("acme", version 1) that every bad upload must leave alone."""
    response = _put(http, "acme", *adapter_files(model_config, rank=4))
    assert response.status_code == 201, response.text
    return response.json()


def test_upload_answers_201_with_metadata(http, stored, model_config):
    config, weights = adapter_files(model_config, rank=4)
    assert stored["customer_id"] == "acme" and stored["version"] == 1
    assert stored["rank"] == 4 and stored["alpha"] == 8.0
    assert stored["target_modules"] == ["q_proj", "v_proj"]
    assert stored["bytes"] == len(config) + len(weights)
    assert len(stored["sha256"]) == 64
    detail = http.get("/admin/adapters/acme", headers=AUTH)
    assert detail.status_code == 200 and detail.json()["sha256"] == stored["sha256"]
    assert detail.json()["state"] in {"on_disk", "loading", "in_host", "on_device"}
    listing = http.get("/admin/adapters", headers=AUTH).json()["data"]
    assert [a["customer_id"] for a in listing] == ["acme"]


BAD_UPLOADS = {
    # name: (how to break the upload, status, text the message must contain)
    "broken-json": (lambda c, w: (c[:-7], w), 400, "not valid JSON"),
    "not-lora": (lambda c, w: (json.dumps({**json.loads(c), "peft_type": "PREFIX_TUNING"}).encode(), w), 400, "LORA"),
    "truncated-safetensors": (lambda c, w: (c, w[: len(w) // 2]), 400, "safetensors"),
    "garbage-weights": (lambda c, w: (c, b"\x00" * 64), 400, "safetensors"),
    "empty-weights": (lambda c, w: (c, b""), 400, "safetensors"),
    "pickle-as-safetensors": (lambda c, w: (c, _pickled()), 400, "pickle"),
    "rank-mismatch": (lambda c, w: (json.dumps({**json.loads(c), "r": 8}).encode(), w), 400, "rank"),
}


def _pickled() -> bytes:
    buffer = io.BytesIO()
    torch.save({"base_model.model.x.lora_A.weight": torch.ones(2, 2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_bad_upload_is_refused_and_nothing_is_stored(server, http, stored, model_config, name):
    breaks, status, needle = BAD_UPLOADS[name]
    before = _store_listing(server)
    for customer in ("acme", "newcomer"):  # a replacement and a first upload
        response = _put(http, customer, *breaks(*adapter_files(model_config, rank=4)))
        _assert_error(response, status, needle)
    assert _store_listing(server) == before
    assert http.get("/admin/adapters/acme", headers=AUTH).json()["version"] == 1
    assert http.get("/admin/adapters/newcomer", headers=AUTH).status_code == 404


def test_adapters_that_do_not_fit_the_base_model_are_refused(server, http, stored, model_config):
    before = _store_listing(server)
    _assert_error(_put(http, "acme", *adapter_files(model_config, hidden=512)), 400, "does not fit the base model")
    _assert_error(_put(http, "acme", *adapter_files(model_config, nan=True)), 400, "NaN")
    _assert_error(_put(http, "acme", *adapter_files(model_config, rank=12)), 400, "max_rank")
    _assert_error(_put(http, "acme", *adapter_files(model_config, config={"use_dora": True})), 400, "DoRA")
    _assert_error(_put(http, "acme", *adapter_files(model_config, config={"target_modules": ["lm_head"]})), 400,
                  "lm_head")
    assert _store_listing(server) == before


def test_a_server_of_attention_adapters_refuses_one_on_the_mlp(default_model_dir, model_config, tmp_path):
    """LORAPLEX_LORA_MODULES=attention: an upload targeting the MLP is a 400 that names the setting
    (nothing stored); one on q and v is stored and serves."""
    settings = Settings.from_env(device="cpu", max_num_seqs=2, num_kv_blocks=32, max_model_len=256, max_loras=2,
                                 max_lora_rank=MAX_RANK, admin_token=ADMIN_TOKEN, lora_modules="attention",
                                 adapter_store=str(tmp_path / "adapters"))
    with BackgroundServer(create_app(settings)) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        config, weights = adapter_files(model_config, rank=4)
        mlp_config = json.dumps({**json.loads(config), "target_modules": ["q_proj", "v_proj", "down_proj"]}).encode()
        _assert_error(_put(client, "acme", mlp_config, weights), 400, "down_proj", "LORAPLEX_LORA_MODULES")
        assert client.get("/admin/adapters/acme", headers=AUTH).status_code == 404
        assert _put(client, "acme", config, weights).status_code == 201
        answer = client.post("/v1/completions", headers={"X-Customer-Id": "acme"},
                             json={"model": "acme", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 3


def test_pickle_and_malformed_multipart_are_refused(server, http, stored, model_config):
    before = _store_listing(server)
    config, weights = adapter_files(model_config)
    _assert_error(_put(http, "acme", config, _pickled(), weights_name="adapter_model.bin"), 400, "pickle")
    _assert_error(http.put("/admin/adapters/acme", files={"adapter_config": ("a.json", config)}, headers=AUTH),
                  400, "adapter_model")
    _assert_error(_put(http, "acme", config, weights, extra={"readme": ("README.md", b"hi")}), 400)
    _assert_error(http.put("/admin/adapters/acme", data={"adapter_model": "not a file"},
                           files={"adapter_config": ("adapter_config.json", config)}, headers=AUTH), 400, "file part")
    _assert_error(http.put("/admin/adapters/acme", json={"adapter_config": {}}, headers=AUTH), 400, "multipart")
    _assert_error(http.put("/admin/adapters/acme", content=b"--x\r\nnonsense", headers={
        **AUTH, "content-type": "multipart/form-data; boundary=x"}), 400)
    assert _store_listing(server) == before


def test_oversized_uploads_get_413(server, http, stored, model_config):
    before = _store_listing(server)
    config, _ = adapter_files(model_config)
    _assert_error(_put(http, "acme", config, b"\x00" * (MAX_UPLOAD_BYTES + 1)), 413, "limit")

    def chunked():  # no Content-Length: the limit holds while reading
        yield (b'--zzz\r\nContent-Disposition: form-data; name="adapter_model"; filename="adapter_model.safetensors"'
               b'\r\n\r\n')
        for _ in range(6):
            yield b"\x00" * (1 << 20)

    response = http.put("/admin/adapters/acme", content=chunked(), headers={
        **AUTH, "content-type": "multipart/form-data; boundary=zzz"})
    _assert_error(response, 413, "limit")
    assert _store_listing(server) == before


@pytest.mark.parametrize("customer", ["..", "../escape", "a/b", ".hidden", "-dash", "x" * 65, "a b", "caf\u00e9",
                                      "nul\x00byte", "", "acme/../../escape"])
def test_path_like_customer_ids_are_refused(server, http, stored, model_config, customer):
    before = _store_listing(server)
    path = "/admin/adapters/" + quote(customer, safe="").replace(".", "%2E")
    response = http.put(path, files={"adapter_config": ("c.json", b"{}"), "adapter_model": ("m", b"")}, headers=AUTH)
    error = _assert_error(response, 400, "invalid customer id")
    assert error["code"] == "invalid_customer_id"
    for method in ("GET", "DELETE"):
        assert http.request(method, path, headers=AUTH).status_code == 400
    assert _store_listing(server) == before
    assert not (server.settings.adapter_store_dir.parent / "escape").exists()


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_admin_token"),
    ({"Authorization": "Bearer wrong-token"}, "invalid_admin_token"),
    ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, "invalid_admin_token"),
    ({"Authorization": f"Basic {ADMIN_TOKEN}"}, "missing_admin_token"),
    ({"Authorization": "Bearer"}, "missing_admin_token"),
])
def test_admin_calls_without_the_right_token_get_401(server, http, stored, model_config, headers, code):
    before = _store_listing(server)
    response = _put(http, "intruder", *adapter_files(model_config), headers=headers)
    assert _assert_error(response, 401)["code"] == code
    assert response.headers["www-authenticate"] == "Bearer"
    assert http.get("/admin/adapters", headers=headers).status_code == 401
    assert http.delete("/admin/adapters/acme", headers=headers).status_code == 401
    assert _store_listing(server) == before


def test_replace_list_delete_and_the_server_keeps_serving(server, http, stored, model_config):
    second = _put(http, "acme", *adapter_files(model_config, rank=8))
    assert second.status_code == 201 and second.json()["version"] == 2 and second.json()["rank"] == 8
    assert http.get("/admin/adapters/acme", headers=AUTH).json()["version"] == 2
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
    served = http.post("/v1/completions", json=body, headers={"X-Customer-Id": "acme"})
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] >= 1
    assert not (server.settings.adapter_store_dir / "acme" / "v1").exists()  # retired, nobody used it

    deleted = http.delete("/admin/adapters/acme", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["version"] == 2
    _assert_error(http.get("/admin/adapters/acme", headers=AUTH), 404)
    _assert_error(http.delete("/admin/adapters/acme", headers=AUTH), 404)
    _assert_error(http.post("/v1/completions", json=body, headers={"X-Customer-Id": "acme"}), 404, "acme")
    assert http.get("/admin/adapters", headers=AUTH).json()["data"] == []
    assert http.post("/v1/completions", json=body).status_code == 200  # the base model still serves
    again = _put(http, "acme", *adapter_files(model_config, rank=4))
    assert again.status_code == 201 and again.json()["version"] == 3  # numbers are never reused
    assert http.get("/ready").status_code == 200


def test_an_adapter_damaged_on_disk_fails_its_request_not_the_server(server, http, model_config):
    assert _put(http, "fragile", *adapter_files(model_config, rank=4)).status_code == 201
    weights = server.settings.adapter_store_dir / "fragile" / "v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # same size, different sha256
    failures_before = _load_failures(http)
    body = {"prompt": "Hello", "max_tokens": 2}
    error = _assert_error(http.post("/v1/completions", json=body, headers={"X-Customer-Id": "fragile"}), 500,
                          "failed to load")
    assert error["code"] == "generation_failed"
    assert _load_failures(http) == failures_before + 1  # the operator sees it on the dashboard
    assert http.post("/v1/completions", json=body).status_code == 200
    assert http.get("/ready").status_code == 200


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fails_at", ["last_version", "adapter_model.safetensors", "current"])
def test_a_full_disk_during_an_upload_answers_507_and_changes_nothing(server, http, model_config, monkeypatch,
                                                                    fails_at):
    """ENOSPC while the version counter is raised, while the weights are written (in the temp
    dir), or while `current` is replaced (the new version's directory already renamed into
    place): 507, the adapter still served at
    its old version, every stored byte as before (but the version counter), no temp files."""
    from server.lora import store as store_module

    customer = "full-" + fails_at.split(".")[0].replace("_", "-")
    assert _put(http, customer, *adapter_files(model_config, rank=4)).status_code == 201
    customer_dir = server.settings.adapter_store_dir / customer
    before = {k: v for k, v in _tree(customer_dir).items() if k != "last_version"}
    listing = http.get("/admin/adapters", headers=AUTH).json()
    real_write = store_module._write_synced
    small_files = iter(["last_version", "current"])  # a put replaces these two, in this order, via temp files

    def disk_full(path, data):
        name = path.name
        if name.startswith(store_module.TEMP_PREFIX) and path.parent == customer_dir:
            name = next(small_files)
        if name == fails_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(store_module, "_write_synced", disk_full)
    config, weights = adapter_files(model_config, rank=8)
    response = _put(http, customer, config, weights)
    error = _assert_error(response, 507, "no space left")
    assert error["code"] == "insufficient_storage" and error["type"] == "insufficient_storage_error"
    assert {k: v for k, v in _tree(customer_dir).items() if k != "last_version"} == before
    assert http.get("/admin/adapters", headers=AUTH).json() == listing
    body = {"prompt": "Hello", "max_tokens": 2}
    assert http.post("/v1/completions", json=body, headers={"X-Customer-Id": customer}).status_code == 200
    assert 'loraplex_adapter_uploads_total{result="store_full"}' in http.get("/metrics").text
    monkeypatch.setattr(store_module, "_write_synced", real_write)  # space again: the same upload goes through
    assert _put(http, customer, config, weights).json()["rank"] == 8


def _load_failures(http) -> float:
    line = next(line for line in http.get("/metrics").text.splitlines()
                if line.startswith("loraplex_adapter_load_failures_total "))
    return float(line.split()[1])


def test_upload_metrics_count_by_result(http):
    text = http.get("/metrics").text
    assert 'loraplex_adapter_uploads_total{result="stored"}' in text
    assert 'loraplex_adapter_uploads_total{result="invalid_adapter"}' in text
    assert 'loraplex_adapter_uploads_total{result="invalid_customer_id"}' in text
    assert 'loraplex_adapter_uploads_total{result="too_large"}' in text


# --- without a model: the disabled admin API and tenant API keys (no lifespan, nothing loaded)

def test_admin_api_without_a_token_refuses_and_says_how_to_enable_it(tmp_path):
    client = TestClient(create_app(Settings(admin_token="", adapter_store=str(tmp_path))))
    for method, path in (("GET", "/admin/adapters"), ("PUT", "/admin/adapters/acme"),
                         ("DELETE", "/admin/adapters/acme")):
        response = client.request(method, path, headers={"Authorization": "Bearer anything"})
        assert response.status_code == 403
        assert "LORAPLEX_ADMIN_TOKEN" in response.json()["error"]["message"]
    assert list(tmp_path.iterdir()) == []


def test_tenant_api_keys_fix_the_customer(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-of-acme-0123456789": "acme", "key-of-base-0123456789": None}))
    client = TestClient(create_app(Settings(api_keys_file=str(keys))))
    body = {"prompt": "hi", "max_tokens": 1}
    assert _assert_error(client.post("/v1/completions", json=body), 401)["code"] == "missing_api_key"
    wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope-nope-nope-nope"})
    assert _assert_error(wrong, 401)["code"] == "invalid_api_key"
    other = client.post("/v1/completions", json=body, headers={
        "Authorization": "Bearer key-of-acme-0123456789", "X-Customer-Id": "globex"})
    assert _assert_error(other, 403)["code"] == "customer_mismatch"
    # past authentication, the request reaches the (not loaded) model: 503
    for key in ("key-of-acme-0123456789", "key-of-base-0123456789"):
        response = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert _assert_error(response, 503)["code"] == "not_ready"
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200


def test_invalid_api_key_files_are_refused_at_start(tmp_path):
    bad = tmp_path / "keys.json"
    for content in ("not json", "[]", json.dumps({"short": "acme"}), json.dumps({"long-enough-key-123": "../x"})):
        bad.write_text(content)
        with pytest.raises(ValueError):
            create_app(Settings(api_keys_file=str(bad)))


def test_serve_defaults_to_localhost_8000_and_flags_override(monkeypatch):
    from server.cli import build_parser, serve_settings

    for name in ("LORAPLEX_HOST", "LORAPLEX_PORT", "LORAPLEX_MAX_LORAS"):
        monkeypatch.delenv(name, raising=False)
    defaults = serve_settings(build_parser().parse_args(["serve"]))
    assert (defaults.host, defaults.port, defaults.model) == ("127.0.0.1", 8000, None)
    flags = serve_settings(build_parser().parse_args(["serve", "--port", "9123", "--max-loras", "3"]))
    assert (flags.port, flags.max_loras) == (9123, 3)



def test_the_upload_bound_follows_the_base_model_and_the_max_rank(default_model_dir, model_config, tmp_path):
    """A valid adapter of every targetable module at the max rank fits under the derived bound
    (by about the float64 factor of 2 over float32), and a server whose byte limit is larger
    refuses, by the declared size alone, an upload past what any valid adapter can be."""
    from server.lora.peft import max_adapter_upload_bytes

    rank, modules = MAX_RANK, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    shapes = model_config.linear_shapes()
    tensors = {}
    for layer in range(model_config.num_layers):
        for module in modules:
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, shapes[module][0])
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(shapes[module][1], rank)
    largest_fp32 = len(save(tensors)) + 1024
    bound = max_adapter_upload_bytes(model_config, rank)
    assert largest_fp32 < bound < 2 * largest_fp32 + (2 << 20)  # float64, and the config and header allowance

    settings = Settings.from_env(device="cpu", max_num_seqs=2, num_kv_blocks=32, max_model_len=256, max_loras=1,
                                 max_lora_rank=rank, admin_token=ADMIN_TOKEN, adapter_store=str(tmp_path / "store"))
    assert settings.max_upload_bytes > bound
    with BackgroundServer(create_app(settings)) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:  # a size declared, then little sent
            conn.sendall((f"PUT /admin/adapters/acme HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                          f"Content-Length: {bound + 1}\r\n\r\n--x\r\n").encode())
            answer = conn.recv(65536).decode()
        status_line, _, rest = answer.partition("\r\n")
        assert " 413 " in status_line, answer
        body = json.loads(rest.split("\r\n\r\n", 1)[1])
        assert body["error"]["type"] == "invalid_request_error" and "largest valid adapter" in body["error"]["message"]
        assert client.get("/admin/adapters", headers=AUTH).json()["data"] == []
