"""Soak: the real server under mixed traffic and admin churn for a bounded time (issue 12, item 6).

    PYTHONPATH=. python3 loadtest/soak.py [--minutes 10] [--out DIR] [--device cpu]

Starts `python -m server.cli serve` (the prepared default model unless --model) and runs, all at
once, until the time is up:
- streaming and non-streaming completions and chats for six tenants (each with an adapter) and
  the base model, greedy and sampled;
- admin churn: adapters replaced, deleted and uploaded again, listed;
- clients that leave a stream after its first event;
- bad requests (malformed JSON, out-of-range fields, unknown customers, wrong admin token);
- bursts from one tenant past its in-flight bound (--max-requests-per-tenant 4: 429s expected).

It records every request's outcome: complete (200 and, for a stream, [DONE] after a finish
reason), refused with a 4xx in OpenAI's envelope, ended with an explicit error event, left by the
client on purpose; anything else (5xx, a dropped connection, a stream cut without an error) is
a loss. It samples the server's resident memory (VmRSS) every second and counts /metrics series.
Writes <out>/soak_<device>.json: requests by kind and outcome, losses, memory after warm-up
(the first quarter) and at the end, its slope, and the series counts. Exit status 1 on a loss,
a 5xx, memory growth past --max-growth-mb after warm-up, or more than --max-new-series series
appearing after it (the host tier is 64 MiB, so adapter copies stop adding memory early).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from loadtest.server_process import ServerProcess, free_port

REPO = Path(__file__).resolve().parent.parent
TENANTS = [f"soak-{i}" for i in range(6)]
PROMPTS = ["Tell me about rivers.", "A short poem on glass:", "Three facts about owls:"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "loadtest/results"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="checkpoint dir (default: the prepared default model)")
    p.add_argument("--max-growth-mb", type=float, default=64.0, help="resident memory growth allowed after warm-up")
    p.add_argument("--max-new-series", type=int, default=16,
                   help="metric series allowed to appear after warm-up (labels seen late, e.g. a rare status)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Tally:
    def __init__(self):
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (kind, outcome)
        self.losses: list[str] = []

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes[(kind, outcome)] += 1
        if outcome == "lost":
            self.losses.append(f"{kind}: {detail}"[:300])


async def _generate(client: httpx.AsyncClient, tally: Tally, kind: str, path: str, body: dict, headers: dict,
                    leave_early: bool = False) -> None:
    try:
        if not body.get("stream"):
            response = await client.post(path, json=body, headers=headers)
            tally.add(kind, _classify(response.status_code, response.content))
            return
        async with client.stream("POST", path, json=body, headers=headers) as response:
            if response.status_code != 200:
                tally.add(kind, _classify(response.status_code, await response.aread()))
                return
            finished = done = errored = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if leave_early:
                    tally.add(kind, "left")
                    return
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                errored = errored or "error" in event
                finished = finished or any(c.get("finish_reason") for c in event.get("choices") or ())
            if done and (finished or errored):
                tally.add(kind, "error_event" if errored else "complete")
            else:
                tally.add(kind, "lost", f"stream ended without [DONE] or a finish reason ({path})")
    except (httpx.HTTPError, ValueError) as e:
        tally.add(kind, "lost", f"{type(e).__name__}: {e}")


def _classify(status: int, content: bytes) -> str:
    if status >= 500:
        return "lost"
    if status >= 400:
        try:
            json.loads(content)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return "lost"
        return f"refused_{status}"
    return "complete"


async def soak(url: str, admin_token: str, model: str, make_adapter, until: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    admin = {"Authorization": f"Bearer {admin_token}"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300, connect=30), limits=limits) as client:

        async def upload(tenant: str, kind: str = "admin_upload") -> None:
            config, weights = make_adapter(rng.randrange(1 << 30))
            files = {"adapter_config": ("adapter_config.json", config),
                     "adapter_model": ("adapter_model.safetensors", weights)}
            try:
                response = await client.put(f"/admin/adapters/{tenant}", files=files, headers=admin)
                tally.add(kind, _classify(response.status_code, response.content))
            except httpx.HTTPError as e:
                tally.add(kind, "lost", f"{type(e).__name__}: {e}")

        for tenant in TENANTS:
            await upload(tenant, "setup_upload")

        def generation_body() -> tuple[str, dict]:
            stream = rng.random() < 0.6
            sampling = {"temperature": 0} if rng.random() < 0.5 else {"temperature": 0.8, "top_p": 0.9, "seed": 7}
            if rng.random() < 0.3:
                return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": rng.choice(
                    PROMPTS)}], "max_tokens": rng.randint(1, 12), "stream": stream, **sampling}
            return "/v1/completions", {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 12),
                                       "stream": stream, **sampling}

        async def steady() -> None:
            while time.monotonic() < until:
                tenant = rng.choice([None, *TENANTS])
                path, body = generation_body()
                await _generate(client, tally, "generate", path, body, {"X-Customer-Id": tenant} if tenant else {})

        async def churn() -> None:
            while time.monotonic() < until:
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                tenant, action = rng.choice(TENANTS), rng.random()
                if action < 0.6:
                    await upload(tenant)
                elif action < 0.8:
                    response = await client.delete(f"/admin/adapters/{tenant}", headers=admin)
                    tally.add("admin_delete", _classify(response.status_code, response.content))
                    await asyncio.sleep(rng.uniform(0.1, 1.0))  # requests for it meanwhile: 404
                    await upload(tenant)
                else:
                    response = await client.get("/admin/adapters", headers=admin)
                    tally.add("admin_list", _classify(response.status_code, response.content))

        async def leavers() -> None:
            while time.monotonic() < until:
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": 64, "stream": True,
                        "ignore_eos": True}
                await _generate(client, tally, "leave_early", "/v1/completions", body,
                                {"X-Customer-Id": rng.choice(TENANTS)}, leave_early=True)

        async def bad() -> None:
            cases = [
                ("post", "/v1/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
                ("post", "/v1/completions", {"json": {"model": model, "prompt": "x", "max_tokens": -3}}),
                ("post", "/v1/completions", {"json": {"model": model, "prompt": "x", "temperature": 9}}),
                ("post", "/v1/completions", {"json": {"model": model, "prompt": "x"}, "headers": {
                    "X-Customer-Id": "nobody-here"}}),
                ("post", "/v1/chat/completions", {"json": {"model": model, "messages": []}}),
                ("put", "/admin/adapters/soak-0", {"headers": {"Authorization": "Bearer wrong"}}),
                ("get", "/v1/models/does-not-exist", {}),
            ]
            while time.monotonic() < until:
                await asyncio.sleep(rng.uniform(0.1, 0.5))
                method, path, kwargs = rng.choice(cases)
                try:
                    response = await client.request(method.upper(), path, **kwargs)
                    outcome = _classify(response.status_code, response.content)
                    tally.add("bad_request", outcome if outcome != "complete" else "lost",
                              f"{method} {path} answered {response.status_code}")
                except httpx.HTTPError as e:
                    tally.add("bad_request", "lost", f"{type(e).__name__}: {e}")

        async def bursts() -> None:
            while time.monotonic() < until:
                await asyncio.sleep(rng.uniform(3, 6))
                tenant = rng.choice(TENANTS)
                body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": 8}
                await asyncio.gather(*(_generate(client, tally, "burst", "/v1/completions", body,
                                                 {"X-Customer-Id": tenant}) for _ in range(12)))

        await asyncio.gather(*(steady() for _ in range(6)), churn(), leavers(), bad(), bursts())


async def _sample_memory(pid: int, until: float, samples: list[tuple[float, float]]) -> None:
    start = time.monotonic()
    while time.monotonic() < until:
        samples.append((time.monotonic() - start, _rss_mb(pid)))
        await asyncio.sleep(1.0)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _series(url: str) -> set[str]:
    """The /metrics series (name and labels) present now."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def _slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples) or 1.0
    return 60 * sum((t - mean_t) * (m - mean_m) for t, m in samples) / var


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from loadtest.bench_fairness import _adapter_maker, _default_model_dir

    model_dir = Path(args.model) if args.model else _default_model_dir()
    admin_token = secrets.token_hex(16)
    tally, memory = Tally(), []
    with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as workdir:
        work = Path(workdir)
        server = ServerProcess(["--device", args.device, "--model", str(model_dir), "--home", str(work / "home"),
                                "--adapter-store", str(work / "adapters"), "--max-loras", "4",
                                "--host-cache-bytes", str(64 << 20),
                                "--max-requests-per-tenant", "4", "--max-num-seqs", "8"],
                               dict(os.environ, PYTHONPATH=str(REPO), LORAPLEX_ADMIN_TOKEN=admin_token),
                               args.out / f"soak_server_{args.device.split(':')[0]}.log", REPO, "127.0.0.1",
                               free_port())
        try:
            server.start()
            server.wait_ready(600)
            model = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
            makers = _adapter_maker(model_dir, model)
            duration = 60 * args.minutes
            started = time.monotonic()
            until = started + duration

            async def run() -> int:
                warm_until = started + duration / 4
                task = asyncio.ensure_future(_sample_memory(server.proc.pid, until, memory))
                soaking = asyncio.ensure_future(soak(server.base_url, admin_token, model, makers, until, tally,
                                                     args.seed))
                await asyncio.sleep(max(0.0, warm_until - time.monotonic()))
                warm_series = await asyncio.to_thread(_series, server.base_url)
                await asyncio.gather(task, soaking)
                return warm_series

            warm_series = asyncio.run(run())
            end_series = _series(server.base_url)
            metrics_text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
        finally:
            exit_code = server.stop()
    server_5xx = sum(float(line.split()[-1]) for line in metrics_text.splitlines()
                     if line.startswith("loraplex_http_requests_total{") and 'status_class="5xx"' in line)
    after_warmup = [(t, m) for t, m in memory if t >= duration / 4]
    growth = after_warmup[-1][1] - after_warmup[0][1] if len(after_warmup) > 1 else 0.0
    result = {
        "command": "PYTHONPATH=. python3 loadtest/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "minutes": args.minutes, "device": args.device,
        "requests": sum(tally.outcomes.values()),
        "outcomes": {f"{kind}/{outcome}": n for (kind, outcome), n in sorted(tally.outcomes.items())},
        "lost": len(tally.losses), "loss_examples": tally.losses[:10], "server_5xx": server_5xx,
        "memory_mb": {"after_warmup": after_warmup[0][1] if after_warmup else None,
                      "end": after_warmup[-1][1] if after_warmup else None, "growth": growth,
                      "slope_mb_per_min_after_warmup": _slope_mb_per_min(after_warmup),
                      "samples": [(round(t, 1), round(m, 1)) for t, m in memory]},
        "metric_series": {"after_warmup": len(warm_series), "end": len(end_series),
                          "new_after_warmup": sorted(end_series - warm_series)},
        "server_exit_code": exit_code,
    }
    failed = (result["lost"] or server_5xx or growth > args.max_growth_mb
              or len(end_series - warm_series) > args.max_new_series or exit_code != 0)
    result["passed"] = not failed
    path = args.out / f"soak_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"{result['requests']} requests, {result['lost']} lost, {server_5xx:.0f} 5xx; memory after warm-up "
          f"{result['memory_mb']['after_warmup']:.0f} MB -> {result['memory_mb']['end']:.0f} MB "
          f"({result['memory_mb']['slope_mb_per_min_after_warmup']:+.1f} MB/min); metric series {len(warm_series)} -> "
          f"{len(end_series)}; {'passed' if not failed else 'FAILED'}; wrote {path}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
