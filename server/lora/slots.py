"""Which adapter occupies which device slot: LRU over unpinned slots, pin counts while in use.

Plain Python (no tensors), so the scheduler can ask `can_acquire` without touching a device.
"""

from __future__ import annotations

from collections import OrderedDict


class SlotTable:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slot_of: dict[str, int] = {}  # adapter id -> slot
        self._pins: dict[str, int] = {}  # adapter id -> sequences using it
        self._idle: OrderedDict[str, None] = OrderedDict()  # resident, unpinned; least recent first
        self._free = list(range(num_slots - 1, -1, -1))

    def slot_of(self, adapter_id: str) -> int | None:
        return self._slot_of.get(adapter_id)

    def can_acquire(self, adapter_id: str) -> bool:
        return adapter_id in self._slot_of or bool(self._free) or bool(self._idle)

    def acquire(self, adapter_id: str) -> tuple[int, bool]:
        """Pin the adapter; returns (slot, needs_load). Raises if every slot is pinned."""
        if adapter_id in self._slot_of:
            self._pins[adapter_id] += 1
            self._idle.pop(adapter_id, None)
            return self._slot_of[adapter_id], False
        if self._free:
            slot = self._free.pop()
        elif self._idle:
            victim, _ = self._idle.popitem(last=False)
            slot = self._slot_of.pop(victim)
            del self._pins[victim]
        else:
            raise RuntimeError("every adapter slot is pinned")
        self._slot_of[adapter_id] = slot
        self._pins[adapter_id] = 1
        return slot, True

    def release(self, adapter_id: str) -> None:
        self._pins[adapter_id] -= 1
        if self._pins[adapter_id] == 0:
            self._idle[adapter_id] = None

    def evict(self, adapter_id: str) -> None:
        """Forget an unpinned adapter (e.g. it was replaced or deleted)."""
        if self._pins.get(adapter_id):
            raise RuntimeError(f"adapter {adapter_id!r} is in use")
        slot = self._slot_of.pop(adapter_id, None)
        if slot is not None:
            self._pins.pop(adapter_id, None)
            self._idle.pop(adapter_id, None)
            self._free.append(slot)
