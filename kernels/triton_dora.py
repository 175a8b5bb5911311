"""DoRA's output scaling: each DoRA token's projection output times its slot's per-channel factor.

After `x W^T + b` and the LoRA delta (`lora_apply`), a token whose adapter is a DoRA adapter
needs `f * (x W^T + s B A x) + b`, with f = m / ||W + s B A||_row of its slot, computed once
when the adapter was loaded (server/lora/dora.py). With y already holding `x W^T + b + s B A x`:

    for t in range(T):
        s = token_slots[t]
        if s >= 0 and dora_slots[s]:
            y[t] = (factors[s] * y[t] + (1 - factors[s]) * bias).to(y.dtype)   # in fp32; no bias: f * y

Base-model tokens (slot -1) and LoRA slots (dora_slots[s] == 0) are left untouched, so one
batch mixes all three. Every value the kernel reads is on the device and the grid depends on
T and the width only: the launch can be captured in a CUDA graph and replayed after the
per-step metadata changed. Programs are (token, block of BLOCK columns); a program whose token
is not DoRA reads and writes nothing. fp32 arithmetic in the reference's order, without FMA
contraction, and one rounding at the end: the kernel equals the reference bit for bit.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # a CPU-only install: the reference below must still import
    triton = None
    _jit = lambda fn: fn  # noqa: E731  the kernel is then never launched

from kernels.triton_norm import round_to  # noqa: E402

BLOCK = 1024


@_jit
def _dora_scale_kernel(
    y_ptr, bias_ptr, factors_ptr, dora_slots_ptr, token_slots_ptr, stride_yt, stride_fs,
    SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(token_slots_ptr + t)
    safe_slot = tl.maximum(slot, 0).to(tl.int64)
    is_dora = (slot >= 0) & (tl.load(dora_slots_ptr + safe_slot) != 0)
    mask = offs < tl.where(is_dora, SIZE, 0)  # nothing read or written for other tokens
    y = tl.load(y_ptr + t * stride_yt + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(factors_ptr + safe_slot * stride_fs + offs, mask=mask, other=1.0)
    out = f * y
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = out + (1.0 - f) * b
    tl.store(y_ptr + t * stride_yt + offs, round_to(out, y_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def _check(y, bias, factors, dora_slots, token_slots) -> None:
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError(f"y {tuple(y.shape)} must be (T, N) with contiguous rows")
    if factors.dim() != 2 or factors.shape[1] != y.shape[1] or factors.dtype != torch.float32 or factors.stride(1) != 1:
        raise ValueError(f"factors {tuple(factors.shape)} {factors.dtype} must be (num_slots, {y.shape[1]}) float32")
    if dora_slots.shape != (factors.shape[0],) or dora_slots.dtype != torch.int32:
        raise ValueError(f"dora_slots {tuple(dora_slots.shape)} {dora_slots.dtype} must be ({factors.shape[0]},) int32")
    if token_slots.shape[0] < y.shape[0] or token_slots.dtype != torch.int32:
        raise ValueError(f"token_slots must be int32 with a slot for each of the {y.shape[0]} tokens")
    if bias is not None and (bias.shape != (y.shape[1],) or not bias.is_contiguous()):
        raise ValueError(f"bias {tuple(bias.shape)} must be ({y.shape[1]},) and contiguous")


def dora_scale(y: torch.Tensor, bias: torch.Tensor | None, factors: torch.Tensor, dora_slots: torch.Tensor,
               token_slots: torch.Tensor) -> torch.Tensor:
    """y (T, N) in place, as the module docstring says; returns y. factors (num_slots, N) float32
    (rows may be strided), dora_slots (num_slots,) int32, token_slots (>= T,) int32, bias (N,) or None."""
    _check(y, bias, factors, dora_slots, token_slots)
    num_tokens, size = y.shape
    if num_tokens > 0:
        block = min(BLOCK, triton.next_power_of_2(size))
        _dora_scale_kernel[(num_tokens, triton.cdiv(size, block))](
            y, y if bias is None else bias, factors, dora_slots, token_slots, y.stride(0), factors.stride(0),
            SIZE=size, HAS_BIAS=bias is not None, BLOCK=block,
            INTERPRETED=type(_dora_scale_kernel).__name__ == "InterpretedFunction",
            num_warps=4 if block >= 512 else 1, enable_fp_fusion=False,
        )
    return y


def dora_scale_reference(y: torch.Tensor, bias: torch.Tensor | None, factors: torch.Tensor,
                         dora_slots: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """The same in plain PyTorch (the CPU path and the test oracle), without a host sync."""
    _check(y, bias, factors, dora_slots, token_slots)
    slots = token_slots[: y.shape[0]].long()
    safe = slots.clamp(min=0)
    is_dora = (slots >= 0) & (dora_slots[safe] != 0)  # (T,)
    f = factors[safe]  # (T, N) float32
    out = f * y.float()
    if bias is not None:
        out = out + (1.0 - f) * bias.float()
    y.copy_(torch.where(is_dora[:, None], out.to(y.dtype), y))
    return y
