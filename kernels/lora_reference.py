"""Plain-PyTorch LoRA shrink/expand: the test oracle and the CPU path.

Slot layout shared with the Triton kernels: for a (possibly fused) projection with
`n_slices` output slices, `lora_a[i]` is `(num_slots, max_rank, h_in)` and `lora_b[i]` is
`(num_slots, h_out_i, max_rank)`; an adapter of smaller rank leaves its extra rows of A
and columns of B zero, and a slot that does not target slice i has zeros there, so the
padded maths is exact. `scales[s, i]` is alpha/r (or alpha/sqrt(r)) of slot s on slice i.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kernels.metadata import LoRABatchMeta


def lora_shrink_reference(
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    meta: LoRABatchMeta,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """v = x A^T per token, for each slice, into an fp32 buffer.

        for t in range(T):
            s = token_slots[t]
            if s < 0: continue                    # out[:, t] stays zero
            for i in range(n_slices):
                out[i, t, :] = lora_a[i][s] @ x[t]  # (R, h_in) @ (h_in,) -> (R,)

    x: (T, h_in); returns out: (n_slices, T, max_rank) float32.
    """
    num_tokens = x.shape[0]
    max_rank = lora_a[0].shape[1]
    if out is None:
        out = torch.zeros(len(lora_a), num_tokens, max_rank, dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    for slot, token_idx in meta.groups():
        xs = x.index_select(0, token_idx).float()  # (n, h_in)
        for i, a in enumerate(lora_a):
            out[i].index_copy_(0, token_idx, xs @ a[slot].float().t())
    return out


def lora_expand_reference(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    scales: torch.Tensor,
    meta: LoRABatchMeta,
) -> torch.Tensor:
    """y += scale * v B^T per token and slice, in place; slices sit side by side in y.

        for t in range(T):
            s = token_slots[t]
            if s < 0: continue                    # y[t] untouched
            offset = 0
            for i in range(n_slices):
                h = lora_b[i].shape[1]
                y[t, offset:offset + h] += scales[s, i] * (lora_b[i][s] @ v[i, t])
                offset += h

    y: (T, sum_i h_out_i) in the model dtype; v: (n_slices, T, max_rank) float32.
    """
    for slot, token_idx in meta.groups():
        offset = 0
        for i, b in enumerate(lora_b):
            h_out = b.shape[1]
            delta = (v[i].index_select(0, token_idx) @ b[slot].float().t()) * scales[slot, i].float()
            rows = y.index_select(0, token_idx)
            rows[:, offset : offset + h_out] += delta.to(y.dtype)
            y.index_copy_(0, token_idx, rows)
            offset += h_out
    return y
