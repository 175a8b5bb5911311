"""The LoRA kernel checks at real sizes on a CUDA device, and CUDA-graph capture and replay.

Run on the H200 with `python3 -m pytest -m gpu tests/test_lora_kernels_gpu.py`; skipped where
there is no CUDA device. Sizes are Llama-3-8B's: hidden 4096, q 4096 / k, v 1024 (GQA),
gate/up 14336; ranks 8, 16, 64 and mixed (with untargeted slices) in bf16, a few in fp16/fp32.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (runs on the H200 through the device tool)", allow_module_level=True)

from kernels.triton_expand import _lora_expand_kernel, lora_expand  # noqa: E402
from kernels.lora_reference import lora_expand_reference, lora_shrink_reference  # noqa: E402
from kernels.triton_fused_decode import lora_fused_decode  # noqa: E402
from kernels.triton_shrink import lora_shrink  # noqa: E402
from kernels.metadata import LoRABatchMeta  # noqa: E402
from tests.kernel_checks import capture_graph  # noqa: E402
from tests.test_lora_kernels import POPULARITIES, TOLERANCES, check, make_pool, make_slots, rank_table  # noqa: E402

if type(_lora_expand_kernel).__name__ == "InterpretedFunction":
    pytest.skip("TRITON_INTERPRET=1 is set: the kernels were built for the CPU interpreter", allow_module_level=True)

LLAMA3_8B = {"o": (4096, (4096,)), "qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336))}
TOKENS = (1, 16, 63, 256, 133)

SWEEP = [
    (pop, rank, TOKENS[(2 * ri + pi) % 5], ("o", "qkv")[(pi + ri) % 2])
    for pi, pop in enumerate(POPULARITIES)
    for ri, rank in enumerate((8, 16, 64, "mixed"))
]


@pytest.mark.parametrize("popularity,rank,num_tokens,proj", SWEEP)
def test_sweep_llama_sizes(popularity, rank, num_tokens, proj):
    gen = torch.Generator().manual_seed(1000 * num_tokens + len(popularity))
    h_in, widths = LLAMA3_8B[proj]
    num_slots = (num_tokens if popularity == "distinct" else 32) + 3
    slots = make_slots(popularity, num_tokens, num_slots, gen)
    check(slots, h_in, widths, rank_table(rank, num_slots, len(widths), gen), torch.bfloat16, gen,
          rank_major=popularity != "uniform", fused_cfg="default")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("popularity,num_tokens", [("zipf", 256), ("identical", 1024)])
def test_other_dtypes_and_prefill(dtype, popularity, num_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    slots = make_slots(popularity, num_tokens, 40, gen)
    check(slots, 4096, (4096, 1024, 1024), rank_table("mixed", 40, 3, gen), dtype, gen, rank_major=True)


def test_gate_up_prefill_and_decode():
    gen = torch.Generator().manual_seed(2)
    slots = [1] * 300 + [4] * 212 + make_slots("distinct", 37, 40, gen)
    h_in, widths = LLAMA3_8B["gate_up"]
    check(slots, h_in, widths, rank_table("mixed", 40, 2, gen), torch.bfloat16, gen, rank_major=True)


@pytest.mark.parametrize("capture_with,replays,one_launch", [
    ("distinct", ("zipf", "identical", "uniform", "base"), False),
    ("identical", ("distinct", "skewed"), False),
    ("distinct", ("distinct", "zipf", "uniform", "base"), True),
])
def test_cuda_graph_replay_with_new_metadata(capture_with, replays, one_launch):
    """Capture shrink+expand (or the one-launch decode kernel) once; refill the metadata in
    place; every replay is right."""
    gen = torch.Generator().manual_seed(17)
    num_tokens, num_slots = 256, 300
    h_in, widths = LLAMA3_8B["qkv"]
    ranks = rank_table("mixed", num_slots, 3, gen)
    a_ref, b_ref, a, b, scales, slot_ranks = make_pool(num_slots, h_in, widths, ranks, torch.bfloat16, gen,
                                                       rank_major=True, pad_value=float("nan"))
    meta = LoRABatchMeta.build(make_slots(capture_with, num_tokens, num_slots, gen), "cuda", capacity=num_tokens)
    x = torch.randn(num_tokens, h_in, device="cuda").to(torch.bfloat16)
    y = torch.randn(num_tokens, sum(widths), device="cuda").to(torch.bfloat16)
    v = torch.empty(3, num_tokens, a[0].shape[1], device="cuda")

    def step():
        if one_launch:
            lora_fused_decode(y, x, a, b, scales, meta, slot_ranks=slot_ranks)
            return
        lora_shrink(x, a, meta, v, slot_ranks=slot_ranks)
        lora_expand(y, v, b, scales, meta, slot_ranks=slot_ranks)

    graph, _ = capture_graph(step)

    for popularity in replays:
        slots = [-1] * num_tokens if popularity == "base" else make_slots(popularity, num_tokens, num_slots, gen)
        meta.update(slots)
        x.copy_(torch.randn(num_tokens, h_in, device="cuda"))
        y0 = torch.randn(num_tokens, sum(widths), device="cuda").to(torch.bfloat16)
        y.copy_(y0)
        v.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        v_ref = lora_shrink_reference(x, a_ref, meta)
        y_ref = lora_expand_reference(y0.clone(), v_ref, b_ref, scales, meta)
        if not one_launch:
            torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-4)
        rtol, atol = TOLERANCES[torch.bfloat16]
        torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
        base = torch.tensor([s < 0 for s in slots], device="cuda")
        assert torch.equal(y[base], y0[base]), f"{popularity}: a slot -1 row changed"
        assert int(meta.split_counters.abs().sum()) == 0


@pytest.mark.parametrize("one_launch", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 64, 256])  # 256: over PDL_MAX_TOKENS, plain launches
def test_chained_layers_under_programmatic_dependent_launch(num_tokens, one_launch):
    """A base matmul, then two LoRA layers (shrink+expand, or the one-launch kernel) each reading
    what the one before wrote, in a CUDA graph: with PDL (on here for T <= 64, sm_90+) a kernel
    may start early, and must still wait for its inputs (x, y, v) before reading them; the
    one-launch kernels share the metadata's counters, which each must leave at zero."""
    from kernels.triton_shrink import _lora_shrink_kernel, use_pdl

    if torch.cuda.get_device_capability()[0] >= 9:
        assert use_pdl(_lora_shrink_kernel, torch.device("cuda"))
    gen = torch.Generator().manual_seed(23)
    num_slots = 300
    h_in, widths = LLAMA3_8B["o"]
    ranks = rank_table("mixed", num_slots, 1, gen)
    a_ref, b_ref, a, b, scales, slot_ranks = make_pool(num_slots, h_in, widths, ranks, torch.bfloat16, gen,
                                                       rank_major=True, pad_value=float("nan"))
    meta = LoRABatchMeta.build(make_slots("distinct", num_tokens, num_slots, gen), "cuda")
    x = torch.randn(num_tokens, h_in, device="cuda").to(torch.bfloat16)
    w = (torch.randn(h_in, h_in, device="cuda") / h_in**0.5).to(torch.bfloat16)
    z0 = torch.randn(num_tokens, h_in, device="cuda").to(torch.bfloat16)
    max_rank = a[0].shape[1]
    h, z = torch.empty_like(z0), torch.empty_like(z0)
    v1, v2 = (torch.full((1, num_tokens, max_rank), float("nan"), device="cuda") for _ in range(2))

    def step():
        torch.matmul(x, w, out=h)
        if one_launch:
            lora_fused_decode(h, x, a, b, scales, meta, slot_ranks=slot_ranks)
            z.copy_(z0)
            lora_fused_decode(z, h, a, b, scales, meta, slot_ranks=slot_ranks)
            return
        lora_shrink(x, a, meta, v1, slot_ranks=slot_ranks)
        lora_expand(h, v1, b, scales, meta, slot_ranks=slot_ranks)
        lora_shrink(h, a, meta, v2, slot_ranks=slot_ranks)
        z.copy_(z0)
        lora_expand(z, v2, b, scales, meta, slot_ranks=slot_ranks)

    graph, _ = capture_graph(step)
    for _ in range(2):
        h.fill_(float("nan"))
        v1.fill_(float("nan"))
        v2.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        h_ref = lora_expand_reference(torch.matmul(x, w), lora_shrink_reference(x, a_ref, meta), b_ref, scales, meta)
        v2_ref = lora_shrink_reference(h, a_ref, meta)  # from the kernels' h: bf16 rounding differs
        z_ref = lora_expand_reference(z0.clone(), v2_ref, b_ref, scales, meta)
        rtol, atol = TOLERANCES[torch.bfloat16]
        torch.testing.assert_close(h, h_ref, rtol=rtol, atol=atol)
        if not one_launch:
            torch.testing.assert_close(v2, v2_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(z, z_ref, rtol=rtol, atol=atol)
        assert int(meta.split_counters.abs().sum()) == 0
