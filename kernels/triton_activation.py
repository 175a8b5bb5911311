"""SiLU-and-multiply of the MLP's fused gate/up projection: one launch.

    I = gate_up.shape[1] // 2
    for t in range(T):
        gate, up = gate_up[t, :I], gate_up[t, I:]
        out[t] = silu(gate).to(dtype) * up             # silu(g) = g / (1 + exp(-g)), in fp32

Rounding follows `silu_and_mul_reference` (`F.silu(gate) * up`, as the MLP had it) step by
step: silu in fp32 as PyTorch's CUDA kernel computes it (libdevice expf, an IEEE division),
rounded to the dtype, then the product rounded once. On CUDA that should be the reference bit
for bit, expf being the same libdevice code torch's kernel is built from
(tests/test_fused_elementwise_gpu.py reports any difference); under the CPU interpreter numpy's
exp stands in for torch's and may differ in the last fp32 bit, which flips the rounding of a
rare element (tests/test_fused_elementwise.py holds the bound).

gate_up may be a row-strided view (the last dimension contiguous). Programs are (token, block
of BLOCK columns); the grid depends only on the shape, so the launch can be graph-captured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _jit = triton.jit
except ImportError:  # a CPU-only install: the reference below must still import
    triton = None
    _jit = lambda fn: fn  # noqa: E731  the kernel is then never launched

from kernels.triton_norm import round_to  # noqa: E402

BLOCK = 1024


@_jit
def _silu_and_mul_kernel(
    gate_up_ptr, out_ptr, stride_gt, stride_ot,
    SIZE: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + t * stride_gt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + t * stride_gt + SIZE + offs, mask=mask, other=0.0).to(tl.float32)
    if INTERPRETED:
        e = tl.exp(-gate)
    else:  # expf, as PyTorch's CUDA silu (tl.exp would be the faster ex2.approx)
        e = libdevice.exp(-gate)
    silu = round_to(tl.math.div_rn(gate, 1.0 + e), dtype, INTERPRETED).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, round_to(silu * up, dtype, INTERPRETED), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up (T, 2I), gate then up -> (T, I) = silu(gate) * up; `out` optional (T, I)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} must be (T, 2 * intermediate)")
    num_tokens, size = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, size, dtype=gate_up.dtype, device=gate_up.device)
    if out.shape != (num_tokens, size) or out.dtype != gate_up.dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must be ({num_tokens}, {size}) {gate_up.dtype}")
    if gate_up.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("the last dimension of gate_up and out must be contiguous")
    if num_tokens > 0:
        block = min(BLOCK, triton.next_power_of_2(size))
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(size, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), SIZE=size, BLOCK=block,
            INTERPRETED=type(_silu_and_mul_kernel).__name__ == "InterpretedFunction",
            num_warps=4 if block >= 512 else 1, enable_fp_fusion=False,
        )
    return out


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The same in plain PyTorch (the CPU path): the MLP's activation as it was."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
