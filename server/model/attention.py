"""Attention over a flattened batch of sequences with a paged KV cache.

Each sequence contributes a run of query tokens (a prefill chunk or one decode token); those
are always the last tokens of its context, whose keys/values were just written to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from server.model.kv_cache import KVCache


@dataclass
class AttentionMeta:
    positions: torch.Tensor  # (T,) int32: position of each token within its sequence
    slot_mapping: torch.Tensor  # (T,) int32: flat KV cache slot of each token's key/value, -1 = padding
    query_starts: torch.Tensor  # (B+1,) int32: offsets of each sequence's tokens in the flat batch
    context_lens: torch.Tensor  # (B,) int32: keys visible to each sequence after this step
    block_tables: torch.Tensor  # (B, max_blocks) int32; entries past a sequence's blocks are stale
    max_query_len: int  # most tokens any sequence feeds this step (1: a decode batch)
    sliding_window: int | None = None
    # indices of the sequences with several query tokens, -1 padded; None: let the kernel look at every sequence
    prefill_seqs: torch.Tensor | None = None
    # host copies of query_starts / context_lens: the CPU path loops over sequences with them
    host_query_starts: list[int] | None = None
    host_context_lens: list[int] | None = None


def paged_attention(
    q: torch.Tensor, kv_cache: KVCache, layer: int, meta: AttentionMeta, scale: float
) -> torch.Tensor:
    """q (T, heads, head_dim) -> (T, heads, head_dim); keys/values already in the cache.

    On the GPU one Triton launch (kernels/triton_attention.py) serves the whole batch, prefill
    chunks and decodes alike; on the CPU, a decode batch is one padded SDPA call and anything
    else goes sequence by sequence through the kernel's PyTorch reference."""
    lens = meta.host_context_lens
    if not q.is_cuda and meta.max_query_len == 1 and lens is not None and meta.host_query_starts[-1] == len(lens):
        return _decode_attention(q, kv_cache, layer, meta, scale)
    return kernels.paged_attention(
        q, kv_cache.k[layer], kv_cache.v[layer], meta.block_tables, meta.query_starts, meta.context_lens,
        meta.max_query_len, scale, meta.sliding_window, prefill_seqs=meta.prefill_seqs,
    )


def _decode_attention(q, kv_cache: KVCache, layer: int, meta: AttentionMeta, scale: float) -> torch.Tensor:
    # One query per sequence: pad every sequence's keys to the longest and mask, so the whole
    # decode batch is a single attention call.
    max_len = max(meta.host_context_lens)
    num_blocks = -(-max_len // kv_cache.block_size)
    tables = meta.block_tables[:, :num_blocks].long()
    bsz = len(meta.host_context_lens)
    k = kv_cache.k[layer][tables].flatten(1, 2)[:, :max_len]  # (B, L, kv_heads, head_dim)
    v = kv_cache.v[layer][tables].flatten(1, 2)[:, :max_len]
    lens = meta.context_lens
    key_pos = torch.arange(max_len, device=q.device)
    mask = key_pos[None, :] < lens[:, None]  # (B, L)
    if meta.sliding_window is not None:
        mask &= key_pos[None, :] > (lens[:, None] - 1 - meta.sliding_window)
    heads, kv_heads = q.shape[1], k.shape[2]
    out = F.scaled_dot_product_attention(
        q.view(bsz, heads, 1, -1),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=heads != kv_heads,
    )  # (B, heads, 1, head_dim)
    return out.view(bsz, heads, -1)
