"""Plain-PyTorch paged attention and KV write: the test oracles and the CPU paths of
kernels/triton_attention.py and kernels/triton_kv_write.py.

Layout shared with the Triton kernel. The flat batch q (T, num_heads, head_dim) holds each
sequence's query tokens side by side: sequence i owns rows query_starts[i]:query_starts[i+1],
and they are the last tokens of its context of context_lens[i] keys, whose keys/values are
already in the cache. One layer's cache is (num_blocks, block_size, num_kv_heads, head_dim);
key position p of sequence i lives in page block_tables[i, p // block_size], row
p % block_size. Query head h reads kv head h // G, G = num_heads // num_kv_heads (GQA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of every sequence's query tokens.

        for i in range(B):
            n, L = query_starts[i+1] - query_starts[i], context_lens[i]
            for j in range(n):                          # n == 0: a padding sequence, nothing
                t, pos = query_starts[i] + j, L - n + j   # row of q, position in the sequence
                keys = [p for p in range(L) if p <= pos and (w is None or p > pos - w)]
                for h in range(num_heads):
                    K = [k_cache[block_tables[i, p // bs], p % bs, h // G] for p in keys]  # same for V
                    out[t, h] = softmax(scale * K @ q[t, h]) @ V

    Rows of q that belong to no sequence leave out untouched. Computes in fp32, one cast to q's
    dtype at the end. Reads query_starts / context_lens on the host (a sync; not graph-safe).
    Returns out (T, num_heads, head_dim), allocated when None.
    """
    check_attention_args(q, k_cache, v_cache, block_tables, query_starts, context_lens, max_query_len,
                         sliding_window, out)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_size = k_cache.shape[1]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    starts, lens = query_starts.tolist(), context_lens.tolist()
    for i, length in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        n = end - start
        if n == 0:
            continue
        if not 0 < n <= min(max_query_len, length):
            raise ValueError(f"sequence {i}: {n} query tokens, max_query_len {max_query_len}, context {length}")
        pages = block_tables[i, : -(-length // block_size)].long()
        k = k_cache.index_select(0, pages).flatten(0, 1)[:length].float()  # (L, kv_heads, head_dim)
        v = v_cache.index_select(0, pages).flatten(0, 1)[:length].float()
        q_pos = torch.arange(length - n, length, device=q.device)
        k_pos = torch.arange(length, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # (n, L)
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        o = F.scaled_dot_product_attention(
            q[start:end].float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask[None], scale=scale, enable_gqa=num_heads != num_kv_heads,
        )  # (heads, n, head_dim)
        out[start:end] = o.transpose(0, 1).to(out.dtype)
    return out


def check_attention_args(q, k_cache, v_cache, block_tables, query_starts, context_lens, max_query_len,
                         sliding_window, out) -> None:
    """Raise ValueError unless the arguments fit together (shapes, dtypes, devices only: no sync)."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("q must be (T, num_heads, head_dim), the caches (num_blocks, block_size, num_kv_heads, "
                         "head_dim)")
    num_heads, head_dim = q.shape[1:]
    if v_cache.shape != k_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match, "
                         f"head_dim {head_dim}")
    if num_heads % k_cache.shape[2] != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if q.dtype not in floats or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache must share one float dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    num_seqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or query_starts.shape != (num_seqs + 1,):
        raise ValueError("need block_tables (B, max_blocks), query_starts (B+1,), context_lens (B,)")
    for name, t in (("block_tables", block_tables), ("query_starts", query_starts), ("context_lens", context_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if any(t.device != q.device for t in (k_cache, v_cache, block_tables, query_starts, context_lens)):
        raise ValueError("every tensor must be on q's device")
    if max_query_len < 0 or (sliding_window is not None and sliding_window < 1):
        raise ValueError(f"max_query_len {max_query_len} must be >= 0 and sliding_window >= 1 or None")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")


def write_kv_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> None:
    """k_cache.flat[slot_mapping[t]] = k[t] (and v) for every token t with a slot >= 0: the plain-PyTorch
    twin of kernels/triton_kv_write.py (the CPU path)."""
    keep = slot_mapping >= 0
    slots = slot_mapping.long()
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)
