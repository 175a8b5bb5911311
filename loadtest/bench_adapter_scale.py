"""Scale in adapters (issue 11): throughput, TTFT and ITL with 1, 8, 64, 512 and 2,000 adapters
on one server whose GPU pool holds far fewer, S-LoRA's synthetic workload, open loop.

    PYTHONPATH=. python3 loadtest/bench_adapter_scale.py --out DIR [--checkpoint DIR]
        [--points 8,2000,512,64,1] [--rate R | --load 0.9] [--duration 25] [--warmup 10]

One run: (1) a random Llama-2-7B-shaped bf16 checkpoint (or --checkpoint); (2) the adapter store
seeded with 2,000 customers (loadtest/store_seed.py: ranks 8/16/32/64 on q,k,v,o drawn at random
per customer, --distinct contents per rank shared through hard links); (3) `loraplex serve` with
default settings; (4) unless --rate is given, a closed-loop calibration at 8 adapters with
--calibration-clients clients measures the server's capacity in requests/s, and the open-loop
rate is --load times it (near saturation); (5) per point N, `python -m loadtest run` with Poisson
arrivals at that rate, N tenants with Zipf(1) popularity, prompt and output lengths uniform in
[8, 512] (S-LoRA's workload), streaming, reports in DIR/scale_<N>.json; (6) the issue's targets
(throughput at 2,000 >= 0.95x at 8, TTFT p99 at 2,000 <= 2x at 8) in DIR/adapter_scale_<device>.json.
The 8 and 2,000 points run first, so a time limit cuts the others. `python -m loadtest plot
DIR/scale_*.json --against tenants --out DIR` draws throughput against adapters and the CDFs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.bench_run import REPO, child_env, device_and_name, device_slug, progress_printer
from loadtest.server_process import start_bench_server

RANKS = (8, 16, 32, 64)
PREFIX = "cust-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=REPO / ".bench" / "tokenizer")
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead of writing a random one")
    p.add_argument("--points", default="8,2000,512,64,1", help="numbers of adapters, in the order run")
    p.add_argument("--distinct", type=int, default=8, help="distinct adapter contents per rank (default 8)")
    p.add_argument("--rate", type=float, help="open-loop requests/s (default: calibrated)")
    p.add_argument("--load", type=float, default=0.9, help="rate as a fraction of the calibrated capacity")
    p.add_argument("--calibration-clients", type=int, default=256)
    p.add_argument("--lengths", default="8-512", help="prompt and output lengths (default 8-512)")
    p.add_argument("--duration", type=float, default=25.0, help="seconds of arrivals per point, warm-up included")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--drain", type=float, default=30.0)
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--workdir", type=Path)
    p.add_argument("--time-budget", type=float, default=560.0, help="skip points that would end later")
    args = p.parse_args(argv)
    args.points = [int(n) for n in args.points.split(",")]
    if not args.points or min(args.points) < 1:
        p.error("--points: positive numbers of adapters")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    deadline = time.monotonic() + args.time_budget
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-scale-"))
    say = progress_printer()
    device, device_name = device_and_name()
    result: dict = {"command": " ".join(["python3", "loadtest/bench_adapter_scale.py", *(argv or sys.argv[1:])]),
                    "device": device_name,
                    "setup": {"shape": args.shape, "ranks": list(RANKS), "target_modules": ["q_proj", "k_proj",
                              "v_proj", "o_proj"], "popularity": "zipf:1", "lengths": args.lengths,
                              "distinct_per_rank": args.distinct, "duration_s": args.duration,
                              "warmup_s": args.warmup}, "points": []}
    server = None
    try:
        ckpt, cfg = _checkpoint(args, workdir, device, say)
        customers = [f"{PREFIX}{i}" for i in range(max(args.points))]
        result["store"] = _seed(args, workdir / "adapters", customers, cfg, ckpt.name, say)
        if device == "cuda":
            torch.cuda.empty_cache()
        flags = [t for arg in args.server_arg for t in arg.split()]
        server, _ = start_bench_server(ckpt, workdir, device, args.out / "server_scale.log", REPO, flags, say=say)
        result["server"] = {"command": server.command}
        base = server.base_url
        if args.rate is None:
            calib = _loadtest(args, base, "calibration", ["--concurrency", str(args.calibration_clients),
                                                           "--tenants", "8"], args.out / "scale_calibration.json")
            capacity = calib["summary"]["requests_per_s"]
            args.rate = round(args.load * capacity, 2)
            result["calibration"] = {"clients": args.calibration_clients, "requests_per_s": capacity,
                                     "output_tokens_per_s": calib["summary"]["output_tokens_per_s"],
                                     "rate": args.rate}
            say(f"capacity {capacity:.2f} req/s closed-loop at {args.calibration_clients} clients; "
                f"open loop at {args.rate} req/s")
        result["rate"] = args.rate
        for n in args.points:
            if time.monotonic() + args.duration + args.drain + 20 > deadline:
                say(f"{n} adapters: skipped (time budget)")
                result["points"].append({"adapters": n, "skipped": "time budget"})
                continue
            if server.exit_code() is not None:
                raise RuntimeError(f"the server exited ({server.exit_code()}):\n{server.log_tail()}")
            report = _loadtest(args, base, f"{n} adapters", ["--rate", str(args.rate), "--tenants", str(n)],
                               args.out / f"scale_{n}.json")
            result["points"].append(_point(n, report))
            say(_line(result["points"][-1]))
        result["targets"] = targets(result["points"])
        for t in result["targets"]:
            say(f"target {t['name']}: {t['value']:.3f} (limit {t['limit']}) {'MET' if t['met'] else 'MISSED'}")
        return 0
    finally:
        if server is not None:
            result.setdefault("server", {})["exit_code"] = server.stop()
        path = args.out / f"adapter_scale_{device_slug(device_name)}.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        say(f"wrote {path}")
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _checkpoint(args, workdir: Path, device: str, say):
    from loadtest.checkpoint import SHAPES, write_random_checkpoint
    from server.model.config import ModelConfig

    ckpt = args.checkpoint
    if ckpt is None:
        say(f"writing a random {args.shape} checkpoint")
        ckpt = workdir / f"model-{args.shape}"
        write_random_checkpoint(ckpt, SHAPES[args.shape], args.tokenizer, device)
    return ckpt, ModelConfig.from_dir(ckpt)


def _seed(args, root: Path, customers: list[str], cfg, base_name: str, say) -> dict:
    from loadtest.checkpoint import QKVO, peft_adapter_files
    from loadtest.store_seed import seed_store
    from server.lora.peft import load_peft_adapter

    rng = random.Random(0)
    ranks = [rng.choice(RANKS) for _ in customers]
    content = [RANKS.index(r) * args.distinct + rng.randrange(args.distinct) for r in ranks]
    gen_device = device_and_name()[0]

    def make_files(c: int) -> tuple[bytes, bytes]:
        return peft_adapter_files(cfg, RANKS[c // args.distinct], QKVO, 5000 + c, gen_device, base_name)

    def validate(config: bytes, weights: bytes):
        return load_peft_adapter(config, weights, cfg, max_rank=max(RANKS))

    start = time.monotonic()
    say(f"seeding the store with {len(customers)} customers ({args.distinct} distinct adapters a rank)")
    summary = seed_store(root, customers, content, make_files, validate, say)
    summary.update(seconds=time.monotonic() - start, ranks={r: ranks.count(r) for r in RANKS})
    say(f"  {summary['distinct_adapters']} distinct adapters, {summary['distinct_bytes'] / 1e9:.1f} GB, "
        f"in {summary['seconds']:.0f} s")
    return summary


def _loadtest(args, base_url: str, label: str, mode: list[str], out: Path) -> dict:
    """One `python -m loadtest run`, as an operator would type it."""
    command = [sys.executable, "-m", "loadtest", "run", "--url", base_url, *mode, "--tenant-prefix", PREFIX,
               "--popularity", "zipf:1", "--prompt-tokens", args.lengths, "--output-tokens", args.lengths,
               "--duration", str(args.duration), "--warmup", str(args.warmup), "--drain", str(args.drain),
               "--label", label, "--out", str(out), "--quiet"]
    subprocess.run(command, cwd=REPO, env=child_env(), timeout=args.duration + args.drain + 120, check=False)
    return json.loads(out.read_text())


def _point(n: int, report: dict) -> dict:
    s = report["summary"]
    server = report.get("server") or {}
    adapter_counters = {k: v for k, v in server.items() if k.startswith("loraplex_adapter")}
    return {"adapters": n, "output_tokens_per_s": s["output_tokens_per_s"], "requests_per_s": s["requests_per_s"],
            "ttft_s": s["ttft_s"], "itl_s": s["itl_s"], "tpot_s": s["tpot_s"], "latency_s": s["latency_s"],
            "status": s["status"], "errors": s["errors"], "offered": report.get("offered"),
            "tenants_seen": len(s["tenants"]), "adapter_counters": adapter_counters,
            "server_means": report.get("server_means")}


def _line(p: dict) -> str:
    def ms(stats, key):
        return f"{stats[key] * 1e3:.0f}" if stats else "-"

    return (f"{p['adapters']:5d} adapters: {p['output_tokens_per_s']:7.0f} tok/s {p['requests_per_s']:5.2f} req/s  "
            f"TTFT p50/p99 {ms(p['ttft_s'], 'p50')}/{ms(p['ttft_s'], 'p99')} ms  ITL p50/p99 "
            f"{ms(p['itl_s'], 'p50')}/{ms(p['itl_s'], 'p99')} ms  tenants seen {p['tenants_seen']}  "
            f"status {p['status']}")


def targets(points: list[dict]) -> list[dict]:
    by_n = {p["adapters"]: p for p in points if not p.get("skipped")}
    if 8 not in by_n or 2000 not in by_n:
        return []
    small, large = by_n[8], by_n[2000]
    out = [{"name": "throughput 2000 / 8 adapters", "value": large["output_tokens_per_s"] / small["output_tokens_per_s"],
            "limit": 0.95, "sense": ">="}]
    if small["ttft_s"] and large["ttft_s"]:
        out.append({"name": "TTFT p99 2000 / 8 adapters", "value": large["ttft_s"]["p99"] / small["ttft_s"]["p99"],
                    "limit": 2.0, "sense": "<="})
    for t in out:
        t["met"] = t["value"] >= t["limit"] if t["sense"] == ">=" else t["value"] <= t["limit"]
    return out


if __name__ == "__main__":
    sys.exit(main())
