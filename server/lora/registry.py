"""Adapters held in memory and paged into device slots on demand (no disk tier).

Implements the scheduler's `AdapterResidency` for adapters registered by the library caller;
the tiered cache (SSD -> host -> device) implements the same protocol for the server.
"""

from __future__ import annotations

from typing import Hashable

from server.lora.adapter import LoRAAdapter
from server.lora.pool import AdapterPool
from server.lora.slots import SlotTable


class InMemoryAdapters:
    def __init__(self, pool: AdapterPool):
        self.pool = pool
        self.slots = SlotTable(pool.num_pages, pool.max_block)
        self.adapters: dict[Hashable, LoRAAdapter] = {}
        self._generation: dict[Hashable, int] = {}  # registrations of each key: a replaced adapter's identity changes

    def register(self, key: Hashable, adapter: LoRAAdapter) -> None:
        self.slots.evict(key)  # raises while in use; a replaced adapter is reloaded on next use
        self.adapters[key] = self.pool.prepare(adapter)  # packed and planned once here, not at every load
        self._generation[key] = self._generation.get(key, 0) + 1

    def identity(self, key: Hashable) -> Hashable:
        """The prefix cache's name for the adapter's weights: the key and which registration."""
        return (key, self._generation[key])

    def prepare(self, key: Hashable) -> str:
        return "ready" if key in self.adapters else "failed"

    def error(self, key: Hashable) -> str:
        return f"adapter {key!r} is not registered"

    def can_pin(self, key: Hashable) -> bool:
        return self.slots.can_acquire(key, self.pool.pages_for(self.adapters[key]))

    def pin(self, key: Hashable) -> int:
        slot, needs_load, _ = self.slots.acquire(key, self.pool.pages_for(self.adapters[key]))
        if needs_load:
            self.pool.load(slot, self.adapters[key])
        return slot

    def unpin(self, key: Hashable) -> None:
        self.slots.release(key)
