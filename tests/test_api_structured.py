"""response_format over HTTP: json_schema and json_object on chat and completions (the official
client, streaming included), mixed with free-form requests at once; malformed or uncompilable
formats are a 400 naming response_format."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings
from tests.test_structured_outputs import ORDERS, PERSON


@pytest.fixture(scope="module")
def server(default_model_dir):
    settings = Settings.from_env(device="cpu", max_num_seqs=8, num_kv_blocks=256, max_model_len=512, max_loras=1,
                                 max_lora_rank=8, admin_token="unused-token-xxxxxxxx", served_model_name="")
    with BackgroundServer(create_app(settings)) as running:
        yield running


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def _schema_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_schemas_and_free_form_requests_at_once(server):
    client = _client(server)
    model = "SmolLM2-135M-Instruct"

    def chat(i):
        kind = i % 4
        kwargs = dict(model=model, max_tokens=160, temperature=0.8, seed=i,
                      messages=[{"role": "user", "content": f"Customer number {i}, as JSON please."}])
        if kind == 0:
            kwargs["response_format"] = _schema_format(PERSON)
        elif kind == 1:
            kwargs["response_format"] = _schema_format(ORDERS)
        elif kind == 2:  # any object: greedy and asked for a short one (an unbounded one may run past max_tokens)
            kwargs["response_format"] = {"type": "json_object"}
            kwargs.update(temperature=0, messages=[{"role": "user", "content": 'Answer with the JSON object '
                                                                              '{"city": "Paris"} and nothing else.'}])
        else:
            kwargs["max_tokens"] = 12  # free form
        return kind, client.chat.completions.create(**kwargs)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(chat, range(8)))
    for kind, response in answers:
        text = response.choices[0].message.content
        if kind == 3:
            continue
        assert response.choices[0].finish_reason == "stop", text
        value = json.loads(text)
        jsonschema.validate(value, [PERSON, ORDERS, {"type": "object"}][kind])


def test_streamed_and_completions_structured_output(server):
    client = _client(server)
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=160, stream=True,
                                            messages=[{"role": "user", "content": "A person, as JSON."}],
                                            response_format=_schema_format(PERSON), temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    completion = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Orders as JSON:", max_tokens=160,
                                           temperature=0, extra_body={"response_format": _schema_format(ORDERS)})
    jsonschema.validate(json.loads(completion.choices[0].text), ORDERS)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "Unsupported type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "structured output"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}}, "json_schema"),
    ({"type": "json_schema", "json_schema": "nope"}, "json_schema"),
    ({"type": "xml"}, "xml"),
])
def test_bad_response_formats_are_400(server, response_format, message):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        response = httpx.post(f"{server.url}{path}", json={**body, "response_format": response_format}, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and message in error["message"], error
