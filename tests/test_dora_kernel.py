"""DoRA's scaling kernel (kernels/triton_dora.py) against its reference, and the reference against
a per-token loop of peft's formula: fresh random inputs, batches mixing DoRA slots, LoRA slots
and base tokens, factors as strided column views of the pool's table. Under the CPU interpreter
here; at Llama-2-7B widths and in a CUDA graph: tests/test_dora_gpu.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' definition
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no CUDA and TRITON_INTERPRET is set to something other than 1", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from kernels.metadata import LoRABatchMeta  # noqa: E402
from kernels.triton_dora import dora_scale, dora_scale_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_SLOTS = 6
DORA_SLOTS = (1, 4)  # slots 0, 2, 3, 5 hold LoRA adapters


def make_case(num_tokens: int, width: int, dtype, with_bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(num_tokens, width, generator=gen).to(dtype).to(DEVICE)
    table = 1 + 0.3 * torch.randn(NUM_SLOTS, width + 40, generator=gen)  # the pool's table: other columns beside
    factors = table.to(DEVICE)[:, 17 : 17 + width]  # a strided column view, as a projection's
    dora_slots = torch.zeros(NUM_SLOTS, dtype=torch.int32)
    dora_slots[list(DORA_SLOTS)] = 1
    bias = torch.randn(width, generator=gen).to(dtype).to(DEVICE) if with_bias else None
    token_slots = torch.randint(-1, NUM_SLOTS, (num_tokens,), generator=gen).tolist()
    token_slots[:3] = [1, -1, 0][: num_tokens]  # at least one DoRA, one base and one LoRA token
    meta = LoRABatchMeta.build(token_slots, DEVICE, capacity=num_tokens + 5)  # padded capacity: -1 beyond
    return y, bias, factors, dora_slots.to(DEVICE), meta, token_slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 96, 1300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_the_reference_bit_for_bit(dtype, width, with_bias):
    y, bias, factors, dora_slots, meta, token_slots = make_case(19, width, dtype, with_bias, seed=width)
    expected = dora_scale_reference(y.clone(), bias, factors, dora_slots, meta.token_slots)
    got = dora_scale(y.clone(), bias, factors, dora_slots, meta.token_slots)
    assert torch.equal(got, expected)
    changed = (got != y).any(dim=1).tolist()
    assert changed == [s in DORA_SLOTS for s in token_slots]  # DoRA rows move; LoRA and base rows stay exact


def test_reference_is_peft_formula_token_by_token():
    """y = f * (xW^T + lora) + b, written as peft's `base + (f - 1) * (base - b) + f * lora` on
    the parts, against the reference applied to their sum (fp64, so only the algebra is tested)."""
    gen = torch.Generator().manual_seed(0)
    num_tokens, width = 11, 48
    xw = torch.randn(num_tokens, width, generator=gen, dtype=torch.float64)
    lora = torch.randn(num_tokens, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(width, generator=gen, dtype=torch.float64)
    factors = (1 + 0.3 * torch.randn(NUM_SLOTS, width, generator=gen)).float()
    dora_slots = torch.tensor([int(s in DORA_SLOTS) for s in range(NUM_SLOTS)], dtype=torch.int32)
    token_slots = [1, -1, 0, 4, 4, 2, -1, 1, 5, 3, 4]
    meta = LoRABatchMeta.build(token_slots, "cpu")
    y = xw + bias + lora  # what the projection holds after x W^T + b and lora_apply
    got = dora_scale_reference(y.clone(), bias, factors, dora_slots, meta.token_slots)
    for t, s in enumerate(token_slots):
        base = xw[t] + bias
        if s in DORA_SLOTS:
            f = factors[s].double()
            expected = base + (f - 1) * (base - bias) + f * lora[t]  # peft's DoraLinearLayer.forward
        else:
            expected = y[t]
        torch.testing.assert_close(got[t], expected, rtol=1e-6, atol=1e-6)


def test_refuses_mismatched_shapes():
    y, bias, factors, dora_slots, meta, _ = make_case(5, 64, torch.float32, True, seed=1)
    with pytest.raises(ValueError, match="factors"):
        dora_scale(y, bias, factors[:, :32], dora_slots, meta.token_slots)
    with pytest.raises(ValueError, match="dora_slots"):
        dora_scale(y, bias, factors, dora_slots[:3], meta.token_slots)
    with pytest.raises(ValueError, match="bias"):
        dora_scale(y, bias[:10], factors, dora_slots, meta.token_slots)
