"""Serving benchmark: the real server over HTTP, on a random 7B/8B-shaped checkpoint, against
the memory roofline measured in the same run (issue 10, item 6).

    PYTHONPATH=. python3 loadtest/bench_serving.py --out DIR [--shape llama2-7b|llama3-8b]
        [--phases base@64,tenants32@64,...] [--tokenizer DIR] [--duration S] [--server-arg=--max-loras=32]

One run: (1) the device-to-device copy bandwidth; (2) a random bf16 checkpoint in Hugging Face
layout (plus the tokenizer from --tokenizer; prompts are token ids, the tokenizer only decodes);
(3) the engine alone, in process: its decode step (batch 64, base and 32 distinct adapters) and
the phases' own closed loop without the server (64 requests always in flight; skip both with
--no-engine-alone), freed before (4) `python -m server.cli serve` starts as a subprocess
(log: <out>/server_<shape>.log); (5) the first request after /ready; (6) N PEFT adapters
uploaded through the admin API; (7) phases of closed-loop streaming clients: `tenantsN@C` is C
concurrent clients, each request for one of N tenants round-robin (`base@C`: no tenant header),
128-token random prompts, 128 output tokens with ignore_eos, greedy; before a tenants phase, one
one-token request per tenant loads its adapters (the phase measures the steady state; the cold
first load is step 6's figure; --no-touch skips it); the first wave's lengths are staggered over
the clients (1 .. 128 tokens; --no-stagger: all 128) so that finishes and new prompts spread
over the steps as in a steady state, as the engine-alone closed loop does, instead of the whole
phase running in lockstep (every prompt in the same few steps); a warm-up, --duration seconds
measured, then a bounded drain; the server's /metrics scraped at the window's edges;
(8) per phase the roofline step (weights + KV at the mean context of C sequences + C's distinct
adapters, over the copy bandwidth) and the issue's targets as MET/MISSED; (9) a table, and
everything as JSON in <out>/serving_bench_<shape>_<device>.json.

Exit status: 0 when the phases ran (request errors are reported, not fatal), 2 when the server
did not start, 3 when it died during the phases. The server is always stopped (SIGTERM, then
SIGKILL), also on errors and on SIGTERM to the benchmark. --time-budget (default 540 s) skips
phases that would not finish in time, so the JSON is written before an outer time limit hits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import secrets
import shlex
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
from loadtest.sse_client import LoadSpec, one_request, random_prompt, run_clients, touch_tenants

# Heavy imports (torch, the engine) happen inside functions: client worker processes are
# spawned and re-import this module, and they need none of it.

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PHASES = "base@64,tenants32@64,tenants128@64,base@128,tenants32@128"
CLIENTS_PER_PROCESS = 16
HOST = "127.0.0.1"
EXIT_SERVER_START, EXIT_SERVER_DIED = 2, 3
STOP_MARGIN_S = 45.0  # of --time-budget, kept for stopping the server and writing the results
PHASE_PATTERN = re.compile(r"(?:base|tenants(?P<tenants>\d+))@(?P<clients>\d+)")


@dataclass(frozen=True)
class Phase:
    name: str
    tenants: int  # 0 = base model
    concurrency: int


def parse_phase(text: str) -> Phase:
    match = PHASE_PATTERN.fullmatch(text.strip())
    if not match or int(match["clients"]) < 1 or match["tenants"] == "0":
        raise argparse.ArgumentTypeError(f"phase {text!r}: expected base@C or tenantsN@C, e.g. tenants32@64")
    return Phase(text.strip(), int(match["tenants"] or 0), int(match["clients"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from loadtest.checkpoint import SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="where the JSON and the server log go")
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES), help="random checkpoint shape")
    p.add_argument("--phases", default=DEFAULT_PHASES, help=f"comma-separated (default {DEFAULT_PHASES})")
    p.add_argument("--tokenizer", type=Path, help="dir with tokenizer files (default: the prepared SmolLM2)")
    p.add_argument("--device", help="cuda | cuda:N | cpu (default: cuda when there is one)")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds at the start of a phase")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="wait for in-flight requests after a phase")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=16, help="adapter rank")
    p.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj",
                   help="adapter target modules, comma-separated, or all-linear (default q,k,v,o)")
    p.add_argument("--adapters-dir", type=Path,
                   help="upload these peft adapter directories (sorted; the i-th is tenant i) instead of random ones")
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint directory instead of writing a random one")
    p.add_argument("--upload-concurrency", type=int, default=4)
    p.add_argument("--request-timeout", type=float, default=300.0, help="per request, between bytes")
    p.add_argument("--client-procs", type=int, default=0,
                   help=f"client worker processes per phase (default: one per {CLIENTS_PER_PROCESS} clients)")
    p.add_argument("--no-engine-alone", action="store_true", help="skip the in-process engine step")
    p.add_argument("--engine-batch", type=int, default=64)
    p.add_argument("--engine-adapters", type=int, default=32)
    p.add_argument("--engine-decode-steps", type=int, default=32)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `loraplex serve` flags, after ours (so they win), e.g. --server-arg=--max-loras=32")
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for /ready")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="skip phases that would end later than this many seconds into the run (0: no limit)")
    p.add_argument("--workdir", type=Path, help="checkpoint and adapter store (default: a temp dir, removed)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stagger", action="store_true",
                   help="every client's first request asks for --max-tokens too (clients then stay in lockstep)")
    p.add_argument("--no-touch", action="store_true",
                   help="do not load a tenants phase's adapters (one one-token request each) before it starts")
    args = p.parse_args(argv)
    try:
        args.phases = [parse_phase(s) for s in args.phases.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if not args.phases:
        p.error("--phases is empty")
    args.modules = _parse_modules(p, args.modules)
    if args.adapters_dir is not None:
        args.adapter_dirs = sorted(d for d in args.adapters_dir.iterdir() if (d / "adapter_config.json").is_file())
        tenants = max(phase.tenants for phase in args.phases)
        if len(args.adapter_dirs) < tenants:
            p.error(f"--adapters-dir holds {len(args.adapter_dirs)} adapters, the phases need {tenants}")
    args.tokenizer = args.tokenizer or _default_tokenizer()
    if not (args.tokenizer / "tokenizer.json").is_file() and not (args.tokenizer / "tokenizer_config.json").is_file():
        p.error(f"no tokenizer in {args.tokenizer}: pass --tokenizer DIR (e.g. the SmolLM2 dir that "
                "`loraplex prepare-model` writes under ~/.cache/loraplex/models)")
    return args


def _parse_modules(p: argparse.ArgumentParser, text: str) -> tuple[str, ...]:
    from loadtest.checkpoint import ALL_LINEAR

    modules = ALL_LINEAR if text.strip() == "all-linear" else tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(modules) - set(ALL_LINEAR))
    if not modules or unknown:
        p.error(f"--modules: expected names among {', '.join(ALL_LINEAR)} or all-linear, got {text!r}")
    return modules


def _default_tokenizer() -> Path:
    from server.config import Settings
    from server.model.prepare import DEFAULT_MODEL_NAME

    return Settings.from_env().models_dir / DEFAULT_MODEL_NAME


class Progress:
    def __init__(self):
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f}s] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the finally blocks stop the server
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-serving-bench-"))
    progress = Progress()
    result = {"command": " ".join(["python3", "loadtest/bench_serving.py", *(argv or sys.argv[1:])]),
              "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shape": args.shape,
              "settings": _settings_summary(args), "error": None}
    try:
        return run(args, workdir, result, progress)
    except BaseException as e:  # recorded, then raised as it is (traceback, exit status)
        result["error"] = result["error"] or f"{type(e).__name__}: {e}"
        raise
    finally:
        _write_json(args, result, progress)
        if args.workdir is None and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _settings_summary(args: argparse.Namespace) -> dict:
    return {"phases": [p.name for p in args.phases], "duration_s": args.duration, "warmup_s": args.warmup,
            "stagger_first_wave": not args.no_stagger, "touch_tenants_first": not args.no_touch,
            "drain_timeout_s": args.drain_timeout, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "rank": args.rank, "target_modules": list(args.modules), "seed": args.seed,
            "adapters_dir": str(args.adapters_dir) if args.adapters_dir else None,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "tokenizer": str(args.tokenizer), "server_args": args.server_arg}


def run(args: argparse.Namespace, workdir: Path, result: dict, progress: Progress) -> int:
    import torch

    from loadtest.roofline import copy_bandwidth

    deadline = time.monotonic() + args.time_budget if args.time_budget > 0 else float("inf")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result["device"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    result["device_kind"] = device
    procs = max(_client_procs(args, p) for p in args.phases)
    pool = multiprocessing.get_context("spawn").Pool(procs)  # started now: warm when the phases begin
    server = None
    try:
        progress(f"copy bandwidth on {device}")
        bandwidth = copy_bandwidth(device)
        result["copy_bandwidth"] = bandwidth
        progress(f"  {bandwidth['bytes_per_s'] / 1e12:.3f} TB/s (read + write)")

        ckpt_dir, cfg, sizes = _write_checkpoint(args, workdir, device, result, progress)
        result["engine_alone"] = _engine_alone(args, ckpt_dir, device, sizes, bandwidth, progress)

        admin_token = secrets.token_hex(16)
        server = _start_server(args, ckpt_dir, workdir, device, admin_token, deadline, result, progress)
        if server is None:
            return EXIT_SERVER_START
        model_name = _base_model_name(server.base_url)
        token_range = (min(1000, cfg.vocab_size // 2), cfg.vocab_size)
        first = _single_request(args, server.base_url, model_name, token_range, None, "first")
        result["first_request"] = report.record_summary(first)
        progress(f"first request: TTFT {report.fmt_ms(first.ttft)}, {first.error or 'ok'}")

        tenants = max(p.tenants for p in args.phases)
        customer_ids = [f"tenant-{i:03d}" for i in range(tenants)]
        if customer_ids:
            result["uploads"] = _upload_adapters(args, server.base_url, admin_token, customer_ids, cfg, device,
                                                 model_name, progress)
            first = _single_request(args, server.base_url, model_name, token_range, customer_ids[0], "first-adapter")
            result["first_adapter_request"] = report.record_summary(first)
            progress(f"first adapter request: TTFT {report.fmt_ms(first.ttft)}, {first.error or 'ok'}")

        result["phases"] = []
        for phase in args.phases:
            if server.exit_code() is not None:
                result["error"] = f"the server exited with code {server.exit_code()} during the phases"
                progress(f"{result['error']}\n{server.log_tail()}")
                return EXIT_SERVER_DIED
            summary = _run_phase(args, pool, phase, server.base_url, model_name, customer_ids, token_range,
                                 sizes, bandwidth["bytes_per_s"], deadline, progress)
            result["phases"].append(summary)
        _finish(result)
        return 0
    finally:
        pool.terminate()
        if server is not None:
            code = server.stop()
            result.setdefault("server", {})["exit_code"] = code
            progress(f"server stopped (exit code {code})")


def _write_checkpoint(args, workdir: Path, device: str, result: dict, progress: Progress):
    """The random checkpoint, its config, and the bytes a decode step of it reads."""
    from loadtest.checkpoint import SHAPES, adapter_bytes, decode_weight_bytes, kv_bytes_per_token
    from loadtest.checkpoint import existing_checkpoint, write_random_checkpoint
    from loadtest.roofline import DecodeBytes
    from server.model.config import ModelConfig

    if args.checkpoint is not None:
        ckpt_dir = args.checkpoint
        checkpoint = existing_checkpoint(ckpt_dir)
        progress(f"serving the checkpoint in {ckpt_dir}")
    else:
        progress(f"writing a random {args.shape} checkpoint")
        ckpt_dir = workdir / f"model-{args.shape}"
        checkpoint = write_random_checkpoint(ckpt_dir, SHAPES[args.shape], args.tokenizer, device, args.seed)
    cfg = ModelConfig.from_dir(ckpt_dir)
    dtype_bytes = 2 if device.startswith("cuda") else 4  # the server's default dtype: bf16 on GPU, fp32 on CPU
    sizes = DecodeBytes(decode_weight_bytes(cfg, dtype_bytes), kv_bytes_per_token(cfg, dtype_bytes),
                        adapter_bytes(cfg, args.rank, args.modules, dtype_bytes))
    result["model_config"] = json.loads((ckpt_dir / "config.json").read_text())
    result["checkpoint"] = {**checkpoint, "decode_bytes": sizes.to_dict(), "dtype_bytes": dtype_bytes}
    padded = checkpoint["tokenizer"].get("padded_from")
    progress(f"  {checkpoint['bytes'] / 1e9:.2f} GB in {checkpoint['write_s']:.1f} s"
             + (f"; tokenizer vocabulary padded from {padded} to {cfg.vocab_size}" if padded else ""))
    return ckpt_dir, cfg, sizes


def _client_procs(args: argparse.Namespace, phase: Phase) -> int:
    wanted = args.client_procs or -(-phase.concurrency // CLIENTS_PER_PROCESS)
    return max(1, min(wanted, phase.concurrency))


def _engine_alone(args, ckpt_dir: Path, device: str, sizes, bandwidth: dict, progress: Progress) -> dict:
    from loadtest.engine_alone import measure_engine_alone
    from loadtest.roofline import roofline

    if args.no_engine_alone:
        return {"skipped": True}
    progress(f"engine alone: batch {args.engine_batch}, base and {args.engine_adapters} adapters")
    engine = measure_engine_alone(ckpt_dir, device, args.engine_batch, args.prompt_tokens, args.engine_decode_steps,
                                  args.engine_adapters, args.rank, closed_loop_tokens=args.max_tokens)
    if engine.get("error"):
        progress(f"  engine alone failed (reported in the JSON):\n{engine['error']}")
        return engine
    engine["roofline"] = roofline(sizes, args.engine_batch, engine["mean_context"], 0, bandwidth["bytes_per_s"])
    engine["roofline_adapters"] = roofline(sizes, args.engine_batch, engine["mean_context"],
                                           min(args.engine_adapters, args.engine_batch), bandwidth["bytes_per_s"])
    progress(f"  base step {report.fmt_ms(engine['base_step_s'])}, adapters step "
             f"{report.fmt_ms(engine['adapters_step_s'])}, roofline {report.fmt_ms(engine['roofline']['step_s'])}")
    for case, loop in (engine.get("closed_loop") or {}).items():
        if isinstance(loop, dict):
            progress(f"  closed loop ({case}): {loop['tokens_per_s']:.0f} tok/s, step {report.fmt_ms(loop['step_s'])}")
    held = (engine.get("device_memory_after") or {}).get("reserved_bytes", 0)
    if held > 1 << 30:
        progress(f"  warning: {held / 2**30:.1f} GiB still held after the engine was freed; the server gets less")
    return engine


def _start_server(args, ckpt_dir: Path, workdir: Path, device: str, admin_token: str, deadline: float,
                  result: dict, progress: Progress) -> ServerProcess | None:
    port = free_port(HOST)
    env = dict(os.environ)
    env["LORAPLEX_ADMIN_TOKEN"] = admin_token
    # the server must import `server` from this checkout and whatever the caller's PYTHONPATH holds
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    max_clients = max(p.concurrency for p in args.phases)
    flags = ["--model", str(ckpt_dir), "--device", device, "--home", str(workdir / "home"),
             "--adapter-store", str(workdir / "adapters"), "--max-num-seqs", str(max_clients)]
    flags += [token for arg in args.server_arg for token in shlex.split(arg)]
    log_path = args.out / f"server_{args.shape}.log"
    server = ServerProcess(flags, env, log_path, REPO, HOST, port)
    result["server"] = {"command": server.command, "log": log_path.name, "url": server.base_url}
    progress(f"starting the server: {' '.join(server.command)}")
    server.start()
    timeout = min(args.server_timeout, max(60.0, deadline - time.monotonic() - STOP_MARGIN_S))
    try:
        ready_s = server.wait_ready(timeout)
    except ServerStartError as e:
        result["error"] = str(e).splitlines()[0]
        print(f"bench_serving: {e}", file=sys.stderr, flush=True)
        result["server"]["exit_code"] = server.stop()
        return None
    result["server"].update({"ready_s": ready_s, "config": _server_config(server.base_url)})
    progress(f"  ready after {ready_s:.1f} s; {result['server']['config']}")
    return server


def _server_config(base_url: str) -> dict | None:
    text = _scrape(base_url)
    return report.build_info(text) if text else None


def _base_model_name(base_url: str) -> str:
    response = httpx.get(f"{base_url}/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _single_request(args, base_url: str, model: str, token_range, tenant: str | None, seed: str):
    prompt = random_prompt(f"{args.seed}/{seed}", args.prompt_tokens, token_range)
    return asyncio.run(one_request(base_url, model, prompt, args.max_tokens, tenant, args.request_timeout))


def _upload_adapters(args, base_url: str, admin_token: str, customer_ids: list[str], cfg, device: str,
                     model_name: str, progress: Progress) -> dict:
    from loadtest.checkpoint import peft_adapter_files

    def make_files(index: int) -> tuple[bytes, bytes]:
        if args.adapters_dir is not None:
            folder = args.adapter_dirs[index]
            return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()
        return peft_adapter_files(cfg, args.rank, args.modules, 1000 + index, device, model_name)

    progress(f"uploading {len(customer_ids)} adapters ({args.upload_concurrency} at a time)")
    summary = upload_adapters(base_url, admin_token, customer_ids, make_files, args.upload_concurrency,
                              args.request_timeout)
    median = (summary["request_s"] or {}).get("p50")
    progress(f"  {summary['ok']}/{summary['count']} stored in {summary['wall_s']:.1f} s, median request "
             f"{report.fmt_ms(median)}" + (f"; errors {summary['errors']}: {summary['error_examples'][:1]}"
                                    if summary["errors"] else ""))
    return summary


def _run_phase(args, pool, phase: Phase, base_url: str, model: str, customer_ids: list[str], token_range,
               sizes, bandwidth: float, deadline: float, progress: Progress) -> dict:
    """Closed-loop clients in worker processes; the server's metrics scraped at the window's edges."""
    from loadtest.roofline import roofline

    out = {"name": phase.name, "tenants": phase.tenants, "concurrency": phase.concurrency}
    if time.monotonic() + args.warmup + args.duration + STOP_MARGIN_S > deadline:
        progress(f"phase {phase.name}: skipped, it would not end within --time-budget {args.time_budget:.0f} s")
        return {**out, "skipped": "time budget", "output_tokens_per_s": 0.0, "requests_per_s": 0.0, "errors": {}}
    if phase.tenants and not args.no_touch:
        touch_start = time.monotonic()
        prompt = random_prompt(f"{args.seed}/touch", args.prompt_tokens, token_range)
        touched = asyncio.run(touch_tenants(base_url, model, customer_ids[:phase.tenants], prompt,
                                            args.request_timeout))
        out["touch"] = {"seconds": time.monotonic() - touch_start, "tenants": len(touched),
                        "errors": sum(not r.ok for r in touched)}
        progress(f"phase {phase.name}: {len(touched)} tenants' adapters loaded in {out['touch']['seconds']:.1f} s"
                 + (f", {out['touch']['errors']} errors" if out["touch"]["errors"] else ""))
    procs = _client_procs(args, phase)
    start_at = time.monotonic() + 0.5  # lets every worker pick up its share before the first request
    w0 = start_at + args.warmup
    w1 = w0 + args.duration
    cancel_at = min(w1 + args.drain_timeout, deadline - STOP_MARGIN_S / 2)
    spec = LoadSpec(url=f"{base_url}/v1/completions", model=model, tenants=tuple(customer_ids[:phase.tenants]),
                    concurrency=phase.concurrency, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                    token_range=token_range, seed=f"{args.seed}/{phase.name}", request_timeout_s=args.request_timeout,
                    start_at=start_at, stop_issuing_at=w1, cancel_at=cancel_at, stagger=not args.no_stagger)
    progress(f"phase {phase.name}: {phase.concurrency} clients, {phase.tenants or 'no'} tenants, "
             f"{args.warmup:g} s warm-up + {args.duration:g} s measured; client processes: {procs}")
    shares = [list(range(p, phase.concurrency, procs)) for p in range(procs)]
    pending = [pool.apply_async(run_clients, (spec, share)) for share in shares]
    before = _scrape_at(base_url, w0)
    after = _scrape_at(base_url, w1)
    outputs, failures = [], []
    for job in pending:
        try:
            outputs.append(job.get(timeout=max(1.0, cancel_at - time.monotonic()) + 30))
        except Exception as e:  # noqa: BLE001 - a broken worker loses its share, not the run
            failures.append(f"{type(e).__name__}: {e}")
    records = [r for o in outputs for r in o["records"]]
    out.update(report.summarize_requests(records, (w0, w1)))
    out["server"] = report.server_window(_parse(before), _parse(after))
    out["client"] = {"processes": procs, "cpu_busy_max": max((o["cpu_s"] / o["wall_s"] for o in outputs
                                                               if o["wall_s"] > 0), default=None),
                     "worker_failures": failures}
    context = args.prompt_tokens + args.max_tokens / 2
    out["roofline"] = roofline(sizes, phase.concurrency, context, min(phase.tenants, phase.concurrency), bandwidth)
    _log_phase(out, progress)
    return out


def _scrape_at(base_url: str, when: float) -> str | None:
    time.sleep(max(0.0, when - time.monotonic()))
    return _scrape(base_url)


def _scrape(base_url: str) -> str | None:
    try:
        response = httpx.get(f"{base_url}/metrics", timeout=10)
        return response.text if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


def _parse(text: str | None) -> dict | None:
    return report.parse_metrics(text) if text else None


def _log_phase(phase: dict, progress: Progress) -> None:
    progress(report.phase_line(phase))
    busy = phase["client"]["cpu_busy_max"]
    if busy is not None and busy > 0.8:
        progress(f"  warning: a client process was {busy:.0%} busy; the clients may have limited the figures "
                 "(raise --client-procs)")


def _finish(result: dict) -> None:
    result["targets"] = report.all_targets(result)
    print("\n" + report.format_table([p for p in result["phases"] if not p.get("skipped")]), flush=True)
    if result["targets"]:
        print("targets (issue 10):\n" + report.format_targets(result["targets"]), flush=True)


def _write_json(args, result: dict, progress: Progress) -> None:
    device = result.get("device", "unknown").lower().replace("nvidia", "").strip()
    slug = "".join(c if c.isalnum() else "_" for c in device).strip("_") or "unknown"
    path = args.out / f"serving_bench_{args.shape}_{slug}.json"
    result["elapsed_s"] = time.monotonic() - progress.start
    path.write_text(json.dumps(result, indent=2, default=str))
    progress(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
