"""The LoRA shrink beside the projection's GEMM (a second stream) against one stream, in one run (GPU).

    PYTHONPATH=. python3 loadtest/bench_lora_overlap.py [--out DIR] [--rounds 2] [--shape llama2-7b]

A Llama-2-7B-shaped random model, rank-16 q,k,v,o adapters. Each round captures the step
graphs with the overlap off, then on (`ModelRunner.set_lora_overlap`), and in each times the
decode step of 64 sequences: base model only; 32 tenants (two sequences an adapter, the
serving benchmark's tenants32@64); 64 distinct adapters; and a mixed step (the 64 decodes of
32 tenants plus one 128-token prompt of a 33rd). A decode step is timed as the serving engine
runs (asynchronous scheduling, graphs), the median over 40 steps of wall time per step; a
mixed step one at a time with a synchronize, median of 7. Writes lora_overlap_<shape>_h200.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from loadtest.random_model import LLAMA2_7B, LLAMA3_8B, StubTokenizer, random_adapter, random_model
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams

BATCH, PROMPT, RANK, STEPS = 64, 128, 16, 40
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
SHAPES = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B}


def add(engine: Engine, i: int, adapter: str | None, max_tokens: int) -> None:
    prompt = [1 + (i * 7 + j) % 30000 for j in range(PROMPT)]
    engine.add_request(GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                                         adapter=adapter))


def start(engine: Engine, adapters: list[str | None]) -> None:
    for i, a in enumerate(adapters):
        add(engine, i, a, 4 * STEPS)
    while engine.scheduler.num_waiting or any(s.num_cached_tokens < len(s.prompt_ids) for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    engine.flush()
    torch.cuda.synchronize()


def stop(engine: Engine) -> None:
    engine.flush()
    for seq in list(engine.scheduler.running) + [s for q in engine.scheduler.waiting.values() for s in q]:
        engine.abort(seq)
    torch.cuda.synchronize()


def decode_step_ms(engine: Engine, adapters: list[str | None]) -> float:
    start(engine, adapters)
    times = []
    last = time.perf_counter()
    for _ in range(STEPS):
        engine.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    stop(engine)
    return statistics.median(times) * 1e3


def mixed_step_ms(engine: Engine, adapters: list[str | None], extra: str | None) -> float:
    start(engine, adapters)
    times = []
    for i in range(7):
        add(engine, 1000 + i, extra, 2)
        engine.flush()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        engine.flush()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        engine.step()
    stop(engine)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "loadtest/results"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    args = parser.parse_args()
    settings = Settings(device="cuda", dtype="bfloat16", max_loras=BATCH + 8, max_lora_rank=RANK,
                        max_num_seqs=BATCH + 8, max_num_batched_tokens=512, num_kv_blocks=(BATCH + 8) * 512 // 16,
                        max_model_len=1024, lora_overlap="off")
    model = random_model(SHAPES[args.shape], torch.bfloat16, "cuda")
    engine = Engine(model, StubTokenizer(), settings)
    for i in range(BATCH + 1):
        engine.add_adapter(f"t{i}", random_adapter(model.config, RANK, QKVO, seed=i, device="cuda"))
    cases = {
        "base": [None] * BATCH,
        "tenants32": [f"t{i % 32}" for i in range(BATCH)],
        "distinct64": [f"t{i}" for i in range(BATCH)],
    }
    results: dict[str, dict[str, list[float]]] = {}
    for round_ in range(args.rounds):
        for overlap in ("off", "on"):
            engine.runner.set_lora_overlap(overlap == "on")
            start_capture = time.perf_counter()
            engine.runner.capture_graphs(engine.limits.max_num_seqs)
            capture_s = time.perf_counter() - start_capture
            row = results.setdefault(overlap, {})
            for name, adapters in cases.items():
                row.setdefault(name, []).append(decode_step_ms(engine, adapters))
            row.setdefault("mixed_tenants32", []).append(mixed_step_ms(engine, cases["tenants32"], f"t{BATCH}"))
            print(f"round {round_} overlap {overlap} (capture {capture_s:.1f} s): "
                  + ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in row.items()), flush=True)
    summary = {}
    for name in results["off"]:
        off, on = statistics.median(results["off"][name]), statistics.median(results["on"][name])
        summary[name] = {"off_ms": round(off, 3), "on_ms": round(on, 3), "on_vs_off": round(on / off, 3)}
    for name in ("tenants32", "distinct64"):
        for overlap in ("off", "on"):
            summary[name][f"vs_base_{overlap}"] = round(summary["base"][f"{overlap}_ms"] / summary[name][f"{overlap}_ms"], 3)
    report = {"command": f"PYTHONPATH=. python3 loadtest/bench_lora_overlap.py --rounds {args.rounds} --shape {args.shape}",
              "device": torch.cuda.get_device_name(), "batch": BATCH, "rank": RANK, "modules": list(QKVO),
              "steps": STEPS, "rounds": results, "summary": summary}
    for name, row in summary.items():
        print(f"{name:16s} {row}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"lora_overlap_{args.shape}_h200.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
