"""Decode throughput of the engine with and without adapters, on a Llama-2-7B-shaped model.

    PYTHONPATH=. python3 loadtest/bench_engine_lora.py [--out DIR] [--dora]

Batch 64, each sequence on its own rank-16 adapter: (a) q,k,v,o and (b) all seven
projections, against the same engine with no adapters, in one run. Reports tokens/s, the
throughput ratio and the byte ratio (bytes a decode step must read without adapters / with
them: base weights + the KV cache at the measured context + the batch's adapters' A and B).
Also adapter swap-in, as the issue's targets: host -> device of a pinned rank-16 all-linear adapter
(80 MB) into a slot, and disk -> device (rank-16 all-linear, and q,k,v,o) against a plain read of
the same file, both from the page cache; medians of several after warm-up.

With --dora (issue 14): batch 64 of 64 distinct DoRA adapters against 64 distinct LoRA adapters
of the same rank and modules (and no adapters), q,k,v,o and all seven projections, in one run;
and host -> device swap-in of a DoRA adapter (which computes its factors on the GPU) against the
same adapter as LoRA (engine_dora_bench_h200.json).
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
from safetensors.torch import save

from loadtest.random_model import LLAMA2_7B, StubTokenizer, random_adapter, random_model
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.lora.loader import read_stored_adapter
from server.lora.peft import load_peft_adapter
from server.lora.store import AdapterStore

BATCH, PROMPT, DECODE_STEPS, RANK = 64, 128, 64, 16
SWAP_REPEATS = 15
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


def _median_ms(fn, repeats: int = SWAP_REPEATS, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def swap_in_host_row(pool, adapter) -> dict:
    """Host -> device: pool.load of a packed, page-locked adapter with its plan made (as the host tier
    holds it), until the slot is written; beside one plain copy of the same pinned buffer."""
    pinned = adapter.packed(pin_memory=True)
    pool.plan(pinned)  # made by the cache's loader thread, off the engine thread
    device_buffer = torch.empty_like(pinned.buffer, device="cuda")
    one_copy_ms = _median_ms(lambda: device_buffer.copy_(pinned.buffer, non_blocking=True))
    load_ms = _median_ms(lambda: pool.load(0, pinned))
    issue = []  # how long the engine thread spends in pool.load (the copies run on the side stream)
    for _ in range(SWAP_REPEATS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        pool.load(0, pinned)
        issue.append(1000 * (time.perf_counter() - start))
    torch.cuda.synchronize()
    return {"case": "swap-in host->device (pinned, rank-16 all-linear)", "adapter_bytes": pinned.nbytes,
            "median_ms": load_ms, "one_pinned_copy_ms": one_copy_ms, "engine_thread_ms": statistics.median(issue),
            "repeats": SWAP_REPEATS, "target_ms": 2.0}


def swap_in_disk_row(pool, store: AdapterStore, cfg, adapter, name: str) -> dict:
    """Disk -> device as the cache does it (read_stored_adapter + plan on a loader thread, then pool.load),
    the file in the page cache and already verified (its sha256 is checked on the first load only:
    that one is reported apart), against Path.read_bytes of the same file, interleaved."""
    tensors = {}
    for (layer, m), w in adapter.modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if m in QKVO else 'mlp'}.{m}"
        tensors[prefix + ".lora_A.weight"], tensors[prefix + ".lora_B.weight"] = w.lora_a, w.lora_b
    config = json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK,
                         "target_modules": sorted(adapter.target_modules)}).encode()
    record = store.put(name, config, save(tensors), lambda c, w: load_peft_adapter(c, w, cfg, max_rank=RANK))
    time.sleep(1.1)  # the store trusts a file's stamp only once it is a second old (store.py: _RACY_NS)

    def disk_to_device():
        loaded = read_stored_adapter(store, record, cfg, max_rank=RANK, dtype=pool.dtype, pin_memory=True)
        pool.plan(loaded)
        pool.load(1, loaded)

    first_ms = _median_ms(disk_to_device, repeats=1, warmup=0)  # verifies the sha256
    _median_ms(disk_to_device, repeats=1, warmup=2)
    load_ms, read_ms = [], []
    for _ in range(SWAP_REPEATS):  # interleaved, so both see the same machine
        load_ms.append(_median_ms(disk_to_device, repeats=1, warmup=0))
        read_ms.append(_median_ms(record.weights_path.read_bytes, repeats=1, warmup=0))
    floor = bytearray(record.weights_path.stat().st_size)

    def read_into():
        with open(record.weights_path, "rb", buffering=0) as f:
            f.readinto(floor)

    load, read = statistics.median(load_ms), statistics.median(read_ms)
    return {"case": f"swap-in disk->device (page cache, rank-16 {name})", "file_bytes": len(floor),
            "median_ms": load, "file_read_ms": read, "ratio_to_read": load / read, "target_ratio": 1.2,
            "read_into_preallocated_ms": _median_ms(read_into), "first_load_with_sha256_ms": first_ms,
            "repeats": SWAP_REPEATS}


def dora_rows(engine: Engine, base_tps: float) -> list[dict]:
    """64 DoRA vs 64 LoRA adapters (same rank, modules and A/B values) per module set, then swap-in."""
    cfg, rows = engine.model.config, []
    for name, modules in (("qkvo", QKVO), ("all-linear", ALL)):
        tps = {}
        for kind in ("lora", "dora"):
            for i in range(BATCH):
                engine.add_adapter(f"{kind}-{name}-{i}", random_adapter(cfg, RANK, modules, seed=i, device="cuda",
                                                                        dora=kind == "dora"))
            names = [f"{kind}-{name}-{i}" for i in range(BATCH)]
            decode_tokens_per_s(engine, names)  # warm-up, loads the slots
            tps[kind] = decode_tokens_per_s(engine, names)
        rows.append({"case": f"64 distinct rank-16 DoRA vs LoRA adapters on {name}", "lora_tokens_per_s": tps["lora"],
                     "dora_tokens_per_s": tps["dora"], "dora_over_lora": tps["dora"] / tps["lora"],
                     "lora_over_base": tps["lora"] / base_tps, "dora_over_base": tps["dora"] / base_tps})
    for kind in ("lora", "dora"):
        adapter = random_adapter(cfg, RANK, ALL, seed=999, device="cpu", dora=kind == "dora").packed(pin_memory=True)
        engine.pool.plan(adapter)
        rows.append({"case": f"swap-in host->device (pinned, rank-16 all-linear, {kind})",
                     "median_ms": _median_ms(lambda: engine.pool.load(0, adapter)), "repeats": SWAP_REPEATS})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "loadtest/results"))
    parser.add_argument("--dora", action="store_true", help="64 DoRA adapters against 64 LoRA adapters of the "
                                                             "same rank (and none), in one run")
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
    if args.dora:
        rows += dora_rows(engine, base_tps)
        for r in rows:
            print(json.dumps(r))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "engine_dora_bench_h200.json").write_text(json.dumps({
            "command": "PYTHONPATH=. python3 loadtest/bench_engine_lora.py --dora",
            "device": torch.cuda.get_device_name(), "model": "Llama-2-7B shape, random bf16", "batch": BATCH,
            "prompt_tokens": PROMPT, "rows": rows}, indent=2))
        return
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

    # swap-in, the issue's targets: host -> device of a pinned rank-16 all-linear adapter (80 MB) into a slot,
    # and disk -> device (the cache's loader: verified read, checks, packing; then the slot copy) against a
    # plain read of the same file, both from the page cache. Slots 0 and 1 are overwritten: run last.
    adapter = random_adapter(cfg, RANK, ALL, seed=999, device="cpu")
    rows.append(swap_in_host_row(engine.pool, adapter))
    with tempfile.TemporaryDirectory() as d:
        store = AdapterStore(Path(d))
        for name, modules in (("all-linear", ALL), ("qkvo", QKVO)):
            adapter = random_adapter(cfg, RANK, modules, seed=998, device="cpu")
            rows.append(swap_in_disk_row(engine.pool, store, cfg, adapter, name))
    for r in rows:
        print(json.dumps(r))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "engine_lora_bench_h200.json").write_text(json.dumps({
        "command": "PYTHONPATH=. python3 loadtest/bench_engine_lora.py", "device": torch.cuda.get_device_name(),
        "model": "Llama-2-7B shape, random bf16", "batch": BATCH, "prompt_tokens": PROMPT, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
