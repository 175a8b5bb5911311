"""RMSNorm, with the residual add before it fused in: one launch, one program per row.

    for t in range(T):
        if residual is not None:
            h[t] = x[t] + residual[t]                  # the new residual stream, in x's dtype
            x[t] = h[t]
        xf = float32(x[t])
        normed = xf * rsqrt(mean(xf * xf) + eps)       # fp32 statistics
        out[t] = weight * normed.to(x.dtype)           # the product rounded once to x's dtype

Rounding follows the PyTorch code it replaces (`rms_norm_reference`, the model's RMSNorm as it
was) step by step: the add in fp32 rounded once to the dtype, x*x rounded to fp32, the mean as
CUDA takes it (the fp32 sum times fp32(1/size)), `+ eps` rounded, rsqrt (the same MUFU
approximation as torch.rsqrt on CUDA), x * rstd rounded to fp32 then to the dtype, and the
weight product rounded once. fp contraction is off, so no multiply-add becomes an fma; where the
compiler turns an fp32 add or product of two bf16/fp16 values, rounded to that type, into the
16-bit instruction, the result is the same (fp32 carries more than twice their precision, so
the double rounding is exact). The one step that cannot be reproduced is the order in which the
sum of squares is reduced: the statistic can differ in its last fp32 bit, which flips the bf16
rounding of a rare element (tests/test_fused_elementwise.py holds the bound). `h` is bit-exact.

x and residual may be row-strided views (the last dimension contiguous); the grid depends only
on T, so the launch can be graph-captured.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _jit = triton.jit
except ImportError:  # a CPU-only install: the reference below must still import
    triton = None
    _jit = lambda fn: fn  # noqa: E731  the kernel is then never launched

MAX_SIZE = 32768  # a row is held in registers: one block of next_power_of_2(size) values


@_jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 x rounded to nearest even in dtype, as PyTorch rounds. Compiled, a plain cast; under
    the interpreter, whose fp32 -> bf16 cast truncates (triton 3.9), bf16 is rounded on the bits."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # finite values; a carry bumps the exponent
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@_jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_xt, stride_rt, stride_ot, stride_ht, inv_size, eps,
    SIZE: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRETED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < SIZE
    dtype = out_ptr.dtype.element_ty
    xf = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + t * stride_rt + offs, mask=mask, other=0.0).to(tl.float32)
        h = round_to(xf + r, dtype, INTERPRETED)  # the new residual stream, rounded as PyTorch's add
        tl.store(residual_out_ptr + t * stride_ht + offs, h, mask=mask)
        xf = h.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) * inv_size
    if INTERPRETED:  # 1 / sqrt, as torch.rsqrt on the CPU
        rstd = tl.math.rsqrt(mean_sq + eps)
    else:  # rsqrt.approx, as torch.rsqrt on CUDA
        rstd = libdevice.rsqrt(mean_sq + eps)
    normed = round_to(xf * rstd, dtype, INTERPRETED).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, round_to(w * normed, dtype, INTERPRETED), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """x (T, size) -> RMSNorm(x); with `residual`, (RMSNorm(x + residual), x + residual).

    `out` / `residual_out` (T, size), optional: where to write (fresh tensors otherwise)."""
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)} must be (T, size) and weight {tuple(weight.shape)} (size,)")
    if weight.dtype != x.dtype or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype)):
        raise ValueError("weight and residual must have x's dtype (and residual x's shape)")
    num_tokens, size = x.shape
    if size > MAX_SIZE:
        raise ValueError(f"rows of {size} values do not fit one block (at most {MAX_SIZE})")
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    if residual is not None and residual_out is None:
        residual_out = torch.empty_like(out)
    outputs = [out] if residual is None else [out, residual_out]
    if any(o.shape != x.shape or o.dtype != x.dtype for o in outputs):
        raise ValueError("out and residual_out must have x's shape and dtype")
    rows = [x] + outputs + ([] if residual is None else [residual])
    if weight.stride(0) != 1 or any(a.stride(1) != 1 for a in rows):
        raise ValueError("weight and the last dimension of x, residual and the outputs must be contiguous")
    if num_tokens > 0:
        block = triton.next_power_of_2(size)
        # 1.0 / size reaches the kernel as fp32(1 / size), the factor CUDA's mean multiplies its sum by
        _rms_norm_kernel[(num_tokens,)](
            x, x if residual is None else residual, weight, out, out if residual is None else residual_out,
            x.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
            0 if residual is None else residual_out.stride(0), 1.0 / size, eps,
            SIZE=size, BLOCK=block, HAS_RESIDUAL=residual is not None,
            INTERPRETED=type(_rms_norm_kernel).__name__ == "InterpretedFunction",
            num_warps=min(max(block // 512, 1), 16), enable_fp_fusion=False,
        )
    return out if residual is None else (out, residual_out)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The same in plain PyTorch (the CPU path): the model's RMSNorm and residual add as they were."""
    if residual is not None:
        h = x + residual
        return rms_norm_reference(h, weight, eps), h
    # fp32 statistics, as transformers does, then back to the model dtype before the scale
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
