"""The device pool's slot contents, checked against the adapter's own tensors."""

import torch

from server.lora.pool import PROJECTION_SLICES, AdapterPool
from server.model.config import ModelConfig
from server.model.llama import LlamaModel
from tests.test_engine import random_adapter
from tests.tiny_models import TINY_CONFIGS


def _model():
    cfg = ModelConfig.from_hf_dict({**TINY_CONFIGS["llama-gqa"]().to_dict(), "architectures": ["LlamaForCausalLM"]})
    with torch.device("meta"):
        model = LlamaModel(cfg)
    return model.to_empty(device="cpu")


def test_slot_holds_exactly_the_adapter_and_reloading_leaves_no_trace():
    model = _model()
    pool = AdapterPool(model, num_slots=3, max_rank=8)
    wide = random_adapter(model.config, rank=8, seed=1, modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    narrow = random_adapter(model.config, rank=2, seed=2, modules=("v_proj",)).packed()
    pool.load(1, wide)
    pool.load(1, narrow)  # same slot: nothing of `wide` may survive
    for layer, name, proj in model.projections():
        for i, module in enumerate(PROJECTION_SLICES[name]):
            a, b = proj.lora.lora_a[i][1], proj.lora.lora_b[i][1]
            weights = narrow.modules.get((layer, module))
            if weights is None:
                assert not a.any() and not b.any() and proj.lora.slot_ranks[1, i] == 0
                continue
            torch.testing.assert_close(a[:2], weights.lora_a, rtol=0, atol=0)
            torch.testing.assert_close(b[:, :2], weights.lora_b, rtol=0, atol=0)
            assert not a[2:].any() and not b[:, 2:].any()
            assert proj.lora.scales[1, i] == weights.scale and proj.lora.slot_ranks[1, i] == 2
            assert not proj.lora.lora_a[i][0].any() and not proj.lora.lora_a[i][2].any()  # other slots untouched


def test_packed_adapter_is_one_buffer_with_identical_values():
    model = _model()
    adapter = random_adapter(model.config, rank=4, seed=3)
    packed = adapter.packed()
    assert packed.buffer is not None and packed.buffer.numel() * packed.buffer.element_size() == adapter.nbytes
    for key, m in adapter.modules.items():
        assert packed.modules[key].lora_a.data_ptr() >= packed.buffer.data_ptr()
        torch.testing.assert_close(packed.modules[key].lora_a, m.lora_a, rtol=0, atol=0)
        torch.testing.assert_close(packed.modules[key].lora_b, m.lora_b, rtol=0, atol=0)
