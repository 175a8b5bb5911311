"""Reading FP8 checkpoints in the common `quantization_config` layouts: compressed-tensors
(llm-compressor's "float-quantized" format, what vLLM serves) and transformers' fbgemm_fp8.

Both store, for every quantized linear `<module>`:

    <module>.weight         float8_e4m3fn (N, K)
    <module>.weight_scale   (N, 1) per output channel, or a single value per tensor (float32/bf16)
    <module>.input_scale    optional: a static activation scale (compressed-tensors), not used

which is our FP8Weight (kernels/fp8.py) as it is, a per-tensor scale repeated per channel. What we
read: 8-bit float weights, symmetric, per channel or per tensor; activations are quantized per
token at run time, whatever the checkpoint's activation scheme (a static scale is a coarser
version of the same; we never apply it). Everything else (int weights, group or block scales,
2:4 sparsity, other formats) is a clear error, and so is a projection module the checkpoint left
unquantized (its `ignore` list): every projection is served in FP8.
"""

from __future__ import annotations

import re

import torch

from kernels.fp8 import FP8_DTYPE, FP8Weight

_KEY = re.compile(r"(.+_proj)\.(weight|weight_scale|input_scale)")
IGNORED = ("input_scale",)  # read past: activations are quantized per token at run time


class FP8CheckpointError(ValueError):
    """An FP8 checkpoint layout we cannot serve exactly."""


def is_fp8(quantization_config: dict) -> bool:
    """True for an FP8 layout we read; raises for compressed-tensors / fbgemm configs we cannot."""
    method = quantization_config.get("quant_method")
    if method == "fbgemm_fp8":
        return True
    if method != "compressed-tensors":
        return False
    if quantization_config.get("format") not in ("float-quantized", "naive-quantized"):
        raise FP8CheckpointError(f"compressed-tensors format {quantization_config.get('format')!r}: only "
                                 "float-quantized (FP8) checkpoints are read")
    for name, group in (quantization_config.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise FP8CheckpointError(f"config group {name!r}: weights of type {weights.get('type')!r}, "
                                     f"{weights.get('num_bits')} bits; only 8-bit float weights are read")
        if weights.get("strategy") not in ("channel", "tensor") or not weights.get("symmetric", True):
            raise FP8CheckpointError(f"config group {name!r}: {weights.get('strategy')!r} weight scales "
                                     "(only symmetric per-channel or per-tensor scales are read)")
    return True


def split_key(key: str) -> tuple[str, str] | None:
    m = _KEY.fullmatch(key)
    return (m.group(1), m.group(2)) if m else None


def complete(parts: dict[str, torch.Tensor]) -> bool:
    weight = parts.get("weight")
    return weight is not None and (weight.dtype != FP8_DTYPE or "weight_scale" in parts)


def to_fp8(module: str, parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
           device) -> FP8Weight:
    weight = parts["weight"]
    if tuple(weight.shape) != tuple(shape):
        raise FP8CheckpointError(f"{module}.weight has shape {tuple(weight.shape)}, expected {tuple(shape)}")
    if weight.dtype != FP8_DTYPE:
        raise FP8CheckpointError(f"{module}.weight is {weight.dtype}, not float8_e4m3fn: every projection module "
                                 "of an FP8 checkpoint must be FP8")
    scale = parts["weight_scale"].float().reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(shape[0]).contiguous()
    if scale.numel() != shape[0]:
        raise FP8CheckpointError(f"{module}.weight_scale has {scale.numel()} values: per channel ({shape[0]}) "
                                 "or per tensor (1) only")
    return FP8Weight(weight.to(device), scale.to(device), dtype)
