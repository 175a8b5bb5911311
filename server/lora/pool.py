"""The device tier of adapters: preallocated LoRA slots that the kernels read.

For each layer and fused projection, `num_slots` slots of `max_rank`, zero-padded (see
kernels/lora_reference.py for the layout). Loading an adapter into a slot overwrites that
slot completely, so no trace of the previous tenant's weights survives. Which adapter sits
in which slot, and when a slot may be reused, is decided by `SlotTable` (server/lora/slots.py).
"""

from __future__ import annotations

import torch

from server.lora.adapter import LoRAAdapter
from server.model.llama import LlamaModel, LoRASlots

# Our fused projections and the PEFT module names of their slices, in order.
PROJECTION_SLICES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class AdapterPool:
    def __init__(self, model: LlamaModel, num_slots: int, max_rank: int):
        self.num_slots = num_slots
        self.max_rank = max_rank
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self._slots: dict[tuple[int, str], LoRASlots] = {}
        # Scales and ranks of every (layer, projection) in two tensors, so a slot's whole row
        # is written with one copy: (layers, projections, slots, max slices)
        shape = (model.config.num_layers, len(PROJECTION_SLICES), num_slots, 3)
        self._scales = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._ranks = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._proj_index = proj_index = {name: i for i, name in enumerate(PROJECTION_SLICES)}
        for layer, name, proj in model.projections():
            in_features = proj.weight.shape[1]
            n_slices, p = len(proj.out_sizes), proj_index[name]
            slots = LoRASlots(
                lora_a=[self._zeros(num_slots, max_rank, in_features) for _ in proj.out_sizes],
                # B is stored rank-major, so a rank-r adapter's B is its first r rows: the kernels
                # then read only r * out_i elements of it (see kernels/triton_expand.py)
                lora_b=[self._zeros(num_slots, max_rank, out).transpose(1, 2) for out in proj.out_sizes],
                scales=self._scales[layer, p, :, :n_slices],
                slot_ranks=self._ranks[layer, p, :, :n_slices],
            )
            proj.lora = slots
            self._slots[(layer, name)] = slots

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        total = 0
        for s in self._slots.values():
            total += sum(t.nbytes for t in s.lora_a) + sum(t.nbytes for t in s.lora_b) + s.scales.nbytes + s.slot_ranks.nbytes
        return total

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write an adapter into a slot; modules it does not target get zeros.

        One transfer brings the adapter to the device (when it is packed), then the slot is
        zeroed and filled with batched device copies, and its scales and ranks written in
        one copy each: a few launches instead of several per module."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 0..{self.num_slots - 1}")
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} exceeds the pool's max rank {self.max_rank}")
        if self.device.type != "cuda":
            self._write_slot(slot, adapter)
            return
        # On the GPU the copies run on a side stream, so the engine thread does not wait for
        # them: the side stream first waits for the batches still reading the slot's old
        # contents, and the compute stream waits for the copies before its next use.
        compute = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(compute)
        with torch.cuda.stream(self._copy_stream):
            self._write_slot(slot, adapter)
        compute.wait_stream(self._copy_stream)

    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        adapter = adapter.to(self.device, non_blocking=True)
        scales = torch.zeros(self._scales.shape[0], self._scales.shape[1], 3)
        ranks = torch.zeros(scales.shape, dtype=torch.int32)
        targets, sources = [], []
        for (layer, proj_name), slots in self._slots.items():
            p = self._proj_index[proj_name]
            for i, module in enumerate(PROJECTION_SLICES[proj_name]):
                weights = adapter.modules.get((layer, module))
                if weights is None:
                    continue
                r = weights.rank
                targets += [slots.lora_a[i][slot, :r], slots.lora_b[i][slot, :, :r]]
                sources += [weights.lora_a.to(self.dtype), weights.lora_b.to(self.dtype)]
                scales[layer, p, i] = weights.scale
                ranks[layer, p, i] = r
        self.clear(slot)
        if targets:
            torch._foreach_copy_(targets, sources)
        if self.device.type == "cuda":
            scales, ranks = scales.pin_memory(), ranks.pin_memory()
        self._scales[:, :, slot].copy_(scales, non_blocking=True)
        self._ranks[:, :, slot].copy_(ranks, non_blocking=True)

    def clear(self, slot: int) -> None:
        torch._foreach_zero_([t[slot] for s in self._slots.values() for t in (*s.lora_a, *s.lora_b)])
        self._scales[:, :, slot].zero_()
        self._ranks[:, :, slot].zero_()
