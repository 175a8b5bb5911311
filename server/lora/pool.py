"""The device tier of adapters: preallocated LoRA rows that the kernels read, in pages.

For each layer and fused projection, rows of A and (rank-major) B for every slice, cut into
`num_pages` pages of `page_rank` rows (min(16, max_rank)). An adapter of rank r takes
ceil(r / page_rank) consecutive pages (a block placed by SlotTable, server/lora/slots.py, rounded
up to a power of two) and its first page is its slot: the kernels read slot s's rows at
`s * page_rank`, rows 0..rank-1, so a slice's tensor is the overlapping view
(num_pages, max_rank, width) with a stride of page_rank rows between slots (and max_rank -
page_rank rows of padding at the end, so the last slot's view stays inside the storage). Every
reader stops at the slot's true rank per slice (`slot_ranks`; the Triton kernels and the
PyTorch reference alike), so rows past an adapter's rank, which belong to the next page's
tenant or to an earlier one, are never read, and no load zeroes anything. The pool sized for
N adapters of max_rank holds N * max_rank / r of rank r: hundreds of rank-16 adapters where
dozens of rank-64 ones fit (S-LoRA's unified paging, with contiguous pages).

Each slice's rows are views of a few "row group" allocations, one per kind and row width:
`_groups[("a", 4096)]` is (modules, rows per member, 4096) and holds the A of every slice whose
input is 4096 wide, `_groups[("b", w)]` the rank-major B^T of every slice w wide. So any set of
an adapter's rows is one index per group away.

Loading an adapter into a slot (`load`) takes its packed buffer (server/lora/adapter.py, rows
grouped the same way) and its `SlotPlan` (made once per adapter and pool, on the cache's loader
thread), then:
  1. on CUDA, one copy of the buffer into a staging buffer of one max-rank adapter's size, on a
     side stream so that it overlaps the step in flight (non_blocking: page-locked buffers copy
     asynchronously, others synchronously);
  2. waits (on the side stream) for the batches that may still read the pages' old contents;
  3. one `index_copy_` of rows per group (the plan's row indices plus the slot's offset);
  4. copies the slot's scales and ranks from small tensors of the plan.
The compute stream then waits for the side stream before its next use. No Python loop over
modules runs on this path: a few launches whatever the adapter's size.

DoRA adapters (server/lora/dora.py) also need, per slot, a float32 factor per output channel of
every projection, m / ||W + s B A||_row: `_dora_factors` (pages, sum of every projection's
width), 1 where the adapter has no module, and a flag per slot (`_dora_slots`) that
kernels.dora_scale reads. A DoRA load computes the factors on the pool's device from the base
weights and the A and B just written to the slot (what the kernels will apply), one small
GEMM and norm per module on the side stream: a Python loop over modules, on DoRA loads only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from server.lora.adapter import LoRAAdapter
from server.lora.slots import block_pages
from server.lora.dora import dora_factor
from server.model.llama import DORA, LlamaModel, LoRASlots

# Our fused projections and the PEFT module names of their slices, in order.
PROJECTION_SLICES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
_MAX_SLICES = 3
PAGE_RANK = 16  # rows of a page (fewer when max_rank is smaller): the unit adapters are placed in


@dataclass(frozen=True)
class SlotPlan:
    """Where one packed adapter's rows go in a slot of one pool; made once, used by every load."""

    numel: int  # elements of the packed buffer
    groups: tuple[tuple[tuple[str, int], int, int, int], ...]  # (group, buffer offset, first row index, rows)
    rows: torch.Tensor  # int64: each buffer row's row in its group for slot 0 (+ slot * page_rank)
    scales: torch.Tensor  # float32 (layers, projections, 3): the slot's scales
    ranks: torch.Tensor  # int32, the same shape: the slot's ranks (0 where not targeted)
    pages: int  # pages the adapter spans (its largest rank over page_rank, rounded up)
    projections: frozenset  # names of the fused projections it targets in some layer (and DORA for DoRA)
    # DoRA: every module's magnitude back to back (float32, page-locked on CUDA) and per module
    # (layer, projection, slice, magnitude offset, rank, scale); None for a LoRA adapter
    magnitudes: torch.Tensor | None = None
    dora_modules: tuple[tuple[int, str, int, int, int, float], ...] = ()


def pool_projections(model: LlamaModel, modules: frozenset[str] | None = None) -> list:
    """(layer, name, projection) of every fused projection the pool holds rows for: those with a
    slice among `modules` (PEFT names; None: every module). The others carry no LoRA."""
    return [(layer, name, proj) for layer, name, proj in model.projections()
            if modules is None or modules.intersection(PROJECTION_SLICES[name])]


class AdapterPool:
    def __init__(self, model: LlamaModel, max_adapters: int, max_rank: int, modules: frozenset[str] | None = None):
        """Room for `max_adapters` adapters of `max_rank` at once (more of smaller ranks), with rows
        for the projections of `modules` only (None: all; LORAPLEX_LORA_MODULES)."""
        self.modules = modules
        self.max_rank = max_rank
        self.page_rank = min(PAGE_RANK, max_rank)
        self.max_block = block_pages(-(-max_rank // self.page_rank))  # pages of a max-rank adapter
        self.max_adapters = max_adapters
        self.num_pages = num_pages = max_adapters * self.max_block
        self._member_rows = num_pages * self.page_rank + max_rank - self.page_rank
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        num_layers = model.config.num_layers
        # Scales and ranks of every (layer, projection) in two tensors, so a slot's whole row
        # is written with one copy: (layers, projections, slots, max slices)
        shape = (num_layers, len(PROJECTION_SLICES), num_pages, _MAX_SLICES)
        self._scales = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._ranks = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self._proj_index = {name: i for i, name in enumerate(PROJECTION_SLICES)}
        # module -> (projection index, slice index): where its scale and rank go
        self._slice_of = {m: (self._proj_index[name], i)
                          for name, ms in PROJECTION_SLICES.items() for i, m in enumerate(ms)}

        projections = pool_projections(model, modules)
        # DoRA factors of every projection side by side: (pages, total width); 1 = no DoRA module
        widths = [sum(proj.out_sizes) for _, _, proj in projections]
        self._dora_factors = torch.ones(num_pages, sum(widths), dtype=torch.float32, device=self.device)
        self._dora_slots = torch.zeros(num_pages, dtype=torch.int32, device=self.device)
        self._dora_columns = {}  # (layer, projection) -> first column in _dora_factors
        self._weights = {}  # (layer, projection) -> (the projection, slice row offsets, slice widths)
        column = 0
        for (layer, name, proj), width in zip(projections, widths):
            self._dora_columns[(layer, name)] = column
            offsets = [sum(proj.out_sizes[:i]) for i in range(len(proj.out_sizes))]
            self._weights[(layer, name)] = (proj, offsets, proj.out_sizes)
            column += width
        members: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for layer, name, proj in projections:
            for module, out_features in zip(PROJECTION_SLICES[name], proj.out_sizes):
                members.setdefault(("a", proj.in_features), []).append((layer, module))
                members.setdefault(("b", out_features), []).append((layer, module))
        self._groups = {key: torch.zeros(len(m), self._member_rows, key[1], dtype=self.dtype, device=self.device)
                        for key, m in members.items()}
        self._rows = {key: g.view(-1, key[1]) for key, g in self._groups.items()}  # (modules * member rows, width)
        # (kind, layer, module) -> (group, index in the group)
        self._member = {(key[0], *m): (key, j) for key, ms in members.items() for j, m in enumerate(ms)}
        self._slots: dict[tuple[int, str], LoRASlots] = {}
        for layer, name, proj in projections:
            p, modules = self._proj_index[name], PROJECTION_SLICES[name]
            slots = LoRASlots(
                lora_a=[self._slice("a", layer, m) for m in modules],
                # B is stored rank-major, so a rank-r adapter's B is its first r rows: the kernels
                # then read only r * out_i elements of it (see kernels/triton_expand.py)
                lora_b=[self._slice("b", layer, m).transpose(1, 2) for m in modules],
                scales=self._scales[layer, p, :, : len(modules)],
                slot_ranks=self._ranks[layer, p, :, : len(modules)],
                dora_factors=self._dora_factors[:, self._dora_columns[(layer, name)] :][:, : sum(proj.out_sizes)],
                dora_slots=self._dora_slots,
            )
            proj.lora = slots
            self._slots[(layer, name)] = slots
        # Plans depend on this geometry only; adapters keep theirs under this key.
        self._plan_key = (self.device.type, self._member_rows, self.page_rank, max_rank,
                          tuple((k, len(m)) for k, m in members.items()))
        self._slot_projections: list[frozenset] = [frozenset()] * num_pages  # what each slot's adapter targets
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self._copy_stream is not None:
            slot_numel = sum(len(m) * max_rank * key[1] for key, m in members.items())
            slot_rows = sum(len(m) for m in members.values()) * max_rank
            self._staging = torch.empty(slot_numel, dtype=self.dtype, device=self.device)  # one slot's worth
            self._row_staging = torch.empty(slot_rows, dtype=torch.int64, device=self.device)

    @property
    def num_slots(self) -> int:
        """Slots the kernels index: one per page (an adapter's slot is its first page)."""
        return self.num_pages

    def projections_of(self, slots) -> frozenset:
        """Names of the projections that the adapters in these slots target (host-side, no sync)."""
        return frozenset().union(*(self._slot_projections[s] for s in slots))

    def pages_for(self, adapter: LoRAAdapter) -> int:
        """Pages an adapter takes (before rounding up to its block)."""
        return max(1, -(-adapter.rank // self.page_rank))

    def _slice(self, kind: str, layer: int, module: str) -> torch.Tensor:
        """(num_pages, max_rank, width): slot s is rows s * page_rank.. of the member's rows (overlapping views)."""
        key, j = self._member[(kind, layer, module)]
        width = key[1]
        return self._groups[key][j].as_strided((self.num_pages, self.max_rank, width), (self.page_rank * width, width, 1))

    @property
    def nbytes(self) -> int:
        """Device bytes the pool holds: slots, scales and ranks, DoRA factors, and on CUDA one slot's staging."""
        extra = self._staging.nbytes + self._row_staging.nbytes if self._copy_stream is not None else 0
        extra += self._dora_factors.nbytes + self._dora_slots.nbytes
        return sum(g.nbytes for g in self._groups.values()) + self._scales.nbytes + self._ranks.nbytes + extra

    def prepare(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """The adapter as this pool loads it: packed in the pool's dtype (page-locked on CUDA) and
        with its plan made, so a later `load` only issues copies (callers do this off the engine
        thread, or once at registration)."""
        if adapter.layout is None or adapter.buffer.dtype != self.dtype:
            adapter = adapter.packed(pin_memory=self._copy_stream is not None, dtype=self.dtype)
        self.plan(adapter)
        return adapter

    def plan(self, adapter: LoRAAdapter) -> SlotPlan:
        """The adapter's plan for this pool (made once and kept on the adapter); the adapter must be packed."""
        plan = adapter.plans.get(self._plan_key)
        if plan is None:
            plan = adapter.plans[self._plan_key] = self._make_plan(adapter)
        return plan

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write an adapter into a slot; modules it does not target get zeros. The adapter is
        packed here first if it is not (slow: the cache and the in-memory registry pack once)."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} exceeds the pool's max rank {self.max_rank}")
        if not 0 <= slot <= self.num_pages - self.pages_for(adapter):
            raise IndexError(f"slot {slot}: an adapter of {self.pages_for(adapter)} pages does not fit "
                             f"{self.num_pages} pages there")
        if adapter.layout is None:
            adapter = adapter.packed(pin_memory=self._copy_stream is not None, dtype=self.dtype)
        plan = self.plan(adapter)
        with self._side_stream() as wait_for_readers:
            source = self._source(adapter.buffer, plan.numel)
            rows = self._device_rows(plan.rows, slot, 0)
            wait_for_readers()
            self._ranks[:, :, slot].zero_()  # a load that fails midway leaves rank 0: half-copied rows are never read
            self._dora_slots[slot] = 0  # and no DoRA factor of a half-loaded adapter is applied
            for key, offset, first, n in plan.groups:
                width = key[1]
                source_rows = source[offset : offset + n * width].view(n, width)
                self._rows[key].index_copy_(0, rows[first : first + n], source_rows)
            self._scales[:, :, slot].copy_(plan.scales, non_blocking=True)
            self._ranks[:, :, slot].copy_(plan.ranks, non_blocking=True)
            if plan.magnitudes is not None:
                self._load_dora_factors(slot, plan)
            self._slot_projections[slot] = plan.projections

    def clear(self, slot: int) -> None:
        """Mark a slot empty (e.g. after a failed load): rank 0 everywhere, so nothing reads its rows."""
        self._slot_projections[slot] = frozenset()
        with self._side_stream() as wait_for_readers:
            wait_for_readers()
            self._scales[:, :, slot].zero_()
            self._ranks[:, :, slot].zero_()
            self._dora_slots[slot] = 0

    # --- internals
    def _load_dora_factors(self, slot: int, plan: SlotPlan) -> None:
        """The slot's DoRA factors from the base weights and the rows just written (on the side stream)."""
        magnitudes = plan.magnitudes.to(self.device, non_blocking=True)
        factors = self._dora_factors[slot]
        factors.fill_(1.0)
        for layer, name, i, offset, rank, scale in plan.dora_modules:
            proj, row_offsets, out_sizes = self._weights[(layer, name)]
            rows, width = row_offsets[i], out_sizes[i]
            lora = self._slots[(layer, name)]
            column = self._dora_columns[(layer, name)] + rows
            factors[column : column + width] = dora_factor(  # a quantized base: its dequantized weight, as peft's
                proj.dense_weight(i), lora.lora_a[i][slot, :rank], lora.lora_b[i][slot, :, :rank], scale,
                magnitudes[offset : offset + width], all_reduce=proj.all_reduce)  # row-parallel: a collective
        self._dora_slots[slot] = 1

    def _make_plan(self, adapter: LoRAAdapter) -> SlotPlan:
        if adapter.layout is None:
            raise ValueError("only a packed adapter has a plan (LoRAAdapter.packed)")
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} exceeds the pool's max rank {self.max_rank}")
        groups, starts, counts, first = [], [], [], 0
        stride = self._member_rows  # rows per group member
        for group in adapter.layout:
            key = (group.kind, group.width)
            for layer, module, rank in group.members:
                member_group, j = self._member.get((group.kind, layer, module), (None, 0))
                if self.modules is not None and module not in self.modules:
                    raise ValueError(f"the adapter targets {module}, which this server's adapter pool holds no rows "
                                     f"for (LORAPLEX_LORA_MODULES: {', '.join(sorted(self.modules))})")
                if member_group != key:
                    raise ValueError(f"the adapter's {module} of layer {layer} ({group.kind.upper()} rows of width "
                                     f"{group.width}) fits no slice of this model")
                starts.append(j * stride)
                counts.append(rank)
            groups.append((key, group.offset, first, group.num_rows))
            first += group.num_rows
        # rows: for each member, its first `rank` rows: start, start + 1, ...
        counts = np.asarray(counts, dtype=np.int64)
        run_starts = np.repeat(np.cumsum(counts) - counts, counts)
        rows = torch.from_numpy(np.repeat(np.asarray(starts, dtype=np.int64), counts) + np.arange(first) - run_starts)
        where = [(layer, *self._slice_of[module]) for layer, module in adapter.modules]
        index = tuple(torch.tensor(column) for column in zip(*where))
        scales = torch.zeros(self._scales.shape[0], self._scales.shape[1], _MAX_SLICES)
        ranks = torch.zeros(scales.shape, dtype=torch.int32)
        scales.index_put_(index, torch.tensor([m.scale for m in adapter.modules.values()], dtype=torch.float32))
        ranks.index_put_(index, torch.tensor([m.rank for m in adapter.modules.values()], dtype=torch.int32))
        if self._copy_stream is not None:  # sources of non_blocking copies must be page-locked
            rows, scales, ranks = rows.pin_memory(), scales.pin_memory(), ranks.pin_memory()
        projection_of = {m: name for name, ms in PROJECTION_SLICES.items() for m in ms}
        targeted = frozenset(projection_of[module] for _, module in adapter.modules)
        magnitudes, dora_modules = None, []
        if adapter.use_dora:
            targeted |= {DORA}
            offset = 0
            for (layer, module), m in adapter.modules.items():
                dora_modules.append((layer, projection_of[module], self._slice_of[module][1], offset, m.rank, m.scale))
                offset += m.magnitude.numel()
            magnitudes = torch.cat([m.magnitude.float() for m in adapter.modules.values()])
            if self._copy_stream is not None and magnitudes.device.type == "cpu":
                magnitudes = magnitudes.pin_memory()
        return SlotPlan(sum(g.numel for g in adapter.layout), tuple(groups), rows, scales, ranks,
                        self.pages_for(adapter), targeted, magnitudes, tuple(dora_modules))

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[Callable[[], None]]:
        """On CUDA: run the block on the copy stream; `wait_for_readers()` makes it wait for the work
        queued so far on the compute stream (batches still reading a slot), and the compute stream
        waits for the block's copies before its next use. Elsewhere: the block as it is."""
        if self._copy_stream is None:
            yield lambda: None
            return
        compute = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.stream(self._copy_stream):
                yield lambda: self._copy_stream.wait_stream(compute)
        finally:
            compute.wait_stream(self._copy_stream)

    def _source(self, buffer: torch.Tensor, numel: int) -> torch.Tensor:
        """The packed buffer on the device in the pool's dtype: itself when it already is (e.g. a
        GPU-resident adapter), else one copy, into the staging buffer on CUDA."""
        if buffer.device == self.device and buffer.dtype == self.dtype:
            return buffer
        if self._copy_stream is None:
            return buffer.to(self.device, self.dtype)
        if numel > self._staging.numel():
            raise ValueError(f"the adapter ({numel} elements) is larger than a slot of this pool")
        staging = self._staging[:numel]
        staging.copy_(buffer, non_blocking=True)
        return staging

    def _device_rows(self, rows: torch.Tensor, slot: int, offset: int) -> torch.Tensor:
        """The plan's row indices for `slot`, on the device (staged at `offset` on CUDA)."""
        if self._copy_stream is None:
            return (rows + slot * self.page_rank).to(self.device)
        staged = self._row_staging[offset : offset + rows.numel()]
        staged.copy_(rows, non_blocking=True)
        return staged.add_(slot * self.page_rank)
