"""A validated LoRA adapter in memory: per (layer, module) its A, B and scale.

DoRA's magnitude vectors (small: one float per output channel) stay separate tensors beside
the packed buffer. This is what the PEFT parser produces and what the adapter pool copies into device slots.
`packed()` lays every tensor into one contiguous (optionally page-locked) buffer in the rows
the device slots hold: A as its (r, in) rows, B rank-major as the (r, out) rows of B^T (the
pool stores B that way, see server/lora/pool.py), grouped by kind and row width
(`packed_layout`). Moving the adapter to the GPU is then one copy, and placing it in a slot
one indexed row copy per group. Packed, `lora_b` is a transposed view: (out, r) as ever.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import torch

ModuleKey = tuple[int, str]  # (layer index, short module name such as "q_proj")


@dataclass(frozen=True)
class LoRAModuleWeights:
    lora_a: torch.Tensor  # (r, in_features)
    lora_b: torch.Tensor  # (out_features, r)
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    magnitude: torch.Tensor | None = None  # DoRA's (out_features,) float32 magnitude; None for LoRA

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class RowGroup:
    """Rows of one width in a packed buffer, back to back: for kind "a" the A of each member
    (width in_features), for kind "b" its B^T (width out_features); `rank` rows per member."""

    kind: str  # "a" or "b"
    width: int
    offset: int  # element offset of the group's first row in the buffer
    members: tuple[tuple[int, str, int], ...]  # (layer, module, rank), in row order

    @property
    def num_rows(self) -> int:
        return sum(rank for _, _, rank in self.members)

    @property
    def numel(self) -> int:
        return self.num_rows * self.width


def packed_layout(shapes: Mapping[ModuleKey, tuple[int, int, int]]) -> tuple[RowGroup, ...]:
    """The packed layout of modules given as (layer, module) -> (rank, in_features, out_features):
    groups ordered by (kind, width), members by (layer, module)."""
    members: dict[tuple[str, int], list[tuple[int, str, int]]] = {}
    for (layer, module), (rank, fan_in, fan_out) in sorted(shapes.items()):
        members.setdefault(("a", fan_in), []).append((layer, module, rank))
        members.setdefault(("b", fan_out), []).append((layer, module, rank))
    layout, offset = [], 0
    for (kind, width), group_members in sorted(members.items()):
        group = RowGroup(kind, width, offset, tuple(group_members))
        layout.append(group)
        offset += group.numel
    return tuple(layout)


@dataclass(frozen=True)
class LoRAAdapter:
    rank: int  # the largest rank over its modules (rank_pattern may vary it)
    alpha: float  # the config's lora_alpha
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names (e.g. "q_proj") targeted in at least one layer
    modules: dict[ModuleKey, LoRAModuleWeights] = field(repr=False)  # (layer index, short name)
    # Set together by packed() (or the store's reader): the buffer every A and B is a view of.
    buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)
    layout: tuple[RowGroup, ...] | None = field(default=None, repr=False, compare=False)
    # Scatter plans of the packed buffer into a pool's slots, made once (AdapterPool.plan).
    plans: dict = field(default_factory=dict, repr=False, compare=False)
    use_dora: bool = False  # every module has a magnitude (server/lora/dora.py); kept beside the buffer

    @property
    def nbytes(self) -> int:
        return sum(m.lora_a.nbytes + m.lora_b.nbytes + (0 if m.magnitude is None else m.magnitude.nbytes)
                   for m in self.modules.values())

    def packed(self, pin_memory: bool = False, dtype: torch.dtype | None = None) -> "LoRAAdapter":
        """The same adapter with every A and B a view of one contiguous buffer (page-locked
        with `pin_memory`, when the tensors are on the CPU; cast to `dtype` if given) in the
        layout `packed_layout` gives."""
        first = next(iter(self.modules.values())).lora_a
        layout = packed_layout({key: (m.rank, m.lora_a.shape[1], m.lora_b.shape[0]) for key, m in self.modules.items()})
        buffer = torch.empty(sum(g.numel for g in layout), dtype=dtype or first.dtype, device=first.device,
                             pin_memory=pin_memory and first.device.type == "cpu")
        packed = self.with_buffer(buffer, layout)
        for key, m in self.modules.items():
            packed.modules[key].lora_a.copy_(m.lora_a)
            packed.modules[key].lora_b.copy_(m.lora_b)  # into the rank-major (transposed) view
        return packed

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LoRAAdapter":
        """A copy on `device`: one transfer when packed, one per tensor otherwise."""
        if self.buffer is not None:
            return self.with_buffer(self.buffer.to(device, non_blocking=non_blocking), self.layout)
        return replace(self, modules={
            k: LoRAModuleWeights(m.lora_a.to(device, non_blocking=non_blocking),
                                 m.lora_b.to(device, non_blocking=non_blocking), m.scale,
                                 None if m.magnitude is None else m.magnitude.to(device, non_blocking=non_blocking))
            for k, m in self.modules.items()
        })

    def with_buffer(self, buffer: torch.Tensor, layout: tuple[RowGroup, ...]) -> "LoRAAdapter":
        """The same adapter (scales, config) with its A and B as views of `buffer` laid out as `layout`."""
        views = layout_views(buffer, layout)
        if views.keys() != self.modules.keys():
            raise ValueError("the layout does not describe this adapter's modules")
        modules = {key: LoRAModuleWeights(*views[key], m.scale, m.magnitude) for key, m in self.modules.items()}
        plans = self.plans if layout == self.layout else {}  # plans depend on the layout only
        return replace(self, modules=modules, buffer=buffer, layout=layout, plans=plans)


def layout_views(buffer: torch.Tensor,
                 layout: tuple[RowGroup, ...]) -> dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]:
    """(lora_a (r, in), lora_b (out, r)) of every module, as views of a buffer packed as `layout`."""
    views: dict[ModuleKey, list] = {}
    for group in layout:
        offset = group.offset
        for layer, module, rank in group.members:
            rows = buffer[offset : offset + rank * group.width].view(rank, group.width)
            views.setdefault((layer, module), [None, None])[group.kind == "b"] = rows if group.kind == "a" else rows.t()
            offset += rank * group.width
    return {key: (a, b) for key, (a, b) in views.items()}
