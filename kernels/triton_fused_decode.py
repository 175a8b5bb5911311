"""One-launch LoRA for decode batches: y[t] += scale * B[s_t] (A[s_t] x_t), shrink and expand
programs in one grid, ordered by tickets.

Semantics are those of the shrink/expand pair (kernels/lora_reference.py):

    for t in range(T):
        s = token_slots[t]
        if s < 0: continue                                       # y[t] untouched
        for i in range(n_slices):
            y[t, off_i:off_i + h_i] += scales[s, i] * (lora_b[i][s] @ (lora_a[i][s] @ x[t]))

Why one launch. A decode batch whose tokens have adapters of their own is a pair of gathers
of a few tens of MB; as two kernels (kernels/triton_shrink.py, triton_expand.py) each pays its
own ramp-up and tail, and the expand cannot start any token before the whole shrink is done.
(A first fused kernel, dropped, had each program shrink all of h_in alone and was slower.)
Here the grid holds both kinds of program, and the split of work stays that of the pair:

- shrink programs, one per (token, slice, rank chunk, K split): the one-token GEMV of
  `_shrink_tile`, leaving an fp32 partial in a workspace and arriving at the (token, slice)
  counter;
- expand programs, one per (token, BLOCK_N columns of one slice): load B's first rank chunk
  and y, wait until the token's counter shows every partial in, sum the partials into v, add
  scale * v B^T to y.

Programs draw their role from a ticket (an atomic counter) rather than their program id: every
shrink ticket is drawn before any expand ticket, so a waiting expand program only ever waits
for programs that are already running, which finish without waiting for anything; no deadlock,
whatever order or residency the hardware gives the grid (decoupled look-back scans rely on the
same argument). Tickets go token by token, so the first tokens' expands run while later
tokens' shrinks still stream A.

Counters live in the metadata's `split_counters` ((tile, slice) entries, and the ticket counter
as its last element) and are back at zero when the kernel ends: the program drawing the last
ticket resets the ticket counter, and the last expand program of a (token, slice) resets its
counter. Shrink programs past a slot's rank, slot -1 tokens and untargeted slices (rank 0) skip
both sides, consistently, since both read the same rank.

Under programmatic dependent launch every program first waits for the previous kernel (and
with it, that kernel's counter resets), then draws its ticket. CUDA graphs: the grid depends
only on T, the slot count, the widths and the configuration. Only one-token tiles (tile size
1 of the metadata): batches where tokens share adapters, and batches of up to 64 tokens (where
the pair overlaps its launches and measured faster), take the pair (see `takes_one_launch`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels.metadata import MAX_SLICES, LoRABatchMeta, max_tiles
from kernels.triton_expand import check_expand_args, lora_expand
from kernels.triton_shrink import (
    _COUNTER_SLICES, PDL_MAX_TOKENS, _shrink_tile, check_shrink_args, gdc_launch_dependents, gdc_wait, lora_shrink,
    num_sms, one_token_config, pdl_args, takes_one_token_tiles,
)

FUSED_DECODE = True  # decode batches on one-token tiles take this kernel; the bench can clear it


@triton.jit
def _expand_columns(
    y_ptr, ws_ptr, b_ptr, lock, scale, slot, rank, tok, block, n_out, col0, target, n_consumers,
    stride_yt, stride_yn, stride_wp, stride_wt, stride_bs, stride_bn, stride_br,
    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    """y[tok, block's columns] += scale * v B^T once v's partials are all in (see module docstring)."""
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    if EVEN_N:
        n_ok = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        n_ok = offs_n < n_out
    y_ptrs = y_ptr + tok * stride_yt + (col0 + offs_n) * stride_yn
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
    w_ptrs = ws_ptr + tok * stride_wt + offs_r
    # B and y do not depend on the shrink: their loads go out before the wait
    b_next = tl.load(b_ptrs, mask=(offs_r < rank)[:, None] & n_ok[None, :], other=0.0)
    y_old = tl.load(y_ptrs, mask=n_ok, other=0.0)
    arrived = tl.atomic_add(lock, 0, sem="acquire", scope="gpu")
    while arrived < target:
        arrived = tl.atomic_add(lock, 0, sem="acquire", scope="gpu")
    if ONE_CHUNK:  # every rank fits in one chunk: no loop, no prefetch registers
        v = tl.zeros((BLOCK_R,), tl.float32)
        for s in tl.static_range(SPLIT_K):  # the shrink's partials (another SM's writes: skip L1)
            v += tl.load(w_ptrs + s * stride_wp, mask=offs_r < rank, other=0.0, cache_modifier=".cg")
        acc = tl.sum(b_next.to(tl.float32) * v[:, None], axis=0)
    else:
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            b_tile = b_next
            b_next = tl.load(b_ptrs + (r0 + BLOCK_R) * stride_br,
                             mask=(offs_r < rank - r0 - BLOCK_R)[:, None] & n_ok[None, :], other=0.0)
            r_ok = offs_r < rank - r0
            v = tl.zeros((BLOCK_R,), tl.float32)
            for s in tl.static_range(SPLIT_K):
                v += tl.load(w_ptrs + s * stride_wp + r0, mask=r_ok, other=0.0, cache_modifier=".cg")
            acc += tl.sum(b_tile.to(tl.float32) * v[:, None], axis=0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=n_ok)
    done = tl.atomic_add(lock, 1, sem="relaxed", scope="gpu")
    if done == target + n_consumers - 1:  # the token's last expand program: re-arm the counter
        tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")


@triton.jit
def _lora_fused_decode_kernel(
    x_ptr, y_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr, scales_ptr, ranks_ptr, tiles_ptr, sorted_ptr,
    ws_ptr, counters_ptr, ticket_ptr,
    h_in, n0, n1, n2, max_rank, n_shrink,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_yt, stride_yn,
    stride_b0s, stride_b0n, stride_b0r, stride_b1s, stride_b1n, stride_b1r, stride_b2s, stride_b2n, stride_b2r,
    stride_ss, stride_si, stride_rs, stride_ri, stride_wp, stride_wi, stride_wt,
    N_SLICES: tl.constexpr, HAS_RANKS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # the previous kernel (and its counter resets) must be done before a ticket is drawn
        gdc_wait()
        gdc_launch_dependents()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="relaxed", scope="gpu")
    if ticket == tl.num_programs(0) - 1:  # every ticket is drawn: re-arm for the next launch
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")
    is_shrink = ticket < n_shrink
    # a shrink ticket is (token, slice, rank chunk, split), split fastest so that programs
    # sharing x run together; an expand ticket (token, column block), slice 0's blocks first
    num_rchunks = tl.cdiv(max_rank, BLOCK_R)
    per_token = N_SLICES * num_rchunks * SPLIT_K
    split = ticket % SPLIT_K
    rchunk = (ticket // SPLIT_K) % num_rchunks
    nb0 = tl.cdiv(n0, BLOCK_N)
    nb1 = tl.cdiv(n1, BLOCK_N)
    blocks_per_token = nb0 + nb1 + tl.cdiv(n2, BLOCK_N)
    block = (ticket - n_shrink) % blocks_per_token
    tile = tl.where(is_shrink, ticket // per_token, (ticket - n_shrink) // blocks_per_token)
    slice_id = tl.where(is_shrink, (ticket % per_token) // (SPLIT_K * num_rchunks),
                        (block >= nb0).to(tl.int32) + (block >= nb0 + nb1).to(tl.int32))
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    if (count > 0) & (slot >= 0):
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + slot * stride_rs + slice_id * stride_ri)
        else:
            rank = max_rank + 0 * slot
        lock = counters_ptr + tile * _COUNTER_SLICES + slice_id
        ws_i = ws_ptr + slice_id * stride_wi
        if is_shrink:
            rows = tl.arange(0, 1)
            row_ok = rows < count
            tok = tl.load(sorted_ptr + start + rows)  # (1,), as _shrink_tile takes a tile of tokens
            # one branch per slice: each keeps its pointer's alignment facts for vectorised loads
            if slice_id == 0:
                _shrink_tile(x_ptr, a0_ptr, ws_i, ws_i, lock, slot, rank, tok, row_ok, rchunk, split, h_in,
                             max_rank, stride_xt, stride_xk, stride_as, stride_ar, stride_ak, 0, 0, stride_wp,
                             stride_wt, SPLIT_K, 1, BLOCK_R, BLOCK_K, EVEN_K, False, True)
            if N_SLICES > 1:
                if slice_id == 1:
                    _shrink_tile(x_ptr, a1_ptr, ws_i, ws_i, lock, slot, rank, tok, row_ok, rchunk, split, h_in,
                                 max_rank, stride_xt, stride_xk, stride_as, stride_ar, stride_ak, 0, 0, stride_wp,
                                 stride_wt, SPLIT_K, 1, BLOCK_R, BLOCK_K, EVEN_K, False, True)
            if N_SLICES > 2:
                if slice_id == 2:
                    _shrink_tile(x_ptr, a2_ptr, ws_i, ws_i, lock, slot, rank, tok, row_ok, rchunk, split, h_in,
                                 max_rank, stride_xt, stride_xk, stride_as, stride_ar, stride_ak, 0, 0, stride_wp,
                                 stride_wt, SPLIT_K, 1, BLOCK_R, BLOCK_K, EVEN_K, False, True)
        elif rank > 0:
            tok = tl.load(sorted_ptr + start)
            scale = tl.load(scales_ptr + slot * stride_ss + slice_id * stride_si)
            target = SPLIT_K * tl.cdiv(rank, BLOCK_R)  # partials the shrink programs leave
            if slice_id == 0:
                _expand_columns(y_ptr, ws_i, b0_ptr, lock, scale, slot, rank, tok, block, n0, 0, target,
                                tl.cdiv(n0, BLOCK_N), stride_yt, stride_yn, stride_wp, stride_wt,
                                stride_b0s, stride_b0n, stride_b0r, SPLIT_K, BLOCK_N, BLOCK_R, EVEN_N, ONE_CHUNK)
            if N_SLICES > 1:
                if slice_id == 1:
                    _expand_columns(y_ptr, ws_i, b1_ptr, lock, scale, slot, rank, tok, block - nb0, n1, n0,
                                    target, nb1, stride_yt, stride_yn, stride_wp, stride_wt,
                                    stride_b1s, stride_b1n, stride_b1r, SPLIT_K, BLOCK_N, BLOCK_R, EVEN_N, ONE_CHUNK)
            if N_SLICES > 2:
                if slice_id == 2:
                    _expand_columns(y_ptr, ws_i, b2_ptr, lock, scale, slot, rank, tok, block - nb0 - nb1, n2,
                                    n0 + n1, target, tl.cdiv(n2, BLOCK_N), stride_yt, stride_yn, stride_wp,
                                    stride_wt, stride_b2s, stride_b2n, stride_b2r, SPLIT_K, BLOCK_N, BLOCK_R,
                                    EVEN_N, ONE_CHUNK)


def fused_decode_config(num_tokens: int, n_slices: int, max_rank: int, h_in: int, meta: LoRABatchMeta,
                        device) -> dict:
    """The shrink side as the pair's one-token configuration, but with fewer warps a program
    (more programs resident) and K split in two, not four, once shrink programs would number
    over 8 per multiprocessor (the expand programs fill the machine too); expand programs take
    512 columns. One warp while one chunk holds every rank (max_rank <= 16); above, the expand's
    rank loop holds two (16, 512) tiles of B, too many registers for one warp, so two. From the
    H200 sweeps (loadtest/results/kernel_tune_onelaunch*_h200.json and the two bench runs in
    loadtest/results/README.md): at T = 256, one warp against two, o rank 16 27.2 -> 25.1 us,
    q/k/v rank 8 28.6 -> 27.2, but q/k/v mixed 90.4 -> 107.1 and rank 64 159.4 -> 168.9;
    halving the split where the rule does, o rank 64 104 -> 77 us."""
    shrink = one_token_config(num_tokens, n_slices, max_rank, h_in, device)
    split, block_r = shrink["SPLIT_K"], shrink["BLOCK_R"]
    programs = max(1, num_tokens) * n_slices * triton.cdiv(max_rank, block_r)
    while split > 2 and programs * split > 8 * num_sms(device):
        split //= 2
    return dict(BLOCK_R=block_r, BLOCK_K=shrink["BLOCK_K"], SPLIT_K=split, BLOCK_N=512,
                num_warps=1 if max_rank <= block_r else 2)


def lora_fused_decode(
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
    """y += scale * (x A^T) B^T per token and slice, in place, in one launch; see the docstring."""
    check_shrink_args(x, lora_a, meta, slot_ranks)
    check_expand_args(y, lora_b, scales, meta, slot_ranks)
    n_slices = len(lora_a)
    num_tokens, h_in = x.shape
    num_slots, max_rank, _ = lora_a[0].shape
    if len(lora_b) != n_slices or lora_b[0].shape[2] != max_rank:  # tokens: both checks hold meta to them
        raise ValueError("lora_a and lora_b must agree on slices and max_rank")
    if num_tokens == 0:
        return y
    cfg = dict(config or fused_decode_config(num_tokens, n_slices, max_rank, h_in, meta, x.device))
    split, block_r, block_n = cfg.pop("SPLIT_K"), cfg["BLOCK_R"], cfg["BLOCK_N"]
    widths = [b.shape[1] for b in lora_b] + [0] * (MAX_SLICES - n_slices)
    tiles = max_tiles(num_tokens, num_slots, 1)
    n_shrink = tiles * n_slices * triton.cdiv(max_rank, block_r) * split
    n_expand = tiles * sum(triton.cdiv(n, block_n) for n in widths)
    ws = torch.empty(split, n_slices, num_tokens, max_rank, dtype=torch.float32, device=x.device)
    a = list(lora_a) + [lora_a[0]] * (MAX_SLICES - n_slices)
    b = list(lora_b) + [lora_b[0]] * (MAX_SLICES - n_slices)
    counters = meta.split_counters
    _lora_fused_decode_kernel[(n_shrink + n_expand,)](
        x, y, a[0], a[1], a[2], b[0], b[1], b[2], scales, slot_ranks if slot_ranks is not None else meta.packed,
        meta.tiles[1], meta.sorted_tokens, ws, counters, counters[counters.numel() - 1:],
        h_in, widths[0], widths[1], widths[2], max_rank, n_shrink,
        x.stride(0), x.stride(1), *lora_a[0].stride(), y.stride(0), y.stride(1),
        *[s for t in b for s in t.stride()], *scales.stride(),
        *(slot_ranks.stride() if slot_ranks is not None else (0, 0)), *ws.stride()[:3],
        N_SLICES=n_slices, HAS_RANKS=slot_ranks is not None, SPLIT_K=split,
        EVEN_K=h_in % (cfg["BLOCK_K"] * split) == 0, EVEN_N=all(n % block_n == 0 for n in widths),
        ONE_CHUNK=max_rank <= block_r,
        **pdl_args(_lora_fused_decode_kernel, x.device, num_tokens), **cfg,
    )
    return y


def takes_one_launch(num_tokens: int, meta: LoRABatchMeta) -> bool:
    """Decode batches of more than PDL_MAX_TOKENS tokens on one-token tiles (FUSED_DECODE set).

    Measured side by side on the H200 (loadtest/results/kernel_bench_onelaunch_h200.json): at
    T = 256 the one launch beat the pair in all 8 cases (1.01-1.43x: o rank 8 23.4 -> 16.8 us,
    q/k/v rank 8 40.9 -> 28.6 us); at T <= 16, where the pair overlaps its launches through
    programmatic dependent launch, it lost in all 16 (0.50-0.95x); at T = 64 it won 4 of 8
    (0.82-1.20x)."""
    return FUSED_DECODE and num_tokens > PDL_MAX_TOKENS and takes_one_token_tiles(num_tokens, meta)


def lora_apply(y, x, lora_a, lora_b, scales, meta, slot_ranks=None):
    """The Triton LoRA op: large decode batches on one-token tiles take the one-launch kernel
    (`takes_one_launch`), everything else the shrink/expand pair through an fp32 v."""
    if takes_one_launch(x.shape[0], meta):
        return lora_fused_decode(y, x, lora_a, lora_b, scales, meta, slot_ranks=slot_ranks)
    v = lora_shrink(x, lora_a, meta, slot_ranks=slot_ranks)
    return lora_expand(y, v, lora_b, scales, meta, slot_ranks=slot_ranks)
