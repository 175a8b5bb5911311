"""Writing a step's keys and values into the paged KV cache: one launch for both.

    for t in range(T):
        s = slot_mapping[t]
        if s < 0: continue               # a padding token of a captured batch: writes nothing
        k_cache.flat[s] = k[t]           # (kv_heads, head_dim)
        v_cache.flat[s] = v[t]

`k_cache` / `v_cache` are one layer's (num_blocks, block_size, kv_heads, head_dim) storage;
slot s is block s // block_size, offset s % block_size. k and v may be strided views (v
comes straight out of the fused qkv projection). The plain-PyTorch twin is
`write_kv_reference` in kernels/attention_reference.py; the grid depends only on T, so the
write can be graph-captured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k, v (T, kv_heads, head_dim) into one layer's caches at flat slots (T,) int32/int64; -1 skips."""
    num_tokens, kv_heads, head_dim = k.shape
    if v.shape != k.shape or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping {tuple(slot_mapping.shape)} disagree")
    if k_cache.shape[2:] != (kv_heads, head_dim) or k_cache.dtype != k.dtype or v_cache.shape != k_cache.shape:
        raise ValueError("the caches do not match k and v in heads, head_dim or dtype")
    if k.stride(2) != 1 or v.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("head_dim must be the contiguous dimension, and the caches contiguous")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), kv_heads * head_dim, head_dim,
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4 if kv_heads * head_dim >= 2048 else 1,
    )
