"""OpenAI-compatible inference: /v1/completions, /v1/chat/completions, /v1/models.

One request becomes one engine sequence per (prompt, choice) — `n` choices of several prompts
run as separate sequences in the same batches; choice i samples with `seed + i` when a seed is
given. The tenant's adapter version is resolved when the request arrives and held until its
last sequence finishes (see server/service.py). Streams are server-sent events ending in
`data: [DONE]`; an error after the stream has started arrives as a `data: {"error": ...}` event.
Non-streaming requests whose client goes away are aborted within `DISCONNECT_POLL_S`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api.auth import CUSTOMER_HEADER, Tenant, get_service, get_tenant, select_customer
from server.admission import Overloaded, Ticket
from server.api.errors import (APIError, BadRequest, DeadlineExceeded, InternalError, NotFound, ServiceUnavailable,
                               TooManyRequests, error_body)
from server.api.formats import ChatFormat, ResponseFormat, TextCompletionFormat
from server.api.schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, GenerationFields
from server.engine.loop import StreamEvent
from server.engine.request import GenerationRequest, SamplingParams
from server.lora.store import AdapterNotFound, InvalidCustomerId
from server.metrics import Metrics
from server.service import Service

router = APIRouter(tags=["inference"])

DISCONNECT_POLL_S = 0.5
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- /v1/models

@router.get("/v1/models")
def list_models(tenant: Tenant = Depends(get_tenant), service: Service = Depends(get_service)) -> dict:
    """The base model, and the caller's own adapter when it has one (never other tenants')."""
    data = [_base_model_card(service)]
    if tenant.customer_id is not None:
        data.append(_adapter_card(service, tenant.customer_id, source=CUSTOMER_HEADER))
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
def retrieve_model(model_id: str, tenant: Tenant = Depends(get_tenant), service: Service = Depends(get_service)):
    if service.is_base_model_name(model_id):
        return _base_model_card(service)
    if model_id == tenant.customer_id:
        return _adapter_card(service, model_id, source=CUSTOMER_HEADER)
    raise NotFound(f"the model {model_id!r} does not exist", code="model_not_found", param="model")


def _base_model_card(service: Service) -> dict:
    return {"id": service.model.name, "object": "model", "created": 0, "owned_by": "loraplex",
            "root": service.model.name, "parent": None}


def _adapter_card(service: Service, customer_id: str, *, source: str) -> dict:
    try:
        record = service.get_adapter(customer_id)
    except (AdapterNotFound, InvalidCustomerId):
        raise _unknown_customer(customer_id, source) from None
    created = int(datetime.fromisoformat(record.created_at.replace("Z", "+00:00")).timestamp())
    return {"id": customer_id, "object": "model", "created": created, "owned_by": customer_id,
            "root": service.model.name, "parent": service.model.name}


def _unknown_customer(customer_id: str, source: str) -> NotFound:
    if source == "model":
        return NotFound(f"the model {customer_id!r} does not exist: neither the base model nor a stored adapter",
                        code="model_not_found", param="model")
    return NotFound(f"unknown customer {customer_id!r}: no adapter is stored for this {CUSTOMER_HEADER}",
                    code="adapter_not_found", param=CUSTOMER_HEADER)


# --- /v1/completions and /v1/chat/completions

@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, http: Request, tenant: Tenant = Depends(get_tenant),
                            service: Service = Depends(get_service)):
    arrived_at = time.monotonic()
    _refuse_unsupported(body)
    customer = select_customer(tenant, body.model, service)
    prompts = body.prompts()
    if not prompts:
        raise BadRequest("prompt is empty", param="prompt")
    prompt_ids = await _tokenize(lambda: [service.completion_prompt_ids(p) for p in prompts])
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    echo = None
    if body.echo:
        echo = await asyncio.to_thread(lambda: [p if isinstance(p, str) else service.decode(p) for p in prompts])
    # max_tokens 0 scores the prompt: the engine samples the one token a prefill ends with, which
    # no answer shows (the prompt's log-probabilities are those of the same forward)
    return await _serve(http, tenant, customer, service, body, prompt_ids, max(1, max_tokens), TextCompletionFormat(),
                        arrived_at, echo, prompt_only=max_tokens == 0)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, http: Request, tenant: Tenant = Depends(get_tenant),
                                 service: Service = Depends(get_service)):
    arrived_at = time.monotonic()
    _refuse_unsupported(body)
    customer = select_customer(tenant, body.model, service)
    prompt_ids = await _tokenize(lambda: [service.chat_prompt_ids(body.template_messages())])
    max_tokens = body.max_completion_tokens or body.max_tokens or service.default_max_tokens(len(prompt_ids[0]))
    return await _serve(http, tenant, customer, service, body, prompt_ids, max_tokens, ChatFormat(), arrived_at)


def _refuse_unsupported(body: GenerationFields) -> None:
    problem = body.unsupported()
    if problem:
        raise BadRequest(problem, code="unsupported")


async def _tokenize(work) -> list[list[int]]:
    try:
        return await asyncio.to_thread(work)
    except ValueError as e:
        raise BadRequest(str(e), param="prompt") from None


async def _serve(http: Request, tenant: Tenant, customer: str | None, service: Service, body: GenerationFields,
                 prompt_ids: list[list[int]], max_tokens: int, fmt: ResponseFormat, arrived_at: float,
                 echo: list[str] | None = None, prompt_only: bool = False) -> Response:
    """`echo`: per prompt, its text to put before each of its choices' text (completions' echo).
    `prompt_only`: no completion token in the answer (completions' max_tokens 0)."""
    if not service.loop.is_alive:
        raise ServiceUnavailable("the engine loop is not running", code="engine_stopped")
    where = "messages" if isinstance(fmt, ChatFormat) else "prompt"
    schema = body.json_schema()
    if schema is not None:  # compiled now (and cached): an unusable schema is a 400 before anything is queued
        try:
            await asyncio.to_thread(service.check_json_schema, schema)
        except ValueError as e:
            raise BadRequest(str(e), param="response_format", code="invalid_response_format") from None
    try:
        for ids in prompt_ids:
            service.check_length(len(ids), max_tokens, where=where)
        timeout_s = _timeout_s(http, service.settings.max_request_seconds)
        choices = _choices(body, prompt_ids, max_tokens, customer, None if timeout_s is None else arrived_at + timeout_s)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    key = None
    if customer is not None:
        try:
            key = service.acquire_adapter(customer)
        except (AdapterNotFound, InvalidCustomerId):
            source = CUSTOMER_HEADER if customer == tenant.customer_id else "model"
            raise _unknown_customer(customer, source) from None
    metrics = http.app.state.metrics
    try:
        ticket = service.admission.admit(tenant.customer_id or customer or "", len(choices),
                                         sum(len(request.prompt) for _, request in choices))
    except Overloaded as e:
        if key is not None:
            service.release_adapter(key)
        metrics.count_rejected(e.reason)
        raise TooManyRequests(str(e), e.retry_after_s, code=e.reason) from None
    run = _Run(service, metrics, key, choices, fmt, customer or service.model.name,
               usage_in_stream=bool(body.stream_options and body.stream_options.include_usage), arrived_at=arrived_at,
               ticket=ticket, wants_logprobs=body.logprob_counts()[0] is not None,
               echo=[echo[p] for p, _ in choices] if echo is not None else None, prompt_only=prompt_only)
    try:
        if body.stream:
            return await _stream_response(run)
        return await _until_disconnect(http, run.collect())
    except ValueError as e:  # the engine's own validation of a sequence
        raise BadRequest(str(e)) from None
    finally:
        if not body.stream:
            run.release()


def _choices(body: GenerationFields, prompt_ids: list[list[int]], max_tokens: int, customer: str | None,
             deadline: float | None = None):
    n = body.n or 1
    if n * len(prompt_ids) > MAX_CHOICES:
        raise ValueError(f"n x prompts = {n * len(prompt_ids)} sequences; at most {MAX_CHOICES} per request")
    choices = []
    logprobs, prompt_logprobs = body.logprob_counts()
    for prompt_index, ids in enumerate(prompt_ids):
        for i in range(n):
            seed = None if body.seed is None else body.seed + i
            sampling = SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0),
                seed=None if seed is None else (seed + 2**63) % 2**64 - 2**63, stop=body.stop_strings(),
                ignore_eos=bool(body.ignore_eos), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                json_schema=body.json_schema(),
            )
            choices.append((prompt_index, GenerationRequest(prompt=ids, sampling=sampling, adapter=customer,
                                                            deadline=deadline)))
    return choices


@dataclass
class _Run:
    """One HTTP request's sequences: their merged events, metrics, and the adapter version they hold."""

    service: Service
    metrics: Metrics
    key: tuple | None
    choices: list[tuple[int, GenerationRequest]]
    fmt: ResponseFormat
    model_name: str
    usage_in_stream: bool = False
    arrived_at: float = field(default_factory=time.monotonic)
    ticket: Ticket | None = None  # admission: queued until the first event, counted until release
    wants_logprobs: bool = False
    echo: list[str] | None = None  # per choice: the prompt's text, put before its own (completions' echo)
    prompt_only: bool = False  # max_tokens 0: the sampled token is dropped from every event
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    _released: bool = False

    def __post_init__(self):
        self.id = f"{self.fmt.id_prefix}-{uuid.uuid4().hex}"
        self.text_offsets = [0] * len(self.choices)  # log-probabilities' text_offset, per choice
        self._echo_due = set(range(len(self.choices))) if self.echo is not None else set()

    def token_texts(self, ids: list[int]) -> list[str]:
        return self.service.token_texts(ids)

    def with_echo(self, index: int, event: StreamEvent) -> tuple[str, list | None]:
        """The event's text and log-probability entries, after the prompt's on the choice's first event."""
        entries = event.logprobs
        if index not in self._echo_due:
            return event.text, entries
        self._echo_due.discard(index)
        if self.wants_logprobs:
            entries = (event.prompt_logprobs or []) + (entries or [])
        return self.echo[index] + event.text, entries

    def release(self) -> None:
        if self.ticket is not None:
            self.ticket.close()
        if self.key is not None and not self._released:
            self._released = True
            self.service.release_adapter(self.key)

    async def events(self) -> AsyncIterator[tuple[int, StreamEvent]]:
        observations = [self.metrics.start_request(self.arrived_at) for _ in self.choices]
        streams = [self.service.stream(request, self.key) for _, request in self.choices]
        try:
            async with aclosing(_merge(streams)) as merged:
                async for index, event in merged:
                    if self.prompt_only:
                        event = _without_completion(event)
                    if self.ticket is not None:
                        self.ticket.started()  # its prompt went through: no longer queued
                    observations[index].on_tokens(len(event.token_ids))
                    if event.finish_reason is not None:
                        observations[index].on_finish(event.finish_reason, event.prompt_tokens,
                                                      event.completion_tokens)
                    yield index, event
        finally:  # also when a dropped stream is finalised by the garbage collector
            self.release()

    def usage(self, completion_tokens: int) -> dict:
        prompts = {p: len(r.prompt) for p, r in self.choices}
        prompt_tokens = sum(prompts.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def collect(self) -> JSONResponse:
        texts = [[] for _ in self.choices]
        entries = [[] if self.wants_logprobs else None for _ in self.choices]
        finals: list[StreamEvent | None] = [None] * len(self.choices)
        async with aclosing(self.events()) as events:
            async for index, event in events:
                text, logprobs = self.with_echo(index, event)
                texts[index].append(text)
                if entries[index] is not None:
                    entries[index] += logprobs or []
                if event.finish_reason is not None:
                    finals[index] = event
                    _raise_if_failed(event)
        for index in list(self._echo_due):  # a choice that ended without an event: echo alone
            texts[index].insert(0, self.echo[index])
        results = [("".join(t), _finish_reason(f), e) for t, f, e in zip(texts, finals, entries)]
        body = self.fmt.response(self, results)
        body["usage"] = self.usage(sum(f.completion_tokens for f in finals))
        return JSONResponse(body)


def _without_completion(event: StreamEvent) -> StreamEvent:
    """The event as a request of max_tokens 0 sees it: no completion text, tokens or their
    log-probabilities (the prompt's stay); it ends at its length limit, unless it failed."""
    finish = event.finish_reason
    if finish in ("stop", "length"):
        finish = "length"
    return replace(event, text="", token_ids=[], logprobs=None, completion_tokens=0, finish_reason=finish)


async def _merge(streams: list[AsyncIterator[StreamEvent]]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """Events of several streams as they come, tagged with the stream's index. Leaving early
    cancels the pumps, whose streams then abort their sequences."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for event in only:
                yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StreamEvent]) -> None:
        try:
            async with aclosing(stream) as events:
                async for event in events:
                    queue.put_nowait((index, event))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield index, item
            if item.finish_reason is not None:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


TIMEOUT_HEADER = "X-Request-Timeout"
_DEADLINE_MESSAGE = (f"the request ran past its deadline (the {TIMEOUT_HEADER} header's seconds, at most the "
                     "server's LORAPLEX_MAX_REQUEST_SECONDS, from its arrival)")


def _timeout_s(http: Request, server_max: float) -> float | None:
    """The request's deadline in seconds from its arrival: the client's X-Request-Timeout if it
    gives one, at most the server's maximum (None: no deadline at all)."""
    raw = http.headers.get(TIMEOUT_HEADER)
    limit = server_max or None
    if raw is None:
        return limit
    try:
        asked = float(raw)
    except ValueError:
        asked = -1.0
    if not 0 < asked < float("inf"):
        raise BadRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds, not {raw!r}", param=TIMEOUT_HEADER)
    return asked if limit is None else min(asked, limit)


def _raise_if_failed(event: StreamEvent) -> None:
    if event.finish_reason == "timeout":
        raise DeadlineExceeded(_DEADLINE_MESSAGE)
    if event.finish_reason == "abort":
        raise ServiceUnavailable(event.error or "the request was aborted", code="aborted")
    if event.finish_reason == "error":
        raise InternalError(event.error or "the generation failed", code="generation_failed")


def _finish_reason(event: StreamEvent | None) -> str:
    return event.finish_reason if event is not None else "abort"


async def _until_disconnect(http: Request, work) -> Response:
    """Await `work`; if the client disconnects first, cancel it (aborting its sequences)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await http.is_disconnected():
                return Response(status_code=499)  # nobody reads it; counted as a client error
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _stream_response(run: _Run) -> Response:
    """Start the stream; errors before the first event still get a proper HTTP status."""
    events = run.events()
    try:
        first = await anext(events)
        if len(run.choices) == 1 and first[1].finish_reason in ("error", "abort", "timeout"):
            _raise_if_failed(first[1])
    except BaseException:
        await events.aclose()
        run.release()
        raise
    return StreamingResponse(_sse(run, first, events), media_type="text/event-stream", headers=SSE_HEADERS)


async def _sse(run: _Run, first: tuple[int, StreamEvent], events: AsyncIterator[tuple[int, StreamEvent]]):
    fmt = run.fmt
    completion_tokens = 0
    try:
        plain = not run.wants_logprobs and run.echo is None
        templates = [_text_template(run, index) if plain else None for index in range(len(run.choices))]
        for index in range(len(run.choices)):
            for chunk in fmt.opening_chunks(run, index):
                yield _data(chunk)
        async for index, event in _prepend(first, events):
            if event.finish_reason is None and event.text and templates[index] is not None:
                head, tail = templates[index]  # the common event: only the text changes
                yield head + json.dumps(event.text) + tail
                continue
            if event.finish_reason in ("error", "abort", "timeout"):
                yield _data(_stream_error(event))
                continue
            text, entries = run.with_echo(index, event)
            for chunk in fmt.chunks(run, index, text, event.finish_reason, entries):
                yield _data(chunk)
            if event.finish_reason is not None:
                completion_tokens += event.completion_tokens
        if run.usage_in_stream:
            yield _data({**fmt.chunk_head(run), "choices": [], "usage": run.usage(completion_tokens)})
    except APIError as e:
        yield _data(error_body(e.status_code, e.message, e.code, e.param))
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
        yield _data(error_body(500, f"internal server error ({type(e).__name__}: {e})", "internal_error"))
    finally:
        await events.aclose()
        run.release()
    yield "data: [DONE]\n\n"


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def _stream_error(event: StreamEvent) -> dict:
    if event.finish_reason == "timeout":
        return error_body(504, _DEADLINE_MESSAGE, "deadline_exceeded")
    if event.finish_reason == "abort":
        return error_body(503, event.error or "the request was aborted", "aborted")
    return error_body(500, event.error or "the generation failed", "generation_failed")


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


_TEXT_MARK = "\x00text\x00"  # JSON-escaped to a string no real chunk carries


def _text_template(run: _Run, index: int) -> tuple[str, str] | None:
    """The SSE line of a text delta of choice `index` cut around its text, so a stream encodes
    its chunk once and then each token's text alone (the stream's per-token CPU is what the
    engine shares its interpreter with); None where the format makes no single such chunk."""
    chunks = run.fmt.chunks(run, index, _TEXT_MARK, None)
    if len(chunks) != 1:
        return None
    head, mark, tail = _data(chunks[0]).partition(json.dumps(_TEXT_MARK))
    return (head, tail) if mark else None
