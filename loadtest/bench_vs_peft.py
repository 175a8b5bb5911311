"""loraplex against what users run today, in one run (issue 11): the same random Llama-2-7B-shaped
bf16 checkpoint and the same 32 rank-16 all-linear adapters, served by Hugging Face transformers
and peft (loadtest/hf_baseline.py, in its own process) and then by loraplex through HTTP
(loadtest/bench_serving.py, closed-loop streaming clients, 32 tenants round-robin).

    PYTHONPATH=. python3 loadtest/bench_vs_peft.py --out DIR [--tokenizer DIR]
        [--phases tenants32@32,base@32,tenants32@256] [--duration 12] [--mixed-new-tokens 32]

Writes DIR/vs_peft_<device>.json (both sides, the ratios against the issue's targets: loraplex
>= 100x peft's mixed batch, >= 5x transformers on the base model alone) and prints a table. The
first loraplex phase is the like-for-like one (32 requests in flight, as peft's batch of 32);
the others show what the server does with more requests in flight.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.bench_run import REPO, child_env, device_and_name, device_slug, progress_printer

TARGETS = {"peft_mixed": 100.0, "transformers_base": 5.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=REPO / ".bench" / "tokenizer")
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--mixed-new-tokens", type=int, default=32)
    p.add_argument("--phases", default="tenants32@32,base@32,tenants32@256")
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--workdir", type=Path, help="checkpoint and adapters (default: a temp dir, removed)")
    p.add_argument("--keep-workdir", action="store_true", help="keep them (another benchmark reuses the checkpoint)")
    p.add_argument("--hf-timeout", type=float, default=300.0)
    p.add_argument("--serving-budget", type=float, default=240.0, help="bench_serving's --time-budget")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from loadtest.checkpoint import ALL_LINEAR, SHAPES, peft_adapter_files, write_peft_adapter
    from loadtest.checkpoint import write_random_checkpoint
    from server.model.config import ModelConfig

    args = parse_args(argv)
    device, device_name = device_and_name()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplex-vs-peft-"))
    say = progress_printer()
    result: dict = {"command": " ".join(["python3", "loadtest/bench_vs_peft.py", *(argv or sys.argv[1:])]),
                    "setup": {"shape": args.shape, "adapters": args.adapters, "rank": args.rank,
                              "target_modules": list(ALL_LINEAR), "batch": args.batch,
                              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                              "mixed_new_tokens": args.mixed_new_tokens}}
    try:
        say(f"writing a random {args.shape} checkpoint and {args.adapters} rank-{args.rank} all-linear adapters")
        ckpt = workdir / f"model-{args.shape}"
        result["checkpoint"] = write_random_checkpoint(ckpt, SHAPES[args.shape], args.tokenizer, device)
        cfg = ModelConfig.from_dir(ckpt)
        adapters = workdir / "adapters"
        for i in range(args.adapters):
            files = peft_adapter_files(cfg, args.rank, ALL_LINEAR, 1000 + i, device, ckpt.name)
            write_peft_adapter(adapters / f"tenant-{i:03d}", *files)
        if device == "cuda":
            torch.cuda.empty_cache()

        say("Hugging Face transformers and peft")
        hf_json = args.out / "hf_baseline.json"
        hf = subprocess.run([sys.executable, "-m", "loadtest.hf_baseline", "--checkpoint", str(ckpt),
                             "--adapters", str(adapters), "--out", str(hf_json), "--batch", str(args.batch),
                             "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                             "--mixed-new-tokens", str(args.mixed_new_tokens)],
                            cwd=REPO, env=child_env(), timeout=args.hf_timeout)
        result["hf"] = json.loads(hf_json.read_text()) if hf.returncode == 0 and hf_json.is_file() else \
            {"error": f"exit code {hf.returncode}"}

        say("loraplex through HTTP")
        serving_out = args.out / "serving"
        serving = subprocess.run([sys.executable, "loadtest/bench_serving.py", "--out", str(serving_out),
                                  "--tokenizer", str(args.tokenizer), "--checkpoint", str(ckpt),
                                  "--adapters-dir", str(adapters), "--modules", "all-linear", "--shape", args.shape,
                                  "--rank", str(args.rank), "--phases", args.phases, "--no-engine-alone",
                                  "--duration", str(args.duration), "--warmup", str(args.warmup),
                                  "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.new_tokens),
                                  "--time-budget", str(args.serving_budget), "--workdir", str(workdir / "serving")],
                                 cwd=REPO, env=child_env(), timeout=args.serving_budget + 60)
        serving_json = next(serving_out.glob(f"serving_bench_{args.shape}_*.json"), None)
        result["loraplex"] = json.loads(serving_json.read_text()) if serving_json else \
            {"error": f"exit code {serving.returncode}"}
        result["comparison"] = compare(result["hf"], result["loraplex"])
        print(format_table(result["comparison"]), flush=True)
        return 0
    finally:
        path = args.out / f"vs_peft_{device_slug(device_name)}.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        say(f"wrote {path}")
        if args.workdir is None and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def compare(hf: dict, loraplex: dict) -> list[dict]:
    """Each loraplex phase's output tokens/s against each Hugging Face case, with the targets."""
    rows = []
    for phase in loraplex.get("phases") or []:
        if phase.get("skipped"):
            continue
        tps = phase["output_tokens_per_s"]
        row = {"phase": phase["name"], "tokens_per_s": tps, "itl_p50_s": (phase.get("itl_s") or {}).get("p50"),
               "ttft_p50_s": (phase.get("ttft_s") or {}).get("p50"), "errors": phase.get("errors")}
        for case in ("peft_mixed", "peft_one_adapter", "transformers_base"):
            theirs = (hf.get(case) or {}).get("tokens_per_s")
            row[f"x_{case}"] = tps / theirs if theirs else None
        row["targets"] = {case: {"target": limit, "ratio": row[f"x_{case}"],
                                 "met": row[f"x_{case}"] is not None and row[f"x_{case}"] >= limit}
                          for case, limit in TARGETS.items()}
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| loraplex phase | tok/s | x peft mixed (target 100) | x peft one adapter | x transformers base (target 5) |",
             "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("x_peft_mixed", "x_peft_one_adapter",
                                                                        "x_transformers_base")]
        lines.append(f"| {r['phase']} | {r['tokens_per_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
