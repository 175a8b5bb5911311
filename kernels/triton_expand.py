"""Triton LoRA expand: y[t, slice i] += scale[s_t, i] * B_i[s_t] v[i, t], in place.

Semantics are those of `lora_expand_reference` (kernels/lora_reference.py):

    for t in range(T):
        s = token_slots[t]
        if s < 0: continue                          # y[t] untouched
        for i in range(n_slices):                   # slices side by side in y
            y[t, off_i:off_i + h_i] += scales[s, i] * (lora_b[i][s] @ v[i, t])

A program owns one tile of up to BLOCK_T tokens that share an adapter (from the per-step
metadata, kernels/metadata.py) and N_SUB consecutive BLOCK_N-wide blocks of output columns,
which it walks in a loop (the tile's metadata is read once; the next block's loads overlap
this one's). The blocks of all fused slices (q, k, v of different widths under GQA; gate,
up) are numbered one after the other along grid axis 0, so a fused projection is one launch.
For each block the program reads B once for the whole tile, `tl.dot`s it with the tile's v
(fp32 accumulation), then reads, adds to and writes y once, with a single cast. Decode (one
token per tile when every sequence has its own adapter) is a bandwidth-bound read of B;
prefill streams y.

Pool layout and ranks. `lora_b[i]` is (num_slots, h_out_i, max_rank), padded to max_rank
with zeros (memory stays padded for now). Any strides are accepted, and the layout we
recommend for the pool is rank-major: allocate (num_slots, max_rank, h_out_i) and pass
`.transpose(1, 2)`. Then the `rank` rows a program reads (masked to `r < slot_ranks[s, i]`)
are contiguous runs of h_out elements and a rank-8 adapter beside rank-64 ones costs rank-8
bytes; with the plain (h_out, max_rank) layout each row of B is a 2*max_rank-byte run of which
only 2*rank bytes are used, and memory sectors of 32 bytes round that up (rank 8 at max_rank
64 costs twice its bytes). `slot_ranks` is optional (default: every slot at max_rank, exact by
the zero padding). Rank 0 (a slice the adapter does not target) reads no B and adds nothing
(the block of y is rewritten as it was). Supported: max_rank <= 128, up to 3 slices,
bf16/fp16/fp32; v is rounded to B's dtype for the tensor cores (fp32 pools stay in fp32).

CUDA graphs: the grid depends only on T, the slot count, the widths and the configuration.

Launch latency: decode-sized batches are launched with programmatic dependent launch where
available (see kernels/triton_shrink.py); a program reads the metadata, slot rank, scale and,
in the decode configuration (one column block, one rank chunk), its block of B before it waits
for the previous kernel (the shrink that writes v); y and v are read after the wait.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels.triton_shrink import PDL_MAX_TOKENS, _check_meta, dot_in_fp32, gdc_launch_dependents, gdc_wait, pdl_args
from kernels.metadata import MAX_RANK_CHUNKS, MAX_SLICES, LoRABatchMeta, max_tiles


@triton.jit
def _expand_tile(
    y_ptr, v_ptr, b_ptr, scale, slot, rank, tok, row_ok, block, n_out, col0,
    stride_yt, stride_yn, stride_vt, stride_vr, stride_bs, stride_bn, stride_br,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, N_SUB: tl.constexpr,
    SINGLE_R: tl.constexpr, EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = block * (BLOCK_N * N_SUB) + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + tok[:, None] * stride_yt + (col0 + offs_n)[None, :] * stride_yn  # (BLOCK_T, BLOCK_N)
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
    v_ptrs = v_ptr + tok[:, None] * stride_vt + offs_r[None, :] * stride_vr  # (BLOCK_T, BLOCK_R)
    if SINGLE_R:  # the whole rank in one chunk: v is read once and the loop below is innermost
        r_ok = offs_r < rank
        if USE_PDL and N_SUB == 1:  # B is the adapter's, never the previous kernel's: load it first
            if EVEN_N:
                b_first = tl.load(b_ptrs, mask=r_ok[:, None], other=0.0)
            else:
                b_first = tl.load(b_ptrs, mask=r_ok[:, None] & (offs_n < n_out)[None, :], other=0.0)
    if USE_PDL:  # y and v below may be the previous kernel's
        gdc_wait()
        gdc_launch_dependents()
    if SINGLE_R:
        v_tile = tl.load(v_ptrs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # fp32
        if not DOT_FP32:
            v_tile = v_tile.to(b_ptr.dtype.element_ty)
    # N_SUB column blocks, unrolled: the tile's metadata is paid for once, and each block's y
    # (and B) loads are issued before the block before it is added and stored, by hand, since
    # Triton's pipeliner only overlaps the loads that feed a tl.dot inside a loop
    y_next = tl.load(y_ptrs, mask=row_ok[:, None] & _cols_ok(offs_n, n_out, EVEN_N), other=0.0)
    if SINGLE_R:
        if USE_PDL and N_SUB == 1:
            b_next = b_first
        else:
            b_next = tl.load(b_ptrs, mask=r_ok[:, None] & _cols_ok(offs_n, n_out, EVEN_N), other=0.0)
    for j in tl.static_range(N_SUB):
        n_ok = _cols_ok(offs_n + j * BLOCK_N, n_out, EVEN_N)
        y_tile = y_next
        if SINGLE_R:
            b_tile = b_next
        if j + 1 < N_SUB:
            n_ok_next = _cols_ok(offs_n + (j + 1) * BLOCK_N, n_out, EVEN_N)
            y_next = tl.load(y_ptrs + BLOCK_N * stride_yn, mask=row_ok[:, None] & n_ok_next, other=0.0)
            if SINGLE_R:
                b_next = tl.load(b_ptrs + BLOCK_N * stride_bn, mask=r_ok[:, None] & n_ok_next, other=0.0)
        if SINGLE_R:
            if DOT_FP32:
                acc = tl.dot(v_tile, b_tile.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(v_tile, b_tile)
        else:
            acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
            for r0 in range(0, rank, BLOCK_R):
                r_ok = offs_r < rank - r0
                v_tile = tl.load(v_ptrs + r0 * stride_vr, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                b_tile = tl.load(b_ptrs + r0 * stride_br, mask=r_ok[:, None] & n_ok, other=0.0)
                if DOT_FP32:
                    acc = tl.dot(v_tile, b_tile.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(v_tile.to(b_tile.dtype), b_tile, acc)
        out = y_tile.to(tl.float32) + acc * scale
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok)
        y_ptrs += BLOCK_N * stride_yn
        b_ptrs += BLOCK_N * stride_bn


@triton.jit
def _cols_ok(cols, n_out, EVEN_N: tl.constexpr):
    """(1, BLOCK_N) mask of the columns inside the slice; all-true when every span divides it,
    which keeps the loads along the contiguous axis unmasked and 16 bytes wide."""
    if EVEN_N:
        return tl.full((1, cols.shape[0]), 1, tl.int1)
    return (cols < n_out)[None, :]


@triton.jit
def _lora_expand_kernel(
    y_ptr, v_ptr, b0_ptr, b1_ptr, b2_ptr, scales_ptr, ranks_ptr, tiles_ptr, sorted_ptr,
    n0, n1, n2, max_rank,
    stride_yt, stride_yn, stride_vi, stride_vt, stride_vr,
    stride_b0s, stride_b0n, stride_b0r, stride_b1s, stride_b1n, stride_b1r, stride_b2s, stride_b2n, stride_b2r,
    stride_ss, stride_si, stride_rs, stride_ri,
    N_SLICES: tl.constexpr, HAS_RANKS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, N_SUB: tl.constexpr,
    SINGLE_R: tl.constexpr, EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    # axis 0: column blocks (BLOCK_N * N_SUB wide) of slice 0, then 1, then 2; axis 1: tiles
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    if (count > 0) & (slot >= 0):
        rows = tl.arange(0, BLOCK_T)
        row_ok = rows < count
        tok = tl.load(sorted_ptr + start + rows, mask=row_ok, other=0)  # (BLOCK_T,) token indices
        nb0 = tl.cdiv(n0, BLOCK_N * N_SUB)
        nb1 = tl.cdiv(n1, BLOCK_N * N_SUB)
        slice_id = (pid_n >= nb0).to(tl.int32) + (pid_n >= nb0 + nb1).to(tl.int32)
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + slot * stride_rs + slice_id * stride_ri)
        else:
            rank = max_rank + 0 * slot
        scale = tl.load(scales_ptr + slot * stride_ss + slice_id * stride_si)
        v_i = v_ptr + slice_id * stride_vi
        # one branch per slice: each keeps its pointer's alignment facts for vectorised loads
        if slice_id == 0:
            _expand_tile(y_ptr, v_i, b0_ptr, scale, slot, rank, tok, row_ok, pid_n, n0, 0,
                         stride_yt, stride_yn, stride_vt, stride_vr, stride_b0s, stride_b0n, stride_b0r,
                         BLOCK_T, BLOCK_N, BLOCK_R, N_SUB, SINGLE_R, EVEN_N, DOT_FP32, USE_PDL)
        if N_SLICES > 1:
            if slice_id == 1:
                _expand_tile(y_ptr, v_i, b1_ptr, scale, slot, rank, tok, row_ok, pid_n - nb0, n1, n0,
                             stride_yt, stride_yn, stride_vt, stride_vr, stride_b1s, stride_b1n, stride_b1r,
                             BLOCK_T, BLOCK_N, BLOCK_R, N_SUB, SINGLE_R, EVEN_N, DOT_FP32, USE_PDL)
        if N_SLICES > 2:
            if slice_id == 2:
                _expand_tile(y_ptr, v_i, b2_ptr, scale, slot, rank, tok, row_ok, pid_n - nb0 - nb1, n2,
                             n0 + n1, stride_yt, stride_yn, stride_vt, stride_vr, stride_b2s, stride_b2n,
                             stride_b2r, BLOCK_T, BLOCK_N, BLOCK_R, N_SUB, SINGLE_R, EVEN_N, DOT_FP32, USE_PDL)


def expand_config(num_tokens: int, max_rank: int, meta: LoRABatchMeta) -> dict:
    """Launch configuration from static shapes and the metadata's host-side hints.

    Tuned on the H200 (loadtest/results/kernel_tune_h200.json, then kernel_tune_prefetch_h200.json
    once a program prefetched its next column block): decode-like batches take 16-token tiles, one
    block of 256 columns per program up to PDL_MAX_TOKENS tokens (B's first block then loads before
    the PDL wait) and 4 blocks of 128 above (5-9% faster at T = 256; one-token GEMV tiles, as the
    shrink takes, measured no better here: kernel_tune_gemv_h200.json); prefill-like
    ones walk 8 blocks, of 128 with 16-token tiles while the rank is at most 32, and of 64 with
    64-token tiles above, where re-reading B for every 16 tokens cost more than the smaller grid
    (rank 64: 35.7 -> 32.3 us on o, 50.0 -> 45.6 us on mixed q/k/v; rank 16: 21.0 -> 29.4 us, so
    not there). One rank chunk covers ranks up to 64, so all of a block's B rows are loaded at
    once; rows past a slot's rank are masked and cost no memory traffic.
    """
    r_chunk = min(64, max(16, triton.next_power_of_2(max_rank)))
    if meta.max_group_tokens >= 64:
        if r_chunk >= 64:
            return dict(BLOCK_T=64, BLOCK_N=64, N_SUB=8, BLOCK_R=r_chunk, num_warps=4, num_stages=1)
        return dict(BLOCK_T=16, BLOCK_N=128, N_SUB=8, BLOCK_R=r_chunk, num_warps=4, num_stages=1)
    if num_tokens <= PDL_MAX_TOKENS:  # B's first block loads before the PDL wait only when N_SUB is 1
        return dict(BLOCK_T=16, BLOCK_N=256, N_SUB=1, BLOCK_R=r_chunk, num_warps=4, num_stages=1)
    return dict(BLOCK_T=16, BLOCK_N=128, N_SUB=4, BLOCK_R=r_chunk, num_warps=4, num_stages=1)


def lora_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    scales: torch.Tensor,
    meta: LoRABatchMeta,
    *,
    slot_ranks: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y += scale * v B^T per token and slice, in place; see the module docstring."""
    check_expand_args(y, lora_b, scales, meta, slot_ranks)
    n_slices = len(lora_b)
    num_tokens = y.shape[0]
    num_slots, _, max_rank = lora_b[0].shape
    widths = [b.shape[1] for b in lora_b]
    if v.shape != (n_slices, num_tokens, max_rank) or v.dtype != torch.float32 or v.device != y.device:
        raise ValueError(f"v must be ({n_slices}, {num_tokens}, {max_rank}) float32 on y's device")
    if num_tokens == 0:
        return y

    cfg = dict(config or expand_config(num_tokens, max_rank, meta))
    block_t = cfg.pop("BLOCK_T")
    widths += [0] * (MAX_SLICES - n_slices)
    b = list(lora_b) + [lora_b[0]] * (MAX_SLICES - n_slices)
    b_strides = [s for t in b for s in t.stride()]
    cfg.setdefault("N_SUB", 1)
    span = cfg["BLOCK_N"] * cfg["N_SUB"]
    blocks = sum(triton.cdiv(n, span) for n in widths)
    grid = (blocks, max_tiles(num_tokens, num_slots, block_t))
    _lora_expand_kernel[grid](
        y, v, b[0], b[1], b[2], scales, slot_ranks if slot_ranks is not None else meta.packed,
        meta.tiles[block_t], meta.sorted_tokens,
        widths[0], widths[1], widths[2], max_rank,
        y.stride(0), y.stride(1), *v.stride(), *b_strides, *scales.stride(),
        *(slot_ranks.stride() if slot_ranks is not None else (0, 0)),
        N_SLICES=n_slices, HAS_RANKS=slot_ranks is not None, BLOCK_T=block_t,
        EVEN_N=all(n % span == 0 for n in widths), SINGLE_R=cfg["BLOCK_R"] >= max_rank,
        DOT_FP32=dot_in_fp32(_lora_expand_kernel, lora_b[0].dtype),
        **pdl_args(_lora_expand_kernel, y.device, num_tokens), **cfg,
    )
    return y


def check_expand_args(y: torch.Tensor, lora_b: Sequence[torch.Tensor], scales: torch.Tensor, meta: LoRABatchMeta,
                      slot_ranks: torch.Tensor | None) -> None:
    """Raise ValueError unless y (T, sum of widths), the B slices, scales and metadata fit together."""
    n_slices = len(lora_b)
    num_slots, _, max_rank = lora_b[0].shape
    widths = [b.shape[1] for b in lora_b]
    if not 1 <= n_slices <= MAX_SLICES:
        raise ValueError(f"1..{MAX_SLICES} slices supported, got {n_slices}")
    if y.dim() != 2 or y.shape[1] != sum(widths):
        raise ValueError(f"y must be (T, {sum(widths)}), got {tuple(y.shape)}")
    if any(b.shape[0] != num_slots or b.shape[2] != max_rank or b.dtype != lora_b[0].dtype for b in lora_b):
        raise ValueError("every slice of lora_b must be (num_slots, h_out_i, max_rank) of one dtype")
    if scales.shape != (num_slots, n_slices) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be ({num_slots}, {n_slices}) float32")
    if slot_ranks is not None and slot_ranks.shape != (num_slots, n_slices):
        raise ValueError(f"slot_ranks must be ({num_slots}, {n_slices})")
    if max_rank > 16 * MAX_RANK_CHUNKS:
        raise ValueError(f"max_rank {max_rank} exceeds {16 * MAX_RANK_CHUNKS}")
    if any(t.device != y.device for t in (scales, *lora_b)):
        raise ValueError("y, lora_b and scales must share one device")
    _check_meta(meta, y.shape[0], y.device)
