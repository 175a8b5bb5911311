"""Workers' adapter shards in POSIX shared memory, so that a swap-in under tensor parallelism
sends a name, not megabytes.

Rank 0's adapter cache cuts an adapter into every rank's shard off the engine thread
(server/lora/sharding.py). Each worker's shard is packed there into a shared-memory block of its
own (`SharedBlocks.put`). A swap-in then sends the worker a `ShardMessage` (the block's name,
the packed layout, the scales and DoRA magnitudes: a few kilobytes); the worker maps the block,
loads its pool slot straight from it (`load_shared_shard`) and unmaps it. Sending the shard's bytes
through the command group instead took 60 ms for a 7B rank-16 q,k,v,o shard (17 MB) and 0.6 s
for 70 MB on two CPU processes, on the engine thread, at every swap-in.

Lifetime: a block lives while rank 0's host tier holds its adapter. When rank 0 drops it, the
block's name is released (`SharedBlocks`); rank 0 sends the queued names with its next load or
clear command and the worker unlinks them. Commands reach a worker in order, so it unlinks a
block only after it has finished any load that reads it; rank 0 never unlinks a block a worker
might still be about to open. Names still queued when the group stops are unlinked by rank 0.

Where shared memory cannot be had (no /dev/shm, or full: a container's default is 64 MB), the
shard is sent by value as before, with one warning.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import torch

from server.lora.adapter import LoRAAdapter, LoRAModuleWeights, RowGroup, packed_layout

_names = itertools.count()
_warned = threading.Event()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardMessage:
    """What a worker needs to load its shard from shared memory (pickled into the load command)."""

    name: str
    dtype: torch.dtype
    numel: int
    layout: tuple[RowGroup, ...]
    template: LoRAAdapter  # scales, ranks, config and magnitudes; no A or B (they are in the block)


class SharedShard:
    """Rank 0's handle on one worker's shard in a shared-memory block; the block is unmapped
    here, and its name released to `SharedBlocks`, when this handle goes."""

    def __init__(self, shm: SharedMemory, message: ShardMessage, nbytes: int, blocks: "SharedBlocks"):
        self.message, self.nbytes = message, nbytes
        self.rank = message.template.rank
        weakref.finalize(self, _release, shm, blocks)


class SharedBlocks:
    """Rank 0's book of the blocks it made: each is live until its shard is dropped, then
    released, and a worker unlinks it when rank 0 hands the name over (`take_released`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: set[str] = set()
        self._released: deque[str] = deque()

    def put(self, shard: LoRAAdapter, dtype: torch.dtype) -> SharedShard | LoRAAdapter:
        """`shard` packed in `dtype` into a new block; the shard itself (to send by value) where
        no block can be made."""
        layout = packed_layout({key: (m.rank, m.lora_a.shape[1], m.lora_b.shape[0]) for key, m in shard.modules.items()})
        numel = sum(g.numel for g in layout)
        try:
            shm = SharedMemory(name=f"loraplex_{os.getpid()}_{next(_names)}", create=True,
                               size=max(1, numel * dtype.itemsize))
        except OSError as e:
            if not _warned.is_set():
                _warned.set()
                log.warning("no shared memory for adapter shards (%s): they are sent to the tensor-parallel "
                            "workers by value, which is slow on every swap-in; give /dev/shm room", e)
            return shard
        try:
            buffer = torch.frombuffer(shm.buf, dtype=dtype, count=numel)
            filled = shard.with_buffer(buffer, layout)  # A and B become views of the block
            for key, m in shard.modules.items():
                filled.modules[key].lora_a.copy_(m.lora_a)
                filled.modules[key].lora_b.copy_(m.lora_b)
            del buffer, filled  # no view of the block may outlive this (shm.close() needs that)
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        with self._lock:
            self._live.add(shm.name)
        template = replace(shard, modules={key: LoRAModuleWeights(_EMPTY, _EMPTY, m.scale, m.magnitude)
                                           for key, m in shard.modules.items()}, buffer=None, layout=None, plans={})
        magnitudes = sum(0 if m.magnitude is None else m.magnitude.nbytes for m in shard.modules.values())
        return SharedShard(shm, ShardMessage(shm.name, dtype, numel, layout, template), shm.size + magnitudes, self)

    def take_released(self) -> list[str]:
        """Names of dropped shards, for a worker to unlink (sent with the next load or clear)."""
        with self._lock:
            names = list(self._released)
            self._released.clear()
            self._live.difference_update(names)
        return names

    def unlink_all(self) -> None:
        """Every block not handed over yet (rank 0, once the workers have stopped)."""
        with self._lock:
            names = self._live | set(self._released)
            self._live.clear()
            self._released.clear()
        unlink_now(names)

    def _released_by(self, name: str) -> None:
        with self._lock:
            if name in self._live:
                self._released.append(name)


_EMPTY = torch.empty(0)


def _release(shm: SharedMemory, blocks: SharedBlocks) -> None:
    """Rank 0 no longer holds the block: unmap it here; a worker unlinks it (see the docstring)."""
    shm.close()
    resource_tracker.unregister(shm._name, "shared_memory")  # a worker or unlink_all unlinks it
    blocks._released_by(shm.name)


def load_shared_shard(load, slot: int, message: ShardMessage) -> None:
    """A worker: `load(slot, shard)` (its pool's load) with the shard read from the mapped block,
    then unmap it. The load must copy the shard (a pool slot does): the mapping goes after it.
    The block is mapped as a plain file of /dev/shm, not through SharedMemory, which would make
    this process's resource tracker (shared with rank 0's, under spawn) an owner of it."""
    fd = os.open(f"/dev/shm/{message.name}", os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, message.numel * message.dtype.itemsize)
    finally:
        os.close(fd)
    try:
        load(slot, message.template.with_buffer(torch.frombuffer(mapping, dtype=message.dtype, count=message.numel),
                                                message.layout))
    finally:
        try:
            mapping.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes with that view
            pass


def unlink_now(names) -> None:
    """Remove blocks by name (a worker, for names rank 0 released; rank 0, for those left at stop)."""
    for name in names:
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass
