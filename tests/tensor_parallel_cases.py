"""The steps tests/test_tensor_parallel.py runs on a model at TP=1 (in the test process) and on
each rank of a TP=2 group (spawned processes, gloo): kept apart from the test module so that the
workers import torch and our server code only, not pytest, transformers or peft.

A case is one checkpoint, its adapters (PEFT directories, loaded into the same pool slots on
every rank) and a few steps over a paged KV cache filled with random values first (a read of a
slot no step wrote would show): prefills, then decodes beside a new prefill, then decodes. Each
step is a list of (tokens, start position, block table, adapter index or -1) and every step's
logits are kept.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import torch

MAX_RANK = 16
NUM_BLOCKS, BLOCK_SIZE = 48, 4


def run_case(case: dict, tp=None, device: str = "cpu", model=None) -> list[torch.Tensor]:
    """Every step's logits (all tokens' rows) for one case; `tp`: this rank's TensorParallel;
    `model`: one already built (else the case's checkpoint, quantized as the case says)."""
    from server.lora.sharding import shard_adapter

    runner, pool = _build(case, tp, device, model)
    model = runner.model

    def load(slot, adapter):
        pool.load(slot, adapter if model.tp is None else shard_adapter(adapter, model.tp.plan(model.config)))

    return _run_steps(case, runner.run, _load_adapters(case, model.config, load))


def run_case_driven(case: dict, tp, device: str = "cpu") -> list[torch.Tensor] | None:
    """The case through server/engine/tp_driver.py: rank 0 loads and runs, the others follow
    (returns rank 0's logits; None on the others)."""
    from server.engine.tp_driver import DrivenRunner, ShardedAdapterPool, worker_loop

    runner, pool = _build(case, tp, device)
    if tp.rank > 0:
        worker_loop(runner, pool, tp)
        return None
    driven = DrivenRunner(runner, tp)
    sharded = ShardedAdapterPool(pool, tp, runner.model.config)
    try:
        return _run_steps(case, driven.run, _load_adapters(case, runner.model.config, sharded.load))
    finally:
        driven.stop()
        sharded.blocks.unlink_all()


def dense_projections(model) -> dict:
    """(layer, HF module) -> its weight as this rank's model computes with it (dequantized)."""
    from server.lora.pool import PROJECTION_SLICES

    return {(layer, module): proj.dense_weight(i).float().cpu()
            for layer, name, proj in model.projections() for i, module in enumerate(PROJECTION_SLICES[name])}


def _build(case: dict, tp, device: str, model=None):
    """(runner, adapter pool or None) over a KV cache of random values."""
    from server.lora.pool import AdapterPool
    from server.model.kv_cache import KVCache
    from server.model.loader import load_model
    from server.model.runner import ModelRunner

    if model is None:
        model = load_model(case["model_dir"], torch.float32, device, quantize=case.get("quantize"), tp=tp)
    shard = model.shard_config
    kv = KVCache(shard.num_layers, NUM_BLOCKS, BLOCK_SIZE, shard.num_kv_heads, shard.head_dim, torch.float32, device)
    generator = torch.Generator().manual_seed(7)
    kv.k.copy_(torch.randn(kv.k.shape, generator=generator))
    kv.v.copy_(torch.randn(kv.v.shape, generator=generator))
    pool = AdapterPool(model, max_adapters=len(case["adapter_dirs"]) + 1, max_rank=MAX_RANK) if case["adapter_dirs"] else None
    return ModelRunner(model, kv, device), pool


def _load_adapters(case: dict, config, load) -> list[int]:
    """Parse each adapter against the whole model and `load(slot, adapter)` it; returns the slots."""
    from server.lora.peft import load_peft_adapter_dir

    slots = []
    for slot, adapter_dir in enumerate(case["adapter_dirs"], start=1):  # slot 0 stays empty
        load(slot, load_peft_adapter_dir(Path(adapter_dir), config, max_rank=MAX_RANK))
        slots.append(slot)
    return slots


# all-reduces issued during the steps (not the adapter loads) of the case run last in this process
STEP_ALL_REDUCES = [0]


def _run_steps(case: dict, run, slots: list[int]) -> list[torch.Tensor]:
    from server.model.runner import SequenceChunk

    logits = []
    calls = _count_all_reduces()
    for step in case["steps"]:
        chunks = [SequenceChunk(tokens, start, table, lora_slot=slots[a] if a >= 0 else -1)
                  for tokens, start, table, a in step]
        with calls:
            logits.append(run(chunks, all_logits=True).cpu())
    STEP_ALL_REDUCES[0] = calls.count
    return logits


class _count_all_reduces:
    """Counts torch.distributed.all_reduce calls made inside `with` (re-enterable)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self._real = torch.distributed.all_reduce

        def counted(*args, **kwargs):
            self.count += 1
            return self._real(*args, **kwargs)

        torch.distributed.all_reduce = counted

    def __exit__(self, *exc):
        torch.distributed.all_reduce = self._real


def worker(rank: int, world_size: int, init_method: str, spec_path: str) -> None:
    """One rank of the group (torch.multiprocessing.spawn's target): every case of the spec, then
    the spec's `driven` cases through the rank-0 driver; logits saved to <out_dir>/rank<r>.pt.
    The spec's `backend` (default gloo) and `device` (default cpu): under NCCL rank r runs on
    cuda:r; under gloo every rank on `device` (on one GPU: both ranks share it)."""
    from server.model.tensor_parallel import init_tensor_parallel

    torch.set_num_threads(1)  # two ranks on a two-core machine
    spec = json.loads(Path(spec_path).read_text())
    backend = spec.get("backend", "gloo")
    device = f"cuda:{rank}" if backend == "nccl" else spec.get("device", "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    tp = init_tensor_parallel(rank, world_size, init_method, backend=backend, timeout=timedelta(seconds=120),
                              device_index=torch.device(device).index)
    try:
        results = {}
        for name, case in spec["cases"].items():
            results[name] = run_case(case, tp, device)
            results[f"all_reduces:{name}"] = STEP_ALL_REDUCES[0]
        for name, case in spec["cases"].items():
            if case.get("quantize"):  # what the test builds its dense reference from
                from server.model.loader import load_model

                shard = load_model(case["model_dir"], torch.float32, device, quantize=case["quantize"], tp=tp)
                results[f"weights:{name}"] = dense_projections(shard)
        for name in spec["driven"]:
            results[f"driven:{name}"] = run_case_driven(spec["cases"][name], tp, device)
    finally:
        torch.distributed.destroy_process_group()
    torch.save(results, Path(spec["out_dir"]) / f"rank{rank}.pt")
