"""Prefix caching over HTTP, counted through /metrics: a tenant's 1,000-token system prompt is
computed once and then found by its later requests; another tenant (an adapter on k/v) with the
same system prompt finds none of it."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings
from tests.peft_helpers import make_peft_model, save_adapter

ADMIN_TOKEN = "test-admin-token-prefix"
BLOCK = 16


def _system_prompt(tokenizer) -> str:
    sentences = [f"Rule {i}: answer the customer's question number {i} politely, and never share data of other "
                 f"customers or invent facts about orders." for i in range(200)]
    text, i = "", 0
    while len(tokenizer.encode(text)) < 1000:
        text += sentences[i] + " "
        i += 1
    return text


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    adapter_dir = save_adapter(make_peft_model(copy.deepcopy(base), "r8-qv", seed=5), tmp_path_factory.mktemp("kv"))
    settings = Settings.from_env(device="cpu", max_num_seqs=8, num_kv_blocks=512, kv_block_size=BLOCK,
                                 max_model_len=2048, max_loras=2, max_lora_rank=16, admin_token=ADMIN_TOKEN,
                                 adapter_store=str(tmp_path_factory.mktemp("adapters")), served_model_name="")
    with BackgroundServer(create_app(settings)) as running:
        files = {"adapter_config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
                 "adapter_model": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes())}
        response = httpx.put(f"{running.url}/admin/adapters/other", files=files,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
        assert response.status_code == 201, response.text
        running.tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
        yield running


def _metrics(http) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if not sample.labels:
                samples[sample.name] = sample.value
    return samples


def _ask(http, system: str, question: str, customer: str | None = None):
    headers = {"X-Customer-Id": customer} if customer else {}
    response = http.post("/v1/chat/completions", headers=headers, json={
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_shared_system_prompt_is_computed_once_and_never_across_tenants(server):
    system = _system_prompt(server.tokenizer)
    with httpx.Client(base_url=server.url, timeout=300) as http:
        before = _metrics(http)
        first = _ask(http, system, "Where is my parcel?")
        prompt_tokens = first["usage"]["prompt_tokens"]
        assert prompt_tokens > 1000
        after_first = _metrics(http)
        assert after_first["loraplex_prefix_cache_hits_total"] == before["loraplex_prefix_cache_hits_total"]
        computed_first = after_first["loraplex_engine_step_batched_tokens_sum"] - before["loraplex_engine_step_batched_tokens_sum"]
        assert computed_first >= prompt_tokens  # the whole prompt, then a decode step

        questions = ["Can I return shoes?", "Do you ship to Norway?", "What are your opening hours?"]
        for question in questions:
            _ask(http, system, question)
        after = _metrics(http)
        hits = after["loraplex_prefix_cache_hits_total"] - after_first["loraplex_prefix_cache_hits_total"]
        queries = after["loraplex_prefix_cache_queries_total"] - after_first["loraplex_prefix_cache_queries_total"]
        assert hits >= len(questions) * (1000 // BLOCK) * BLOCK  # each found the system prompt
        assert queries >= len(questions) * prompt_tokens - 3 * len(questions) * 16
        computed = after["loraplex_engine_step_batched_tokens_sum"] - after_first["loraplex_engine_step_batched_tokens_sum"]
        assert computed < len(questions) * 100  # the system prompt was not computed again

        # another tenant, whose adapter changes k and v, with the very same messages: no hit
        _ask(http, system, "Where is my parcel?", customer="other")
        tenant = _metrics(http)
        assert tenant["loraplex_prefix_cache_hits_total"] == after["loraplex_prefix_cache_hits_total"]
        assert tenant["loraplex_engine_step_batched_tokens_sum"] - after["loraplex_engine_step_batched_tokens_sum"] >= prompt_tokens
        # ... and its own second request finds its own blocks
        _ask(http, system, "Can I return shoes?", customer="other")
        assert _metrics(http)["loraplex_prefix_cache_hits_total"] - tenant["loraplex_prefix_cache_hits_total"] >= 960
