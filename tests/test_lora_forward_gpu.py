"""The model's LoRA path on CUDA (Triton kernels) against peft on the CPU (fp32 reference)."""

import copy

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the H200 through the device tool)"),
]

from server.lora.peft import load_peft_adapter_dir  # noqa: E402
from server.lora.pool import AdapterPool  # noqa: E402
from server.model.kv_cache import KVCache  # noqa: E402
from server.model.loader import load_model  # noqa: E402
from server.model.runner import ModelRunner, SequenceChunk  # noqa: E402
from tests.peft_helpers import DORA_CONFIGS, LORA_CONFIGS, make_peft_model, save_adapter  # noqa: E402
from tests.tiny_models import build_tiny  # noqa: E402


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-3), (torch.bfloat16, 0.15)])
def test_mixed_batch_on_cuda_matches_peft(tmp_path, dtype, atol):
    hf = build_tiny("qwen2-bias", seed=3)
    hf.save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base", dtype, "cuda")
    names = sorted({**LORA_CONFIGS, **DORA_CONFIGS})  # DoRA adapters beside LoRA ones
    peft_models, pool = {}, AdapterPool(model, max_adapters=len(names) + 2, max_rank=16)
    for slot, name in enumerate(names, start=1):
        peft_models[name] = make_peft_model(copy.deepcopy(hf), name, seed=slot)
        adapter = load_peft_adapter_dir(save_adapter(peft_models[name], tmp_path / name), model.config, max_rank=16, dtype=dtype)
        pool.load(slot, adapter)
    c = model.config
    runner = ModelRunner(model, KVCache(c.num_layers, 64, 4, c.num_kv_heads, c.head_dim, dtype, "cuda"), "cuda")
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 14, 1, 9, 7, 3, 11)]
    refs = [peft_models[n] for n in names] + [hf]
    chunks = [SequenceChunk(p, 0, [10 * i + j for j in range(4)], lora_slot=(i + 1 if i < len(names) else -1)) for i, p in enumerate(prompts)]
    logits = runner.run(chunks).cpu()
    for row, (p, ref) in enumerate(zip(prompts, refs)):
        with torch.no_grad():
            expected = ref(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[row], expected, atol=atol, rtol=0)
