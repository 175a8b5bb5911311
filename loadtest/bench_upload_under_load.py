"""The seed's design problem at small scale (issue 11): new customers' adapters uploaded while
other customers' traffic runs. How long from a new customer's upload to its first served token,
and what the upload does to everyone else's inter-token latency.

    PYTHONPATH=. python3 loadtest/bench_upload_under_load.py --out DIR [--checkpoint DIR]
        [--initial 16] [--new 100] [--clients 32] [--baseline 15] [--upload-window 60]

One run: (1) a random Llama-2-7B-shaped checkpoint (or --checkpoint); (2) `loraplex serve`,
default settings; (3) --initial customers' adapters uploaded and loaded (rank 16 on q,k,v,o);
(4) --clients closed-loop streaming clients over those customers (128-token prompts, 128 output
tokens, round-robin), in worker processes; (5) after --baseline seconds, --new further customers
one after another: PUT /admin/adapters/{id} (multipart, as `python -m loadtest adapters` sends
it), then at once that customer's first streaming request (16 tokens); (6) per new customer the
upload's own time, the time from the upload's answer to the first token, and the two together;
the other customers' ITL and TTFT in the baseline window and in the upload window, side by side.
Written to DIR/upload_under_load_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest import serving_report as report
from loadtest.admin_upload import upload_adapters
from loadtest.bench_run import REPO, device_and_name, device_slug, progress_printer
from loadtest.server_process import start_bench_server
from loadtest.sse_client import LoadSpec, RequestRecord, random_prompt, run_clients, stream_completion
from loadtest.sse_client import completion_body, touch_tenants

CLIENTS_PER_PROCESS = 16
WARMUP_S = 5.0  # of the baseline, before its window opens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=REPO / ".bench" / "tokenizer")
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead of writing a random one")
    p.add_argument("--initial", type=int, default=16, help="customers with traffic from the start")
    p.add_argument("--new", type=int, default=100, help="customers uploaded during the traffic")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients of the initial customers")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--first-tokens", type=int, default=16, help="max_tokens of a new customer's first request")
    p.add_argument("--baseline", type=float, default=15.0, help="seconds of traffic before the first upload")
    p.add_argument("--upload-window", type=float, default=60.0,
                   help="seconds the traffic runs after the first upload; uploads not started by then are not made")
    p.add_argument("--workdir", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-upload-bench-"))
    say = progress_printer()
    device, device_name = device_and_name()
    result: dict = {"command": " ".join(["python3", "loadtest/bench_upload_under_load.py", *(argv or sys.argv[1:])]),
                    "device": device_name,
                    "setup": {k: getattr(args, k) for k in ("shape", "initial", "new", "clients", "rank",
                                                            "prompt_tokens", "max_tokens", "first_tokens",
                                                            "baseline", "upload_window")}}
    procs = max(1, -(-args.clients // CLIENTS_PER_PROCESS))
    pool = multiprocessing.get_context("spawn").Pool(procs)  # started now: warm when the traffic begins
    server = None
    try:
        from loadtest.checkpoint import QKVO, SHAPES, peft_adapter_files, write_random_checkpoint
        from server.model.config import ModelConfig

        ckpt = args.checkpoint
        if ckpt is None:
            say(f"writing a random {args.shape} checkpoint")
            ckpt = workdir / f"model-{args.shape}"
            write_random_checkpoint(ckpt, SHAPES[args.shape], args.tokenizer, device)
        cfg = ModelConfig.from_dir(ckpt)
        server, admin_token = start_bench_server(ckpt, workdir, device, args.out / "server_upload.log", REPO, say=say)
        base = server.base_url
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        token_range = (min(1000, cfg.vocab_size // 2), cfg.vocab_size)

        def make_files(index: int) -> tuple[bytes, bytes]:
            return peft_adapter_files(cfg, args.rank, QKVO, 7000 + index, device, ckpt.name)

        initial = [f"old-{i:03d}" for i in range(args.initial)]
        result["initial_uploads"] = upload_adapters(base, admin_token, initial, make_files, 4, 120)
        asyncio.run(touch_tenants(base, model, initial, random_prompt("touch", args.prompt_tokens, token_range), 120))
        say(f"{len(initial)} initial customers stored and loaded")
        new = [f"new-{i:03d}" for i in range(args.new)]
        files = [make_files(args.initial + i) for i in range(args.new)]  # built before the clock runs

        start_at = time.monotonic() + 1.0
        uploads_from = start_at + args.baseline
        stop_at = uploads_from + args.upload_window
        spec = LoadSpec(url=f"{base}/v1/completions", model=model, tenants=tuple(initial), concurrency=args.clients,
                        prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, token_range=token_range,
                        seed="upload-bench", request_timeout_s=120, start_at=start_at, stop_issuing_at=stop_at,
                        cancel_at=stop_at + 60)
        jobs = [pool.apply_async(run_clients, (spec, list(range(p, args.clients, procs)))) for p in range(procs)]
        say(f"traffic: {args.clients} clients over {len(initial)} customers; uploads start in {args.baseline:g} s")
        time.sleep(max(0.0, uploads_from - time.monotonic()))
        customers = asyncio.run(_add_customers(base, admin_token, model, new, files, args, token_range, stop_at, say))
        uploads_until = time.monotonic()
        records = [r for job in jobs for r in job.get(timeout=stop_at + 120 - time.monotonic())["records"]]

        result["new_customers"] = _summarize_new(customers)
        result["new_customers"]["per_customer"] = customers
        baseline = (start_at + min(WARMUP_S, args.baseline / 2), uploads_from)
        during = (uploads_from, uploads_until)
        result["others"] = {"baseline_window": _window(records, baseline), "upload_window": _window(records, during)}
        _print(result, say)
        return 0
    finally:
        pool.terminate()
        if server is not None:
            result["server_exit_code"] = server.stop()
        path = args.out / f"upload_under_load_{device_slug(device_name)}.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        say(f"wrote {path}")
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


async def _add_customers(base: str, admin_token: str, model: str, customers: list[str], files, args, token_range,
                         stop_at: float, say) -> list[dict]:
    """Upload each new customer's adapter, then send its first request at once; one after another."""
    out = []
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
        for customer, (config, weights) in zip(customers, files):
            if time.monotonic() >= stop_at:
                out.append({"customer": customer, "skipped": "upload window over"})
                continue
            t0 = time.monotonic()
            response = await client.put(f"{base}/admin/adapters/{customer}", headers=headers, files={
                "adapter_config": ("adapter_config.json", config, "application/json"),
                "adapter_model": ("adapter_model.safetensors", weights, "application/octet-stream")})
            t1 = time.monotonic()
            row = {"customer": customer, "bytes": len(weights), "upload_status": response.status_code,
                   "upload_s": t1 - t0}
            if response.status_code == 201:
                rec = RequestRecord(start=t1, tenant=customer)
                prompt = random_prompt(f"new/{customer}", args.prompt_tokens, token_range)
                await stream_completion(client, f"{base}/v1/completions",
                                        completion_body(model, prompt, args.first_tokens),
                                        {"X-Customer-Id": customer}, rec)
                row.update(first_status=rec.status, first_error=rec.error, first_token_after_upload_s=rec.ttft,
                           upload_to_first_token_s=(rec.chunk_times[0] - t0) if rec.chunk_times else None,
                           tokens=rec.tokens)
            out.append(row)
            if len(out) % 25 == 0:
                say(f"  {len(out)}/{len(customers)} new customers")
    return out


def _summarize_new(rows: list[dict]) -> dict:
    done = [r for r in rows if r.get("first_token_after_upload_s") is not None and r.get("first_error") is None]
    return {"customers": len(rows), "served": len(done),
            "skipped": sum(1 for r in rows if r.get("skipped")),
            "upload_failures": sum(1 for r in rows if r.get("upload_status") not in (None, 201)),
            "first_request_failures": sum(1 for r in rows if r.get("upload_status") == 201 and r.get("first_error")),
            "upload_s": report.percentiles([r["upload_s"] for r in done]),
            "first_token_after_upload_s": report.percentiles([r["first_token_after_upload_s"] for r in done]),
            "upload_to_first_token_s": report.percentiles([r["upload_to_first_token_s"] for r in done])}


def _window(records: list, window: tuple[float, float]) -> dict:
    s = report.summarize_requests(records, window)
    return {k: s[k] for k in ("window_s", "output_tokens_per_s", "itl_s", "ttft_s", "tpot_s", "requests", "errors")}


def _print(result: dict, say) -> None:
    new = result["new_customers"]

    def ms(stats, key):
        return f"{stats[key] * 1e3:.0f}" if stats else "-"

    say(f"new customers: {new['served']}/{new['customers']} served ({new['upload_failures']} upload failures, "
        f"{new['first_request_failures']} first-request failures, {new['skipped']} not started)")
    for name in ("upload_s", "first_token_after_upload_s", "upload_to_first_token_s"):
        stats = new[name]
        say(f"  {name}: p50 {ms(stats, 'p50')} ms, p90 {ms(stats, 'p90')} ms, p99 {ms(stats, 'p99')} ms, "
            f"max {ms(stats, 'max')} ms")
    for label, w in result["others"].items():
        say(f"others, {label} ({w['window_s']:.1f} s): {w['output_tokens_per_s']:.0f} tok/s, ITL p50/p99 "
            f"{ms(w['itl_s'], 'p50')}/{ms(w['itl_s'], 'p99')} ms, TTFT p50/p99 {ms(w['ttft_s'], 'p50')}/"
            f"{ms(w['ttft_s'], 'p99')} ms, errors {w['errors']}")


if __name__ == "__main__":
    sys.exit(main())
