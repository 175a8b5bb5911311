"""Tenant isolation under churn (issue 12, item 2), through HTTP on the default model (CPU).

32 tenants each upload an adapter whose greedy continuation of the shared prompts is its own
(its "canary": checked up front to differ from every other tenant's and the base model's).
Then requests for random tenants and for the base model arrive at random times, so steps run
at many batch sizes, while:
- the device pool holds 4 adapters (constant eviction: 32 tenants page through it),
- the KV cache is small enough that sequences are preempted and recomputed,
- 4 tenants replace their adapters mid-run through the admin API.
Every output must equal its tenant's solo reference (for the version its request was admitted
with: the old one if it ended before the replacement began, the new one if it was sent after the
replacement answered, either one in between), so no tenant ever sees another's canary.

CI runs ISOLATION_REQUESTS requests (LORAPLEX_ISOLATION_REQUESTS, default 112); `make test-slow`
runs 2,000.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings
from server.model.config import ModelConfig
from tests.test_engine_tiered import peft_files

ADMIN = {"Authorization": "Bearer isolation-admin-token"}
TENANTS = [f"tenant-{i:02d}" for i in range(32)]
REPLACED = TENANTS[::8]  # 4 tenants upload a new version mid-run
PROMPTS = ["The harbour master wrote in the log that", "Recipe for a quiet evening:"]
MAX_TOKENS = 10
ISOLATION_REQUESTS = int(os.environ.get("LORAPLEX_ISOLATION_REQUESTS", "112"))


def _window(num_requests: int) -> float:
    """Seconds over which the requests arrive (about 25 a second: the CPU keeps up with a queue)."""
    return max(6.0, num_requests / 25)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    settings = Settings.from_env(
        device="cpu", max_loras=4, max_lora_rank=8, max_num_seqs=8, kv_block_size=4, num_kv_blocks=28,
        max_model_len=256, admin_token=ADMIN["Authorization"].split()[1],
        adapter_store=str(tmp_path_factory.mktemp("isolation") / "adapters"), served_model_name="base",
    )
    with BackgroundServer(create_app(settings)) as running:
        yield running


def _adapter_files(model_config: ModelConfig, rank: int, seed: int) -> dict:
    config, weights = peft_files(model_config, rank=rank, seed=seed, scale=0.3)
    return {"adapter_config": ("adapter_config.json", config), "adapter_model": ("adapter_model.safetensors", weights)}


def _body(prompt: str) -> dict:
    return {"model": "base", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


def _solo(http: httpx.Client, tenant: str | None, prompt: str) -> str:
    headers = {"X-Customer-Id": tenant} if tenant else {}
    response = http.post("/v1/completions", json=_body(prompt), headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _metric(http: httpx.Client, name: str, **labels) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def test_tenants_never_see_each_others_outputs_under_eviction_replacement_and_preemption(server, default_model_dir):
    _run_churn(server, default_model_dir, ISOLATION_REQUESTS)


@pytest.mark.slow
def test_the_long_churn_too(server, default_model_dir):
    """`make test-slow`: the same checks over 2,000 requests."""
    _run_churn(server, default_model_dir, 2000)


def _run_churn(server, default_model_dir, num_requests: int) -> None:
    model_config = ModelConfig.from_dir(default_model_dir)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for i, tenant in enumerate(TENANTS):
            response = http.put(f"/admin/adapters/{tenant}", files=_adapter_files(model_config, 4, 100 + i),
                                headers=ADMIN)
            assert response.status_code == 201, response.text
        # solo references, one request at a time: the canaries
        reference = {(who, p): _solo(http, who, p) for who in [None, *TENANTS] for p in PROMPTS}
        for p in PROMPTS:
            canaries = [reference[(who, p)] for who in [None, *TENANTS]]
            assert len(set(canaries)) == len(canaries), "two identities share a canary: the check would be blind"
        preemptions_before = _metric(http, "loraplex_preemptions_total")
        evictions_before = _metric(http, "loraplex_adapter_cache_evictions_total", tier="device")

        rng = random.Random(7)
        plan = sorted((rng.uniform(0, _window(num_requests)), rng.choice([None, *TENANTS]), rng.choice(PROMPTS))
                      for _ in range(num_requests))
        replacement: dict[str, float] = {}
        results = asyncio.run(_churn(server.url, plan, replacement, model_config, num_requests))

        new_reference = {(t, p): _solo(http, t, p) for t in REPLACED for p in PROMPTS}
        for t in REPLACED:
            assert all(new_reference[(t, p)] != reference[(t, p)] for p in PROMPTS), "the new version changes nothing"
        preempted = _metric(http, "loraplex_preemptions_total") - preemptions_before
        evicted = _metric(http, "loraplex_adapter_cache_evictions_total", tier="device") - evictions_before

    assert len(results) == num_requests
    print(f"{len(results)} requests ({sum(w is None for w, *_ in results)} base), {preempted:.0f} preemptions, "
          f"{evicted:.0f} device evictions, {len(reference) + len(new_reference)} solo references")
    mismatches = []
    for who, prompt, sent, ended, status, text in results:
        assert status == 200, (who, status, text)
        allowed = {reference[(who, prompt)]}
        if who in REPLACED:
            if sent > replacement["answered"]:
                allowed = {new_reference[(who, prompt)]}
            elif ended >= replacement["started"]:
                allowed.add(new_reference[(who, prompt)])
        if text not in allowed:
            owner = [k for k, v in {**reference, **new_reference}.items() if v == text]
            mismatches.append((who, prompt, text, owner))
    assert not mismatches, f"{len(mismatches)} outputs differ from their solo reference: {mismatches[:3]}"
    assert preempted > 0, "the KV cache never ran out: preemption was not exercised"
    assert evicted > 0, "no adapter was evicted from the device pool"
    assert {who for who, *_ in results} >= set(REPLACED)


async def _churn(url: str, plan, replacement: dict[str, float], model_config: ModelConfig, num_requests: int):
    """Send the planned requests at their times, replace REPLACED's adapters halfway; returns
    (tenant, prompt, sent, ended, status, text) per request."""
    start = time.monotonic()
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(at: float, who: str | None, prompt: str):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            headers = {"X-Customer-Id": who} if who else {}
            sent = time.monotonic()
            response = await client.post("/v1/completions", json=_body(prompt), headers=headers)
            text = response.json()["choices"][0]["text"] if response.status_code == 200 else response.text
            return who, prompt, sent, time.monotonic(), response.status_code, text

        async def replace():
            await asyncio.sleep(_window(num_requests) / 2)
            replacement["started"] = time.monotonic()
            for i, tenant in enumerate(REPLACED):
                response = await client.put(f"/admin/adapters/{tenant}", files=_adapter_files(model_config, 8, 900 + i),
                                            headers=ADMIN)
                assert response.status_code == 201, response.text
            replacement["answered"] = time.monotonic()

        *results, _ = await asyncio.gather(*(one(*p) for p in plan), replace())
    return results
