"""Triton LoRA shrink: v[i, t] = A_i[s_t] x_t for every token t and fused slice i.

Semantics are those of `lora_shrink_reference` (kernels/lora_reference.py):

    for t in range(T):
        s = token_slots[t]
        for i in range(n_slices):
            out[i, t, :] = lora_a[i][s] @ x[t] if s >= 0 else 0

One kernel serves prefill and decode. Tokens are grouped by slot in the per-step metadata
(kernels/metadata.py) and cut into tiles of BLOCK_T tokens that share one adapter; a program
owns one (tile, slice, rank chunk, K split) and computes `x_tile @ A_chunk^T` with `tl.dot`
(fp32 accumulation, tensor cores in bf16/fp16). The adapter's A rows are therefore read once
per tile, not once per token: SGMV for prefill (BLOCK_T = 64), and for decode (BLOCK_T = 16)
a bandwidth-bound gather-matvec where the few tokens sharing an adapter still share one read.
Decode batches whose tokens mostly have adapters of their own take one-token tiles (BLOCK_T =
1) instead: the product is a multiply-reduce on the CUDA cores, since a 16-row tl.dot tile
holding one token would mask 15 of its 16 rows (see `shrink_config`). Decode batches have few tiles, so the reduction over h_in is split across SPLIT_K programs;
their fp32 partials meet in a workspace and the last program to arrive (an atomic counter in
the metadata, reset by that program) sums them: no memset, no second launch. (So launches
that share one metadata object must be ordered on one stream, as a model's layers are.)

Pool layout and ranks. Per slice, `lora_a[i]` is (num_slots, max_rank, h_in) with rows past an
adapter's rank zero (memory stays padded to max_rank for now). `slot_ranks` (num_slots,
n_slices) int32, optional, gives each slot's true rank per slice (0: the slice is not
targeted). The rows a program loads are masked to `r < rank`, and a row of A is contiguous,
so a rank-8 adapter beside a rank-64 one reads rank-8 bytes of A at any max_rank. Decode
configurations also cut the rank into chunks of 16 (8 on one-token tiles up to rank 8), one
program each; a program whose chunk
lies past its slot's rank writes zeros and stops, so the work is rank-proportional too (one
chunk for rank 8, four for 64). Prefill configurations take all ranks in one masked chunk so
x is read once; there the tensor-core work is padded, which costs nothing measurable since
streaming x is the bound. Without `slot_ranks`, every slot counts as max_rank (exact by the
zero padding, just slower). Supported: max_rank <= 128 (eight chunks of 16; the metadata's
counters are sized for it), up to 3 fused slices of one h_in, bf16/fp16/fp32 (x is cast to
A's dtype; fp32 pools multiply in full fp32).

CUDA graphs: the grid depends only on T, the pool's slot count and the configuration; all
step data is read from the metadata's device buffers; no host synchronisation.

Launch latency (programmatic dependent launch, Hopper and later; `use_pdl`). Decode batches are
latency-bound: a shrink+expand pair is two launches, each with a chain of metadata -> token
index -> data loads before weights move. Both kernels are launched with `launch_pdl` so that each
may start while the kernel before it in the stream finishes: a program reads only the step's
metadata, its slot's rank (and, in the expand, scale and first block of B), then waits (`gdc_wait`, which returns once
the previous kernel has completed and its writes are visible) before it reads x, y, v or the
split-K workspace, and then lets the next kernel launch (`gdc_launch_dependents`). Activations
are only read after the wait, so semantics are unchanged, with one condition: the metadata and
the pool (weights, slot_ranks, scales) must not be written by the kernel launched just before on
the same stream. The engine meets it: metadata arrives by host copies, and server/lora/pool.py
writes slots on a side stream that the compute stream waits for (a cross-stream wait serialises
fully). Without PDL (`PDL_ENABLED = False`, pre-Hopper GPUs, the interpreter, or batches over
PDL_MAX_TOKENS tokens) both calls compile away and the kernels are the plain ones. Measured on
the H200 (loadtest/results/README.md): a pair at T <= 64 got 1-2 us faster (T = 1: 6.4 -> 4.5
us), while at T = 256 and prefill with rank 64 it got 1-4% slower (the early-launched programs
wait in place, which seems to unbalance a full wave), hence the cut-off.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels.metadata import MAX_RANK_CHUNKS, MAX_SLICES, TILE_SIZES, LoRABatchMeta, max_tiles

try:  # grid dependency control, for programmatic dependent launch (see the module docstring)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older triton: `use_pdl` is then False and the calls are never compiled
    gdc_launch_dependents = gdc_wait = None

PDL_ENABLED = True  # the switch for `use_pdl`; loadtest/bench_lora_kernels.py --no-pdl clears it
GEMV_DECODE = True  # decode-like batches take one-token tiles (see shrink_config); the bench can clear it
PDL_MAX_TOKENS = 64  # larger batches launch plainly (see the module docstring)

_COUNTER_SLICES = tl.constexpr(MAX_SLICES)  # counters are laid out (tile, slice, rank chunk)


def dot_in_fp32(kernel, dtype: torch.dtype) -> bool:
    """fp32 pools multiply in full fp32; so do bf16 ones under the CPU interpreter, whose bf16
    `tl.dot` returns garbage (seen with triton 3.9). Exact products either way."""
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


def use_pdl(kernel, device: torch.device, num_tokens: int = 1) -> bool:
    """Launch with programmatic dependent launch: decode-sized batches (<= PDL_MAX_TOKENS) of
    compiled CUDA kernels on sm_90 or later, with a triton that has both the launch option and
    the gdc calls; never under the interpreter. Depends on static shapes only (graph-safe)."""
    if not PDL_ENABLED or num_tokens > PDL_MAX_TOKENS or device.type != "cuda" or gdc_wait is None:
        return False
    if type(kernel).__name__ == "InterpretedFunction":
        return False
    return _pdl_supported(device)


def pdl_args(kernel, device: torch.device, num_tokens: int) -> dict:
    """The kernel's USE_PDL constexpr and, where it is set, the matching launch option."""
    pdl = use_pdl(kernel, device, num_tokens)
    return dict(USE_PDL=pdl, launch_pdl=True) if pdl else dict(USE_PDL=False)


@functools.lru_cache(maxsize=None)
def _pdl_supported(device: torch.device) -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def _shrink_tile(
    x_ptr, a_ptr, out_ptr, ws_ptr, lock,
    slot, rank, tok, row_ok, rchunk, split,
    h_in, max_rank,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
    stride_ot, stride_or, stride_wp, stride_wt,
    SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, ARRIVE_ONLY: tl.constexpr,
):
    """One program's share of v: its tile's tokens, one rank chunk, one K split.

    SPLIT_K partials meet at `lock` (an int32 counter): the last to arrive sums them into out
    and re-arms the counter. With ARRIVE_ONLY (kernels/triton_fused_decode.py) every program
    leaves its partial in the workspace and arrives; the reader sums the partials itself."""
    offs_r = rchunk * BLOCK_R + tl.arange(0, BLOCK_R)
    out_ptrs = out_ptr + tok[:, None] * stride_ot + offs_r[None, :] * stride_or
    out_mask = row_ok[:, None] & (offs_r[None, :] < max_rank)
    if rchunk * BLOCK_R >= rank:
        # slot -1, a slice the adapter does not target, or rows past its rank: v is zero here
        if not ARRIVE_ONLY and split == 0:
            tl.store(out_ptrs, tl.zeros((BLOCK_T, BLOCK_R), tl.float32), mask=out_mask)
    else:
        r_ok = offs_r < rank
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        k_span = tl.cdiv(tl.cdiv(h_in, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = split * k_span
        k_hi = tl.minimum(k_lo + k_span, h_in)
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk  # (BLOCK_T, BLOCK_K)
        a_ptrs = a_base + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak  # (BLOCK_R, BLOCK_K)
        acc = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:  # no mask along the contiguous axis keeps the loads 16 bytes wide
                x_tile = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                a_tile = tl.load(a_ptrs, mask=r_ok[:, None], other=0.0)
            else:
                k_ok = (k0 + tl.arange(0, BLOCK_K) < k_hi)[None, :]
                x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok, other=0.0)
                a_tile = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok, other=0.0)
            if BLOCK_T == 1:  # one token: multiply and reduce on the CUDA cores, no 16-row padding
                acc += tl.sum(a_tile.to(tl.float32) * x_tile.to(tl.float32), axis=1)[None, :]
            elif DOT_FP32:
                acc = tl.dot(x_tile.to(tl.float32), tl.trans(a_tile.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_tile.to(a_tile.dtype), tl.trans(a_tile), acc)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        if ARRIVE_ONLY:
            ws_ptrs = ws_ptr + tok[:, None] * stride_wt + offs_r[None, :]
            tl.store(ws_ptrs + split * stride_wp, acc, mask=out_mask)
            tl.debug_barrier()  # every thread's partial is out before the counter says so
            tl.atomic_add(lock, 1, sem="release", scope="gpu")
        elif SPLIT_K == 1:
            tl.store(out_ptrs, acc, mask=out_mask)
        else:
            ws_ptrs = ws_ptr + tok[:, None] * stride_wt + offs_r[None, :]
            tl.store(ws_ptrs + split * stride_wp, acc, mask=out_mask)
            tl.debug_barrier()  # every thread's partial is out before the counter says so
            arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:  # last of the splits: reduce, publish, re-arm the counter
                total = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(ws_ptrs + s * stride_wp, mask=out_mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptrs, total, mask=out_mask)
                tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, ranks_ptr, tiles_ptr, sorted_ptr, out_ptr, ws_ptr, counters_ptr,
    h_in, max_rank,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
    stride_rs, stride_ri, stride_oi, stride_ot, stride_or, stride_wp, stride_wi, stride_wt,
    N_SLICES: tl.constexpr, HAS_RANKS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    # axis 0: (slice, rank chunk, split), split fastest so programs sharing x run together
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    num_rchunks = tl.cdiv(max_rank, BLOCK_R)
    split = pid % SPLIT_K
    rchunk = (pid // SPLIT_K) % num_rchunks
    slice_id = pid // (SPLIT_K * num_rchunks)

    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    if count > 0:
        rows = tl.arange(0, BLOCK_T)
        row_ok = rows < count
        tok = tl.load(sorted_ptr + start + rows, mask=row_ok, other=0)  # (BLOCK_T,) token indices
        safe_slot = tl.maximum(slot, 0)
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + safe_slot * stride_rs + slice_id * stride_ri)
        else:
            rank = max_rank + 0 * slot
        rank = tl.where(slot >= 0, rank, 0)
        if USE_PDL:  # metadata only above; x, out and the workspace may be the previous kernel's
            gdc_wait()
            gdc_launch_dependents()
        out_i = out_ptr + slice_id * stride_oi
        ws_i = ws_ptr + slice_id * stride_wi
        lock = counters_ptr + (tile * _COUNTER_SLICES + slice_id) * num_rchunks + rchunk
        # one branch per slice: each keeps its pointer's alignment facts for vectorised loads
        if slice_id == 0:
            _shrink_tile(x_ptr, a0_ptr, out_i, ws_i, lock, safe_slot, rank, tok, row_ok,
                         rchunk, split, h_in, max_rank,
                         stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or, stride_wp,
                         stride_wt, SPLIT_K, BLOCK_T, BLOCK_R, BLOCK_K, EVEN_K, DOT_FP32, False)
        if N_SLICES > 1:
            if slice_id == 1:
                _shrink_tile(x_ptr, a1_ptr, out_i, ws_i, lock, safe_slot, rank, tok, row_ok,
                             rchunk, split, h_in, max_rank,
                             stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or, stride_wp,
                             stride_wt, SPLIT_K, BLOCK_T, BLOCK_R, BLOCK_K, EVEN_K, DOT_FP32, False)
        if N_SLICES > 2:
            if slice_id == 2:
                _shrink_tile(x_ptr, a2_ptr, out_i, ws_i, lock, safe_slot, rank, tok, row_ok,
                             rchunk, split, h_in, max_rank,
                             stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or, stride_wp,
                             stride_wt, SPLIT_K, BLOCK_T, BLOCK_R, BLOCK_K, EVEN_K, DOT_FP32, False)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the H200's count, so the CPU interpreter exercises the same choices


def takes_one_token_tiles(num_tokens: int, meta: LoRABatchMeta) -> bool:
    """A decode-like batch (no adapter with 64 tokens) whose tokens mostly have adapters of their
    own: one token per program reads an adapter once per token, so only where 16-token tiles
    would save under a quarter of the weight reads. Off when GEMV_DECODE is cleared."""
    mostly_distinct = 4 * meta.num_tiles_hint.get(16, num_tokens) >= 3 * num_tokens
    return GEMV_DECODE and meta.max_group_tokens < 64 and mostly_distinct


def shrink_config(num_tokens: int, n_slices: int, max_rank: int, h_in: int, meta: LoRABatchMeta, device) -> dict:
    """Launch configuration from static shapes and the metadata's host-side hints.

    Tuned on the H200 (loadtest/results/kernel_tune_h200.json, kernel_tune_prefetch_h200.json).
    Prefill-like batches (some adapter has >= 64 tokens) take 64-token tiles and one program for
    all of a tile's ranks, so x is read once, and split K only to fill the multiprocessors once;
    at ranks up to 16, K blocks of 64 with 4 stages and about two programs per multiprocessor
    (o 16.2 -> 14.2 us, q/k/v 20.8 -> 18.4 us at rank 16). Decode-like batches whose tokens
    mostly have adapters of their own (16-token tiles would save under a quarter of the weight
    reads) take one-token tiles: GEMV on the CUDA cores, since a 16-row tl.dot tile holding one
    token masks 15 of its 16 rows (the profiler showed 12% achieved occupancy and DRAM at a
    quarter of its bandwidth); rank chunks of 16 (8 for ranks up to 8; a rank-64 adapter costs
    four), K in spans of at most 1024 (the loop is not pipelined), split further until programs
    number ~3 per multiprocessor. Measured against 16-token tiles in one run
    (kernel_bench_h200.json, `ours_tiles16_us`): o rank 8 T=1 4.7 -> 3.5 us, T=64 10.7 -> 9.5,
    T=256 25.4 -> 23.6; but Zipf-shared batches got up to 1.6x slower, hence the condition.
    Other decode-like batches (and all with GEMV_DECODE cleared) take 16-token tl.dot tiles,
    split K until (tile, slice) pairs number ~3 per multiprocessor, and into at least two parts
    when ranks above 16 make some programs four chunks long.
    """
    r_pad = max(16, triton.next_power_of_2(max_rank))
    prefill = meta.max_group_tokens >= 64
    if takes_one_token_tiles(num_tokens, meta):
        return one_token_config(num_tokens, n_slices, max_rank, h_in, device)
    if prefill and r_pad <= 16:
        cfg = dict(BLOCK_T=64, BLOCK_R=16, BLOCK_K=64, num_warps=4, num_stages=4)
        wanted, split = 1.9 * num_sms(device), 1
    elif prefill:
        cfg = dict(BLOCK_T=64, BLOCK_R=min(r_pad, 64), BLOCK_K=128, num_warps=4, num_stages=3)
        wanted, split = 0.9 * num_sms(device), 1
    else:
        cfg = dict(BLOCK_T=16, BLOCK_R=16, BLOCK_K=128, num_warps=2, num_stages=4)
        wanted, split = 3 * num_sms(device), 2 if max_rank > 16 else 1
    tiles = max(1, meta.num_tiles_hint.get(cfg["BLOCK_T"], num_tokens))
    cfg["SPLIT_K"] = _grow_split(split, tiles * n_slices, wanted, h_in, cfg["BLOCK_K"])
    return cfg


def one_token_config(num_tokens: int, n_slices: int, max_rank: int, h_in: int, device) -> dict:
    """GEMV tiles (see shrink_config): rank chunks of 8 or 16, K spans of 256 with at most 1024
    of K per program (the loop is not pipelined), split until ~3 programs per multiprocessor."""
    cfg = dict(BLOCK_T=1, BLOCK_R=8 if max_rank <= 8 else 16, BLOCK_K=256, num_warps=4, num_stages=1)
    split = min(8, max(1, triton.cdiv(h_in, 1024)))
    cfg["SPLIT_K"] = _grow_split(split, max(1, num_tokens) * n_slices, 3 * num_sms(device), h_in, cfg["BLOCK_K"])
    return cfg


def _grow_split(split: int, programs: int, wanted: float, h_in: int, block_k: int) -> int:
    """Double the K split until programs * split reaches `wanted` (at most 8 splits, none empty)."""
    while programs * split < wanted and split < 8 and h_in >= 2 * split * block_k:
        split *= 2
    return split


def lora_shrink(
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    meta: LoRABatchMeta,
    out: torch.Tensor | None = None,
    *,
    slot_ranks: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """v = x A^T per token and slice into (n_slices, T, max_rank) float32; see module docstring."""
    check_shrink_args(x, lora_a, meta, slot_ranks)
    n_slices = len(lora_a)
    num_tokens, h_in = x.shape
    num_slots, max_rank, _ = lora_a[0].shape
    if out is None:
        out = torch.empty(n_slices, num_tokens, max_rank, dtype=torch.float32, device=x.device)
    elif out.shape != (n_slices, num_tokens, max_rank) or out.dtype != torch.float32:
        raise ValueError(f"out must be ({n_slices}, {num_tokens}, {max_rank}) float32")
    if num_tokens == 0:
        return out

    cfg = dict(config or shrink_config(num_tokens, n_slices, max_rank, h_in, meta, x.device))
    block_t, split = cfg.pop("BLOCK_T"), cfg.pop("SPLIT_K")
    num_rchunks = triton.cdiv(max_rank, cfg["BLOCK_R"])
    if num_rchunks > MAX_RANK_CHUNKS or (block_t > 1 and cfg["BLOCK_R"] < 16):
        raise ValueError(f"BLOCK_R {cfg['BLOCK_R']} with max_rank {max_rank}: at most {MAX_RANK_CHUNKS} "
                         "rank chunks, and tl.dot tiles (BLOCK_T > 1) need BLOCK_R >= 16")
    ws = out
    if split > 1:
        ws = torch.empty(split, n_slices, num_tokens, max_rank, dtype=torch.float32, device=x.device)
    ranks = slot_ranks if slot_ranks is not None else meta.packed
    a = list(lora_a) + [lora_a[0]] * (MAX_SLICES - n_slices)
    grid = (n_slices * num_rchunks * split, max_tiles(num_tokens, num_slots, block_t))
    _lora_shrink_kernel[grid](
        x, a[0], a[1], a[2], ranks, meta.tiles[block_t], meta.sorted_tokens, out, ws, meta.split_counters,
        h_in, max_rank,
        x.stride(0), x.stride(1), *lora_a[0].stride(),
        *(slot_ranks.stride() if slot_ranks is not None else (0, 0)),
        *out.stride(), ws.stride(0) if split > 1 else 0, *(ws.stride()[-3:-1] if split > 1 else (0, 0)),
        N_SLICES=n_slices, HAS_RANKS=slot_ranks is not None, SPLIT_K=split, BLOCK_T=block_t,
        EVEN_K=h_in % (cfg["BLOCK_K"] * split) == 0, DOT_FP32=dot_in_fp32(_lora_shrink_kernel, lora_a[0].dtype),
        **pdl_args(_lora_shrink_kernel, x.device, num_tokens), **cfg,
    )
    return out


def check_shrink_args(x: torch.Tensor, lora_a: Sequence[torch.Tensor], meta: LoRABatchMeta,
                      slot_ranks: torch.Tensor | None) -> None:
    """Raise ValueError unless x (T, h_in), the A slices and the metadata fit together."""
    n_slices = len(lora_a)
    num_tokens, h_in = x.shape
    num_slots, max_rank, a_in = lora_a[0].shape
    if not 1 <= n_slices <= MAX_SLICES:
        raise ValueError(f"1..{MAX_SLICES} slices supported, got {n_slices}")
    if a_in != h_in or any(a.shape != lora_a[0].shape or a.stride() != lora_a[0].stride() for a in lora_a):
        raise ValueError("every slice of lora_a must be (num_slots, max_rank, h_in) with the same strides")
    if any(a.dtype != lora_a[0].dtype or a.device != x.device for a in lora_a):
        raise ValueError("lora_a slices must share one dtype and x's device")
    if max_rank > 16 * MAX_RANK_CHUNKS:
        raise ValueError(f"max_rank {max_rank} exceeds {16 * MAX_RANK_CHUNKS}")
    if slot_ranks is not None and slot_ranks.shape != (num_slots, n_slices):
        raise ValueError(f"slot_ranks must be ({num_slots}, {n_slices})")
    _check_meta(meta, num_tokens, x.device)


def _check_meta(meta: LoRABatchMeta, num_tokens: int, device: torch.device) -> None:
    if meta.packed is None:
        raise ValueError("metadata has no kernel buffers: build it with LoRABatchMeta.build")
    if meta.token_slots.shape[0] != num_tokens:
        raise ValueError(f"metadata is for {meta.token_slots.shape[0]} tokens, the batch has {num_tokens}")
    if meta.packed.device != device:
        raise ValueError(f"metadata on {meta.packed.device}, tensors on {device}")
    if any(bt not in meta.tiles for bt in TILE_SIZES):
        raise ValueError("metadata lacks the tile maps")
