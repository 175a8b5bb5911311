"""A validated LoRA adapter in memory: per (layer, module) its A, B and scale.

This is what the PEFT parser produces and what the adapter pool copies into device slots.
`packed()` lays every tensor into one contiguous (optionally page-locked) buffer, so moving
the adapter to the GPU is a single copy instead of hundreds of small ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class LoRAModuleWeights:
    lora_a: torch.Tensor  # (r, in_features)
    lora_b: torch.Tensor  # (out_features, r)
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoRAAdapter:
    rank: int  # the largest rank over its modules (rank_pattern may vary it)
    alpha: float  # the config's lora_alpha
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names (e.g. "q_proj") targeted in at least one layer
    modules: dict[tuple[int, str], LoRAModuleWeights] = field(repr=False)  # (layer index, short name)
    buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)  # set by packed()

    @property
    def nbytes(self) -> int:
        return sum(m.lora_a.nbytes + m.lora_b.nbytes for m in self.modules.values())

    def packed(self, pin_memory: bool = False) -> "LoRAAdapter":
        """The same adapter with every A and B a view of one contiguous buffer."""
        tensors = [t for m in self.modules.values() for t in (m.lora_a, m.lora_b)]
        dtype = tensors[0].dtype
        buffer = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, pin_memory=pin_memory)
        offset = 0
        for t in tensors:
            buffer[offset : offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        return self._with_buffer(buffer)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LoRAAdapter":
        """A copy on `device`: one transfer when packed, one per tensor otherwise."""
        if self.buffer is not None:
            return self._with_buffer(self.buffer.to(device, non_blocking=non_blocking))
        return replace(self, modules={
            k: LoRAModuleWeights(m.lora_a.to(device, non_blocking=non_blocking),
                                 m.lora_b.to(device, non_blocking=non_blocking), m.scale)
            for k, m in self.modules.items()
        })

    def _with_buffer(self, buffer: torch.Tensor) -> "LoRAAdapter":
        modules, offset = {}, 0
        for key, m in self.modules.items():
            views = []
            for t in (m.lora_a, m.lora_b):
                views.append(buffer[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
            modules[key] = LoRAModuleWeights(views[0], views[1], m.scale)
        return replace(self, modules=modules, buffer=buffer)
