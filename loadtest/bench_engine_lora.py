"""Decode throughput of the engine with and without adapters, on a Llama-2-7B-shaped model.

    PYTHONPATH=. python3 loadtest/bench_engine_lora.py [--out DIR]

Batch 64, each sequence on its own rank-16 adapter: (a) q,k,v,o and (b) all seven
projections, against the same engine with no adapters, in one run. Reports tokens/s, the
throughput ratio and the byte ratio (bytes a decode step must read without adapters / with
them: base weights + the KV cache at the measured context + the batch's adapters' A and B).
Also adapter swap-in latency host -> device and disk -> device for a rank-16 all-linear adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loadtest.random_model import LLAMA2_7B, StubTokenizer, random_adapter, random_model
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams

BATCH, PROMPT, DECODE_STEPS, RANK = 64, 128, 64, 16
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = QKVO + ("gate_proj", "up_proj", "down_proj")


def decode_tokens_per_s(engine: Engine, adapters: list[str | None]) -> float:
    params = SamplingParams(max_tokens=DECODE_STEPS + 8, temperature=0, ignore_eos=True)
    for i, a in enumerate(adapters):
        engine.add_request(GenerationRequest([1 + (i * 7 + j) % 30000 for j in range(PROMPT)], params, adapter=a))
    while any(s.num_cached_tokens < len(s.prompt_ids) for s in engine.scheduler.running) or engine.scheduler.num_waiting:
        engine.step()  # prefill everyone
    for _ in range(3):
        engine.step()  # warm decode
    torch.cuda.synchronize()
    times = []
    for _ in range(DECODE_STEPS - 8):
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    for seq in list(engine.scheduler.running):
        engine.abort(seq)
    return BATCH / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "loadtest/results"))
    args = parser.parse_args()
    settings = Settings(device="cuda", dtype="bfloat16", max_loras=BATCH, max_lora_rank=RANK, max_num_seqs=BATCH,
                        num_kv_blocks=BATCH * (PROMPT + DECODE_STEPS + 32) // 16 + 16, max_num_batched_tokens=8192,
                        max_model_len=1024)
    model = random_model(LLAMA2_7B, torch.bfloat16, "cuda")
    engine = Engine(model, StubTokenizer(), settings)
    cfg = model.config
    base_bytes = sum(p.nbytes for p in model.parameters()) - model.embed_tokens.weight.nbytes  # embedding rows are gathered
    kv_bytes = 2 * cfg.num_layers * BATCH * (PROMPT + DECODE_STEPS // 2) * cfg.kv_size * 2
    rows = []
    decode_tokens_per_s(engine, [None] * BATCH)  # warm-up: allocator growth, cuBLAS and Triton compiles
    base_tps = decode_tokens_per_s(engine, [None] * BATCH)
    rows.append({"case": "no adapters", "tokens_per_s": base_tps})
    for name, modules in (("qkvo", QKVO), ("all-linear", ALL)):
        adapter_bytes = 0
        for i in range(BATCH):
            adapter = random_adapter(cfg, RANK, modules, seed=i, device="cuda")
            adapter_bytes += adapter.nbytes
            engine.add_adapter(f"{name}-{i}", adapter)
        decode_tokens_per_s(engine, [f"{name}-{i}" for i in range(BATCH)])  # warm-up, loads the slots
        tps = decode_tokens_per_s(engine, [f"{name}-{i}" for i in range(BATCH)])
        byte_ratio = (base_bytes + kv_bytes) / (base_bytes + kv_bytes + adapter_bytes)
        rows.append({"case": f"64 distinct rank-16 adapters on {name}", "tokens_per_s": tps,
                     "throughput_ratio": tps / base_tps, "byte_ratio": byte_ratio,
                     "ratio_over_byte_ratio": (tps / base_tps) / byte_ratio, "target": ">= 0.95"})

    # swap-in: one rank-16 all-linear adapter, pinned host -> device slot, and from disk
    adapter = random_adapter(cfg, RANK, ALL, seed=999, device="cpu")
    pinned = adapter.packed(pin_memory=True)  # as the host tier keeps it
    torch.cuda.synchronize()
    start = time.perf_counter()
    pinned.buffer.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    one_copy_ms = 1000 * (time.perf_counter() - start)
    host_ms = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.pool.load(0, pinned)
        torch.cuda.synchronize()
        host_ms.append(1000 * (time.perf_counter() - start))
    from safetensors.torch import save_file
    from server.lora.peft import load_peft_adapter_dir

    with tempfile.TemporaryDirectory() as d:
        tensors, names = {}, {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
        for (layer, m), w in adapter.modules.items():
            prefix = f"base_model.model.model.layers.{layer}.{names[m]}.{m}"
            tensors[prefix + ".lora_A.weight"], tensors[prefix + ".lora_B.weight"] = w.lora_a, w.lora_b
        save_file(tensors, f"{d}/adapter_model.safetensors")
        Path(d, "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(ALL)}))
        file_bytes = Path(d, "adapter_model.safetensors").stat().st_size
        start = time.perf_counter()
        Path(d, "adapter_model.safetensors").read_bytes()
        read_ms = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        parsed = load_peft_adapter_dir(Path(d), cfg, max_rank=RANK, dtype=torch.bfloat16)
        engine.pool.load(1, parsed.packed(pin_memory=True))  # as the cache's loader does
        torch.cuda.synchronize()
        disk_ms = 1000 * (time.perf_counter() - start)
    rows.append({"case": "swap-in host->device (pinned, rank-16 all-linear)", "adapter_bytes": adapter.nbytes,
                 "median_ms": statistics.median(host_ms), "one_pinned_copy_ms": one_copy_ms, "target_ms": 2.0})
    rows.append({"case": "swap-in disk->device (page cache; read+validate+copy)", "file_bytes": file_bytes,
                 "ms": disk_ms, "file_read_ms": read_ms, "ratio_to_read": disk_ms / read_ms, "target_ratio": 1.2})
    for r in rows:
        print(json.dumps(r))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "engine_lora_bench_h200.json").write_text(json.dumps({
        "command": "PYTHONPATH=. python3 loadtest/bench_engine_lora.py", "device": torch.cuda.get_device_name(),
        "model": "Llama-2-7B shape, random bf16", "batch": BATCH, "prompt_tokens": PROMPT, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
