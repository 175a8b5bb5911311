"""Triton fused LoRA for decode batches: y += scale * (x A^T) B^T in one launch.

Semantics are those of `lora_shrink_reference` followed by `lora_expand_reference`
(kernels/lora_reference.py):

    for t in range(T):
        s = token_slots[t]
        if s < 0: continue                                   # y[t] untouched
        for i in range(n_slices):                            # q, k, v side by side in y
            v = lora_a[i][s] @ x[t]                          # (R,), fp32
            y[t, cols_i] += scales[s, i] * (lora_b[i][s] @ v)

Why a third kernel. A decode batch moves few bytes per token (rank 8 on a 4096 -> 4096
projection: 64 KB of A, 64 KB of B), so the shrink+expand pair is bound by latency, not
bandwidth: two launches, each walking metadata -> token index -> data, the shrink's split-K
reduction, and v going through global memory between them (measured floor 4.5 us a pair on
the H200, with programmatic dependent launch). Here one program owns a tile of up to BLOCK_T
tokens that share an adapter and one span of BLOCK_N * N_SUB output columns of one slice: it
computes the tile's v over all of h_in (tensor cores, fp32 accumulation), keeps it in registers,
and adds v B^T to its span of y. Programs of the same tile and slice each compute v again: A is
read from DRAM once and from L2 by the others, which is cheap when the rank is small (the case
this kernel exists for) and is bounded by the span choice in `fused_config` when it is not.
B's first block is loaded before the K loop so that both weight streams are in flight together.

Prefill-like batches (an adapter with 64 or more tokens) keep the two kernels (SGMV tiles of 64
tokens; v would otherwise be recomputed per column span from the whole x tile); the dispatch
in kernels/__init__.py chooses.

Ranks, layout, dtypes and CUDA graphs are as in kernels/triton_shrink.py and triton_expand.py:
A (num_slots, max_rank, h_in) and B rank-major, rows masked to `r < slot_ranks[s, i]` so a
rank-8 adapter beside a rank-64 one reads rank-8 bytes; a slice with rank 0 is skipped
without touching y; max_rank <= 128; bf16/fp16/fp32 with fp32 accumulation (v is scaled, then
rounded to B's dtype for the tensor cores); the grid depends only on T, the slot count and
the configuration; no host synchronisation. With programmatic dependent launch (decode-sized
batches on sm_90+) a program reads the metadata, its slot's rank and scale and its first block
of B, then waits for the previous kernel (the base matmul that wrote y) before it reads x or y.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels.metadata import MAX_RANK_CHUNKS, MAX_SLICES, LoRABatchMeta, max_tiles
from kernels.triton_shrink import _check_meta, dot_in_fp32, gdc_launch_dependents, gdc_wait, num_sms, pdl_args


@triton.jit
def _fused_tile(
    x_ptr, a_ptr, y_ptr, b_ptr, scale, slot, rank, tok, row_ok, block, h_in, n_out, col0,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_yt, stride_yn, stride_bs, stride_bn, stride_br,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    N_SUB: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    slot64 = slot.to(tl.int64)
    offs_n = block * (BLOCK_N * N_SUB) + tl.arange(0, BLOCK_N)
    b_ptrs = b_ptr + slot64 * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
    # B belongs to the pool, never to the previous kernel: its first block may load before the wait
    b_tile = tl.load(b_ptrs, mask=r_ok[:, None] & (offs_n < n_out)[None, :], other=0.0)
    if USE_PDL:  # x and y below may be the previous kernel's
        gdc_wait()
        gdc_launch_dependents()

    # shrink: v = x_tile A^T over the whole of h_in, kept in registers
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk  # (BLOCK_T, BLOCK_K)
    a_ptrs = a_ptr + slot64 * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
    acc = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)
    for k0 in range(0, h_in, BLOCK_K):
        if EVEN_K:  # no mask along the contiguous axis keeps the loads 16 bytes wide
            x_tile = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            a_tile = tl.load(a_ptrs, mask=r_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + offs_k < h_in)[None, :]
            x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok, other=0.0)
            a_tile = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok, other=0.0)
        if DOT_FP32:
            acc = tl.dot(x_tile.to(tl.float32), tl.trans(a_tile.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile.to(a_tile.dtype), tl.trans(a_tile), acc)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    v = acc * scale
    if not DOT_FP32:
        v = v.to(b_ptr.dtype.element_ty)

    # expand: y[:, span] += v B^T, one BLOCK_N block at a time
    y_ptrs = y_ptr + tok[:, None] * stride_yt + (col0 + offs_n)[None, :] * stride_yn  # (BLOCK_T, BLOCK_N)
    for j in range(N_SUB):
        n_ok = (offs_n + j * BLOCK_N < n_out)[None, :]
        if j > 0:
            b_tile = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok, other=0.0)
        y_tile = tl.load(y_ptrs, mask=row_ok[:, None] & n_ok, other=0.0)
        if DOT_FP32:
            delta = tl.dot(v, b_tile.to(tl.float32), input_precision="ieee")
        else:
            delta = tl.dot(v, b_tile)
        tl.store(y_ptrs, (y_tile.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok)
        y_ptrs += BLOCK_N * stride_yn
        b_ptrs += BLOCK_N * stride_bn


@triton.jit
def _lora_fused_kernel(
    x_ptr, y_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr, scales_ptr, ranks_ptr, tiles_ptr, sorted_ptr,
    h_in, n0, n1, n2, max_rank,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_yt, stride_yn,
    stride_b0s, stride_b0n, stride_b0r, stride_b1s, stride_b1n, stride_b1r, stride_b2s, stride_b2n, stride_b2r,
    stride_ss, stride_si, stride_rs, stride_ri,
    N_SLICES: tl.constexpr, HAS_RANKS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, N_SUB: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    # axis 0: column spans (BLOCK_N * N_SUB wide) of slice 0, then 1, then 2; axis 1: tiles
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    if (count > 0) & (slot >= 0):
        span: tl.constexpr = BLOCK_N * N_SUB
        nb0 = tl.cdiv(n0, span)
        nb1 = tl.cdiv(n1, span)
        slice_id = (pid_n >= nb0).to(tl.int32) + (pid_n >= nb0 + nb1).to(tl.int32)
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + slot * stride_rs + slice_id * stride_ri)
        else:
            rank = max_rank + 0 * slot
        if rank > 0:  # rank 0: the adapter does not target this slice, y stays as it is
            scale = tl.load(scales_ptr + slot * stride_ss + slice_id * stride_si)
            rows = tl.arange(0, BLOCK_T)
            row_ok = rows < count
            tok = tl.load(sorted_ptr + start + rows, mask=row_ok, other=0)  # (BLOCK_T,) token indices
            # one branch per slice: each keeps its pointer's alignment facts for vectorised loads
            if slice_id == 0:
                _fused_tile(x_ptr, a0_ptr, y_ptr, b0_ptr, scale, slot, rank, tok, row_ok, pid_n, h_in, n0, 0,
                            stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_yt, stride_yn,
                            stride_b0s, stride_b0n, stride_b0r,
                            BLOCK_T, BLOCK_R, BLOCK_K, BLOCK_N, N_SUB, EVEN_K, DOT_FP32, USE_PDL)
            if N_SLICES > 1:
                if slice_id == 1:
                    _fused_tile(x_ptr, a1_ptr, y_ptr, b1_ptr, scale, slot, rank, tok, row_ok, pid_n - nb0, h_in,
                                n1, n0, stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_yt, stride_yn,
                                stride_b1s, stride_b1n, stride_b1r,
                                BLOCK_T, BLOCK_R, BLOCK_K, BLOCK_N, N_SUB, EVEN_K, DOT_FP32, USE_PDL)
            if N_SLICES > 2:
                if slice_id == 2:
                    _fused_tile(x_ptr, a2_ptr, y_ptr, b2_ptr, scale, slot, rank, tok, row_ok, pid_n - nb0 - nb1,
                                h_in, n2, n0 + n1, stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
                                stride_yt, stride_yn, stride_b2s, stride_b2n, stride_b2r,
                                BLOCK_T, BLOCK_R, BLOCK_K, BLOCK_N, N_SUB, EVEN_K, DOT_FP32, USE_PDL)


def fused_config(num_tokens: int, widths: Sequence[int], max_rank: int, meta: LoRABatchMeta, device) -> dict:
    """Launch configuration from static shapes and the metadata's host-side hints.

    The span of output columns per program is the lever: narrower spans put more programs in
    flight (decode is latency-bound) but re-read A from L2 once more per extra span, traffic
    that grows with the rank. So: the widest span (a power of two, capped at the widest slice)
    that still gives about two programs per multiprocessor, and at least 256 columns per 16
    rows of padded rank, so that high ranks, which move enough bytes anyway, stay wide.
    """
    block_r = max(16, triton.next_power_of_2(max_rank))
    tiles = max(1, meta.num_tiles_hint.get(16, num_tokens))
    widest = triton.next_power_of_2(max(widths))
    floor = min(widest, 256 * (block_r // 16))
    span = widest
    while span > floor and tiles * sum(triton.cdiv(w, span) for w in widths) < 2 * num_sms(device):
        span //= 2
    block_n = min(span, 256)
    return dict(BLOCK_T=16, BLOCK_R=block_r, BLOCK_K=256 if block_r <= 32 else 128, BLOCK_N=block_n,
                N_SUB=span // block_n, num_warps=4, num_stages=3)


def lora_shrink_expand(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: torch.Tensor,
    meta: LoRABatchMeta,
    *,
    slot_ranks: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y += scale * (x A^T) B^T per token and slice, in place, in one launch; see the module docstring."""
    n_slices = len(lora_a)
    num_tokens, h_in = x.shape
    num_slots, max_rank, a_in = lora_a[0].shape
    widths = [b.shape[1] for b in lora_b]
    if not 1 <= n_slices <= MAX_SLICES or len(lora_b) != n_slices:
        raise ValueError(f"1..{MAX_SLICES} slices, as many of A as of B, got {n_slices} and {len(lora_b)}")
    if a_in != h_in or any(a.shape != lora_a[0].shape or a.stride() != lora_a[0].stride() for a in lora_a):
        raise ValueError("every slice of lora_a must be (num_slots, max_rank, h_in) with the same strides")
    if y.dim() != 2 or y.shape != (num_tokens, sum(widths)):
        raise ValueError(f"y must be ({num_tokens}, {sum(widths)}), got {tuple(y.shape)}")
    if any(b.shape[0] != num_slots or b.shape[2] != max_rank or b.dtype != lora_a[0].dtype for b in lora_b):
        raise ValueError("every slice of lora_b must be (num_slots, h_out_i, max_rank) in lora_a's dtype")
    if scales.shape != (num_slots, n_slices) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be ({num_slots}, {n_slices}) float32")
    if slot_ranks is not None and slot_ranks.shape != (num_slots, n_slices):
        raise ValueError(f"slot_ranks must be ({num_slots}, {n_slices})")
    if max_rank > 16 * MAX_RANK_CHUNKS:
        raise ValueError(f"max_rank {max_rank} exceeds {16 * MAX_RANK_CHUNKS}")
    if any(t.device != y.device for t in (x, scales, *lora_a, *lora_b)):
        raise ValueError("y, x, lora_a, lora_b and scales must share one device")
    _check_meta(meta, num_tokens, y.device)
    if num_tokens == 0:
        return y

    cfg = dict(config or fused_config(num_tokens, widths, max_rank, meta, y.device))
    block_t = cfg.pop("BLOCK_T")
    cfg.setdefault("N_SUB", 1)
    span = cfg["BLOCK_N"] * cfg["N_SUB"]
    widths += [0] * (MAX_SLICES - n_slices)
    a = list(lora_a) + [lora_a[0]] * (MAX_SLICES - n_slices)
    b = list(lora_b) + [lora_b[0]] * (MAX_SLICES - n_slices)
    grid = (sum(triton.cdiv(n, span) for n in widths), max_tiles(num_tokens, num_slots, block_t))
    _lora_fused_kernel[grid](
        x, y, a[0], a[1], a[2], b[0], b[1], b[2], scales,
        slot_ranks if slot_ranks is not None else meta.packed, meta.tiles[block_t], meta.sorted_tokens,
        h_in, widths[0], widths[1], widths[2], max_rank,
        x.stride(0), x.stride(1), *lora_a[0].stride(), y.stride(0), y.stride(1),
        *(s for t in b for s in t.stride()), *scales.stride(),
        *(slot_ranks.stride() if slot_ranks is not None else (0, 0)),
        N_SLICES=n_slices, HAS_RANKS=slot_ranks is not None, BLOCK_T=block_t,
        EVEN_K=h_in % cfg["BLOCK_K"] == 0, DOT_FP32=dot_in_fp32(_lora_fused_kernel, lora_a[0].dtype),
        **pdl_args(_lora_fused_kernel, y.device, num_tokens), **cfg,
    )
    return y
