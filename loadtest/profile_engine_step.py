"""Where a decode step's time goes, on a Llama-2-7B-shaped model (GPU).

    PYTHONPATH=. python3 loadtest/profile_engine_step.py [--out DIR] [--batch 64]

For a batch of sequences decoding (base model, then each on its own rank-16 q,k,v,o adapter):
the host's share of a step (schedule, building and launching the forward, waiting for the GPU,
sampling with the read-back, postprocess), medians over 20 steps; then the torch profiler's GPU
kernels over 5 steps, grouped by kernel, as a share of the step; and mixed steps (the batch's
decodes plus one 128-token prefill, a mixed graph): their median, and one profiled (host vs GPU, its
kernels). --compare-mixed-attention: the mixed steps again with the attention of a mixed batch in
one launch instead of two (kernels/triton_attention.py). Writes engine_profile_h200.json
(engine_profile_cublas_h200.json with --blas cublas).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from loadtest.random_model import LLAMA2_7B, StubTokenizer, random_adapter, random_model
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams

PROMPT, RANK = 128, 16
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def start_batch(engine: Engine, adapters: list[str | None], max_tokens: int = 200) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, a in enumerate(adapters):
        engine.add_request(GenerationRequest([1 + (i * 7 + j) % 30000 for j in range(PROMPT)], params, adapter=a))
    while engine.scheduler.num_waiting or any(s.num_cached_tokens < len(s.prompt_ids) for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()


def host_breakdown(engine: Engine, steps: int = 20) -> dict:
    """Host time of each part of a step, run one part after the other (no overlap: the parts
    that asynchronous scheduling hides behind the GPU's step)."""
    parts = {"schedule": [], "launch (build + forward + sample)": [], "gpu wait": [], "complete": [], "step": []}
    engine.flush()
    for _ in range(steps):
        t0 = time.perf_counter()
        out = engine.scheduler.schedule()
        t1 = time.perf_counter()
        launched = engine.launch(out.chunks)
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        engine.complete(launched)
        t4 = time.perf_counter()
        for name, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            parts[name].append(value * 1e3)
    return {name: round(statistics.median(v), 3) for name, v in parts.items()}


def kernel_profile(engine: Engine, steps: int = 5, top: int = 14) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    return kernel_table(prof, steps, top)


def kernel_table(prof, steps: int, top: int) -> list[dict]:
    """The profiled GPU kernels grouped by name, per step, largest first, and their total."""
    rows = []
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1
    for e in sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:top]:
        t = getattr(e, "self_device_time_total", 0)
        rows.append({"kernel": e.key[:90], "us_per_step": round(t / steps, 1), "share": round(t / total, 3),
                     "calls_per_step": e.count // steps})
    rows.append({"kernel": "TOTAL GPU", "us_per_step": round(total / steps, 1), "share": 1.0, "calls_per_step": 0})
    return rows


def mixed_step(engine: Engine, adapter: str | None, top: int = 12) -> dict:
    """Steps with every running decode plus one new 128-token prompt (eager: not graphed): the
    median time, then one under the profiler: host vs GPU time and the top host-side ops."""
    from torch.profiler import ProfilerActivity, profile

    def add(i: int) -> None:
        engine.add_request(GenerationRequest([7 + (i * 13 + j) % 30000 for j in range(PROMPT)],
                                             SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapter=adapter))

    times = []
    for i in range(7):
        add(i)
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        engine.step()  # a decode step in between
    add(99)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {"median_ms": round(statistics.median(times), 3), "all_ms": [round(t, 2) for t in times],
            "profiled_wall_ms": round(wall, 2), "profiled_gpu_ms": round(gpu_us / 1e3, 2),
            "kernels": kernel_table(prof, 1, top),
            "top_host_ops": [{"op": e.key[:70], "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
                             for e in host]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "loadtest/results"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--compare-mixed-attention", action="store_true",
                        help="then the mixed steps again with attention in one launch (graphs recaptured)")
    parser.add_argument("--blas", default="auto", choices=["auto", "cublas", "cublaslt"],
                        help="the GEMM library (server setting blas_library); the JSON's name says which")
    args = parser.parse_args()
    batch = args.batch
    settings = Settings(device="cuda", dtype="bfloat16", max_loras=batch + 8, max_lora_rank=RANK, blas_library=args.blas,
                        max_num_seqs=batch + 8, num_kv_blocks=(batch + 8) * 512 // 16, max_model_len=1024)
    model = random_model(LLAMA2_7B, torch.bfloat16, "cuda")
    engine = Engine(model, StubTokenizer(), settings)
    for i in range(batch):
        engine.add_adapter(f"t{i}", random_adapter(model.config, RANK, QKVO, seed=i, device="cuda"))
    report = {"command": "PYTHONPATH=. python3 loadtest/profile_engine_step.py", "batch": batch, "blas": args.blas,
              "device": torch.cuda.get_device_name(), "cases": {}}
    for case, adapters in (("base", [None] * batch), ("adapters", [f"t{i}" for i in range(batch)])):
        start_batch(engine, adapters)
        result = {"host_ms": host_breakdown(engine), "kernels": kernel_profile(engine),
                  "mixed_step": mixed_step(engine, adapters[0])}
        report["cases"][case] = result
        for seq in list(engine.scheduler.running):
            engine.abort(seq)
        mixed = result["mixed_step"]
        print(f"== {case}: host ms {result['host_ms']}")
        for row in result["kernels"]:
            print(f"   {row['us_per_step']:9.1f} us {row['share']:6.1%} x{row['calls_per_step']:<4} {row['kernel']}")
        print(f"   mixed step: median {mixed['median_ms']} ms {mixed['all_ms']}; profiled {mixed['profiled_wall_ms']} ms "
              f"wall, {mixed['profiled_gpu_ms']} ms GPU; top host ops:")
        for row in mixed["top_host_ops"]:
            print(f"      {row['self_cpu_ms']:8.2f} ms x{row['calls']:<5} {row['op']}")
        for row in mixed["kernels"]:
            print(f"   mixed {row['us_per_step']:9.1f} us {row['share']:6.1%} x{row['calls_per_step']:<4} {row['kernel']}")
    if args.compare_mixed_attention:
        import kernels.triton_attention as triton_attention

        triton_attention.MIXED_TWO_LAUNCHES = False
        engine.runner.capture_graphs(engine.limits.max_num_seqs)
        report["mixed_one_attention_launch"] = {}
        for case, adapters in (("base", [None] * batch), ("adapters", [f"t{i}" for i in range(batch)])):
            start_batch(engine, adapters)
            mixed = mixed_step(engine, adapters[0])
            report["mixed_one_attention_launch"][case] = mixed
            for seq in list(engine.scheduler.running):
                engine.abort(seq)
            print(f"== {case}, mixed attention in one launch: median {mixed['median_ms']} ms {mixed['all_ms']}")
            for row in mixed["kernels"][:6]:
                print(f"   mixed {row['us_per_step']:9.1f} us {row['share']:6.1%} x{row['calls_per_step']:<4} {row['kernel']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "engine_profile_h200.json" if args.blas == "auto" else f"engine_profile_{args.blas}_h200.json"
    Path(args.out, name).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
