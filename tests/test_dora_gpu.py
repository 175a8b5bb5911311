"""DoRA on CUDA: the scaling kernel at Llama-2-7B widths and in a CUDA graph, the pool's factors
computed on the GPU against the CPU (the model's DoRA path against peft on CUDA:
tests/test_lora_forward_gpu.py; graphs against eager: tests/test_engine_gpu.py).
Run on the H200: `python3 -m pytest -m gpu tests/test_dora_gpu.py`."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the H200 through the device tool)"),
]

import kernels  # noqa: E402
from kernels.metadata import LoRABatchMeta  # noqa: E402
from kernels.triton_dora import dora_scale, dora_scale_reference  # noqa: E402
from loadtest.random_model import random_adapter, random_model  # noqa: E402
from server.lora.dora import dora_factor  # noqa: E402
from server.lora.pool import AdapterPool  # noqa: E402
from tests.kernel_checks import capture_graph  # noqa: E402

QKV_7B, HIDDEN_7B, GATE_UP_7B = 3 * 4096, 4096, 2 * 11008
NUM_SLOTS = 64


def _case(gen, num_tokens: int, width: int, dtype):
    y = torch.randn(num_tokens, width, generator=gen, device="cuda").to(dtype)
    factors = 1 + 0.3 * torch.randn(NUM_SLOTS, width, generator=gen, device="cuda")
    dora_slots = (torch.arange(NUM_SLOTS, device="cuda") % 2).to(torch.int32)  # odd slots DoRA
    bias = torch.randn(width, generator=gen, device="cuda").to(dtype)
    return y, bias, factors, dora_slots


@pytest.mark.parametrize("width", [QKV_7B, HIDDEN_7B, GATE_UP_7B])
@pytest.mark.parametrize("num_tokens", [1, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_at_7b_widths_equals_the_reference(width, num_tokens, dtype):
    gen = torch.Generator(device="cuda").manual_seed(width + num_tokens)
    y, bias, factors, dora_slots = _case(gen, num_tokens, width, dtype)
    slots = torch.randint(-1, NUM_SLOTS, (num_tokens,), generator=gen, device="cuda").tolist()
    meta = LoRABatchMeta.build(slots, "cuda")
    expected = dora_scale_reference(y.clone(), bias, factors, dora_slots, meta.token_slots)
    assert torch.equal(dora_scale(y.clone(), bias, factors, dora_slots, meta.token_slots), expected)


def test_cuda_graph_replay_with_new_slots_and_flags():
    """Captured once over the metadata; new token slots (update()), outputs and DoRA flags
    before each replay; every replay equals the reference."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    num_tokens, width = 64, HIDDEN_7B
    y, bias, factors, dora_slots = _case(gen, num_tokens, width, torch.bfloat16)
    meta = LoRABatchMeta.build(list(range(num_tokens)), "cuda", capacity=num_tokens)
    graph, _ = capture_graph(lambda: kernels.dora_scale(y, bias, factors, dora_slots, meta))
    for round_ in range(3):
        meta.update(torch.randint(-1, NUM_SLOTS, (num_tokens,), generator=gen, device="cuda").tolist())
        dora_slots.copy_(torch.randint(0, 2, (NUM_SLOTS,), generator=gen, device="cuda", dtype=torch.int32))
        y.copy_(torch.randn(num_tokens, width, generator=gen, device="cuda"))
        expected = dora_scale_reference(y.clone(), bias, factors, dora_slots, meta.token_slots)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, expected), round_


def test_pool_factors_on_the_gpu_equal_the_cpus():
    """The factors a DoRA load computes on the GPU (fp32 from the slot's bf16 rows) against
    server/lora/dora.py on the CPU from the same bf16 values."""
    shape = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=512, intermediate_size=1024,
                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    model = random_model(shape, torch.bfloat16, "cuda", seed=3)
    pool = AdapterPool(model, max_adapters=4, max_rank=16)
    adapter = random_adapter(model.config, 8, ("q_proj", "v_proj", "down_proj"), seed=1, dtype=torch.bfloat16,
                             b_std=0.05, dora=True)
    pool.load(3, adapter)  # the last of the pool's 4 one-page slots
    torch.cuda.synchronize()
    qkv = model.layers[1].self_attn.qkv_proj
    got = qkv.lora.dora_factors[3].cpu()
    m = adapter.modules[(1, "v_proj")]
    rows = slice(sum(qkv.out_sizes[:2]), sum(qkv.out_sizes))
    expected = dora_factor(qkv.weight[rows].cpu(), m.lora_a, m.lora_b, m.scale, m.magnitude)
    torch.testing.assert_close(got[rows], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[qkv.out_sizes[0] : rows.start], torch.ones(qkv.out_sizes[1]))  # k_proj: no module
    assert qkv.lora.dora_slots[3].item() == 1 and qkv.lora.dora_slots[2].item() == 0
