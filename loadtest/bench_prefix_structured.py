"""Prefix caching and structured outputs over HTTP, on a random 7B-shaped checkpoint (issue 16).

    PYTHONPATH=. python3 loadtest/bench_prefix_structured.py --out DIR [--shape llama2-7b] [--tokenizer DIR]

One run (about 6-7 minutes on an H200; --time-budget, default 480 s, skips what would not fit):
(1) a random bf16 checkpoint (loadtest/checkpoint.py) and `loraplex serve` on it with prefix
caching on (loadtest/server_process.py); 32 tenants' rank-16 q,k,v,o adapters uploaded through the
admin API (loadtest/admin_upload.py); (2) the multi-tenant chat phase: C closed-loop streaming
clients (default 32), request n for tenant n mod 32, whose prompt is that tenant's fixed
1,000-token system prompt followed by a fresh 32-token user turn (token ids, as a chat template
would lay them out), 64 output tokens; each tenant is sent one request first (adapters loaded,
and, with the cache on, its system prompt cached: the steady state of a service whose tenants
resend their system prompt); (3) structured outputs at batch 64: 64 clients, base model,
128-token prompts, 128 output tokens, free-form (ignore_eos) and then with a JSON schema
(`response_format` json_schema: nested object, arrays, enum); the per-token overhead is the
ratio of the requests' mean inter-token time (TPOT) p50; (4) the server restarted with
`--no-prefix-caching` on the same store, the chat phase again. TTFT p50/p99, tokens/s, the
server's prefix cache counters over each window, the targets (TTFT p50 >= 3x lower with the
cache; structured-output overhead <= 10%), as JSON (<out>/prefix_structured_<shape>_<device>.json)
and a table (<out>/prefix_structured_<shape>_<device>.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from loadtest import serving_report as report
from loadtest.admin_upload import upload_adapters
from loadtest.server_process import ServerProcess, ServerStartError, free_port
from loadtest.sse_client import RequestRecord, random_prompt, stream_completion

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLIENTS_PER_PROCESS = 16
STOP_MARGIN_S = 40.0
SCHEMA = {"type": "object", "properties": {
    "customer": {"type": "string"}, "priority": {"enum": ["low", "normal", "high"]},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "quantity": {"type": "integer"}, "notes": {"type": "array", "items": {"type": "string"}}},
        "required": ["sku", "quantity", "notes"]}}},
    "required": ["customer", "priority", "items"]}


@dataclass(frozen=True)
class Phase:
    """One closed-loop phase, as every client worker process needs it."""

    name: str
    url: str
    model: str
    kind: str  # "chat": tenant system prompt + user turn; "free" / "json": base model, structured or not
    concurrency: int
    tenants: tuple[str, ...]
    system_tokens: int
    prompt_tokens: int  # the user turn ("chat") or the whole prompt
    max_tokens: int
    token_range: tuple[int, int]
    seed: str
    start_at: float
    stop_issuing_at: float
    cancel_at: float
    timeout_s: float


def parse_args(argv):
    from loadtest.checkpoint import SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--tokenizer", type=Path, help="tokenizer files (default: the prepared SmolLM2)")
    p.add_argument("--device", help="default: cuda when there is one")
    p.add_argument("--tenants", type=int, default=32)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--user-tokens", type=int, default=32)
    p.add_argument("--chat-max-tokens", type=int, default=64)
    p.add_argument("--chat-concurrency", type=int, default=32)
    p.add_argument("--structured-concurrency", type=int, default=64)
    p.add_argument("--structured-prompt-tokens", type=int, default=128)
    p.add_argument("--structured-max-tokens", type=int, default=128)
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--server-timeout", type=float, default=300.0)
    p.add_argument("--time-budget", type=float, default=480.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra `loraplex serve` flags")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-structured", action="store_true", help="the chat phases only (prefix caching on and off)")
    args = p.parse_args(argv)
    if args.tokenizer is None:
        from server.config import Settings
        from server.model.prepare import DEFAULT_MODEL_NAME

        args.tokenizer = Settings.from_env().models_dir / DEFAULT_MODEL_NAME
    return args


def log(start: float, message: str) -> None:
    print(f"[{time.monotonic() - start:7.1f}s] {message}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(SystemExit(128 + signum)))
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-prefix-bench-"))
    start = time.monotonic()
    result = {"command": " ".join(["python3", "loadtest/bench_prefix_structured.py", *(argv or sys.argv[1:])]),
              "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shape": args.shape,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "phases": {},
              "error": None}
    try:
        return run(args, workdir, result, start)
    except BaseException as e:
        result["error"] = result["error"] or f"{type(e).__name__}: {e}"
        raise
    finally:
        _write(args, result, start)
        shutil.rmtree(workdir, ignore_errors=True)


def run(args, workdir: Path, result: dict, start: float) -> int:
    import torch

    from loadtest.checkpoint import QKVO, SHAPES, peft_adapter_files, write_random_checkpoint
    from server.model.config import ModelConfig

    deadline = start + args.time_budget
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result["device"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    log(start, f"writing a random {args.shape} checkpoint")
    ckpt = workdir / "model"
    result["checkpoint"] = write_random_checkpoint(ckpt, SHAPES[args.shape], args.tokenizer, device, args.seed)
    cfg = ModelConfig.from_dir(ckpt)
    token_range = (min(1000, cfg.vocab_size // 2), cfg.vocab_size)
    tenants = tuple(f"tenant-{i:02d}" for i in range(args.tenants))
    procs = max(1, -(-max(args.chat_concurrency, args.structured_concurrency) // CLIENTS_PER_PROCESS))
    pool = multiprocessing.get_context("spawn").Pool(procs)
    admin_token = secrets.token_hex(16)
    try:
        for caching in ("on", "off"):
            flags = [] if caching == "on" else ["--no-prefix-caching"]
            server = _start(args, ckpt, workdir, device, admin_token, flags, result, caching, start, deadline)
            if server is None:
                return 2
            try:
                model = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
                if caching == "on":
                    log(start, f"uploading {len(tenants)} adapters")
                    result["uploads"] = upload_adapters(
                        server.base_url, admin_token, list(tenants),
                        lambda i: peft_adapter_files(cfg, args.rank, QKVO, 1000 + i, device, model), 4,
                        args.request_timeout)
                _touch(args, server.base_url, model, tenants, token_range)
                chat = _phase(args, pool, f"chat_cache_{caching}", server.base_url, model, "chat",
                              args.chat_concurrency, tenants, token_range, deadline, start)
                result["phases"][chat["name"]] = chat
                if caching == "on" and not args.skip_structured:
                    for kind in ("free", "json"):
                        phase = _phase(args, pool, f"structured_{kind}", server.base_url, model, kind,
                                       args.structured_concurrency, (), token_range, deadline, start)
                        result["phases"][phase["name"]] = phase
            finally:
                result.setdefault("servers", {}).setdefault(caching, {})["exit_code"] = server.stop()
        _targets(result)
        return 0
    finally:
        pool.terminate()


def _start(args, ckpt, workdir, device, admin_token, flags, result, caching, start, deadline):
    env = dict(os.environ, LORAPLEX_ADMIN_TOKEN=admin_token)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    concurrency = max(args.chat_concurrency, args.structured_concurrency)
    server = ServerProcess(["--model", str(ckpt), "--device", device, "--home", str(workdir / "home"),
                            "--adapter-store", str(workdir / "adapters"), "--max-num-seqs", str(concurrency),
                            *flags, *[t for a in args.server_arg for t in a.split()]],
                           env, args.out / f"server_prefix_{caching}.log", REPO, HOST, free_port(HOST))
    log(start, f"starting the server (prefix caching {caching}): {' '.join(server.command)}")
    server.start()
    try:
        ready = server.wait_ready(min(args.server_timeout, max(60.0, deadline - time.monotonic())))
    except ServerStartError as e:
        result["error"] = str(e).splitlines()[0]
        server.stop()
        return None
    result.setdefault("servers", {})[caching] = {"command": server.command, "ready_s": ready}
    log(start, f"  ready after {ready:.1f} s")
    return server


def _touch(args, base_url, model, tenants, token_range):
    """One request per tenant: adapters loaded, and (cache on) its system prompt cached."""
    async def touch_all():
        async with httpx.AsyncClient(timeout=args.request_timeout) as client:
            gate = asyncio.Semaphore(16)

            async def one(i, tenant):
                async with gate:
                    rec = RequestRecord(start=time.monotonic(), tenant=tenant)
                    prompt = _system(args.seed, tenant, args.system_tokens, token_range) + random_prompt(
                        f"{args.seed}/touch/{i}", args.user_tokens, token_range)
                    await stream_completion(client, f"{base_url}/v1/completions", _body(model, prompt, 1),
                                            {"X-Customer-Id": tenant}, rec)
            await asyncio.gather(*(one(i, t) for i, t in enumerate(tenants)))
    asyncio.run(touch_all())


def _phase(args, pool, name, base_url, model, kind, concurrency, tenants, token_range, deadline, start) -> dict:
    if time.monotonic() + args.warmup + args.duration + STOP_MARGIN_S > deadline:
        log(start, f"phase {name}: skipped (time budget)")
        return {"name": name, "skipped": "time budget"}
    begin = time.monotonic() + 0.5
    w0, w1 = begin + args.warmup, begin + args.warmup + args.duration
    chat = kind == "chat"
    phase = Phase(name, f"{base_url}/v1/completions", model, kind, concurrency, tenants, args.system_tokens,
                  args.user_tokens if chat else args.structured_prompt_tokens,
                  args.chat_max_tokens if chat else args.structured_max_tokens, token_range,
                  f"{args.seed}/{name}", begin, w1, min(w1 + 60, deadline - STOP_MARGIN_S / 2), args.request_timeout)
    log(start, f"phase {name}: {concurrency} clients, {args.warmup:g} s warm-up + {args.duration:g} s measured")
    procs = min(max(1, -(-concurrency // CLIENTS_PER_PROCESS)), pool._processes)
    jobs = [pool.apply_async(run_clients, (phase, list(range(p, concurrency, procs)))) for p in range(procs)]
    before = _scrape_at(base_url, w0)
    after = _scrape_at(base_url, w1)
    records = [r for job in jobs for r in job.get(timeout=max(1.0, phase.cancel_at - time.monotonic()) + 30)]
    out = {"name": name, "kind": kind, "concurrency": concurrency, **report.summarize_requests(records, (w0, w1))}
    out["server"] = {key: after.get(key, 0) - before.get(key, 0) for key in (
        "loraplex_prefix_cache_queries_total", "loraplex_prefix_cache_hits_total",
        "loraplex_engine_step_batched_tokens_sum", "loraplex_engine_steps_total",
        # where a TTFT goes, as the server sees it: its own TTFT, the queue, the steps (sums and counts)
        "loraplex_time_to_first_token_seconds_sum", "loraplex_time_to_first_token_seconds_count",
        "loraplex_request_queue_time_seconds_sum", "loraplex_request_queue_time_seconds_count",
        "loraplex_engine_step_duration_seconds_sum", "loraplex_engine_step_duration_seconds_count")} \
        if before and after else None
    log(start, "  " + report.phase_line(out))
    return out


def _scrape_at(base_url, when) -> dict | None:
    time.sleep(max(0.0, when - time.monotonic()))
    try:
        return report.parse_metrics(httpx.get(f"{base_url}/metrics", timeout=10).text)
    except httpx.HTTPError:
        return None


def _system(seed, tenant, length, token_range) -> list[int]:
    return random_prompt(f"{seed}/system/{tenant}", length, token_range)


def _body(model, prompt, max_tokens, schema=None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if schema is None:
        body["ignore_eos"] = True
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "order", "schema": schema}}
    return body


# --- client workers (spawned processes: no torch)

def run_clients(phase: Phase, client_ids: list[int]) -> list[RequestRecord]:
    return asyncio.run(_run_clients(phase, client_ids))


async def _run_clients(phase: Phase, client_ids: list[int]) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=len(client_ids) + 4, max_keepalive_connections=len(client_ids) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(phase.timeout_s, connect=10.0)) as client:
        await asyncio.sleep(max(0.0, phase.start_at - time.monotonic()))
        tasks = [asyncio.create_task(_client_loop(client, phase, i, records)) for i in client_ids]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, phase.cancel_at - time.monotonic()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return records


async def _client_loop(client, phase: Phase, client_id: int, records: list) -> None:
    k = 0
    while time.monotonic() < phase.stop_issuing_at:
        n = k * phase.concurrency + client_id
        tenant = phase.tenants[n % len(phase.tenants)] if phase.tenants else None
        prompt = random_prompt(f"{phase.seed}/{n}", phase.prompt_tokens, phase.token_range)
        if phase.kind == "chat":
            prompt = _system(phase.seed.split("/")[0], tenant, phase.system_tokens, phase.token_range) + prompt
        # the first wave's lengths are staggered, so finishes spread over the steps (as bench_serving)
        max_tokens = phase.max_tokens if k else 1 + client_id * phase.max_tokens // phase.concurrency
        rec = RequestRecord(start=time.monotonic(), tenant=tenant)
        records.append(rec)
        body = _body(phase.model, prompt, max_tokens, SCHEMA if phase.kind == "json" else None)
        await stream_completion(client, phase.url, body, {"X-Customer-Id": tenant} if tenant else {}, rec)
        k += 1
        if rec.error is not None:
            await asyncio.sleep(0.2)


# --- report

def _p50(phase: dict | None, key: str):
    return ((phase or {}).get(key) or {}).get("p50")


def _targets(result: dict) -> None:
    phases = result["phases"]
    on, off = phases.get("chat_cache_on"), phases.get("chat_cache_off")
    free, constrained = phases.get("structured_free"), phases.get("structured_json")
    targets = []
    if _p50(on, "ttft_s") and _p50(off, "ttft_s"):
        ratio = _p50(off, "ttft_s") / _p50(on, "ttft_s")
        targets.append({"name": "TTFT p50 cache off / on", "value": ratio, "target": ">= 3", "met": ratio >= 3})
    if _p50(free, "tpot_s") and _p50(constrained, "tpot_s"):
        overhead = _p50(constrained, "tpot_s") / _p50(free, "tpot_s") - 1
        targets.append({"name": "structured output per-token overhead (TPOT p50, batch "
                        f"{constrained['concurrency']})", "value": overhead, "target": "<= 0.10",
                        "met": overhead <= 0.10})
    result["targets"] = targets


def _table(result: dict) -> str:
    lines = [f"{'phase':22} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
             f"{'prefix hits':>12} {'errors':>7}"]
    for name, p in result["phases"].items():
        if p.get("skipped"):
            lines.append(f"{name:22} skipped ({p['skipped']})")
            continue
        server = p.get("server") or {}
        queried = server.get("loraplex_prefix_cache_queries_total") or 0
        hits = f"{server.get('loraplex_prefix_cache_hits_total', 0) / queried:.0%}" if queried else "-"
        lines.append(f"{name:22} {p['output_tokens_per_s']:8.0f} {p['requests_per_s']:7.1f} "
                     f"{report.fmt_ms(_p50(p, 'ttft_s')):>9} {report.fmt_ms((p.get('ttft_s') or {}).get('p99')):>9} "
                     f"{report.fmt_ms(_p50(p, 'tpot_s')):>9} {hits:>12} {sum(p['errors'].values()):7d}")
    for name, p in result["phases"].items():  # the server's view of the same window (means)
        server = p.get("server") or {}
        means = {label: server.get(f"{metric}_sum", 0) / server[f"{metric}_count"]
                 for label, metric in (("TTFT", "loraplex_time_to_first_token_seconds"),
                                       ("queue", "loraplex_request_queue_time_seconds"),
                                       ("step", "loraplex_engine_step_duration_seconds"))
                 if server.get(f"{metric}_count")}
        if means:
            lines.append(f"server, {name}: " + ", ".join(f"{k} mean {report.fmt_ms(v)}" for k, v in means.items()))
    for t in result.get("targets", []):
        lines.append(f"target: {t['name']} = {t['value']:.2f} ({t['target']}): {'MET' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def _write(args, result: dict, start: float) -> None:
    slug = "".join(c if c.isalnum() else "_" for c in result.get("device", "unknown").lower().replace("nvidia", "")
                   .strip()).strip("_") or "unknown"
    stem = args.out / f"prefix_structured_{args.shape}_{slug}"
    result["elapsed_s"] = time.monotonic() - start
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    table = _table(result)
    stem.with_suffix(".txt").write_text(result["command"] + "\n\n" + table + "\n")
    print("\n" + table, flush=True)
    log(start, f"wrote {stem}.json and .txt")


if __name__ == "__main__":
    sys.exit(main())
