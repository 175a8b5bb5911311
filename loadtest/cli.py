"""`python -m loadtest`: a load generator for OpenAI-compatible servers with per-tenant adapters.

    python -m loadtest run --url http://127.0.0.1:8000 --tenants 64 --tenant-prefix cust- \\
        --popularity zipf:1 --rate 8 --duration 60 --prompt-tokens 8-512 --output-tokens 8-512 \\
        --slo-ttft 0.5 --slo-itl 0.05 --out run.json --plots plots/
    python -m loadtest adapters --url http://127.0.0.1:8000 --admin-token $TOKEN \\
        --model-config ~/.cache/loraplex/models/SmolLM2-135M-Instruct --count 64 --prefix cust-
    python -m loadtest plot a.json b.json c.json --against tenants --out plots/

`run` drives streaming /v1/completions (open loop at --rate, or --concurrency closed-loop
clients) and writes a JSON report (loadtest/run_report.py) and, with --plots, latency CDFs.
`adapters` creates N synthetic PEFT adapters for the served base model (random non-zero
weights, ranks cycling through --ranks) and uploads them through the admin API, or writes them
to --out-dir. `plot` draws several reports against each other: throughput against the number
of adapters or the request rate, and their latency CDFs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

from loadtest import run_report
from loadtest.generator import RunSpec, run
from loadtest.workload import Lengths, Popularity, Workload, poisson_arrivals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="drive a server with streaming completions and report")
    r.add_argument("--url", required=True, help="the server's base URL (http://host:port)")
    r.add_argument("--model", help="the base model's id (default: the first of GET /v1/models)")
    r.add_argument("--api-key", help="bearer token sent with every request")
    mode = r.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    mode.add_argument("--concurrency", type=int, help="closed loop: this many clients, one request each at a time")
    r.add_argument("--duration", type=float, default=30.0, help="seconds of sending (default 30)")
    r.add_argument("--warmup", type=float, default=0.0, help="seconds at the start left out of the figures")
    r.add_argument("--drain", type=float, default=60.0, help="seconds to wait for requests after sending stops")
    r.add_argument("--tenants", type=int, default=0, help="number of tenants (0: every request to the base model)")
    r.add_argument("--tenant-prefix", default="tenant-", help="tenant i is PREFIX + i (default tenant-)")
    r.add_argument("--popularity", default="uniform", type=Popularity.parse, help="uniform | zipf | zipf:ALPHA")
    r.add_argument("--tenant-via", choices=["header", "model"], default="header",
                   help="send the tenant as X-Customer-Id (default) or as the request's model")
    r.add_argument("--prompt-tokens", type=Lengths.parse, default=Lengths(128, 128), help="N or LO-HI (default 128)")
    r.add_argument("--output-tokens", type=Lengths.parse, default=Lengths(128, 128), help="N or LO-HI (default 128)")
    r.add_argument("--token-range", default="10-1000", type=Lengths.parse,
                   help="prompt token ids are drawn from LO..HI-1 (default 10-1000: inside any vocabulary)")
    r.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: run to max)")
    r.add_argument("--slo-ttft", type=float, help="SLO bound on time to first token, seconds")
    r.add_argument("--slo-itl", type=float,
                   help="SLO bound on a request's mean inter-token latency after its first token (TPOT), seconds")
    r.add_argument("--workers", type=int, default=0, help="client processes (default: by load, 1-8)")
    r.add_argument("--request-timeout", type=float, default=300.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--label", help="name of this run in plots")
    r.add_argument("--out", type=Path, help="JSON report path")
    r.add_argument("--plots", type=Path, help="directory for latency CDF plots")
    r.add_argument("--quiet", action="store_true", help="no progress lines")

    a = sub.add_parser("adapters", help="create synthetic PEFT adapters and upload them")
    a.add_argument("--model-config", required=True, type=Path,
                   help="the served base model's config.json (or its directory): adapter shapes come from it")
    a.add_argument("--count", type=int, required=True)
    a.add_argument("--prefix", default="tenant-", help="customer i is PREFIX + i (default tenant-)")
    a.add_argument("--first", type=int, default=0, help="index of the first customer (default 0)")
    a.add_argument("--ranks", default="8,16,32,64", help="ranks, cycled over the adapters (default 8,16,32,64)")
    a.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj", help="target modules (default q,k,v,o)")
    a.add_argument("--url", help="upload to this server's admin API")
    a.add_argument("--admin-token", help="the admin API's bearer token")
    a.add_argument("--out-dir", type=Path, help="also (or only) write each adapter as a peft directory here")
    a.add_argument("--concurrency", type=int, default=4, help="uploads at once (default 4)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--timeout", type=float, default=300.0)

    p = sub.add_parser("plot", help="plot several reports against each other")
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--against", choices=["tenants", "rate", "concurrency"], help="x axis of the throughput plot")
    p.add_argument("--out", type=Path, required=True, help="directory for the PNG files")
    args = parser.parse_args(argv)
    if args.command == "run":
        _check_run_args(parser, args)
    if args.command == "adapters" and not (args.url or args.out_dir):
        parser.error("adapters needs --url (upload) or --out-dir (write), or both")
    if args.command == "adapters" and args.url and not args.admin_token:
        parser.error("uploading needs --admin-token")
    return args


def _check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.rate is not None and args.rate <= 0 or args.concurrency is not None and args.concurrency < 1:
        parser.error("--rate must be > 0 and --concurrency >= 1")
    if args.duration <= 0 or not 0 <= args.warmup < args.duration:
        parser.error("--duration must be > 0 and 0 <= --warmup < --duration")
    if args.tenants < 0:
        parser.error("--tenants must be >= 0")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return {"run": command_run, "adapters": command_adapters, "plot": command_plot}[args.command](args)
    except (httpx.HTTPError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# --- run

def command_run(args: argparse.Namespace) -> int:
    base_url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or _first_model(base_url, headers)
    tenants = tuple(f"{args.tenant_prefix}{i}" for i in range(args.tenants))
    workload = Workload(tenants, args.popularity, args.prompt_tokens, args.output_tokens,
                        (args.token_range.lo, args.token_range.hi), args.seed)
    mode = "poisson" if args.rate is not None else "closed"
    spec = RunSpec(base_url, model, workload, args.tenant_via, mode, args.rate or 0.0, args.concurrency or 0,
                   args.duration, args.request_timeout, not args.no_ignore_eos, args.api_key)
    load = args.rate * 4 if args.rate is not None else args.concurrency  # ~requests in flight
    workers = args.workers or max(1, min(8, int(load // 32) + 1))
    before = _scrape(base_url, headers)
    say = (lambda *a: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"{mode} load on {base_url} ({model}): "
        + (f"{args.rate} req/s" if mode == "poisson" else f"{args.concurrency} clients")
        + f" for {args.duration:g} s, {len(tenants)} tenants ({args.popularity}), {workers} worker process(es)")
    last = [0.0]

    def progress(elapsed: float, done: int, tokens: int, errors: int) -> None:
        if elapsed - last[0] >= 1.0:
            last[0] = elapsed
            say(f"  {max(0.0, elapsed):6.1f} s  {done} done  {errors} errors  {tokens} tokens")

    started = time.time()
    out = run(spec, workers, args.drain, progress)
    after = _scrape(base_url, headers)
    window = (out["start_at"] + args.warmup, out["stop_at"])
    summary = run_report.build(out["records"], window, (args.slo_ttft, args.slo_itl))
    report = {
        "argv": sys.argv[1:],
        "label": args.label, "url": base_url, "model": model, "mode": mode, "started_unix": started,
        "workload": {**workload.describe(), "rate": args.rate, "concurrency": args.concurrency,
                     "duration_s": args.duration, "warmup_s": args.warmup, "tenant_via": args.tenant_via,
                     "ignore_eos": not args.no_ignore_eos},
        "offered": _offered(args, workload.seed),
        "summary": summary, "server": run_report.counter_deltas(before, after),
        "client": {"workers": workers, "worker_cpu_s": out["worker_cpu_s"], "worker_failures": out["worker_failures"]},
        "samples": run_report.samples(out["records"], window),
    }
    report["server_means"] = run_report.server_means(report["server"])
    print(run_report.format_summary(summary))
    if report["offered"]:
        say(f"offered: {report['offered']['requests']} Poisson arrivals in {args.duration:g} s "
            f"({report['offered']['rate']:.2f} req/s for {args.rate} asked)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        say(f"report: {args.out}")
    if args.plots:
        from loadtest import plots

        args.plots.mkdir(parents=True, exist_ok=True)
        say(f"plot: {plots.latency_cdfs([{**report, 'path': str(args.out or 'run')}], args.plots)}")
    return 0 if out["worker_failures"] == 0 else 1


def _offered(args: argparse.Namespace, seed: int) -> dict | None:
    """What the open loop actually sent: a short run's Poisson draw can stray from the rate."""
    if args.rate is None:
        return None
    arrivals = len(poisson_arrivals(args.rate, args.duration, seed))
    return {"requests": arrivals, "rate": arrivals / args.duration}


def _first_model(base_url: str, headers: dict) -> str:
    response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _scrape(base_url: str, headers: dict) -> str | None:
    try:
        response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


# --- adapters

def command_adapters(args: argparse.Namespace) -> int:
    from loadtest.admin_upload import upload_adapters
    from loadtest.checkpoint import peft_adapter_files
    from server.model.config import ModelConfig

    config_path = args.model_config / "config.json" if args.model_config.is_dir() else args.model_config
    cfg = ModelConfig.from_hf_dict(json.loads(config_path.read_text()))
    ranks = [int(r) for r in args.ranks.split(",")]
    modules = tuple(m.strip() for m in args.modules.split(",") if m.strip())
    ids = [f"{args.prefix}{args.first + i}" for i in range(args.count)]
    base = config_path.parent.name

    def make_files(i: int) -> tuple[bytes, bytes]:
        config, weights = peft_adapter_files(cfg, ranks[i % len(ranks)], modules, args.seed * 100003 + args.first + i,
                                             "cpu", base)
        if args.out_dir:
            d = args.out_dir / ids[i]
            d.mkdir(parents=True, exist_ok=True)
            (d / "adapter_config.json").write_bytes(config)
            (d / "adapter_model.safetensors").write_bytes(weights)
        return config, weights

    def progress(done: int, total: int) -> None:
        print(f"  {done}/{total} adapters", file=sys.stderr, flush=True)

    if not args.url:
        for i in range(args.count):
            make_files(i)
            progress(i + 1, args.count)
        print(f"wrote {args.count} adapters under {args.out_dir}")
        return 0
    summary = upload_adapters(args.url.rstrip("/"), args.admin_token, ids, make_files, args.concurrency,
                              args.timeout, progress=progress)
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] == summary["count"] else 1


# --- plot

def command_plot(args: argparse.Namespace) -> int:
    from loadtest import plots

    reports = [{**json.loads(path.read_text()), "path": str(path)} for path in args.reports]
    args.out.mkdir(parents=True, exist_ok=True)
    print(plots.latency_cdfs(reports, args.out))
    if args.against:
        print(plots.throughput_vs(reports, args.against, args.out))
    return 0
