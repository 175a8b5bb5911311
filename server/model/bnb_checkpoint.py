"""Reading a checkpoint that transformers saved with a bitsandbytes 4-bit (NF4) config.

`save_pretrained` of a model loaded with `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")` writes, for every quantized linear `<module>`:

    <module>.weight                                  uint8 (N*K/2, 1): the packed codes, row-major
    <module>.weight.absmax                           uint8 codes (double quantization) or float32
    <module>.weight.quant_map                        float32 (16,): the NF4 code book
    <module>.weight.nested_absmax, .nested_quant_map float32: absmax2 and the dynamic map (nested only)
    <module>.weight.quant_state.bitsandbytes__nf4    uint8: JSON {quant_type, blocksize, dtype, shape,
                                                     nested_blocksize, nested_offset}

and `quantization_config` in config.json. These become our NF4Weight (kernels/nf4.py) as they are:
no re-quantization, so the served base is exactly the one the adapters were trained over.
"""

from __future__ import annotations

import json
import re

import torch

from kernels.nf4 import NF4_CODE, NF4Weight

WEIGHT_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                   ".quant_state.bitsandbytes__nf4")
_KEY = re.compile(r"(.+_proj)\.weight(\.absmax|\.quant_map|\.nested_absmax|\.nested_quant_map"
                  r"|\.quant_state\.bitsandbytes__\w+)?")
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256)
IGNORED = ()


class BnbCheckpointError(ValueError):
    """A bitsandbytes checkpoint we cannot serve exactly."""


def is_bnb_4bit(quantization_config: dict) -> bool:
    """True for transformers' bitsandbytes 4-bit NF4 config; raises for bitsandbytes configs we cannot read."""
    if quantization_config.get("quant_method") != "bitsandbytes":
        return False
    if not quantization_config.get("load_in_4bit"):
        raise BnbCheckpointError("a bitsandbytes 8-bit (LLM.int8) checkpoint: only 4-bit NF4 ones are read")
    if quantization_config.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise BnbCheckpointError(f"a bitsandbytes 4-bit checkpoint of quant_type "
                                 f"{quantization_config.get('bnb_4bit_quant_type', 'fp4')!r}: only nf4 is read")
    if quantization_config.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise BnbCheckpointError("bnb_4bit_quant_storage must be uint8 (the packed codes as bytes)")
    return True


def split_key(key: str) -> tuple[str, str] | None:
    """('<module>', suffix) for a quantized linear's tensor, else None."""
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    suffix = m.group(2) or ""
    if suffix.startswith(".quant_state.") and suffix != ".quant_state.bitsandbytes__nf4":
        raise BnbCheckpointError(f"{key}: only nf4 quant states are read")
    return m.group(1), suffix


def complete(parts: dict[str, torch.Tensor]) -> bool:
    state = parts.get(".quant_state.bitsandbytes__nf4")
    if state is None or "" not in parts or ".absmax" not in parts or ".quant_map" not in parts:
        return False
    return "nested_offset" not in _state(state) or (".nested_absmax" in parts and ".nested_quant_map" in parts)


def to_nf4(module: str, parts: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
           device) -> NF4Weight:
    """One module's saved tensors as an NF4Weight on `device`, checked against the model's (N, K)."""
    state = _state(parts[".quant_state.bitsandbytes__nf4"])
    if tuple(state.get("shape", ())) != tuple(shape):
        raise BnbCheckpointError(f"{module}: quantized shape {state.get('shape')}, the model expects {list(shape)}")
    blocksize = int(state.get("blocksize", 0))
    n, k = shape
    if blocksize not in SUPPORTED_BLOCKSIZES or k % blocksize:
        raise BnbCheckpointError(f"{module}: block size {blocksize} (we read {SUPPORTED_BLOCKSIZES}, dividing the "
                                 f"input width {k})")
    if not torch.equal(parts[".quant_map"].float(), torch.tensor(NF4_CODE)):
        raise BnbCheckpointError(f"{module}: quant_map is not the NF4 code book")
    packed = parts[""]
    if packed.dtype != torch.uint8 or packed.numel() != n * k // 2:
        raise BnbCheckpointError(f"{module}.weight: {packed.numel()} {packed.dtype} values, expected {n * k // 2} uint8")
    absmax = parts[".absmax"]
    if absmax.numel() != n * k // blocksize:
        raise BnbCheckpointError(f"{module}.weight.absmax: {absmax.numel()} values, expected {n * k // blocksize}")
    extra = {}
    if "nested_offset" in state:
        if absmax.dtype != torch.uint8:
            raise BnbCheckpointError(f"{module}.weight.absmax: nested absmax must be uint8 codes")
        nested_blocksize = int(state.get("nested_blocksize", 256))
        absmax2 = parts[".nested_absmax"].float()
        if absmax2.numel() != -(-absmax.numel() // nested_blocksize) or parts[".nested_quant_map"].numel() != 256:
            raise BnbCheckpointError(f"{module}: nested statistics do not fit its {absmax.numel()} blocks")
        extra = dict(absmax2=absmax2.to(device), code2=parts[".nested_quant_map"].float().to(device),
                     offsets=torch.tensor([state["nested_offset"]], dtype=torch.float32, device=device),
                     group_starts=torch.zeros(1, dtype=torch.int32, device=device), nested_blocksize=nested_blocksize)
    else:
        absmax = absmax.float()
    return NF4Weight(packed.reshape(n, k // 2).to(device), absmax.to(device), (n, k), dtype, (0, n), blocksize, **extra)


def _state(tensor: torch.Tensor) -> dict:
    try:
        return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BnbCheckpointError(f"an unreadable bitsandbytes quant_state: {exc}") from None
