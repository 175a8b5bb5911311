"""One tenant flooding against nine: do the nine keep their latency? (issue 12, item 1)

    PYTHONPATH=. python3 loadtest/bench_fairness.py [--out DIR] [--rate 0.5] [--flood-factor 20]
        [--duration 30] [--max-tokens 16] [--server-arg=--max-requests-per-tenant=4] [--device cpu]

Starts the real server (`python -m server.cli serve`, the prepared default model unless --model)
as a subprocess and runs two phases of open-loop streaming /v1/completions traffic against it:

1. `alone`: nine tenants, each sending Poisson arrivals at --rate requests/s;
2. `flooded`: the same nine (the same arrival times), plus a tenth tenant at --flood-factor
   times that rate, far past what the server can serve.

Per phase: the nine's TTFT p50/p90/p99 and errors, the flooder's requests by status (a flooder
past its limits gets 429 with Retry-After, answered at once) and how fast those refusals came;
then the target of issue 12: the nine's TTFT p99 flooded <= 2x alone. Everything is written to
<out>/fairness_<device>.json. Each tenant has its own rank-8 q,k,v,o adapter, uploaded through the
admin API before the phases (and the device pool holds all ten: --max-loras 16, so no adapter
load mixes into the latency). Prompts are short and fixed; outputs --max-tokens long with
ignore_eos, greedy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.admin_upload import upload_adapters
from loadtest.server_process import ServerProcess, free_port
from loadtest.sse_client import RequestRecord, stream_completion

REPO = Path(__file__).resolve().parent.parent
NINE = [f"steady-{i}" for i in range(9)]
FLOODER = "flooder"
PROMPT = "Write one sentence about the sea."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "loadtest/results"))
    p.add_argument("--rate", type=float, default=0.5, help="requests/s of each of the nine tenants")
    p.add_argument("--flood-factor", type=float, default=20.0, help="the flooder's rate over one tenant's")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per phase")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="checkpoint dir (default: the prepared default model)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `loraplex serve` flags")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def arrivals(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Poisson arrival times in [0, duration)."""
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def run_phase(url: str, model: str, plan: list[tuple[float, str]], max_tokens: int) -> list[RequestRecord]:
    """Send each (time, tenant) of the plan at its time; returns the records when all ended."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600, connect=30)) as client:
        start = time.monotonic()

        async def one(at: float, tenant: str) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            record = RequestRecord(start=time.monotonic(), tenant=tenant)
            await stream_completion(client, f"{url}/v1/completions", body, {"X-Customer-Id": tenant}, record)
            return record

        return await asyncio.gather(*(one(at, tenant) for at, tenant in plan))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"count": len(ordered), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


def summarize(records: list[RequestRecord]) -> dict:
    nine = [r for r in records if r.tenant != FLOODER]
    flood = [r for r in records if r.tenant == FLOODER]
    by_status: dict[str, int] = {}
    for r in flood:
        key = "ok" if r.ok else (r.error or "?")
        by_status[key] = by_status.get(key, 0) + 1
    refusals = [r.end - r.start for r in flood if r.status == 429 and r.end is not None]
    return {
        "nine": {"requests": len(nine), "ok": sum(r.ok for r in nine),
                 "errors": sorted({r.error for r in nine if not r.ok and r.error}),
                 "ttft_s": percentiles([r.ttft for r in nine if r.ok and r.ttft is not None])},
        "flooder": {"requests": len(flood), "by_status": by_status,
                    "refusal_s": percentiles(refusals),
                    "ttft_s": percentiles([r.ttft for r in flood if r.ok and r.ttft is not None])},
    }


def _default_model_dir() -> Path:
    from server.config import Settings
    from server.model.prepare import prepare_model

    return Path(prepare_model(Settings.from_env(), None, progress=False))


def _adapter_maker(model_dir: Path, model_name: str):
    from loadtest.checkpoint import QKVO, peft_adapter_files
    from server.model.config import ModelConfig

    cfg = ModelConfig.from_dir(model_dir)
    return lambda index: peft_adapter_files(cfg, 8, QKVO, 500 + index, "cpu", model_name)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    steady_plan = sorted((t, tenant) for tenant in NINE for t in arrivals(args.rate, args.duration, rng))
    flood_plan = [(t, FLOODER) for t in arrivals(args.rate * args.flood_factor, args.duration, rng)]
    model_dir = Path(args.model) if args.model else _default_model_dir()
    admin_token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="loraplex-fairness-") as workdir:
        work = Path(workdir)
        server = ServerProcess(["--device", args.device, "--model", str(model_dir), "--home", str(work / "home"),
                                "--adapter-store", str(work / "adapters"), "--max-loras", "16", *args.server_arg],
                               dict(os.environ, PYTHONPATH=str(REPO), LORAPLEX_ADMIN_TOKEN=admin_token),
                               args.out / "fairness_server.log", REPO, "127.0.0.1", free_port())
        try:
            server.start()
            ready_s = server.wait_ready(600)
            model_name = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
            uploads = upload_adapters(server.base_url, admin_token, [*NINE, FLOODER],
                                      _adapter_maker(model_dir, model_name), 2, 120)
            if uploads["ok"] != uploads["count"]:
                raise RuntimeError(f"adapter uploads failed: {uploads['error_examples']}")
            asyncio.run(run_phase(server.base_url, model_name, [(0.0, NINE[0])], args.max_tokens))  # warm-up
            phases = {}
            for name, plan in (("alone", steady_plan), ("flooded", sorted(steady_plan + flood_plan))):
                started = time.monotonic()
                phases[name] = summarize(asyncio.run(run_phase(server.base_url, model_name, plan, args.max_tokens)))
                phases[name]["wall_s"] = time.monotonic() - started
                nine = phases[name]["nine"]
                print(f"{name:8} nine: {nine['ok']}/{nine['requests']} ok, TTFT p50 "
                      f"{nine['ttft_s'].get('p50', float('nan')):.3f} s p99 {nine['ttft_s'].get('p99', float('nan')):.3f} s"
                      f"; flooder: {phases[name]['flooder']['by_status']}", flush=True)
        finally:
            exit_code = server.stop()
    alone_p99 = phases["alone"]["nine"]["ttft_s"].get("p99")
    flooded_p99 = phases["flooded"]["nine"]["ttft_s"].get("p99")
    ratio = flooded_p99 / alone_p99 if alone_p99 and flooded_p99 else None
    result = {
        "command": "PYTHONPATH=. python3 loadtest/bench_fairness.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_ready_s": ready_s, "server_exit_code": exit_code, "phases": phases,
        "target": {"name": "nine tenants' TTFT p99, flooded / alone", "value": ratio, "target": "<= 2",
                   "met": ratio is not None and ratio <= 2.0},
    }
    path = args.out / f"fairness_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"nine tenants' TTFT p99 flooded / alone: {ratio if ratio is None else round(ratio, 2)} (target <= 2); "
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
