"""Each rank's shard of a LoRA adapter under tensor parallelism (server/model/tensor_parallel.py).

The adapter is parsed and validated once against the whole model, then every rank keeps the
part its shard of the model reads, following the base weights' split:

- column-parallel modules (q, k, v, gate, up): A whole, B's output rows (and DoRA's magnitude)
  as the rank's rows of the base weight;
- row-parallel modules (o, down): A's input columns as the rank's columns of the base weight, B
  and the magnitude whole (the shrink is all-reduced before the expand: server/model/llama.py).

Each rank then loads its shard into the same pool slot as every other rank: slot numbering,
pins and swap-ins are the one scheduler's decisions, so the pools stay identical in layout.
Adapters are small (rank x hidden per module), so the whole one is read and then cut.
"""

from __future__ import annotations

from dataclasses import replace

from server.lora.adapter import LoRAAdapter, LoRAModuleWeights
from server.model.tensor_parallel import ShardPlan


def shard_adapter(adapter: LoRAAdapter, plan: ShardPlan) -> LoRAAdapter:
    """The part of `adapter` that rank `plan.rank` holds: new contiguous tensors, unpacked."""
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
            lora_a.contiguous(), lora_b.contiguous(), m.scale, None if magnitude is None else magnitude.contiguous())
    return replace(adapter, modules=modules, buffer=None, layout=None, plans={})
