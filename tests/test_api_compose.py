"""POST /admin/adapters/{customer_id}/compose over real HTTP (on test_api_admin's server): the
stored version is exactly server/lora/compose.py's composition of the sources (which
tests/test_compose.py checks against peft), carries its recipe, serves, and every invalid recipe
is refused with a clear 4xx that changes nothing stored. And GET .../merged, the merged export."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.lora.compose import Recipe, Source, compose
from server.lora.peft import load_peft_adapter
from tests.test_api_admin import (  # noqa: F401  (server, http, model_config: the fixtures)
    AUTH, MAX_RANK, _assert_error, _put, _store_listing, adapter_files, http, model_config, server,
)


@pytest.fixture(scope="module")
def sources(http, model_config):
    """Two tenants' adapters of different ranks: style (rank 4) and domain (rank 2)."""
    files = {"style": adapter_files(model_config, rank=4), "domain": adapter_files(model_config, rank=2)}
    for customer, (config, weights) in files.items():
        assert _put(http, customer, config, weights).status_code == 201
    return files


def _compose(http, customer, body, headers=AUTH):
    if isinstance(body, str):  # raw JSON text, e.g. with a NaN, which httpx will not encode
        return http.post(f"/admin/adapters/{customer}/compose", content=body,
                         headers={**headers, "Content-Type": "application/json"})
    return http.post(f"/admin/adapters/{customer}/compose", json=body, headers=headers)


def test_composition_is_stored_with_its_recipe_and_served(server, http, sources, model_config):
    body = {"sources": [{"customer_id": "style", "weight": 0.7}, {"customer_id": "domain", "weight": -0.3}],
            "method": "cat"}
    response = _compose(http, "mix", body)
    assert response.status_code == 201, response.text
    meta = response.json()
    assert meta["customer_id"] == "mix" and meta["version"] == 1 and meta["rank"] == 6  # 4 + 2
    assert meta["target_modules"] == ["q_proj", "v_proj"] and meta["use_dora"] is False
    styles = http.get("/admin/adapters/style", headers=AUTH).json()
    assert meta["recipe"] == {"method": "cat", "rank": None, "sources": [
        {"customer_id": "style", "version": styles["version"], "sha256": styles["sha256"], "weight": 0.7},
        {"customer_id": "domain", "version": 1, "sha256": http.get("/admin/adapters/domain", headers=AUTH).json()["sha256"],
         "weight": -0.3}]}
    assert http.get("/admin/adapters/mix", headers=AUTH).json()["recipe"] == meta["recipe"]  # kept on disk

    # the stored files are the composition of the sources, byte for byte
    parsed = [load_peft_adapter(*files, model_config, max_rank=MAX_RANK) for files in (sources["style"], sources["domain"])]
    config, weights = compose(Recipe((Source("style", 0.7), Source("domain", -0.3)), "cat"), parsed, max_rank=MAX_RANK)
    version_dir = server.settings.adapter_store_dir / "mix" / "v1"
    assert (version_dir / "adapter_config.json").read_bytes() == config
    assert (version_dir / "adapter_model.safetensors").read_bytes() == weights

    completion = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    mixed = http.post("/v1/completions", json=completion, headers={"X-Customer-Id": "mix"})
    assert mixed.status_code == 200, mixed.text
    svd = _compose(http, "mix", {**body, "method": "svd", "rank": 3})
    assert svd.status_code == 201 and svd.json()["version"] == 2 and svd.json()["rank"] == 3
    assert svd.json()["recipe"]["method"] == "svd" and svd.json()["recipe"]["rank"] == 3


@pytest.mark.parametrize("body, status, param, words", [
    ({"sources": [{"customer_id": "nobody", "weight": 1.0}], "method": "cat"}, 404, None, "nobody"),
    ({"sources": [], "method": "cat"}, 400, "sources", "at least 1"),
    ('{"sources": [{"customer_id": "style", "weight": NaN}], "method": "cat"}', 400, None, "weight"),
    ({"sources": [{"customer_id": "style", "weight": "0.5"}], "method": "cat"}, 400, None, "weight"),
    ({"sources": [{"customer_id": "style", "weight": 1.0}], "method": "ties"}, 400, None, "method"),
    ({"sources": [{"customer_id": "style", "weight": 1.0}], "method": "svd", "rank": MAX_RANK + 1}, 400, "rank",
     f"1..{MAX_RANK}"),
    ({"sources": [{"customer_id": "style", "weight": 1.0}], "method": "cat", "rank": 2}, 400, "rank", "svd only"),
    ({"sources": [{"customer_id": "style", "weight": 1.0}, {"customer_id": "style", "weight": 1.0},
                  {"customer_id": "style", "weight": 1.0}], "method": "cat"}, 400, "sources", "max_lora_rank"),
    ({"sources": [{"customer_id": "../etc", "weight": 1.0}], "method": "cat"}, 400, None, "customer_id"),
], ids=["unknown-source", "zero-sources", "nan-weight", "string-weight", "unknown-method", "rank-too-large",
        "rank-with-cat", "cat-rank-too-large", "bad-source-id"])
def test_invalid_recipes_are_refused_and_change_nothing(server, http, sources, body, status, param, words):
    before = _store_listing(server)
    error = _assert_error(_compose(http, "victim", body), status)
    assert words in error["message"] and (param is None or error["param"] == param), error
    assert _store_listing(server) == before
    _assert_error(http.get("/admin/adapters/victim", headers=AUTH), 404)


def test_a_source_the_customer_may_not_read_is_refused(server, http, sources, monkeypatch):
    """With LORAPLEX_SHARED_ADAPTERS=style, a composition reads the customer's own adapter and
    "style", never another tenant's."""
    service = server.app.state.service
    monkeypatch.setattr(service, "settings", dataclasses.replace(service.settings, shared_adapters="style"))
    before = _store_listing(server)
    body = {"sources": [{"customer_id": "style", "weight": 1.0}, {"customer_id": "domain", "weight": 1.0}],
            "method": "cat"}
    error = _assert_error(_compose(http, "acme-2", body), 403, "domain", "LORAPLEX_SHARED_ADAPTERS")
    assert error["type"] == "permission_error" and error["param"] == "sources[1].customer_id"
    assert _store_listing(server) == before
    assert _compose(http, "domain", body).status_code == 201  # its own adapter and the shared one


def test_compose_needs_the_admin_token(http, sources):
    body = {"sources": [{"customer_id": "style", "weight": 1.0}], "method": "cat"}
    assert _compose(http, "sneaky", body, headers={}).status_code == 401
    assert _compose(http, "sneaky", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    _assert_error(http.get("/admin/adapters/sneaky", headers=AUTH), 404)


def test_svd_of_the_api_equals_peft_reconstruction_bound(sources, model_config):
    """svd keeps the top singular triplets: its error is the norm of the dropped singular values
    (Eckart-Young), what peft's SVD truncation also meets."""
    parsed = [load_peft_adapter(*files, model_config, max_rank=MAX_RANK) for files in (sources["style"], sources["domain"])]
    config, weights = compose(Recipe((Source("style", 1.0), Source("domain", 1.0)), "svd", 3), parsed, max_rank=MAX_RANK)
    composed = load_peft_adapter(config, weights, model_config, max_rank=MAX_RANK)
    for key, m in composed.modules.items():
        exact = sum(p.modules[key].scale * p.modules[key].lora_b @ p.modules[key].lora_a for p in parsed)
        singular = torch.linalg.svdvals(exact)
        error = torch.linalg.matrix_norm(m.scale * m.lora_b @ m.lora_a - exact)
        assert error == pytest.approx(singular[3:].norm().item(), rel=1e-3, abs=1e-6), key


def test_merged_export_is_the_merge_of_the_stored_adapter(server, http, sources, tmp_path, monkeypatch):
    """GET .../merged: a tar of `loraplex merge`'s checkpoint for the customer's current version
    (tests/test_merge.py checks merging against peft); the export's work files are removed."""
    import io
    import tarfile
    import time

    from server.lora.merge import merge_adapter_dir

    service = server.app.state.service  # exports are built under <home>/exports: a temporary home here
    monkeypatch.setattr(service, "settings", dataclasses.replace(service.settings, home=tmp_path / "home"))
    response = http.get("/admin/adapters/style/merged", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(tmp_path / "export", filter="data")
    (exported,) = (tmp_path / "export").iterdir()
    assert exported.name.endswith("-style-v1-merged")
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_bytes(sources["style"][0])
    (adapter_dir / "adapter_model.safetensors").write_bytes(sources["style"][1])
    expected = merge_adapter_dir(adapter_dir, service.model.path, tmp_path / "expected")
    assert (exported / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in expected.iterdir())
    deadline = time.monotonic() + 10
    while any((tmp_path / "home" / "exports").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # removed by a background task once the body is sent
    assert not any((tmp_path / "home" / "exports").iterdir())
    _assert_error(http.get("/admin/adapters/nobody/merged", headers=AUTH), 404)
    assert http.get("/admin/adapters/style/merged").status_code == 401


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/admin/adapters/style/compose", "POST"), ("GET", "/admin/adapters/style/compose", "POST"),
    ("DELETE", "/admin/adapters/style/compose", "POST"), ("PUT", "/admin/adapters/style/merged", "GET"),
    ("DELETE", "/admin/adapters/style/merged", "GET"),
])
def test_other_methods_on_the_subresources_are_405(http, sources, method, path, allow):
    response = http.request(method, path, headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == allow, response.text
    assert http.get("/admin/adapters/style", headers=AUTH).status_code == 200  # untouched
