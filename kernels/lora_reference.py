"""Plain-PyTorch LoRA shrink/expand: the test oracle and the CPU path.

Slot layout shared with the Triton kernels: for a (possibly fused) projection with
`n_slices` output slices, `lora_a[i]` is `(num_slots, max_rank, h_in)` and `lora_b[i]` is
`(num_slots, h_out_i, max_rank)`. With `slot_ranks` ((num_slots, n_slices) int32: slot s's
rank on slice i, 0 = not targeted) only each slot's first rank rows of A (columns of B) are
read, as the kernels do: the rows past them may hold another adapter's (the device pool's
slots overlap, server/lora/pool.py). Without it, every slot counts as max_rank, which is exact
where smaller adapters are zero-padded. `scales[s, i]` is alpha/r (or alpha/sqrt(r)) of slot s
on slice i.
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
    slot_ranks: torch.Tensor | None = None,
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
    ranks = _ranks(slot_ranks, len(lora_a), max_rank)
    for slot, token_idx in meta.groups():
        xs = x.index_select(0, token_idx).float()  # (n, h_in)
        for i, a in enumerate(lora_a):
            r = ranks(slot, i)
            rows = out[i].index_select(0, token_idx)
            rows[:, :r] = xs @ a[slot, :r].float().t()
            out[i].index_copy_(0, token_idx, rows)
    return out


def lora_expand_reference(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    scales: torch.Tensor,
    meta: LoRABatchMeta,
    slot_ranks: torch.Tensor | None = None,
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
    ranks = _ranks(slot_ranks, len(lora_b), lora_b[0].shape[2])
    for slot, token_idx in meta.groups():
        offset = 0
        for i, b in enumerate(lora_b):
            h_out, r = b.shape[1], ranks(slot, i)
            delta = (v[i].index_select(0, token_idx)[:, :r] @ b[slot, :, :r].float().t()) * scales[slot, i].float()
            rows = y.index_select(0, token_idx)
            rows[:, offset : offset + h_out] += delta.to(y.dtype)
            y.index_copy_(0, token_idx, rows)
            offset += h_out
    return y


def _ranks(slot_ranks: torch.Tensor | None, n_slices: int, max_rank: int):
    """(slot, slice) -> rank to read: from `slot_ranks` (read once, on the host), else max_rank."""
    if slot_ranks is None:
        return lambda slot, i: max_rank
    table = slot_ranks.tolist()
    return lambda slot, i: min(table[slot][i], max_rank)
