"""The tiered adapter cache: SSD (the store) -> host RAM (LRU in bytes) -> device slots (the pool).

Implements the scheduler's `AdapterResidency` for keys `(customer_id, version)`. The version is
part of the identity, so a replaced adapter never serves stale weights: new requests carry the
new key, requests already on the old key finish on the old weights.

States of one key (`state(key)`; when a key is both in host RAM and on the device, ON_DEVICE):

    ON_DISK --prepare--> LOADING --read, check, pack--> IN_HOST --pin--> ON_DEVICE
       ^                    | any error                     |                 |
       |                    v                               | host LRU        | device LRU (unpinned only),
       +---- expiry ----- FAILED                            | eviction        | release_old_versions, forget
       +----------------------------------------------------+-----------------+

- Disk -> host (loader threads): `read_stored_adapter` (server/lora/loader.py) reads the file
  once, straight into the adapter's packed buffer, checks the header against the base model
  (the file's sha256 is checked by the store on the first load after start-up and after any
  change on disk, not on every load), and the pool's scatter plan is made there too, so the
  engine thread only issues copies.
- Host tier: `cachetools.LRUCache` sized in bytes: each adapter's packed buffer, page-locked
  when the pool is on CUDA (counted as PyTorch's page-locked allocator holds it, rounded up to
  a power of two) so the host->device copy is one asynchronous transfer. Its evictions never
  touch the device.
  An adapter larger than the whole budget still loads: it is held outside the LRU (one at a time,
  the latest such load) until it is pinned onto the device. Never a deadlock.
- Device tier: the pool's pages, placed by `SlotTable` (a free block of the adapter's size, else
  the block of the least recently used unpinned ones). A pinned adapter is never evicted or
  overwritten.

Threads: the engine thread calls prepare / can_pin / pin / unpin; loader threads read and parse
files off the critical path, one load per key however many ask (single-flight); the admin API
calls forget / release_old_versions; metrics call stats / resident_keys. One lock guards all
shared state; disk reads, parsing and slot copies run outside it.

Decisions:
- A failure stays for `retry_failed_after_s`, then the next prepare retries (a transient I/O
  error heals; a corrupt file fails again); `forget` clears it at once.
- A "ready" from prepare keeps that adapter for the pin that follows, so a host eviction in
  between costs nothing. Should pin still miss host RAM, it reads the file on the engine thread
  (rare); if that fails it raises AdapterLoadError and leaves the slot free.
- The host->device copy is `pool.load` on the engine thread: on CUDA it only queues one
  transfer and a dozen launches on the pool's side stream (ordered before the next step).
- Queries count the prepare calls that decide something (polls of a load in flight or of a known
  failure do not count). Loads count by source: "disk" (file -> host) and "host" (host -> slot).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from cachetools import LRUCache

from server.lora.adapter import LoRAAdapter
from server.lora.loader import read_stored_adapter
from server.lora.pool import AdapterPool
from server.lora.slots import SlotTable
from server.lora.store import AdapterStore
from server.model.config import ModelConfig

AdapterKey = tuple[str, int]  # (customer_id, version)

log = logging.getLogger(__name__)


class AdapterState(enum.Enum):
    ON_DISK = "on_disk"
    LOADING = "loading"
    IN_HOST = "in_host"
    ON_DEVICE = "on_device"
    FAILED = "failed"


class AdapterLoadError(RuntimeError):
    """An adapter could not be read or parsed; `key` names it."""

    def __init__(self, key: AdapterKey, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class TierStats:
    queries: int
    hits: int
    evictions: int
    resident: int  # adapters held
    resident_bytes: int  # their A and B bytes (not the tier's capacity)


@dataclass(frozen=True)
class CacheStats:
    host: TierStats
    device: TierStats
    loads: dict[str, int]  # source -> completed loads: "disk" (file -> host), "host" (host -> device)
    load_seconds: dict[str, float]  # source -> total seconds of those loads
    load_failures: int
    loading: int  # loads in flight now
    pinned: int = 0  # adapters pinned in device slots by running sequences now


@dataclass
class _Counters:
    host_queries: int = 0
    host_hits: int = 0
    device_queries: int = 0
    device_hits: int = 0
    device_evictions: int = 0
    load_failures: int = 0
    loads: dict[str, int] = field(default_factory=lambda: {"disk": 0, "host": 0})
    load_seconds: dict[str, float] = field(default_factory=lambda: {"disk": 0.0, "host": 0.0})

    def count_load(self, source: str, seconds: float) -> None:
        self.loads[source] += 1
        self.load_seconds[source] += seconds


class _HostTier(LRUCache):
    """cachetools' LRU sized in the host memory its adapters hold, counting the evictions it
    makes to fit new entries and the adapters' A and B bytes."""

    def __init__(self, maxsize: int, getsizeof: Callable[[LoRAAdapter], int]):
        super().__init__(maxsize, getsizeof=getsizeof)
        self.evictions = 0
        self.adapter_bytes = 0

    def __setitem__(self, key, adapter: LoRAAdapter) -> None:
        self.pop(key, None)
        super().__setitem__(key, adapter)
        self.adapter_bytes += adapter.nbytes

    def __delitem__(self, key) -> None:
        adapter = super().__getitem__(key)
        super().__delitem__(key)
        self.adapter_bytes -= adapter.nbytes

    def popitem(self):
        item = super().popitem()
        self.evictions += 1
        return item


def host_bytes_held(adapter: LoRAAdapter, page_locked: bool) -> int:
    """Host memory an adapter's buffer takes: PyTorch's page-locked (caching host) allocator
    rounds each block up to a power of two."""
    n = adapter.nbytes
    return 1 << (n - 1).bit_length() if page_locked and n > 1 else n


class AdapterCache:
    def __init__(self, store: AdapterStore, pool: AdapterPool, model_config: ModelConfig, *, host_bytes: int,
                 max_rank: int, dtype: torch.dtype, loader_threads: int = 2, retry_failed_after_s: float = 30.0):
        if max_rank > pool.max_rank:
            raise ValueError(f"max_rank {max_rank} exceeds the pool's max rank {pool.max_rank}")
        self.store, self.pool, self.model_config = store, pool, model_config
        self.max_rank, self.dtype = max_rank, dtype
        self.retry_failed_after_s = retry_failed_after_s
        self._pin_host_memory = pool.device.type == "cuda"  # page-locked host copies: fast host->device
        self._lock = threading.Lock()
        self._host = _HostTier(host_bytes, lambda adapter: host_bytes_held(adapter, self._pin_host_memory))
        self._oversized: tuple[AdapterKey, LoRAAdapter] | None = None  # larger than host_bytes, awaiting pin
        self._prepared: tuple[AdapterKey, LoRAAdapter] | None = None  # the last "ready" answer, for pin
        self._loading: dict[AdapterKey, object] = {}  # key -> token of the load in flight
        self._failed: dict[AdapterKey, tuple[str, float]] = {}  # key -> (message, time.monotonic())
        self._slots = SlotTable(pool.num_pages, pool.max_block)
        self._device_bytes: dict[AdapterKey, int] = {}  # copied into a slot completely
        self._pins: dict[AdapterKey, int] = {}
        self._counters = _Counters()
        self._executor = ThreadPoolExecutor(loader_threads, thread_name_prefix="adapter-loader")

    # --- AdapterResidency (engine thread)
    def prepare(self, key: AdapterKey) -> str:
        """"ready" (pin may follow), "loading" (a background load is in flight) or "failed"."""
        with self._lock:
            on_device = self._slots.slot_of(key) is not None
            if not on_device:
                if key in self._loading:
                    return "loading"
                if self._failure(key) is not None:
                    return "failed"
            counters = self._counters
            counters.device_queries += 1
            if on_device:
                counters.device_hits += 1
                return "ready"
            counters.host_queries += 1
            adapter = self._held(key)
            if adapter is not None:
                counters.host_hits += 1
                self._prepared = (key, adapter)
                return "ready"
            token = self._loading[key] = object()
        try:
            self._executor.submit(self._load, key, token)
        except RuntimeError as e:  # closed
            self._load_failed(key, token, e)
            return "failed"
        return "loading"

    def error(self, key: AdapterKey) -> str:
        with self._lock:
            failure = self._failed.get(key)
        return failure[0] if failure else ""

    def can_pin(self, key: AdapterKey) -> bool:
        with self._lock:
            return self._slots.can_acquire(key, self._pages(key))

    def pin(self, key: AdapterKey) -> int:
        """Make the adapter device-resident if it is not, count one more user; returns its slot.

        Raises RuntimeError when every slot is pinned (ask `can_pin` first) and AdapterLoadError
        when the adapter had to be read again and that failed."""
        with self._lock:
            slot, needs_load, evicted = self._slots.acquire(key, self._pages(key))
            self._pins[key] = self._pins.get(key, 0) + 1
            if not needs_load:
                return slot
            for victim in evicted:
                self._device_bytes.pop(victim, None)
                self._counters.device_evictions += 1
            adapter = self._prepared[1] if self._prepared and self._prepared[0] == key else self._held(key)
            self._prepared = None
            if self._oversized and self._oversized[0] == key:
                self._oversized = None  # on the device from now on; reread from disk if evicted
        try:
            if adapter is None:  # the host tier evicted it since prepare: read it here (rare)
                start = time.perf_counter()
                adapter = self._read(key)
                with self._lock:
                    self._counters.count_load("disk", time.perf_counter() - start)
                    self._keep_in_host(key, adapter)
            start = time.perf_counter()
            self.pool.load(slot, adapter)
        except Exception as e:
            with self._lock:
                self._pins.pop(key)
                self._slots.release(key)
                self._slots.evict(key)
            self.pool.clear(slot)
            message = self._load_failed(key, None, e)
            raise AdapterLoadError(key, message) from e
        with self._lock:
            self._counters.count_load("host", time.perf_counter() - start)
            self._device_bytes[key] = adapter.nbytes
        return slot

    def identity(self, key: AdapterKey) -> AdapterKey:
        """The prefix cache's name for the adapter's weights: (customer id, version) itself, as the
        store never gives a version number twice (a replacement is a new version)."""
        return key

    def unpin(self, key: AdapterKey) -> None:
        with self._lock:
            self._slots.release(key)
            self._pins[key] -= 1
            if self._pins[key] == 0:
                del self._pins[key]

    # --- lifecycle (admin API)
    def release_old_versions(self, customer_id: str, current_version: int, in_use: Iterable[int] = ()) -> list[int]:
        """After a replacement: drop the older versions' host copies and unpinned device copies,
        then prune their files except those pinned, loading or named in `in_use` (versions that
        queued requests still carry: without their files such requests would fail). Returns the
        versions pruned; a pinned one finishes on its weights and goes at a later call or restart."""
        return self._retire(customer_id, lambda version: version < current_version, set(in_use))

    def forget(self, customer_id: str, in_use: Iterable[int] = ()) -> list[int]:
        """After a delete: the same for every version (loads in flight still finish)."""
        return self._retire(customer_id, lambda version: True, set(in_use))

    def close(self) -> None:
        """Stop the loader threads: queued loads are dropped, running ones finish."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    # --- observation (any thread)
    def state(self, key: AdapterKey) -> AdapterState:
        with self._lock:
            if self._slots.slot_of(key) is not None:
                return AdapterState.ON_DEVICE
            if key in self._host or (self._oversized and self._oversized[0] == key):
                return AdapterState.IN_HOST
            if key in self._loading:
                return AdapterState.LOADING
            if key in self._failed:
                return AdapterState.FAILED
            return AdapterState.ON_DISK

    def held_keys(self) -> set[AdapterKey]:
        """Every adapter held in host RAM or a device slot."""
        with self._lock:
            held = {*self._host.keys(), *(key for _, key in self._slots.residents())}
            if self._oversized:
                held.add(self._oversized[0])
            return held

    def resident_keys(self) -> list[AdapterKey]:
        """The adapters in device slots, by slot."""
        with self._lock:
            return [key for _, key in self._slots.residents()]

    def stats(self) -> CacheStats:
        with self._lock:
            c = self._counters
            host = TierStats(c.host_queries, c.host_hits, self._host.evictions, len(self._host),
                             self._host.adapter_bytes)
            device = TierStats(c.device_queries, c.device_hits, c.device_evictions, self._slots.num_resident,
                               sum(self._device_bytes.values()))
            return CacheStats(host, device, dict(c.loads), dict(c.load_seconds), c.load_failures, len(self._loading),
                              len(self._pins))

    # --- internals
    def _load(self, key: AdapterKey, token: object) -> None:
        """Loader thread: file -> parsed adapter in the host tier, or the key marked failed."""
        start = time.perf_counter()
        try:
            adapter = self._read(key)
        except Exception as e:
            self._load_failed(key, token, e)
            return
        with self._lock:
            if self._loading.get(key) is token:
                del self._loading[key]
                self._counters.count_load("disk", time.perf_counter() - start)
                self._keep_in_host(key, adapter)

    def _read(self, key: AdapterKey) -> LoRAAdapter:
        customer_id, version = key
        adapter = read_stored_adapter(self.store, self.store.get_version(customer_id, version), self.model_config,
                                      max_rank=self.max_rank, dtype=self.dtype, pin_memory=self._pin_host_memory)
        return self.pool.prepare(adapter)  # its plan made here, off the engine thread (shards too, under TP)

    def _load_failed(self, key: AdapterKey, token: object | None, error: Exception) -> str:
        """Mark the key failed (unless its load was superseded); returns the message."""
        customer_id, version = key
        message = f"adapter of customer {customer_id!r} version {version} failed to load: {error}"
        log.warning("%s", message)
        with self._lock:
            if token is not None and self._loading.get(key) is not token:
                return message
            self._loading.pop(key, None)
            now = time.monotonic()
            for old in [k for k, (_, at) in self._failed.items() if now - at >= self.retry_failed_after_s]:
                del self._failed[old]
            self._failed[key] = (message, now)
            self._counters.load_failures += 1
        return message

    def _failure(self, key: AdapterKey) -> str | None:
        """The unexpired failure message of the key (lock held)."""
        failure = self._failed.get(key)
        if failure is None:
            return None
        if time.monotonic() - failure[1] >= self.retry_failed_after_s:
            del self._failed[key]
            return None
        return failure[0]

    def _pages(self, key: AdapterKey) -> int:
        """Device pages the adapter takes: from its host copy, else (not held: read again at
        pin) as many as the largest rank takes, so that the pin cannot find too little room."""
        if self._prepared and self._prepared[0] == key:
            return self.pool.pages_for(self._prepared[1])
        adapter = self._held(key)
        return self.pool.pages_for(adapter) if adapter is not None else self.pool.max_block

    def _held(self, key: AdapterKey) -> LoRAAdapter | None:
        """The adapter if it is in host RAM, marked as just used (lock held)."""
        if key in self._host:
            return self._host[key]
        if self._oversized and self._oversized[0] == key:
            return self._oversized[1]
        return None

    def _keep_in_host(self, key: AdapterKey, adapter: LoRAAdapter) -> None:
        if self._host.getsizeof(adapter) > self._host.maxsize:
            self._oversized = (key, adapter)
        else:
            self._host[key] = adapter

    def _retire(self, customer_id: str, selects: Callable[[int], bool], in_use: set[int]) -> list[int]:
        with self._lock:
            def retired(key: AdapterKey) -> bool:
                return key[0] == customer_id and selects(key[1]) and key[1] not in in_use

            for key in [k for k in self._host if retired(k)]:
                del self._host[key]
            for key in [k for k in self._failed if retired(k)]:
                del self._failed[key]
            if self._oversized and retired(self._oversized[0]):
                self._oversized = None
            if self._prepared and retired(self._prepared[0]):
                self._prepared = None
            for _, key in self._slots.residents():
                if retired(key) and key not in self._pins:
                    self._slots.evict(key)
                    self._device_bytes.pop(key, None)
            keep = in_use | {v for c, v in [*self._pins, *self._loading] if c == customer_id}
        return self.store.prune(customer_id, keep)
