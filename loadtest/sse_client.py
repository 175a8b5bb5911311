"""Streaming /v1/completions clients: one request, and the closed loop of a benchmark phase.

No torch here: the serving benchmark runs its clients in worker processes (one asyncio loop
and one httpx.AsyncClient each), so that parsing thousands of server-sent events a second
never makes the client the bottleneck. Times are `time.monotonic()`, which on Linux is one
clock for every process, so the parent can cut all workers' records by the same window.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

ERROR_BACKOFF_S = 0.1  # after a failed request: a dead or refusing server must not be hammered
MAX_BACKOFF_S = 2.0


@dataclass
class RequestRecord:
    start: float  # time.monotonic() when the request was sent
    tenant: str | None = None
    end: float | None = None
    status: int | None = None  # HTTP status; None when no response arrived
    error: str | None = None  # short kind: http_404, stream:<code>, ReadTimeout, incomplete_stream, cancelled
    message: str | None = None
    retry_after: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each token-bearing event
    tokens: int | None = None  # completion_tokens of the usage event

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None


@dataclass(frozen=True)
class LoadSpec:
    """One phase of closed-loop load, as every worker process needs it."""

    url: str  # .../v1/completions
    model: str
    tenants: tuple[str, ...]  # () = base model, no X-Customer-Id
    concurrency: int  # clients in the whole phase (all workers)
    prompt_tokens: int
    max_tokens: int
    token_range: tuple[int, int]  # prompt ids are drawn from [lo, hi)
    seed: str
    request_timeout_s: float
    start_at: float  # monotonic times: clients start, stop issuing, and are cancelled
    stop_issuing_at: float
    cancel_at: float
    stagger: bool = True  # the first request of client i asks for 1 + i * max_tokens / concurrency tokens


def completion_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


def random_prompt(seed: str, length: int, token_range: tuple[int, int]) -> list[int]:
    """Distinct per seed, reproducible across runs (str seeds hash deterministically)."""
    rng = random.Random(seed)
    return [rng.randrange(*token_range) for _ in range(length)]


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict, headers: dict, rec: RequestRecord) -> None:
    """Send one streaming request and fill `rec` as events arrive (also when cancelled)."""
    rec.start = time.monotonic()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            rec.status = response.status_code
            if response.status_code != 200:
                _record_refusal(rec, response, await response.aread())
                return
            if not await _read_events(response, rec) and rec.error is None:
                rec.error, rec.message = "incomplete_stream", "the stream ended without data: [DONE]"
    except asyncio.CancelledError:
        rec.error = rec.error or "cancelled"
        raise
    except httpx.HTTPError as e:
        rec.error, rec.message = type(e).__name__, str(e)[:300]
    except ValueError as e:  # an event that is not JSON
        rec.error, rec.message = "bad_event", str(e)[:300]
    finally:
        rec.end = time.monotonic()


def _record_refusal(rec: RequestRecord, response: httpx.Response, body: bytes) -> None:
    rec.error = f"http_{response.status_code}"
    try:
        rec.message = json.loads(body)["error"]["message"][:300]
    except (ValueError, KeyError, TypeError):
        rec.message = body[:300].decode(errors="replace")
    retry_after = response.headers.get("retry-after", "")
    rec.retry_after = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None


async def _read_events(response: httpx.Response, rec: RequestRecord) -> bool:
    """Parse `data:` lines as bytes arrive; every event of one read gets that read's time.
    Reads to the end of the body even after [DONE]: a response left unread closes its
    connection instead of returning it to the pool. Returns whether [DONE] arrived."""
    buffer, done = b"", False
    async for data in response.aiter_bytes():
        now = time.monotonic()
        buffer += data
        if done or b"\n" not in data:
            continue
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            _apply_event(json.loads(payload), now, rec)
    return done


def _apply_event(event: dict, now: float, rec: RequestRecord) -> None:
    if "error" in event:
        error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
        rec.error, rec.message = f"stream:{error.get('code') or error.get('type')}", str(error.get("message"))[:300]
        return
    usage = event.get("usage")
    if usage:
        rec.tokens = usage.get("completion_tokens")
    # A text completion event carries new text, or the finish reason with the last token's text
    # (possibly empty); usage-only events have no choices.
    for choice in event.get("choices") or ():
        if choice.get("text") or choice.get("finish_reason") or (choice.get("delta") or {}).get("content"):
            rec.chunk_times.append(now)
            return


async def one_request(base_url: str, model: str, prompt: list[int], max_tokens: int, tenant: str | None,
                      timeout_s: float) -> RequestRecord:
    """A single streaming request on a fresh connection (the first request after /ready)."""
    rec = RequestRecord(start=time.monotonic(), tenant=tenant)
    headers = {"X-Customer-Id": tenant} if tenant else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:
        await stream_completion(client, f"{base_url}/v1/completions", completion_body(model, prompt, max_tokens),
                                headers, rec)
    return rec


async def touch_tenants(base_url: str, model: str, tenants: list[str], prompt: list[int], timeout_s: float,
                        parallel: int = 16) -> list[RequestRecord]:
    """One one-token request per tenant, `parallel` at a time: before a phase, so that its
    adapters are loaded (the phase then measures the steady state, not first loads from disk)."""
    gate = asyncio.Semaphore(parallel)

    async def touch(tenant: str) -> RequestRecord:
        async with gate:
            return await one_request(base_url, model, prompt, 1, tenant, timeout_s)

    return await asyncio.gather(*(touch(t) for t in tenants))


# --- the closed loop (runs in worker processes)

def run_clients(spec: LoadSpec, client_ids: list[int]) -> dict:
    """Worker process entry: run `client_ids` of the phase; returns their records and the
    worker's CPU use (a busy worker would slow the clients, not the server)."""
    return asyncio.run(_run_clients(spec, client_ids))


async def _run_clients(spec: LoadSpec, client_ids: list[int]) -> dict:
    records: list[RequestRecord] = []
    connections = len(client_ids) + 4
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(spec.request_timeout_s, connect=10.0)) as client:
        await asyncio.sleep(max(0.0, spec.start_at - time.monotonic()))
        cpu0, wall0 = time.process_time(), time.monotonic()
        tasks = [asyncio.create_task(_client_loop(client, spec, i, records)) for i in client_ids]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, spec.cancel_at - time.monotonic()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {"records": records, "cpu_s": cpu, "wall_s": wall}


async def _client_loop(client: httpx.AsyncClient, spec: LoadSpec, client_id: int, records: list) -> None:
    url = spec.url
    k = 0
    while time.monotonic() < spec.stop_issuing_at:
        n = k * spec.concurrency + client_id  # the phase's request number: tenants round-robin over it
        tenant = spec.tenants[n % len(spec.tenants)] if spec.tenants else None
        headers = {"X-Customer-Id": tenant} if tenant else {}
        prompt = random_prompt(f"{spec.seed}/{n}", spec.prompt_tokens, spec.token_range)
        rec = RequestRecord(start=time.monotonic(), tenant=tenant)
        records.append(rec)
        # the first wave's lengths are staggered (1 .. max_tokens over the clients), so that clients
        # finish, and their next prompts arrive, spread over the steps as in a server's steady state,
        # not all in the same step for the whole phase
        max_tokens = spec.max_tokens if k or not spec.stagger else 1 + client_id * spec.max_tokens // spec.concurrency
        await stream_completion(client, url, completion_body(spec.model, prompt, max_tokens), headers, rec)
        k += 1
        if rec.error is not None:
            await asyncio.sleep(min(MAX_BACKOFF_S, rec.retry_after or ERROR_BACKOFF_S))
