"""The server on the CPU, this tree against an earlier commit, in one run (issue 10's CPU target).

    PYTHONPATH=. python3 loadtest/bench_cpu_serving.py --before 502b38d [--rounds 3] [--out DIR]

Each round starts the default model's server from each tree in turn (the earlier commit from a
temporary `git worktree`), sends a warm-up wave, then a measured wave of 64 concurrent streaming
/v1/completions requests (32-token prompts as token ids, 16 output tokens, ignore_eos, greedy)
and stops it; alternating the trees round by round keeps machine drift out of the ratio. Reports
per tree the medians over rounds of the wave's output tokens/s, TTFT p50 and inter-token gap p50,
and the ratio after / before; writes cpu_serving_compare.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from loadtest.server_process import ServerProcess, free_port
from loadtest.sse_client import one_request, random_prompt

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def wave(base_url: str, model: str, concurrency: int, max_tokens: int, seed: int) -> dict:
    async def run():
        prompts = [random_prompt(f"{seed}/{i}", 32, (100, 40000)) for i in range(concurrency)]
        start = time.monotonic()
        records = await asyncio.gather(*(one_request(base_url, model, p, max_tokens, None, 120.0) for p in prompts))
        return records, time.monotonic() - start

    records, wall = asyncio.run(run())
    ok = [r for r in records if r.ok]
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    return {"ok": len(ok), "errors": len(records) - len(ok), "wall_s": wall,
            "tokens_per_s": sum(r.tokens or 0 for r in ok) / wall,
            "ttft_p50_s": statistics.median(r.ttft for r in ok) if ok else None,
            "gap_p50_s": statistics.median(gaps) if gaps else None}


def serve_and_measure(tree: Path, home: Path, log: Path, concurrency: int, max_tokens: int, seed: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "LORAPLEX_HOME": str(home)}
    server = ServerProcess(["--device", "cpu"], env, log, tree, HOST, free_port(HOST))
    server.start()
    try:
        ready_s = server.wait_ready(600)
        import httpx

        model = httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]
        wave(server.base_url, model, concurrency, max_tokens, seed)  # warm-up
        result = wave(server.base_url, model, concurrency, max_tokens, seed + 1)
        result["ready_s"] = ready_s
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="git ref of the earlier code")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--home", default=os.path.expanduser("~/.cache/loraplex"), help="where the model is prepared")
    parser.add_argument("--out", default="loadtest/results")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-cpu-compare-"))
    before_tree = workdir / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_tree), args.before], check=True,
                   capture_output=True)
    trees = {"before": before_tree, "after": REPO}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    try:
        for r in range(args.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                result = serve_and_measure(trees[name], Path(args.home), workdir / f"{name}-{r}.log",
                                           args.concurrency, args.max_tokens, seed=r)
                runs[name].append(result)
                print(f"round {r} {name:6}: {result['tokens_per_s']:.1f} tok/s, TTFT p50 {result['ttft_p50_s']:.3f} s, "
                      f"gap p50 {result['gap_p50_s']:.3f} s, errors {result['errors']}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "ttft_p50_s", "gap_p50_s")}
               for name, rs in runs.items()}
    summary["ratio_tokens_per_s"] = summary["after"]["tokens_per_s"] / summary["before"]["tokens_per_s"]
    print(json.dumps(summary, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "cpu_serving_compare.json").write_text(json.dumps({
        "command": f"PYTHONPATH=. python3 loadtest/bench_cpu_serving.py --before {args.before} --rounds {args.rounds}",
        "before": args.before, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
