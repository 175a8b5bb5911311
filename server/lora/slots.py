"""Which adapter occupies which device pages: placement, LRU eviction of unpinned adapters, pin
counts while in use.

The pool (server/lora/pool.py) is cut into pages of `page_rank` rows; an adapter of rank r takes
a block of ceil(r / page_rank) pages rounded up to a power of two, aligned to its size (a buddy
layout), and its first page is the slot the kernels index. So a pool sized for N adapters of the
largest rank holds 4N of a quarter of that rank: S-LoRA's point that many small adapters should
not each pay for the largest. Aligned power-of-two blocks keep the question "is there room for
a block of b pages" cheap: per block size, a count of the aligned blocks that no pinned adapter
touches (`can_acquire`, asked by the scheduler every step, is O(1)). Placing a missing adapter
(a load, rare beside steps) scans that size's blocks for the cheapest: a free one, else the one
whose idle adapters were used least recently, and evicts what lies there.

Plain Python (no tensors), so the scheduler can ask `can_acquire` without touching a device.
"""

from __future__ import annotations

from collections import OrderedDict


def block_pages(pages: int) -> int:
    """Pages of the aligned block an adapter of `pages` pages takes: the next power of two."""
    return 1 << max(0, pages - 1).bit_length()


class SlotTable:
    def __init__(self, num_pages: int, max_block: int = 1):
        """`max_block`: the largest block an adapter may take (pages of the largest rank, a power of two)."""
        if max_block < 1 or max_block & (max_block - 1):
            raise ValueError(f"max_block must be a power of two, not {max_block}")
        self.num_pages = num_pages
        self.max_block = max_block
        self._place: dict[str, tuple[int, int]] = {}  # adapter id -> (first page, block pages)
        self._owner: list[str | None] = [None] * num_pages
        self._pins: dict[str, int] = {}  # adapter id -> sequences using it
        self._idle: OrderedDict[str, None] = OrderedDict()  # resident, unpinned; least recent first
        # per block size b: pinned pages in each aligned block, and how many blocks have none
        self._pinned = {b: [0] * (num_pages // b) for b in self._sizes()}
        self._open = {b: num_pages // b for b in self._sizes()}

    def _sizes(self) -> list[int]:
        return [1 << i for i in range(self.max_block.bit_length())]

    @property
    def num_resident(self) -> int:
        return len(self._place)

    def residents(self) -> list[tuple[int, str]]:
        """(first page, adapter id) of every resident adapter, by page."""
        return sorted((first, adapter_id) for adapter_id, (first, _) in self._place.items())

    def slot_of(self, adapter_id: str) -> int | None:
        """The adapter's first page, None when it is not resident."""
        place = self._place.get(adapter_id)
        return place[0] if place is not None else None

    def can_acquire(self, adapter_id: str, pages: int = 1) -> bool:
        return adapter_id in self._place or self._open.get(self._block(pages), 0) > 0

    def acquire(self, adapter_id: str, pages: int = 1) -> tuple[int, bool, list[str]]:
        """Pin the adapter; returns (first page, needs_load, adapters evicted to make room).
        Raises RuntimeError if no block of its size is free of pinned adapters."""
        place = self._place.get(adapter_id)
        if place is not None:
            if self._pins[adapter_id] == 0:
                self._idle.pop(adapter_id)
                self._mark_pinned(*place, 1)
            self._pins[adapter_id] += 1
            return place[0], False, []
        size = self._block(pages)
        first = self._cheapest_block(size)
        if first is None:
            raise RuntimeError(f"every block of {size} adapter pages holds a pinned adapter")
        evicted = list(dict.fromkeys(o for o in self._owner[first : first + size] if o is not None))
        for victim in evicted:
            self._remove(victim)
        self._place[adapter_id] = (first, size)
        self._owner[first : first + size] = [adapter_id] * size
        self._pins[adapter_id] = 1
        self._mark_pinned(first, size, 1)
        return first, True, evicted

    def release(self, adapter_id: str) -> None:
        self._pins[adapter_id] -= 1
        if self._pins[adapter_id] == 0:
            self._idle[adapter_id] = None
            self._mark_pinned(*self._place[adapter_id], -1)

    def evict(self, adapter_id: str) -> None:
        """Forget an unpinned adapter (e.g. it was replaced or deleted)."""
        if self._pins.get(adapter_id):
            raise RuntimeError(f"adapter {adapter_id!r} is in use")
        if adapter_id in self._place:
            self._remove(adapter_id)

    # --- internals
    def _block(self, pages: int) -> int:
        size = block_pages(pages)
        if size > self.max_block:
            raise ValueError(f"an adapter of {pages} pages exceeds the largest block ({self.max_block} pages)")
        return size

    def _remove(self, adapter_id: str) -> None:
        first, size = self._place.pop(adapter_id)
        self._owner[first : first + size] = [None] * size
        self._pins.pop(adapter_id, None)
        self._idle.pop(adapter_id, None)

    def _mark_pinned(self, first: int, size: int, delta: int) -> None:
        """Count `size` pages from `first` as pinned (delta 1) or no longer (-1) in every block size."""
        for b, counts in self._pinned.items():
            for k in range(first // b, min((first + size - 1) // b + 1, len(counts))):
                pages = min(first + size, (k + 1) * b) - max(first, k * b)
                before = counts[k]
                counts[k] += delta * pages
                if (before == 0) != (counts[k] == 0):
                    self._open[b] += 1 if counts[k] == 0 else -1

    def _cheapest_block(self, size: int) -> int | None:
        """First page of the aligned block of `size` pages, free of pinned adapters, that is
        cheapest to take: the fewest resident adapters, then the least recently used ones."""
        if self._open.get(size, 0) == 0:
            return None
        recency = {adapter_id: i for i, adapter_id in enumerate(self._idle)}  # 0 = least recent
        best, best_cost = None, None
        for k, pinned in enumerate(self._pinned[size]):
            if pinned:
                continue
            owners = {o for o in self._owner[k * size : (k + 1) * size] if o is not None}
            if not owners:
                return k * size
            cost = (len(owners), max(recency[o] for o in owners))
            if best_cost is None or cost < best_cost:
                best, best_cost = k * size, cost
        return best
