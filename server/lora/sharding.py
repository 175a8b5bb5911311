"""Each rank's shard of a LoRA adapter under tensor parallelism (server/model/tensor_parallel.py).

The adapter is parsed and validated once against the whole model, then every rank keeps the
part its shard of the model reads, following the base weights' split:

- column-parallel modules (q, k, v, gate, up): A whole, B's output rows (and DoRA's magnitude)
  as the rank's rows of the base weight;
- row-parallel modules (o, down): A's input columns as the rank's columns of the base weight, B
  and the magnitude whole (each rank expands its partial shrink into its partial output before the
  projection's one all-reduce: server/model/llama.py).

Each rank then loads its shard into the same pool slot as every other rank: slot numbering,
pins and swap-ins are the one scheduler's decisions, so the pools stay identical in layout.
Adapters are small (rank x hidden per module), so the whole one is read and then cut: rank 0's
adapter cache reads it (off the engine thread), cuts every rank's shard and keeps them together
as a `ShardedAdapter` in its host tier; a swap-in sends each worker its own shard
(server/engine/tp_driver.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from server.lora.adapter import LoRAAdapter, LoRAModuleWeights
from server.model.tensor_parallel import ShardPlan


def shard_adapter(adapter: LoRAAdapter, plan: ShardPlan) -> LoRAAdapter:
    """The part of `adapter` that rank `plan.rank` holds: new contiguous tensors of their own
    (none a view of the adapter's packed buffer, so a shard pickles as its own bytes), unpacked."""
    if plan.world_size == 1:
        return adapter
    modules = {}
    for (layer, module), m in adapter.modules.items():
        rows, cols = plan.rows(module), plan.cols(module)
        lora_a, lora_b, magnitude = m.lora_a, m.lora_b, m.magnitude
        if rows is not None:
            lora_b = lora_b[rows]
            magnitude = None if magnitude is None else magnitude[rows]
        elif cols is not None:
            lora_a = lora_a[:, cols]
        modules[(layer, module)] = LoRAModuleWeights(
            _own(lora_a), _own(lora_b), m.scale, None if magnitude is None else _own(magnitude))
    return replace(adapter, modules=modules, buffer=None, layout=None, plans={})


def _own(tensor):
    return tensor.clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class ShardedAdapter:
    """Every rank's shard of one adapter, rank by rank (what a tensor-parallel pool loads)."""

    shards: tuple[LoRAAdapter, ...]

    @property
    def rank(self) -> int:  # the adapter's (LoRA) rank: its pages in the pool
        return self.shards[0].rank

    @property
    def use_dora(self) -> bool:
        return self.shards[0].use_dora

    @property
    def nbytes(self) -> int:
        """Host bytes of all the shards (A of column-parallel modules is in every one)."""
        return sum(s.nbytes for s in self.shards)


def shard_for_every_rank(adapter: LoRAAdapter, plans: list[ShardPlan]) -> ShardedAdapter:
    """Each plan's (rank's) shard of `adapter`, in the order of `plans`."""
    return ShardedAdapter(tuple(shard_adapter(adapter, plan) for plan in plans))
