"""Request bodies of the OpenAI-compatible endpoints (pydantic); responses are built in the routers.

Fields follow OpenAI's API, plus vLLM's `top_k` and `ignore_eos`. Types are strict, as JSON has
them (no "16" for 16, no false for 0); unknown fields are ignored,
as OpenAI-compatible servers do (clients send `user`, `metadata`, ...); known features this
server does not implement are refused with a 400 naming them (`unsupported()`), never
silently dropped.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_STOP_STRINGS = 16
MAX_CHOICES = 128
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object: any JSON object

REQUEST_BODY = ConfigDict(extra="ignore", strict=True)  # every body model: see the module docstring
StopString = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class StreamOptions(BaseModel):
    model_config = REQUEST_BODY
    include_usage: bool = False


class GenerationFields(BaseModel):
    model_config = REQUEST_BODY

    model: str | None = None  # the base model's id or a customer's adapter (the customer id)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0 = no limit
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = Field(None)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = False  # vLLM's extension: generate max_tokens even past EOS
    user: str | None = None
    # {"type": "text"} (default), {"type": "json_object"} or {"type": "json_schema", "json_schema":
    # {"name", "schema", "strict", "description"}}, as OpenAI's chat API; completions take it too (vLLM)
    response_format: dict[str, Any] | None = None

    def json_schema(self) -> str | None:
        """The JSON schema (text) the answer must fit, or None for free text; ValueError if
        response_format is malformed (a schema the grammar engine cannot compile is found later)."""
        spec = self.response_format
        if spec is None:
            return None
        kind, inner = spec.get("type", "text"), spec.get("json_schema")
        if inner is not None and (not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), dict)):
            raise ValueError("response_format json_schema must be an object whose schema is a JSON schema object")
        if kind == "text":
            return None
        if kind == "json_object":
            return JSON_OBJECT_SCHEMA
        if kind != "json_schema":
            raise ValueError(f"response_format type {kind!r} is not supported: text, json_object or json_schema")
        return json.dumps((inner or {}).get("schema", {}))

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return stops

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return None, None

    def unsupported(self) -> str | None:
        """Why this request asks for something the server does not do, or None."""
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            return f"stop: at most {MAX_STOP_STRINGS} stop strings"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported (leave them 0)"
        if self.logit_bias:
            return "logit_bias is not supported"
        try:
            self.json_schema()
        except ValueError as e:
            return str(e)
        return None


class CompletionRequest(GenerationFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    # 0: no completion, the prompt alone (with echo and logprobs, how evaluation harnesses score it)
    max_tokens: int | None = Field(None, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One or more prompts: a string, token ids, or a list of either."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per output token, per prompt token); None = not wanted."""
        return self.logprobs, self.logprobs if self.echo else None

    def unsupported(self) -> str | None:
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of is not supported (use n)"
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = REQUEST_BODY
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = REQUEST_BODY
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"message content of type {part.type!r} is not supported: only text")
            if part.text is None:
                raise ValueError("a message content part of type 'text' has no text")
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return ((self.top_logprobs or 0) if self.logprobs else None), None

    def unsupported(self) -> str | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs: true"
        if (self.tools or self.functions) and self.tool_choice != "none":
            return "tools and function calling are not supported"
        for message in self.messages:
            if message.role == "tool" or message.tool_calls:
                return "tool messages and tool calls are not supported"
        return super().unsupported()

    def template_messages(self) -> list[dict]:
        """Messages as the chat template takes them (`developer` is OpenAI's new name for `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
