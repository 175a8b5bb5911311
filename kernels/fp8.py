"""FP8 base weights (e4m3, one scale per output channel) and `y = x W^T (+ b)` over them.

    quantize:  s[n] = max_k |W[n, k]| / 448;  Wq[n, k] = e4m3(W[n, k] / s[n])          (per channel)
    forward:   per token t, sx[t] = max_k |x[t, k]| / 448;  xq[t] = e4m3(x[t] / sx[t])  (dynamic)
               y[t, n] = sx[t] * s[n] * sum_k xq[t, k] Wq[n, k]  (+ b[n]), fp32 sums, one cast

On a CUDA device of compute capability 8.9 or more (Hopper: H100/H200), for a bf16 model, the
product runs on the FP8 tensor cores through `torch._scaled_mm` with row-wise scales; elsewhere `fp8_linear_reference`
computes the same quantities in float32 (the CPU path and the test oracle). Per-channel scales
act row by row, so fused projections are their modules' rows side by side (`FP8Weight.cat`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
_MIN_SCALE = 1e-12  # an all-zero row or token still divides


@dataclass
class FP8Weight:
    weight: torch.Tensor  # (N, K) float8_e4m3fn
    scale: torch.Tensor  # (N,) float32
    dtype: torch.dtype  # the model's dtype: what the output is

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4

    def slice(self, i_rows: tuple[int, int]) -> "FP8Weight":
        start, stop = i_rows
        return FP8Weight(self.weight[start:stop], self.scale[start:stop], self.dtype)

    @staticmethod
    def cat(parts: list["FP8Weight"]) -> "FP8Weight":
        return FP8Weight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), parts[0].dtype)


def quantize_fp8(weight: torch.Tensor) -> FP8Weight:
    """(N, K) weight -> e4m3 with one float32 scale per row (output channel)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return FP8Weight(q, scale, weight.dtype)


def dequantize_fp8(w: FP8Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    return (w.weight.float() * w.scale[:, None]).to(dtype or w.dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic e4m3: (xq (T, K) float8, scales (T, 1) float32)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear_reference(x: torch.Tensor, w: FP8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The forward of the module docstring in float32, cast once to x's dtype."""
    xq, sx = quantize_activations(x)
    y = (xq.float() @ w.weight.float().T) * sx * w.scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_linear(x: torch.Tensor, w: FP8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """On FP8 tensor cores where there are some (torch._scaled_mm, row-wise scales), else the reference."""
    # row-wise scaled _scaled_mm writes bf16 only: other model dtypes take the reference
    if not (x.is_cuda and x.dtype == torch.bfloat16 and has_fp8_tensor_cores(x.device.index or 0)):
        return fp8_linear_reference(x, w, bias)
    xq, sx = quantize_activations(x)
    y = torch._scaled_mm(xq, w.weight.t(), scale_a=sx, scale_b=w.scale[None, :], out_dtype=x.dtype)
    return y if bias is None else y.add_(bias)


@functools.lru_cache(maxsize=None)
def has_fp8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)
