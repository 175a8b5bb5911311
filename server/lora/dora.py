"""DoRA's per-output-channel factor, as peft's `DoraLinearLayer` computes it.

A DoRA adapter (peft `use_dora=True`) keeps LoRA's A, B and scale s and adds a magnitude vector
m (out,). For a linear with base weight W (out, in) and bias b, peft's forward is

    y = (m / ||W + s B A||_row) * (x W^T + s x A^T B^T) + b

with the row norm (over the input features, one per output channel) treated as a constant: it
depends on the adapter and the base weight only. So it is computed once per module when the
adapter is loaded (the adapter pool, on its device) or merged (server/lora/merge.py), and the
step only multiplies each DoRA token's projection output, bias excluded, by its slot's factor
(kernels.dora_scale). The bias stays outside the factor, as in peft.
"""

from __future__ import annotations

from typing import Callable

import torch


def dora_factor(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                magnitude: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """m / ||W + s B A||_row in float32, on the tensors' device: (out,).

    weight (out, in), lora_a (r, in), lora_b (out, r), magnitude (out,); any float dtypes (the
    sum is formed in float32, so a bf16 base is not rounded again before the norm).
    `all_reduce`: the module is row-parallel (server/model/tensor_parallel.py), weight and lora_a
    hold this rank's input columns only, so the squared row norms are summed over the group."""
    merged = merged_weight(weight, lora_a, lora_b, scale)
    if all_reduce is None:
        return factor_of_merged(merged, magnitude)
    return magnitude.float() / all_reduce(merged.square().sum(dim=1)).sqrt()


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s B A in float32: (out, in)."""
    return weight.float() + scale * (lora_b.float() @ lora_a.float())


def factor_of_merged(merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m / ||W + s B A||_row from the float32 W + s B A (`merged_weight`): (out,)."""
    return magnitude.float() / torch.linalg.vector_norm(merged, dim=1)
