"""The HTTP API end to end: a real uvicorn server on 127.0.0.1 with the default model, driven by
the official `openai` client and raw HTTP. Adapter outputs are checked against `peft` itself."""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings
from tests.peft_helpers import make_peft_model, save_adapter

ADMIN_TOKEN = "test-admin-token-0123456789"
PROMPT = "The three most important rules of customer support are"
CHAT_QUESTION = "What is the capital of France?"
NUM_REFERENCE_TOKENS = 32  # the replace/delete test streams this many; the others use prefixes
MAX_MODEL_LEN = 1024
# customer -> (peft_helpers config, seed)
ADAPTERS = {"alpha": ("r8-qv", 11), "beta": ("patterns", 12)}


def _hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """peft's / transformers' own greedy decode, EOS not special (as ignore_eos=True)."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=n, eos_token_id=-1, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def reference(default_model_dir, tmp_path_factory):
    """Adapters saved by peft, and what transformers + peft generate greedily."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer.encode(PROMPT)
    chat_text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}],
                                              add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer.encode(chat_text, add_special_tokens=False)
    ref = {"tokenizer": tokenizer, "prompt_ids": prompt_ids, "base": _hf_greedy(base, prompt_ids, 8),
           "dirs": {}, "completion": {}, "chat": {}}
    for customer, (config_name, seed) in ADAPTERS.items():
        peft_model = make_peft_model(copy.deepcopy(base), config_name, seed=seed)
        ref["dirs"][customer] = save_adapter(peft_model, tmp_path_factory.mktemp(customer))
        ref["completion"][customer] = _hf_greedy(peft_model, prompt_ids, NUM_REFERENCE_TOKENS)
        ref["chat"][customer] = _hf_greedy(peft_model, chat_ids, 6)
        del peft_model
    return ref


def _text(ref, ids: list[int]) -> str:
    return ref["tokenizer"].decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    settings = Settings.from_env(
        device="cpu", max_num_seqs=8, num_kv_blocks=256, max_model_len=MAX_MODEL_LEN, max_loras=2, max_lora_rank=16,
        admin_token=ADMIN_TOKEN, adapter_store=str(tmp_path_factory.mktemp("adapters")), served_model_name="",
    )
    with BackgroundServer(create_app(settings)) as running:
        running.settings = settings
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def base_name(http):
    return http.get("/v1/models").json()["data"][0]["id"]


def _upload(http, customer: str, adapter_dir) -> httpx.Response:
    files = {"adapter_config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes())}
    return http.put(f"/admin/adapters/{customer}", files=files, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


@pytest.fixture(scope="module")
def uploaded(http, reference):
    records = {}
    for customer in ADAPTERS:
        response = _upload(http, customer, reference["dirs"][customer])
        assert response.status_code == 201, response.text
        records[customer] = response.json()
    return records


def _client(server, customer: str | None = None) -> openai.OpenAI:
    headers = {"X-Customer-Id": customer} if customer else None
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", default_headers=headers, max_retries=0,
                         timeout=120)


def _greedy_completion(client, model: str, n: int, **kwargs):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True}, **kwargs)


def _metrics(http) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from /metrics, through prometheus_client's parser."""
    response = http.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# --- tests

def test_health_and_ready(http):
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_base_model_completion_matches_transformers(server, reference, base_name):
    response = _greedy_completion(_client(server), base_name, 8)
    choice = response.choices[0]
    assert choice.text == _text(reference, reference["base"])
    assert choice.finish_reason == "length"
    assert response.model == base_name
    assert response.usage.prompt_tokens == len(reference["prompt_ids"])
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == len(reference["prompt_ids"]) + 8


def test_chat_completion_uses_the_chat_template(server, base_name):
    response = _client(server).chat.completions.create(
        model=base_name, messages=[{"role": "user", "content": CHAT_QUESTION}], max_tokens=20, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == "The capital of France is Paris."
    assert response.choices[0].finish_reason == "stop"


def test_streaming_equals_non_streaming_and_ends_with_done(server, http, base_name):
    client = _client(server)
    messages = [{"role": "user", "content": CHAT_QUESTION}]
    chunks = list(client.chat.completions.create(model=base_name, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "The capital of France is Paris."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == 7 and not chunks[-1].choices

    body = {"model": base_name, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    streamed = "".join(e["choices"][0]["text"] for e in events)
    assert streamed == _greedy_completion(_client(server), base_name, 6).choices[0].text


def test_n_choices_and_seed_are_reproducible(server, base_name):
    client = _client(server)
    kwargs = dict(model=base_name, prompt=PROMPT, max_tokens=5, temperature=1.0, n=2, seed=1234)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 10


def test_customer_adapter_matches_peft(server, reference, uploaded, base_name):
    expected = _text(reference, reference["completion"]["alpha"][:8])
    by_header = _greedy_completion(_client(server, "alpha"), base_name, 8)
    assert by_header.choices[0].text == expected
    assert by_header.model == "alpha"
    by_model = _greedy_completion(_client(server), "alpha", 8)  # vLLM style: the body names the adapter
    assert by_model.choices[0].text == expected
    assert expected != _text(reference, reference["base"])  # the adapter matters
    chat = _client(server, "alpha").chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": CHAT_QUESTION}], max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == _text(reference, reference["chat"]["alpha"])


def test_two_customers_concurrently_each_get_their_own_adapter(server, reference, uploaded, base_name):
    customers = ["alpha", "beta", "alpha", "beta"]

    def run(customer):
        return _greedy_completion(_client(server, customer), base_name, 8).choices[0].text

    with ThreadPoolExecutor(len(customers)) as pool:
        texts = list(pool.map(run, customers))
    assert texts == [_text(reference, reference["completion"][c][:8]) for c in customers]
    assert texts[0] != texts[1]


def test_unknown_customer_and_model_mismatch(server, uploaded, base_name):
    with pytest.raises(openai.NotFoundError) as err:
        _greedy_completion(_client(server, "nobody"), base_name, 2)
    assert err.value.code == "adapter_not_found" and "nobody" in err.value.message
    with pytest.raises(openai.NotFoundError):
        _greedy_completion(_client(server, "../alpha"), base_name, 2)
    with pytest.raises(openai.NotFoundError) as err:
        _greedy_completion(_client(server), "nobody", 2)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        _greedy_completion(_client(server, "alpha"), "beta", 2)
    assert err.value.code == "model_mismatch" and "X-Customer-Id" in err.value.message


def test_models_lists_the_base_model_and_only_the_callers_adapter(server, http, uploaded, base_name):
    assert [m.id for m in _client(server).models.list()] == [base_name]
    assert [m.id for m in _client(server, "alpha").models.list()] == [base_name, "alpha"]
    assert [m.id for m in _client(server, "beta").models.list()] == [base_name, "beta"]
    assert http.get("/v1/models", headers={"X-Customer-Id": "nobody"}).status_code == 404
    assert _client(server, "alpha").models.retrieve("alpha").parent == base_name
    with pytest.raises(openai.NotFoundError):
        _client(server, "alpha").models.retrieve("beta")


def _long_prompt_ids(n: int) -> list[int]:
    return [(1000 + 7 * i) % 40000 + 10 for i in range(n)]


@pytest.mark.parametrize("body, message", [
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),  # 0 is valid: the prompt alone (test_api_logprobs.py)
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 1000}, "n"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop": ["x"] * 20}, "stop"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [-5, 3]}, "vocabulary"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": _long_prompt_ids(MAX_MODEL_LEN - 8), "max_tokens": 16}, "maximum context length"),
    ({"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, "maximum context length"),
])
def test_invalid_completion_requests_get_a_400_envelope(http, body, message):
    response = http.post("/v1/completions", json={"model": None, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),  # completions only
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_invalid_chat_requests_get_a_400_envelope(http, body, message):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_malformed_bodies_get_a_400_envelope(http):
    response = http.post("/v1/completions", content=b'{"prompt": "hi", ', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = http.post("/v1/nothing-here", json={})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def _stream_text(line_iter) -> tuple[str, list[str]]:
    lines = [line for line in line_iter if line]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices")), lines


def test_replace_and_delete_leave_requests_in_flight_alone(server, http, reference, uploaded):
    """A request keeps the adapter version it started with; new requests see the change at once."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    store = server.settings.adapter_store_dir
    n = NUM_REFERENCE_TOKENS
    assert _upload(http, "gamma", reference["dirs"]["alpha"]).json()["version"] == 1
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"X-Customer-Id": "gamma"}) as running:
        lines = running.iter_lines()
        first = next(line for line in lines if line)  # generation has started on version 1
        replaced = _upload(http, "gamma", reference["dirs"]["beta"])
        assert replaced.status_code == 201 and replaced.json()["version"] == 2
        assert _metrics(http)[("loraplex_num_requests_running", ())] == 1  # still in flight
        after = _greedy_completion(_client(server, "gamma"), "gamma", 6).choices[0].text
        rest, _ = _stream_text(lines)
    old_text = json.loads(first.removeprefix("data: "))["choices"][0]["text"] + rest
    assert old_text == _text(reference, reference["completion"]["alpha"])
    assert after == _text(reference, reference["completion"]["beta"][:6])
    assert not (store / "gamma" / "v1").exists()  # pruned once its last request finished

    with http.stream("POST", "/v1/completions", json=body, headers={"X-Customer-Id": "gamma"}) as running:
        lines = running.iter_lines()
        first = next(line for line in lines if line)
        deleted = http.delete("/admin/adapters/gamma", headers=admin)
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert _metrics(http)[("loraplex_num_requests_running", ())] == 1
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                         headers={"X-Customer-Id": "gamma"}).status_code == 404
        rest, lines = _stream_text(lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] + rest == \
        _text(reference, reference["completion"]["beta"])
    assert http.get("/admin/adapters/gamma", headers=admin).status_code == 404


def _wait_until_idle(http, within_s: float = 15) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        metrics = _metrics(http)
        if metrics[("loraplex_num_requests_running", ())] == 0 and metrics[("loraplex_kv_cache_usage_ratio", ())] == 0:
            return
        time.sleep(0.1)
    pytest.fail("an abandoned request kept running")


def test_leaving_a_stream_aborts_its_sequence(http, base_name):
    body = {"model": base_name, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        next(line for line in response.iter_lines() if line)
    _wait_until_idle(http)  # 500 tokens would take far longer


def test_a_tenant_stream_left_early_frees_its_blocks_and_adapter_pin_within_a_step(http, uploaded, base_name):
    body = {"model": base_name, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"X-Customer-Id": "alpha"}) as response:
        next(line for line in response.iter_lines() if line)
        running = _metrics(http)
        assert running[("loraplex_adapters_pinned", ())] == 1 and running[("loraplex_kv_cache_usage_ratio", ())] > 0
        steps_at_close = running[("loraplex_engine_steps_total", ())]
    _wait_until_idle(http)
    idle = _metrics(http)
    assert idle[("loraplex_adapters_pinned", ())] == 0
    # freed by the abort, applied before the engine's next step: not by the 500 tokens running out
    assert idle[("loraplex_engine_steps_total", ())] - steps_at_close <= 5


def test_a_client_that_gives_up_aborts_its_request(server, http, base_name):
    body = {"model": base_name, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0)
    _wait_until_idle(http)


def test_metrics_parse_and_move_with_traffic(server, http, uploaded, base_name):
    before = _metrics(http)
    _greedy_completion(_client(server, "alpha"), base_name, 4)
    after = _metrics(http)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("loraplex_http_requests_total", endpoint="/v1/completions", status_class="2xx") == 1
    assert delta("loraplex_generation_tokens_total") == 4
    assert delta("loraplex_prompt_tokens_total") > 0
    assert delta("loraplex_time_to_first_token_seconds_count") == 1
    assert delta("loraplex_inter_token_latency_seconds_count") == 3
    assert delta("loraplex_e2e_request_latency_seconds_count") == 1
    assert delta("loraplex_request_queue_time_seconds_count") == 1
    assert delta("loraplex_engine_step_batch_size_count") >= 4
    assert delta("loraplex_engine_step_distinct_adapters_sum") >= 4
    assert delta("loraplex_generations_total", finish_reason="length") == 1
    build = [(dict(labels), v) for (name, labels), v in after.items() if name == "loraplex_build_info"]
    assert len(build) == 1 and build[0][1] == 1 and build[0][0]["model"] == base_name
    assert build[0][0]["tensor_parallel_size"] == "1"
    # what the Gateway API Inference Extension's endpoint picker reads, under vLLM's names
    assert after[("vllm:num_requests_waiting", ())] == 0
    assert 0 <= after[("vllm:kv_cache_usage_perc", ())] <= 1
    info = [labels for (name, labels) in after if name == "vllm:lora_requests_info"]
    assert len(info) == 1
    info = dict(info[0])
    assert info["max_lora"] == "2"
    assert "alpha" in info["running_lora_adapters"].split(",")
    assert len(info["running_lora_adapters"].split(",")) <= 2
    # no customer names anywhere else
    for name, labels in after:
        if name not in ("vllm:lora_requests_info", "loraplex_lora_requests_info"):
            assert "alpha" not in str(labels), name
    uploads = [v for (name, labels), v in after.items() if name == "loraplex_adapter_uploads_total"
               and dict(labels)["result"] == "stored"]
    assert uploads and uploads[0] >= 2
    assert after[("loraplex_adapter_loads_total", (("source", "disk"),))] >= 1


@pytest.mark.parametrize("usage_in_stream", [False, True])
def test_streamed_text_chunks_from_the_template_equal_the_encoded_chunks(usage_in_stream):
    """The per-stream template of a text delta gives, byte for byte, the SSE line that encoding
    the whole chunk gives, for texts that JSON must escape."""
    from types import SimpleNamespace

    from server.api.formats import ChatFormat, TextCompletionFormat
    from server.api.routers.completions import _data, _text_template

    texts = ["Paris", ' "quoted" \\ back', "line\nbreak\ttab", "\x00\x1f ctl", "é ü 中文 🙂", "\ud800 lone", "</script>"]
    for fmt in (TextCompletionFormat(), ChatFormat()):
        run = SimpleNamespace(fmt=fmt, id="cmpl-x1", created=1700000000, model_name="base \"m\"",
                              usage_in_stream=usage_in_stream)
        for index in (0, 2):
            head, tail = _text_template(run, index)
            for text in texts:
                (chunk,) = fmt.chunks(run, index, text, None)
                assert head + json.dumps(text) + tail == _data(chunk)
