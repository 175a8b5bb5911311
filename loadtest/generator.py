"""Drive an OpenAI-compatible server with streaming /v1/completions: open loop or closed loop.

Open loop: requests leave at the Poisson send times of `workload.poisson_arrivals`, whether or
not earlier ones have finished (what a service sees from many independent users; the rate is
the load). Closed loop: N clients, each sending its next request when the last one ends (the
load is the concurrency). Either way the requests themselves come from `Workload.request(n)`.

Clients run in worker processes (one asyncio loop and one httpx client each; worker w takes
requests, or clients, w, w + W, w + 2W, ...), so parsing thousands of server-sent events a
second never makes the generator the bottleneck. Each worker counts finished requests and
tokens into shared counters, which the parent prints as progress; at the end it returns its
`RequestRecord`s (loadtest/sse_client.py: send time, status, each token-bearing event's
arrival, the usage's token count). Times are `time.monotonic()`, one clock for every process
on Linux, so the parent cuts every worker's records by the same window.

A tenant reaches the server either as the `X-Customer-Id` header (loraplex) or as the request's
`model` (servers that name adapters as models, loraplex included).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass

import httpx

from loadtest.sse_client import ERROR_BACKOFF_S, MAX_BACKOFF_S, RequestRecord, stream_completion
from loadtest.workload import PlannedRequest, Workload, poisson_arrivals

CUSTOMER_HEADER = "X-Customer-Id"


@dataclass(frozen=True)
class RunSpec:
    base_url: str
    model: str  # the base model's name in the API
    workload: Workload
    tenant_via: str  # "header" | "model"
    mode: str  # "poisson" | "closed"
    rate: float  # requests/s (poisson)
    concurrency: int  # clients (closed)
    duration_s: float  # requests are sent during this long
    request_timeout_s: float
    ignore_eos: bool = True
    api_key: str | None = None
    start_at: float = 0.0  # monotonic times, set by `run`: sending starts, sending stops, stragglers cancelled
    stop_at: float = 0.0
    cancel_at: float = 0.0

    def body_and_headers(self, req: PlannedRequest) -> tuple[dict, dict]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        model = self.model
        if req.tenant is not None:
            if self.tenant_via == "header":
                headers[CUSTOMER_HEADER] = req.tenant
            else:
                model = req.tenant
        body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True  # a vLLM/loraplex extension: every request runs to max_tokens
        return body, headers


def run(spec: RunSpec, workers: int, drain_s: float, progress=None) -> dict:
    """Run the load in `workers` processes; returns {"records", "sent", "worker_cpu_s", ...}.
    `progress(elapsed_s, done, tokens, errors)` is called about once a second."""
    ctx = multiprocessing.get_context("spawn")
    done, tokens, errors = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Value("q", 0)
    results = ctx.Queue()
    start = time.monotonic() + 1.0 + 0.2 * workers  # time for the workers to start
    timed = RunSpec(**{**spec.__dict__, "start_at": start, "stop_at": start + spec.duration_s,
                       "cancel_at": start + spec.duration_s + drain_s})
    procs = [ctx.Process(target=_worker, args=(timed, w, workers, done, tokens, errors, results), daemon=True)
             for w in range(workers)]
    for p in procs:
        p.start()
    outputs = []
    while len(outputs) < workers:
        try:
            outputs.append(results.get(timeout=1.0))
        except Exception:  # queue.Empty: report progress, notice dead workers
            if not any(p.is_alive() for p in procs) and results.empty():
                break
        if progress is not None:
            progress(time.monotonic() - start, done.value, tokens.value, errors.value)
    for p in procs:
        p.join(timeout=5)
    records = [rec for out in outputs for rec in out["records"]]
    return {"records": records, "start_at": timed.start_at, "stop_at": timed.stop_at,
            "worker_cpu_s": [out["cpu_s"] for out in outputs], "worker_failures": workers - len(outputs)}


def _worker(spec: RunSpec, index: int, workers: int, done, tokens, errors, results) -> None:
    try:
        out = asyncio.run(_run_worker(spec, index, workers, done, tokens, errors))
    except BaseException as e:  # report an empty share rather than leave the parent waiting
        out = {"records": [], "cpu_s": 0.0, "error": repr(e)}
    results.put(out)


async def _run_worker(spec: RunSpec, index: int, workers: int, done, tokens, errors) -> dict:
    records: list[RequestRecord] = []
    if spec.mode == "poisson":
        times = poisson_arrivals(spec.rate, spec.duration_s, spec.workload.seed)
        mine = [(n, t) for n, t in enumerate(times) if n % workers == index]
        # no cap on connections: a request must leave at its send time, never wait for a free
        # connection behind slow ones (the loop would then no longer be open)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(8, int(spec.rate * 4 / workers)))
    else:
        mine = [(c, 0.0) for c in range(spec.concurrency) if c % workers == index]
        limits = httpx.Limits(max_connections=len(mine) + 4, max_keepalive_connections=len(mine) + 4)

    async def send(client: httpx.AsyncClient, req: PlannedRequest) -> RequestRecord:
        body, headers = spec.body_and_headers(req)
        rec = RequestRecord(start=time.monotonic(), tenant=req.tenant)
        records.append(rec)
        try:
            await stream_completion(client, f"{spec.base_url}/v1/completions", body, headers, rec)
        finally:
            with done.get_lock():
                done.value += 1
            if rec.tokens:
                with tokens.get_lock():
                    tokens.value += rec.tokens
            if rec.error is not None:
                with errors.get_lock():
                    errors.value += 1
        return rec

    sends: list[asyncio.Task] = []  # the open loop's requests in flight

    async def open_loop(client: httpx.AsyncClient) -> None:
        for n, offset in mine:
            await asyncio.sleep(max(0.0, spec.start_at + offset - time.monotonic()))
            sends.append(asyncio.create_task(send(client, spec.workload.request(n))))
        if sends:
            await asyncio.wait(sends)

    async def client_loop(client: httpx.AsyncClient, client_id: int) -> None:
        k = 0
        while time.monotonic() < spec.stop_at:
            rec = await send(client, spec.workload.request(k * spec.concurrency + client_id))
            k += 1
            if rec.error is not None:  # a refusing server must not be hammered
                await asyncio.sleep(min(MAX_BACKOFF_S, rec.retry_after or ERROR_BACKOFF_S))

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(spec.request_timeout_s, connect=10.0)) as client:
        await asyncio.sleep(max(0.0, spec.start_at - time.monotonic()))
        cpu0 = time.process_time()
        if spec.mode == "poisson":
            tasks = [asyncio.create_task(open_loop(client))]
        else:
            tasks = [asyncio.create_task(client_loop(client, c)) for c, _ in mine]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, spec.cancel_at - time.monotonic()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in sends:  # requests still streaming at cancel_at: recorded as "cancelled"
            task.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
        cpu = time.process_time() - cpu0
    return {"records": records, "cpu_s": cpu}
