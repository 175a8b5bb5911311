"""Quantized base weights in the model: which formats exist, turning a projection's dense
modules into one (`quantize_modules`), reading them back dense, and what the weights weigh.

`--quantize nf4` / `fp8` quantizes a bf16 (or fp16/fp32) checkpoint as it is loaded: every HF
linear (q_proj, k_proj, ...) on its own, as bitsandbytes and transformers do for QLoRA, on the
model's device, one module at a time, so the dense model never exists in memory whole (a 70B
bf16 checkpoint loads into ~36 GB of NF4). Embeddings, norms and the LM head stay in the model
dtype. The formats and their math are kernels/nf4.py and kernels/fp8.py.
"""

from __future__ import annotations

import torch

from kernels.fp8 import FP8Weight, dequantize_fp8, quantize_fp8
from kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

QUANT_FORMATS = ("nf4", "fp8")


class QuantizationError(ValueError):
    """A --quantize value, or a checkpoint's quantization, that we cannot serve."""


def check_format(fmt: str | None) -> str | None:
    if fmt in (None, "", "none"):
        return None
    if fmt not in QUANT_FORMATS:
        raise QuantizationError(f"unknown quantization {fmt!r}: expected one of {', '.join(QUANT_FORMATS)} (or none)")
    return fmt


def quantize_module(weight: torch.Tensor, fmt: str):
    """One HF module's (out, in) weight, already in the model dtype on the model device."""
    if fmt == "nf4":
        return quantize_nf4(weight)
    if fmt == "fp8":
        return quantize_fp8(weight)
    raise QuantizationError(f"unknown quantization {fmt!r}")


def fuse(parts: list):
    """The modules of a fused projection (q, k, v; gate, up), in order, as one quantized weight."""
    if len(parts) == 1:
        return parts[0]
    return NF4Weight.cat(parts) if isinstance(parts[0], NF4Weight) else FP8Weight.cat(parts)


def dequantize_rows(w, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a quantized weight, dense in its model dtype (the rows of whole slices)."""
    if isinstance(w, FP8Weight):
        return dequantize_fp8(w.slice((start, stop)))
    i = w.slice_rows.index(start)
    if w.slice_rows[i + 1] != stop:
        raise ValueError(f"rows {start}:{stop} are not one slice of the NF4 weight ({w.slice_rows})")
    return dequantize_nf4(w.slice(i))


def weight_format(model) -> str:
    """"nf4", "fp8", or the dense dtype's short name (bf16, fp16, fp32)."""
    proj = next(model.projections())[2]
    if proj.quantized is not None:
        return "nf4" if isinstance(proj.quantized, NF4Weight) else "fp8"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[proj.weight.dtype]


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's weights on its device: the projections (quantized or not), and the rest
    (embeddings, LM head, norms) that stay in the model dtype."""
    projections = 0
    for _, _, proj in model.projections():
        projections += proj.quantized.nbytes if proj.quantized is not None else proj.weight.nbytes
    dense = sum(p.nbytes for name, p in model.named_parameters() if not name.endswith("_proj.weight"))
    return {"projections": projections, "other": dense, "total": projections + dense}


def device_memory(model, kv_cache, adapter_pool) -> dict:
    """What the device holds for serving, in bytes: the weights (by format), the KV cache, the adapter pool."""
    weights = weight_bytes(model)
    return {"weight_format": weight_format(model), "weight_bytes": weights["total"],
            "projection_weight_bytes": weights["projections"], "kv_cache_bytes": kv_cache.nbytes,
            "adapter_pool_bytes": adapter_pool.nbytes}


def describe_memory(memory: dict, kv_tokens: int, adapter_pages: int) -> str:
    """One line for the startup log."""
    gib = 1 << 30
    return (f"weights {memory['weight_format']} {memory['weight_bytes'] / gib:.2f} GiB (projections "
            f"{memory['projection_weight_bytes'] / gib:.2f} GiB), KV cache {memory['kv_cache_bytes'] / gib:.2f} GiB "
            f"({kv_tokens} tokens), adapter pool {memory['adapter_pool_bytes'] / gib:.2f} GiB ({adapter_pages} pages)")
