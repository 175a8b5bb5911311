"""Quantized base weights on the GPU: the NF4 kernels at Llama sizes against dequantize-then-matmul,
FP8 through torch._scaled_mm against its float32 reference, CUDA-graph replay of both against eager,
and the engine's graphs over an NF4 / FP8 model against its eager steps (LoRA on top).
Run on the H200: `python3 -m pytest -m gpu tests/test_quantized_gpu.py` (no bitsandbytes needed)."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the H200 through the device tool)"),
]

from kernels.fp8 import fp8_linear, fp8_linear_reference, quantize_fp8  # noqa: E402
from kernels.nf4 import NF4Weight, dequantize_nf4_compute, quantize_nf4  # noqa: E402
from kernels.triton_nf4 import nf4_dequantize, nf4_linear, nf4_matmul  # noqa: E402
from loadtest.random_model import StubTokenizer, random_adapter, random_quantized_model  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from tests.kernel_checks import capture_graph  # noqa: E402

# Llama-2-7B's projections (rows of each slice, K) and a 70B down projection
SHAPES = [((4096, 4096, 4096), 4096), ((4096,), 4096), ((11008, 11008), 4096), ((4096,), 11008), ((8192,), 28672)]
SMALL = dict(
    architectures=["LlamaForCausalLM"], vocab_size=1000, hidden_size=512, intermediate_size=1024,
    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
    max_position_embeddings=2048, rope_theta=10000.0,
)


def _nf4(rows, k, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return NF4Weight.cat([quantize_nf4((torch.randn(n, k, generator=gen, device="cuda") * 0.02).bfloat16())
                          for n in rows])


@pytest.mark.parametrize("rows,k", SHAPES)
def test_nf4_dequantize_kernel_is_bit_for_bit(rows, k):
    w = _nf4(rows, k)
    assert torch.equal(nf4_dequantize(w, torch.bfloat16), dequantize_nf4_compute(w, torch.bfloat16))


@pytest.mark.parametrize("tokens", [1, 7, 16, 64, 200])
@pytest.mark.parametrize("rows,k", SHAPES)
def test_nf4_linear_equals_dequantize_then_matmul(rows, k, tokens):
    w = _nf4(rows, k, seed=tokens)
    x = torch.randn(tokens, k, device="cuda").bfloat16()
    expected = x.float() @ dequantize_nf4_compute(w, torch.bfloat16).float().T
    got = nf4_linear(x, w).float()
    # bf16 output: one rounding of an fp32 sum over K terms in another order
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("tokens", [1, 16, 64, 200])
def test_fp8_scaled_mm_equals_its_reference(tokens):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    w = quantize_fp8((torch.randn(4096, 4096, generator=gen, device="cuda") * 0.02).bfloat16())
    x = torch.randn(tokens, 4096, generator=gen, device="cuda").bfloat16()
    expected = fp8_linear_reference(x, w).float()
    torch.testing.assert_close(fp8_linear(x, w).float(), expected, rtol=1.6e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("kind", ["nf4-fused", "nf4-prefill", "fp8"])
def test_graph_replay_equals_eager(kind):
    tokens = 200 if kind == "nf4-prefill" else 16
    w = _nf4((4096, 1024, 1024), 4096) if kind.startswith("nf4") else quantize_fp8(
        (torch.randn(4096, 4096, device="cuda") * 0.02).bfloat16())
    linear = nf4_linear if kind.startswith("nf4") else fp8_linear
    x = torch.randn(tokens, 4096, device="cuda").bfloat16()
    graph, out = capture_graph(lambda: linear(x, w))
    for seed in range(3):
        x.copy_(torch.randn(tokens, 4096, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, linear(x, w))


@pytest.mark.parametrize("quantize", ["nf4", "fp8"])
def test_engine_graphs_give_the_eager_tokens_over_a_quantized_base(quantize):
    """A small random model quantized in place, LoRA adapters on top: graphs vs eager, same tokens.
    fp32 (as test_engine_gpu.py), so that graphs vs eager is the only difference: padded to a graph's
    shape, a batch may take another path of the same math (the fused kernel or dequantize + cuBLAS),
    which in bf16 could flip a near-tie of a random model. FP8 in fp32 runs its reference path (its
    _scaled_mm, bf16 only, is replayed against eager above)."""
    def engine(enforce_eager):
        model = random_quantized_model(SMALL, quantize, torch.float32, "cuda", seed=1)
        settings = Settings(device="cuda", max_loras=8, max_lora_rank=16, max_num_seqs=16, num_kv_blocks=256,
                            max_model_len=512, enforce_eager=enforce_eager, async_scheduling="off")
        e = Engine(model, StubTokenizer(), settings)
        for i in range(4):
            e.add_adapter(f"a{i}", random_adapter(model.config, 16, ("q_proj", "v_proj", "down_proj"), seed=10 + i,
                                                  device="cuda", dtype=torch.float32, b_std=0.05))
        return e

    gen = torch.Generator().manual_seed(5)
    requests = [GenerationRequest(torch.randint(1, 1000, (n,), generator=gen).tolist(),
                                  SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), adapter=a)
                for n, a in zip((5, 17, 3, 30, 9, 12), ("a0", "a1", None, "a2", "a3", "a0"))]
    graphs, eager = engine(False), engine(True)
    assert graphs.runner.graphs is not None
    assert [r.token_ids for r in graphs.generate(requests)] == [r.token_ids for r in eager.generate(requests)]
