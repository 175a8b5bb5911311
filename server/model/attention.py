"""Attention over a flattened batch of sequences with a paged KV cache (PyTorch reference).

Each sequence contributes a run of query tokens (a prefill chunk or one decode token); those
are always the last tokens of its context, whose keys/values were just written to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model.kv_cache import KVCache


@dataclass
class AttentionMeta:
    positions: torch.Tensor  # (T,) int64: position of each token within its sequence
    slot_mapping: torch.Tensor  # (T,) int64: flat KV cache slot for each token's key/value
    query_starts: list[int]  # (B+1,) offsets of each sequence's tokens in the flat batch
    context_lens: list[int]  # (B,) keys visible to each sequence after this step
    block_tables: torch.Tensor  # (B, max_blocks) int64, padded with 0
    context_lens_tensor: torch.Tensor  # (B,) int64: context_lens on the device, built once per step
    sliding_window: int | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.query_starts[-1] == self.num_seqs


def paged_attention(
    q: torch.Tensor, kv_cache: KVCache, layer: int, meta: AttentionMeta, scale: float
) -> torch.Tensor:
    """q (T, heads, head_dim) -> (T, heads, head_dim); keys/values already in the cache."""
    if meta.is_decode_only:
        return _decode_attention(q, kv_cache, layer, meta, scale)
    out = torch.empty_like(q)
    for i in range(meta.num_seqs):
        start, end = meta.query_starts[i], meta.query_starts[i + 1]
        length = meta.context_lens[i]
        k, v = kv_cache.gather(layer, meta.block_tables[i], length)
        q_pos = torch.arange(length - (end - start), length, device=q.device)
        mask = _causal_mask(q_pos, torch.arange(length, device=q.device), meta.sliding_window)
        out[start:end] = _sdpa(q[start:end], k, v, mask, scale)
    return out


def _decode_attention(q, kv_cache: KVCache, layer: int, meta: AttentionMeta, scale: float) -> torch.Tensor:
    # One query per sequence: pad every sequence's keys to the longest and mask, so the whole
    # decode batch is a single attention call.
    max_len = max(meta.context_lens)
    num_blocks = -(-max_len // kv_cache.block_size)
    tables = meta.block_tables[:, :num_blocks]
    bsz = meta.num_seqs
    k = kv_cache.k[layer][tables].flatten(1, 2)[:, :max_len]  # (B, L, kv_heads, head_dim)
    v = kv_cache.v[layer][tables].flatten(1, 2)[:, :max_len]
    lens = meta.context_lens_tensor
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


def _causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > (q_pos[:, None] - window)
    return mask


def _sdpa(q, k, v, mask, scale) -> torch.Tensor:
    # (n, heads, d) x (L, kv_heads, d) -> (n, heads, d)
    heads, kv_heads = q.shape[1], k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=mask[None], scale=scale, enable_gqa=heads != kv_heads,
    )
    return out.transpose(0, 1)
