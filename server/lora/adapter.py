"""A validated LoRA adapter in memory: per (layer, module) its A, B and scale.

This is what the PEFT parser produces and what the adapter pool copies into GPU slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def nbytes(self) -> int:
        return sum(m.lora_a.nbytes + m.lora_b.nbytes for m in self.modules.values())
