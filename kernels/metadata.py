"""Per-step LoRA metadata: which adapter slot each token of the flattened batch uses.

Built once per step by the model runner and shared by every LoRA-targeted layer.

Two views of the same step:

- for the reference (and anything else on the host side): `active_slots` and, per active
  slot, the int64 indices of its tokens (`groups()`);
- for the Triton kernels: int32 device buffers, all views of one packed tensor that a single
  host-to-device copy fills:

      token_slots          (T,)              slot of each token, -1 = base model only
      sorted_tokens        (capacity,)       token indices grouped by slot: active slots in
                                             ascending order, then the slot -1 tokens
      group_slot/start/count (capacity+1,)   one entry per group (the -1 group last); unused
                                             entries have count 0
      num_groups           (1,)
      tiles[bt]            (capacity, 3)     for each tile size bt in TILE_SIZES: the tokens of
                                             every group cut into runs of at most bt tokens,
                                             one (slot, start in sorted_tokens, count) row each;
                                             unused rows have count 0

  plus `split_counters`, an int32 buffer of semaphores: per (tile, slice, rank chunk) for the
  shrink's split-K reduction, per (tile, slice) for the one-launch decode kernel, whose
  ticket counter is the last element (kernels/triton_fused_decode.py). Every kernel leaves
  the counters it used at zero, so kernels sharing a metadata object must run one after the
  other on one stream, as a model's layers do.

A kernel launched over `max_tiles(T, num_slots, bt)` programs covers every tile of any batch
of T tokens, so the grid depends only on T: the step can be captured in a CUDA graph once
and replayed after `update()` rewrites the buffers in place. For that, build the metadata
outside the capture with `capacity` = the largest batch, capture with a batch of the padded
size, and before each replay `update()` with that many slots (pad with -1). The int64 token
indices of `groups()` live in a second buffer, filled by a second copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

TILE_SIZES = (1, 16, 64)  # token-tile heights the kernels may choose between (1: one token, GEMV)
MAX_SLICES = 3  # fused q/k/v is the widest projection
MAX_RANK_CHUNKS = 8  # 8 chunks of 16: ranks up to 128


def max_tiles(num_tokens: int, num_slots: int, tile: int) -> int:
    """Most tiles of `tile` tokens any batch of `num_tokens` over `num_slots` slots can have.

    Each of at most min(T, S) + 1 groups (the +1 is slot -1) wastes under one tile, and no
    tile is empty: sum_g ceil(n_g / bt) <= (T + G (bt - 1)) / bt, and <= T.
    """
    groups = min(num_tokens, num_slots) + 1
    return min(num_tokens, (num_tokens + groups * (tile - 1)) // tile)


@dataclass
class LoRABatchMeta:
    token_slots: torch.Tensor  # (T,) int32, -1 = base model only
    active_slots: list[int]  # distinct slots >= 0 in the batch, ascending
    # --- the kernels' device view (see the module docstring); None only if built by hand
    capacity: int = 0  # most tokens the buffers hold
    packed: torch.Tensor | None = field(default=None, repr=False)  # int32, every field below
    sorted_tokens: torch.Tensor | None = field(default=None, repr=False)
    group_slot: torch.Tensor | None = field(default=None, repr=False)
    group_start: torch.Tensor | None = field(default=None, repr=False)
    group_count: torch.Tensor | None = field(default=None, repr=False)
    num_groups: torch.Tensor | None = field(default=None, repr=False)
    tiles: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    split_counters: torch.Tensor | None = field(default=None, repr=False)
    # host-side hints for choosing a launch configuration (never read back from the device)
    num_tiles_hint: dict[int, int] = field(default_factory=dict, repr=False)
    max_group_tokens: int = 0
    # names of the model's projections whose LoRA kernels run this step (None: all), plus "dora"
    # when DoRA's scaling runs after them (server/model/llama.py: DORA); set by the model runner
    # from what the batch's adapters target (the kernels never read it)
    projections: frozenset | None = field(default=None, repr=False)
    _sorted64: torch.Tensor | None = field(default=None, repr=False)  # int64 twin of sorted_tokens
    _groups: list[tuple[int, int, int]] = field(default_factory=list, repr=False)  # (slot, start, count), slot >= 0
    _unsorted: np.ndarray | None = field(default=None, repr=False)  # sorted token order not yet in _sorted64
    _last_slots: list[int] | None = field(default=None, repr=False)  # what the buffers hold now
    _host: torch.Tensor | None = field(default=None, repr=False)  # page-locked staging of `packed` (CUDA)
    _copied: object = field(default=None, repr=False)  # torch.cuda.Event: the staging buffer's last copy

    @classmethod
    def build(
        cls, token_slots: list[int], device: torch.device | str = "cpu", *, capacity: int | None = None
    ) -> "LoRABatchMeta":
        """Metadata for one step; `capacity` (>= len(token_slots)) preallocates for a max batch."""
        capacity = max(len(token_slots), capacity or 0, 1)
        device = torch.device(device)
        packed = torch.zeros(_packed_len(capacity), dtype=torch.int32, device=device)
        sorted64 = torch.zeros(capacity, dtype=torch.int64, device=device)
        counters = torch.zeros(capacity * MAX_SLICES * MAX_RANK_CHUNKS + 1, dtype=torch.int32, device=device)
        meta = cls(token_slots=packed[:0], active_slots=[], capacity=capacity)
        meta.packed, meta._sorted64, meta.split_counters = packed, sorted64, counters
        if device.type == "cuda":  # one page-locked staging buffer, reused once its last copy is done
            meta._host = torch.empty(_packed_len(capacity), dtype=torch.int32, pin_memory=True)
            meta._copied = torch.cuda.Event()
        views = _views(packed, capacity)
        meta.sorted_tokens, meta.group_slot, meta.group_start, meta.group_count, meta.num_groups = views[1:6]
        meta.tiles = dict(zip(TILE_SIZES, views[6:]))
        meta.update(token_slots)
        return meta

    def update(self, token_slots: list[int]) -> None:
        """Refill the preallocated buffers in place for a new step (call it outside a capture).

        On CUDA the contents go through one page-locked staging buffer in one asynchronous
        copy; the host waits only for the previous update's copy to have left that buffer. A
        CUDA graph captured over this meta reads the new contents on its next replay.
        """
        num_tokens = len(token_slots)
        if num_tokens > self.capacity:
            raise ValueError(f"{num_tokens} tokens exceed the metadata capacity {self.capacity}")
        if token_slots == self._last_slots:
            return  # decode steps of an unchanged batch: the device buffers already hold this
        self._last_slots = list(token_slots)
        if self._host is not None:
            self._copied.synchronize()  # the previous update's copy has left the staging buffer
            host, sorted_idx, groups = _pack(token_slots, self.capacity, out=self._host.numpy())
            self.packed.copy_(self._host, non_blocking=True)
            self._copied.record()
        else:
            host, sorted_idx, groups = _pack(token_slots, self.capacity)
            self.packed.copy_(torch.from_numpy(host))
        self._unsorted = sorted_idx  # the int64 twin is copied only if the reference path asks
        self.token_slots = self.packed[1 : 1 + num_tokens]
        self._groups = [(slot, start, n) for slot, start, n in groups if slot >= 0]
        self.active_slots = [slot for slot, _, _ in self._groups]
        counts = np.array([n for _, _, n in groups], dtype=np.int64)
        self.num_tiles_hint = {bt: int((-(-counts // bt)).sum()) for bt in TILE_SIZES}
        self.max_group_tokens = max((n for _, _, n in self._groups), default=0)

    @property
    def has_lora(self) -> bool:
        return bool(self.active_slots)

    @property
    def token_indices(self) -> list[torch.Tensor]:
        """Per active slot, the int64 indices of its tokens (views; made on demand: the GPU
        kernels never need them, and a view per slot per step costs host time)."""
        if self._unsorted is not None:
            self._sorted64[: len(self._unsorted)].copy_(torch.from_numpy(self._unsorted))
            self._unsorted = None
        return [self._sorted64[start : start + n] for _, start, n in self._groups]

    def groups(self):
        """(slot, token indices) for every slot used in this step."""
        return zip(self.active_slots, self.token_indices)


def _packed_len(capacity: int) -> int:
    # header, token_slots, sorted_tokens, 3 group arrays, num_groups, tiles per size
    return 1 + capacity + capacity + 3 * (capacity + 1) + 1 + 3 * capacity * len(TILE_SIZES)


def _views(packed: torch.Tensor, capacity: int) -> list[torch.Tensor]:
    """token_slots, sorted_tokens, group_slot, group_start, group_count, num_groups, tiles..."""
    out = [packed[region] for region in _region_slices(capacity)]  # packed[0] is a spare header word
    return out[:6] + [t.view(capacity, 3) for t in out[6:]]


def _pack(token_slots: list[int], capacity: int, out: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Host-side contents of the packed buffer (int32), the sorted token order and the groups
    (slot, start in the sorted order, count): numpy, since this runs every step on the host."""
    slots = np.asarray(token_slots, dtype=np.int64).reshape(-1)
    slots = np.where(slots >= 0, slots, -1)
    key = np.where(slots >= 0, slots, np.iinfo(np.int64).max)  # slot -1 sorts last
    sorted_idx = np.argsort(key, kind="stable")  # token indices grouped by slot, in order within a slot
    group_slot, group_start, group_count = np.unique(slots[sorted_idx] if len(slots) else slots,
                                                     return_index=True, return_counts=True)
    order = np.argsort(np.where(group_slot >= 0, group_slot, np.iinfo(np.int64).max), kind="stable")
    group_slot, group_start, group_count = group_slot[order], group_start[order], group_count[order]
    num_groups = len(group_slot)

    if out is None:
        host = np.zeros(_packed_len(capacity), dtype=np.int32)
    else:
        host = out
        host[:] = 0
    regions = _region_slices(capacity)
    host[regions[0]] = -1
    host[regions[0]][: len(slots)] = slots
    host[regions[1]][: len(slots)] = sorted_idx
    host[regions[2]] = -1
    host[regions[2]][:num_groups] = group_slot
    host[regions[3]][:num_groups] = group_start
    host[regions[4]][:num_groups] = group_count
    host[regions[5]] = num_groups
    for bt, region in zip(TILE_SIZES, regions[6:]):
        rows = host[region].reshape(capacity, 3)  # (slot, start, count) per tile
        rows[:, 0] = -1
        tiles_per_group = -(-group_count // bt)
        num_tiles = int(tiles_per_group.sum())
        group_of_tile = np.repeat(np.arange(num_groups), tiles_per_group)
        first_tile = np.repeat(np.cumsum(tiles_per_group) - tiles_per_group, tiles_per_group)
        offset = (np.arange(num_tiles) - first_tile) * bt  # token offset of the tile within its group
        rows[:num_tiles, 0] = group_slot[group_of_tile]
        rows[:num_tiles, 1] = group_start[group_of_tile] + offset
        rows[:num_tiles, 2] = np.minimum(bt, group_count[group_of_tile] - offset)
    groups = [(int(s), int(a), int(n)) for s, a, n in zip(group_slot, group_start, group_count)]
    return host, sorted_idx, groups


def _region_slices(capacity: int) -> list[slice]:
    """Where each region of `_views` lies in the packed buffer."""
    sizes = [capacity, capacity, capacity + 1, capacity + 1, capacity + 1, 1] + [3 * capacity] * len(TILE_SIZES)
    out, offset = [], 1
    for n in sizes:
        out.append(slice(offset, offset + n))
        offset += n
    return out
