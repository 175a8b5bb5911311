"""Adapter shards in shared memory (server/lora/shard_transport.py): what a worker loads from a
block equals the shard rank 0 put there; a dropped shard's block is unlinked only when a worker
is handed its name (or at stop), never before; with no shared memory the shard goes by value."""

import gc
from pathlib import Path

import pytest
import torch

from loadtest.random_model import random_adapter
from server.lora import shard_transport
from server.lora.shard_transport import SharedBlocks, SharedShard, load_shared_shard, unlink_now
from server.model.config import ModelConfig

CONFIG = ModelConfig.from_hf_dict(dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def _shard(dora: bool = False):
    return random_adapter(CONFIG, 8, ("q_proj", "o_proj", "down_proj"), seed=3, dtype=torch.float32, b_std=0.5,
                          dora=dora)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_worker_loads_what_was_put(dtype):
    blocks = SharedBlocks()
    shard = _shard(dora=True)
    handle = blocks.put(shard, dtype)
    assert isinstance(handle, SharedShard) and Path(f"/dev/shm/{handle.message.name}").exists()
    loaded = {}

    def load(slot, adapter):
        loaded[slot] = {key: (m.lora_a.clone(), m.lora_b.clone(), m.scale, m.magnitude)
                        for key, m in adapter.modules.items()}

    load_shared_shard(load, 5, handle.message)
    assert loaded[5].keys() == shard.modules.keys()
    for key, m in shard.modules.items():
        a, b, scale, magnitude = loaded[5][key]
        assert a.dtype == dtype and torch.equal(a, m.lora_a.to(dtype)) and torch.equal(b, m.lora_b.to(dtype))
        assert scale == m.scale and torch.equal(magnitude, m.magnitude)
    blocks.unlink_all()
    assert not Path(f"/dev/shm/{handle.message.name}").exists()


def test_a_dropped_block_is_unlinked_only_when_handed_over():
    blocks = SharedBlocks()
    handle = blocks.put(_shard(), torch.float32)
    name = handle.message.name
    assert blocks.take_released() == []  # held: nothing to hand over
    del handle
    gc.collect()
    assert Path(f"/dev/shm/{name}").exists(), "rank 0 must not unlink a block a worker may still open"
    assert blocks.take_released() == [name]
    assert blocks.take_released() == []  # handed over once
    unlink_now([name])  # the worker's part
    assert not Path(f"/dev/shm/{name}").exists()
    unlink_now([name])  # twice is harmless


def test_without_shared_memory_the_shard_goes_by_value(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_transport, "SharedMemory", refuse)
    shard = _shard()
    assert SharedBlocks().put(shard, torch.float32) is shard
