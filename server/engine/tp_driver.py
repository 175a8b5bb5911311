"""Rank 0 drives a tensor-parallel group; the other ranks only run the model.

The scheduler, the API and the adapter cache stay single, on rank 0. The engine there holds a
`DrivenRunner` and a `ShardedAdapterPool` in place of its runner and pool: each call is sent to
the workers first, then done on rank 0's own shard, so every rank runs the same step and holds
the same adapter in the same pool slot. Workers sit in `worker_loop`, doing what they receive:

    run(chunks, all_logits, lora_projections, pending)   every rank computes the same logits;
                                 rank 0 keeps them. With `pending` > 0 (asynchronous scheduling)
                                 rank 0 then broadcasts the previous step's sampled ids from its
                                 device (on the forward's group: stream-ordered, no host sync)
    warm_up(capture_graphs)      the same warm-up and CUDA graphs on every rank (the graphs hold
                                 the all-reduces)
    load(slot, unlink) + each rank's shard (a scatter after the command: the name of a
                                 shared-memory block holding it, server/lora/shard_transport.py)
    clear(slot, unlink)          `unlink`: blocks of shards rank 0 has dropped, for the worker
                                 to remove (it has read them, if at all, before: commands are in order)
    stop()

Commands are pickled Python objects broadcast over the group's gloo command group
(TensorParallel.commands), so they never queue behind a step on a device: a step's chunks are a
few kilobytes, and a swap-in's are names and layouts.

A call that fails on rank 0 fails the same way on the workers (the same inputs, the same
checks): a worker logs it and waits for the next command. A worker that dies ends the group
(server/engine/tp_group.py).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from server.lora.adapter import LoRAAdapter
from server.lora.pool import AdapterPool
from server.lora.shard_transport import SharedBlocks, ShardMessage, load_shared_shard, unlink_now
from server.lora.sharding import ShardedAdapter, shard_for_every_rank
from server.model.runner import ModelRunner, SequenceChunk
from server.model.tensor_parallel import ShardPlan, TensorParallel

log = logging.getLogger(__name__)


class DrivenRunner:
    """Rank 0's ModelRunner under tensor parallelism: `run` and `warm_up` on every rank."""

    def __init__(self, runner: ModelRunner, tp: TensorParallel):
        if tp.rank != 0:
            raise ValueError("the driver runs on rank 0 of a tensor-parallel group")
        self.runner, self.tp = runner, tp
        self.model, self.kv_cache, self.device = runner.model, runner.kv_cache, runner.device
        self.stopped = False

    def run(self, chunks: list[SequenceChunk], all_logits: bool = False, pending_tokens: torch.Tensor | None = None,
            lora_projections: frozenset | None = None) -> torch.Tensor:
        pending = pending_tokens.numel() if pending_tokens is not None and any(c.pending_row >= 0 for c in chunks) else 0
        _send(self.tp, ("run", chunks, all_logits, lora_projections, pending))
        if pending:
            pending_tokens = self.tp.broadcast(pending_tokens.to(torch.int64).contiguous())
        return self.runner.run(chunks, all_logits=all_logits, pending_tokens=pending_tokens,
                               lora_projections=lora_projections)

    def warm_up(self, capture_graphs: bool = True) -> None:
        _send(self.tp, ("warm_up", capture_graphs))
        self.runner.warm_up(capture_graphs)

    @property
    def graphs(self):
        return self.runner.graphs

    def stop(self) -> None:
        """Release the workers from their loop (they return from `worker_loop`)."""
        _send(self.tp, ("stop",))
        self.stopped = True


class ShardedAdapterPool:
    """Rank 0's AdapterPool under tensor parallelism: the caches and the scheduler see one pool
    (rank 0's slots and sizes, which every rank's pool shares); an adapter is cut into every
    rank's shard once, by `prepare` (the cache's loader threads call it), the workers' into
    shared memory, and each swap-in sends every worker the name of its own shard's block."""

    def __init__(self, pool: AdapterPool, tp: TensorParallel, config):
        if tp.rank != 0:
            raise ValueError("the driver runs on rank 0 of a tensor-parallel group")
        self.pool, self.tp = pool, tp
        self._plans = [ShardPlan(config, r, tp.world_size) for r in range(tp.world_size)]
        self.blocks = SharedBlocks()

    # what the cache, the registry, the engine and the metrics read: rank 0's pool's own
    def __getattr__(self, name):
        if name in _POOL_READS:
            return getattr(self.pool, name)
        raise AttributeError(name)

    def pages_for(self, adapter) -> int:
        return self.pool.pages_for(adapter)

    def projections_of(self, slots) -> frozenset:
        return self.pool.projections_of(slots)

    def prepare(self, adapter: LoRAAdapter | ShardedAdapter) -> ShardedAdapter:
        """Every rank's shard of the (whole, validated) adapter; rank 0's packed and planned."""
        if isinstance(adapter, ShardedAdapter):
            return adapter
        shards = shard_for_every_rank(adapter, self._plans).shards
        # the workers' shards in shared memory; by value (on the host: a device tensor would
        # unpickle on rank 0's GPU) where there is none
        return ShardedAdapter((self.pool.prepare(shards[0]),
                               *(self.blocks.put(s.to("cpu"), self.pool.dtype) for s in shards[1:])))

    def load(self, slot: int, adapter: LoRAAdapter | ShardedAdapter) -> None:
        adapter = self.prepare(adapter)
        _send(self.tp, ("load", slot, self.blocks.take_released()))
        parts = [None] + [getattr(s, "message", s) for s in adapter.shards[1:]]  # a ShardMessage, or the shard
        dist.scatter_object_list([None], parts, src=0, group=self.tp.commands)
        self.pool.load(slot, adapter.shards[0])

    def clear(self, slot: int) -> None:
        _send(self.tp, ("clear", slot, self.blocks.take_released()))
        self.pool.clear(slot)


# AdapterPool attributes read by its users; none of them changes a pool
_POOL_READS = frozenset({"num_pages", "num_slots", "max_block", "max_rank", "max_adapters", "page_rank", "modules",
                         "device", "dtype", "nbytes"})


def worker_loop(runner: ModelRunner, pool: AdapterPool | None, tp: TensorParallel) -> None:
    """A worker rank (> 0): do rank 0's commands on this rank's shard until it says stop."""
    while True:
        command, *args = _receive(tp)
        try:
            if command == "run":
                chunks, all_logits, lora_projections, pending = args
                pending_tokens = None
                if pending:
                    pending_tokens = tp.broadcast(torch.empty(pending, dtype=torch.int64, device=runner.device))
                runner.run(chunks, all_logits=all_logits, pending_tokens=pending_tokens,
                           lora_projections=lora_projections)  # rank 0 keeps the logits
            elif command == "warm_up":
                runner.warm_up(args[0])
            elif command == "load":
                slot, unlink = args
                unlink_now(unlink)
                box = [None]
                dist.scatter_object_list(box, None, src=0, group=tp.commands)
                if isinstance(box[0], ShardMessage):
                    load_shared_shard(pool.load, slot, box[0])
                else:
                    pool.load(slot, box[0])
            elif command == "clear":
                slot, unlink = args
                unlink_now(unlink)
                pool.clear(slot)
            elif command == "stop":
                return
            else:
                raise RuntimeError(f"unknown tensor-parallel command {command!r}")
        except Exception:  # rank 0 met the same error on the same inputs; its engine reports it
            log.exception("tensor-parallel rank %d: %s failed", tp.rank, command)


def _send(tp: TensorParallel, command: tuple) -> None:
    dist.broadcast_object_list([command], src=0, group=tp.commands)


def _receive(tp: TensorParallel) -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=tp.commands)
    return box[0]
