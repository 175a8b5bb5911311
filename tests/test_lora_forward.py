"""The batched LoRA forward against peft on tiny random models (fp32 logits)."""

import copy

import pytest
import torch

from server.lora.peft import load_peft_adapter_dir
from server.lora.pool import AdapterPool
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.model.runner import ModelRunner, SequenceChunk
from tests.peft_helpers import DORA_CONFIGS, LORA_CONFIGS, make_peft_model, save_adapter
from tests.tiny_models import build_tiny

ATOL = 5e-5
CONFIGS = sorted({**LORA_CONFIGS, **DORA_CONFIGS})  # DoRA adapters are served beside LoRA ones


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = build_tiny("qwen2-bias", seed=1)  # biased q/k/v: LoRA must add to x W^T + b
    path = tmp_path_factory.mktemp("base")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """name -> (peft model, parsed adapter)"""
    hf, path = base
    model_cfg = load_model(path, torch.float32, "cpu").config
    out = {}
    for seed, name in enumerate(CONFIGS):
        peft_model = make_peft_model(copy.deepcopy(hf), name, seed=100 + seed)
        adapter_dir = save_adapter(peft_model, tmp_path_factory.mktemp(name))
        out[name] = (peft_model, load_peft_adapter_dir(adapter_dir, model_cfg, max_rank=16))
    return out


def _setup(path, adapters, max_rank=16):
    model = load_model(path, torch.float32, "cpu")
    c = model.config
    kv = KVCache(c.num_layers, 64, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    pool = AdapterPool(model, max_adapters=len(adapters) + 1, max_rank=max_rank)
    slots = {}
    for slot, (name, (_, adapter)) in enumerate(sorted(adapters.items()), start=1):  # slot 0 stays empty
        pool.load(slot, adapter)
        slots[name] = slot
    return ModelRunner(model, kv, "cpu"), slots


def _logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_peft(base, adapters, name):
    _, path = base
    runner, slots = _setup(path, adapters)
    ids = torch.randint(0, 128, (11,)).tolist()
    ours = runner.run([SequenceChunk(ids, 0, [3, 9, 1], lora_slot=slots[name])], all_logits=True)
    expected = _logits(adapters[name][0], ids)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # the adapter must matter, or this test could not fail
    base_logits = _logits(base[0], ids)
    assert (expected - base_logits).abs().max() > 100 * ATOL


def test_mixed_batch_gives_each_sequence_its_own_adapter(base, adapters):
    """Every adapter (LoRA and DoRA) plus the base model in one flattened step, prompts of
    different lengths."""
    hf, path = base
    runner, slots = _setup(path, adapters)
    names = CONFIGS + [None]
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 14, 1, 9, 7, 3, 11)]
    chunks = [
        SequenceChunk(p, 0, [10 * i + j for j in range(4)], lora_slot=-1 if n is None else slots[n])
        for i, (p, n) in enumerate(zip(prompts, names))
    ]
    logits = runner.run(chunks)
    for row, (p, n) in enumerate(zip(prompts, names)):
        reference = hf if n is None else adapters[n][0]
        torch.testing.assert_close(logits[row], _logits(reference, p)[-1], atol=ATOL, rtol=0)
