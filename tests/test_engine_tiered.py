"""End to end on the default model: adapters uploaded to the store, paged through the tiered
cache into a small device pool, many tenants' requests batched together."""

import asyncio
import json

import pytest
import torch
from safetensors.torch import save

from server.config import Settings
from server.engine.engine import Engine
from server.engine.loop import EngineLoop
from server.engine.request import GenerationRequest, SamplingParams
from server.lora.cache import AdapterCache
from server.lora.peft import load_peft_adapter
from server.lora.store import AdapterStore

NUM_ADAPTERS = 16
NUM_REQUESTS = 64
POOL_SLOTS = 4


def peft_files(model_config, rank: int, seed: int, scale: float = 0.05) -> tuple[bytes, bytes]:
    """adapter_config.json and adapter_model.safetensors in peft's layout, random weights."""
    gen = torch.Generator().manual_seed(seed)
    shapes = model_config.linear_shapes()
    tensors = {}
    for layer in range(model_config.num_layers):
        for module, group in (("q_proj", "self_attn"), ("v_proj", "self_attn"), ("down_proj", "mlp")):
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * scale
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj", "down_proj"], "bias": "none"}
    return json.dumps(config).encode(), save(tensors)


@pytest.fixture(scope="module")
def setup(default_model_dir, tmp_path_factory):
    settings = Settings(max_loras=POOL_SLOTS, max_lora_rank=8, num_kv_blocks=256, kv_block_size=16, max_num_seqs=16, max_model_len=512)
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    caches = []

    def make_cache(pool):
        cache = AdapterCache(store, pool, engine_config, host_bytes=6 * 2**20, max_rank=8, dtype=torch.float32)
        caches.append(cache)
        return cache

    from server.model.config import ModelConfig

    engine_config = ModelConfig.from_dir(default_model_dir)
    validate = lambda c, w: load_peft_adapter(c, w, engine_config, max_rank=8)  # noqa: E731
    keys = []
    for i in range(NUM_ADAPTERS):
        record = store.put(f"customer-{i}", *peft_files(engine_config, rank=4 + 4 * (i % 2), seed=i), validate)
        keys.append((record.customer_id, record.version))
    engine = Engine.from_dir(default_model_dir, settings, make_cache)
    yield engine, keys, caches[0]
    caches[0].close()


def test_many_tenants_over_few_slots_all_complete_and_match_running_alone(setup):
    engine, keys, cache = setup
    requests = [
        GenerationRequest(f"Customer note {i}: the order", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), adapter=keys[i % NUM_ADAPTERS][0])
        for i in range(NUM_REQUESTS)
    ]
    request_keys = [keys[i % NUM_ADAPTERS] for i in range(NUM_REQUESTS)]
    loop = EngineLoop(engine)
    loop.start()

    async def one(request, key):
        return [e async for e in loop.stream(request, key)]

    async def main():
        return await asyncio.gather(*(one(r, k) for r, k in zip(requests, request_keys)))

    try:
        streamed = asyncio.run(main())
    finally:
        loop.stop()
    together = [sum((e.token_ids for e in events), []) for events in streamed]
    assert all(events[-1].finish_reason == "length" for events in streamed)
    stats = cache.stats()
    assert stats.device.evictions > 0  # 16 adapters really did page through 4 slots
    alone = [engine.generate([r], [k])[0].token_ids for r, k in zip(requests, request_keys)]
    assert together == alone
    assert len({tuple(t) for t in alone[:NUM_ADAPTERS]}) > NUM_ADAPTERS // 2  # adapters differ
    assert engine.blocks.num_free == engine.blocks.num_blocks
