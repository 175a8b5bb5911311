"""The OpenAPI document the server publishes (/openapi.json), corrected to what it really does.

FastAPI derives the document from the routes and pydantic models; left alone it would promise
things the server does not do (schemathesis found each of these in tests/test_fuzz_api.py):
- 422 for a malformed request: the server answers 400 in OpenAI's error envelope (errors.py);
  and none of the other errors a route can give (401, 404, 413, 429, 503, 504, 507) appear;
- no request body for adapter uploads, which the route reads itself (multipart, two files);
- any string as a customer id, where the store takes CUSTOMER_ID_PATTERN only;
- /metrics as JSON (it is Prometheus text);
- OpenAI request fields the server accepts only at their defaults (best_of, suffix, penalties,
  tools, ...), so that a client asking for them gets a 400 naming the feature rather than a
  silent no: the document lists the values it accepts.
Limits that depend on the model (the prompt plus max_tokens within the context, token ids within
the vocabulary) cannot be written in a schema; such requests are valid by the document and get 400.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.lora.store import CUSTOMER_ID_PATTERN

ERROR_SCHEMA = {
    "title": "Error", "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": ["string", "null"]},
        "param": {"type": ["string", "null"]}}}},
}
ERROR_DESCRIPTIONS = {
    400: "Invalid request: the body or a parameter, or a feature this server does not implement",
    401: "Missing or wrong credentials",
    403: "Not allowed: the API key belongs to another customer, the admin API is disabled, or a composition "
         "names an adapter its customer may not read",
    404: "No such model, adapter, customer or endpoint",
    413: "Body over its size limit",
    429: "Over a queue or per-tenant bound; retry after Retry-After",
    503: "Loading, stalled, or draining before shutdown",
    504: "The request ran past its deadline",
    507: "No space left in the adapter store",
}
ROUTE_ERRORS = (  # path prefix -> the error statuses its routes can answer
    ("/v1/", (400, 401, 403, 404, 413, 429, 503, 504)),
    ("/admin/", (400, 401, 403, 404, 413, 503, 507)),
    ("/ready", (503,)),
)
_NULL = {"type": "null"}
DEFAULTS_ONLY = {  # schema -> field -> the values the server accepts (anything else: 400)
    "CompletionRequest": {"best_of": {"anyOf": [_NULL, {"const": 1}]},
                          "suffix": {"anyOf": [_NULL, {"const": ""}]}},
    "ChatCompletionRequest": {
        "tools": {"anyOf": [_NULL, {"type": "array", "maxItems": 0}]},
        "functions": {"anyOf": [_NULL, {"type": "array", "maxItems": 0}]}},
    "ChatMessage": {"role": {"enum": ["system", "developer", "user", "assistant"]},
                    "tool_calls": {"anyOf": [_NULL, {"type": "array", "maxItems": 0}]}},
    "ContentPart": {"type": {"const": "text"}, "text": {"type": "string"}},
}
REQUIRED = {"ContentPart": ["type", "text"]}  # schema -> fields the server needs though pydantic has defaults
NON_EMPTY_PROMPT = {"anyOf": [  # "" and [] are "the prompt is empty"
    {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "integer"}, "minItems": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1}, "minItems": 1}]}
STREAMING = {"text/event-stream": {"schema": {  # each event: a chunk object, an error envelope, or [DONE]
    "description": "with \"stream\": true: server-sent events, each a chunk (or an error), then data: [DONE]"}}}
COMMON_DEFAULTS_ONLY = {"presence_penalty": {"anyOf": [_NULL, {"const": 0}]},
                        "frequency_penalty": {"anyOf": [_NULL, {"const": 0}]},
                        "logit_bias": {"anyOf": [_NULL, {"type": "object", "maxProperties": 0}]}}
RESPONSE_FORMAT = {"anyOf": [_NULL, {  # only what the server checks (schemas.GenerationFields.json_schema)
    "type": "object", "description": "structured output: text (the default type), any JSON object, or JSON "
    "fitting json_schema.schema ({} when absent); a schema the grammar engine cannot compile is a 400",
    "properties": {"type": {"enum": ["text", "json_object", "json_schema"]},
                   "json_schema": {"anyOf": [_NULL, {"type": "object", "properties": {"schema": {"type": "object"}}}]}}}]}
UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["adapter_config", "adapter_model"],
    "properties": {"adapter_config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
                   "adapter_model": {"type": "string", "format": "binary",
                                     "description": "adapter_model.safetensors"}}}}}}


def install_openapi(app: FastAPI) -> None:
    """Serve the corrected document (built once, on the first request for it)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = corrected(get_openapi(title=app.title, version=app.version, summary=app.summary,
                                                       routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi


def corrected(doc: dict) -> dict:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for name, fields in DEFAULTS_ONLY.items():
        properties = schemas.get(name, {}).get("properties", {})
        extra = COMMON_DEFAULTS_ONLY if name.endswith("Request") else {}
        for field, accepted in {**fields, **extra}.items():
            if field in properties:
                properties[field] = {**accepted, "description": "accepted only as shown: anything else is 400"}
        if name in REQUIRED:
            schemas[name]["required"] = REQUIRED[name]
    if "CompletionRequest" in schemas:
        schemas["CompletionRequest"]["properties"]["prompt"] = NON_EMPTY_PROMPT
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        if "response_format" in schemas.get(name, {}).get("properties", {}):
            schemas[name]["properties"]["response_format"] = RESPONSE_FORMAT
    for path, operations in doc.get("paths", {}).items():
        errors = next((codes for prefix, codes in ROUTE_ERRORS if path.startswith(prefix)), ())
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in errors:
                responses.setdefault(str(status), {"description": ERROR_DESCRIPTIONS[status], "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "customer_id" and parameter.get("in") == "path":
                    parameter["schema"] = {"type": "string", "pattern": f"^{CUSTOMER_ID_PATTERN}$"}
            if path.startswith("/admin/adapters/") and method == "put":
                operation["requestBody"] = UPLOAD_BODY
            if path.startswith("/v1/") and method == "post" and "200" in responses:
                responses["200"].setdefault("content", {}).update(STREAMING)
            if path == "/metrics":
                responses["200"] = {"description": "Prometheus text exposition format",
                                    "content": {"text/plain": {"schema": {"type": "string"}}}}
    return doc
