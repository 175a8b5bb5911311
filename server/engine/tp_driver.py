"""Rank 0 drives a tensor-parallel group; the other ranks only run the model.

The scheduler, the API and the adapter cache stay single, on rank 0. Whatever touches the model
goes through `TPDriver` there: it sends each command to the workers, then does the same on its
own shard, so every rank runs the same step and holds the same adapter in the same pool slot.
Workers sit in `worker_loop`, doing what they receive until `stop`:

    run(chunks, all_logits, lora_projections) -> rank 0's logits (every rank computes the same)
    load_adapter(slot, adapter)   the whole adapter travels; each rank loads its own shard of it
                                  (server/lora/sharding.py) into the slot rank 0's cache chose
    clear_adapter(slot)
    stop()

Commands are pickled Python objects broadcast from rank 0 over `group` (on GPUs it should be a
gloo group beside NCCL's, so that commands never touch a device): a step's chunks are a few
kilobytes; adapter tensors travel only when one is loaded.

Not yet: the engine does not use this (no `loraplex serve --tensor-parallel-size` wiring); steps
with pending tokens (asynchronous scheduling reads them from rank 0's device) are refused, so a
group runs synchronous steps; workers do not capture CUDA graphs; a worker that fails leaves rank
0 waiting in its next collective until the group's timeout.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from server.lora.adapter import LoRAAdapter, LoRAModuleWeights
from server.lora.pool import AdapterPool
from server.lora.sharding import shard_adapter
from server.model.runner import ModelRunner, SequenceChunk


class TPDriver:
    """Rank 0's handle on the group: ModelRunner's `run` and AdapterPool's `load`/`clear`, on every rank."""

    def __init__(self, runner: ModelRunner, pool: AdapterPool | None, group=None):
        model = runner.model
        if model.tp is None or model.tp.rank != 0:
            raise ValueError("TPDriver runs on rank 0 of a tensor-parallel model")
        self.runner, self.pool, self.group = runner, pool, group
        self._plan = model.tp.plan(model.config)

    def run(self, chunks: list[SequenceChunk], all_logits: bool = False, pending_tokens: torch.Tensor | None = None,
            lora_projections: frozenset | None = None) -> torch.Tensor:
        if pending_tokens is not None or any(c.pending_row >= 0 for c in chunks):
            raise NotImplementedError("pending tokens (asynchronous scheduling) under tensor parallelism")
        _broadcast(("run", chunks, all_logits, lora_projections), self.group)
        return self.runner.run(chunks, all_logits=all_logits, lora_projections=lora_projections)

    def load_adapter(self, slot: int, adapter: LoRAAdapter) -> None:
        """`adapter`: the whole one, as parsed against the whole model."""
        _broadcast(("load", slot, _portable(adapter)), self.group)
        self.pool.load(slot, shard_adapter(adapter, self._plan))

    def clear_adapter(self, slot: int) -> None:
        _broadcast(("clear", slot), self.group)
        self.pool.clear(slot)

    def stop(self) -> None:
        _broadcast(("stop",), self.group)


def worker_loop(runner: ModelRunner, pool: AdapterPool | None, group=None) -> None:
    """A worker rank (> 0): do rank 0's commands on this rank's shard until it says stop."""
    model = runner.model
    plan = model.tp.plan(model.config)
    while True:
        command, *args = _broadcast(None, group)
        if command == "run":
            chunks, all_logits, lora_projections = args
            runner.run(chunks, all_logits=all_logits, lora_projections=lora_projections)  # rank 0 keeps the logits
        elif command == "load":
            slot, adapter = args
            pool.load(slot, shard_adapter(adapter, plan))
        elif command == "clear":
            pool.clear(args[0])
        elif command == "stop":
            return
        else:
            raise RuntimeError(f"unknown tensor-parallel command {command!r}")


def _broadcast(command: tuple | None, group) -> tuple:
    """Rank 0 sends `command`; every other rank returns what it sent."""
    box = [command]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _portable(adapter: LoRAAdapter) -> LoRAAdapter:
    """The adapter as plain CPU tensors (no packed buffer, no pool plans) for pickling."""
    modules = {key: LoRAModuleWeights(m.lora_a.cpu().contiguous(), m.lora_b.cpu().contiguous(), m.scale,
                                      None if m.magnitude is None else m.magnitude.cpu())
               for key, m in adapter.modules.items()}
    return replace(adapter, modules=modules, buffer=None, layout=None, plans={})
