"""Per-step LoRA metadata: which adapter slot each token of the flattened batch uses.

Built once per step by the model runner and shared by every LoRA-targeted layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatchMeta:
    token_slots: torch.Tensor  # (T,) int32, -1 = base model only
    active_slots: list[int]  # distinct slots >= 0 in the batch, ascending
    token_indices: list[torch.Tensor]  # per active slot: int64 indices of its tokens

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device | str = "cpu") -> "LoRABatchMeta":
        slots = torch.tensor(token_slots, dtype=torch.int32)
        active = sorted({s for s in token_slots if s >= 0})
        indices = [torch.nonzero(slots == s).flatten().to(device) for s in active]
        return cls(token_slots=slots.to(device), active_slots=active, token_indices=indices)

    @property
    def has_lora(self) -> bool:
        return bool(self.active_slots)

    def groups(self):
        """(slot, token indices) for every slot used in this step."""
        return zip(self.active_slots, self.token_indices)
