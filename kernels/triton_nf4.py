"""`y = x W^T (+ b)` with W in NF4 (kernels/nf4.py): the fused dequantize-matmul, and a dequantize
kernel for long batches (prefill), whose dense tile cuBLAS then multiplies.

Fused (decode; T up to FUSED_MAX_TOKENS rows of x):

    for each tile of BLOCK_N output channels n (one program; grid axes over BLOCK_T rows of x and
    split-K shares of K):
        for each NF4 block b (64 elements of K) of the share, UNROLL blocks per loop iteration:
            bytes = packed[n, 32b : 32b + 32]                       # (32, BLOCK_N) uint8, transposed
            a[n] = absmax of (n, b)                                  # nested: code2[q] * absmax2[g] + offset
            W_hi = NF4[bytes >> 4] * a, W_lo = NF4[bytes & 15] * a   # float32, rounded once to x's dtype
            acc += x[:, 64b::2] @ W_hi + x[:, 64b+1::2] @ W_lo       # fp32 accumulation (tensor cores)
        y = acc (+ b), one cast (split-K: fp32 partial sums, one reduction adds them)
    one row of x (batch 1): the same loop without tensor cores (GEMV: fp32 multiply-adds into a
    (32, BLOCK_N) accumulator, summed once at the end), so no operand passes through shared memory

Each weight byte is read once per BLOCK_T rows of x, so a decode step reads the 4-bit weights
(plus one absmax code per 64 of them) once: the GEMV is bound by those bytes, a quarter of bf16's.
The dequantized values are bitsandbytes' own (float32 product, one rounding): the kernel equals
dequantize-then-matmul up to the order of the fp32 sums. A block's absmax is one value per row,
broadcast over its bytes. Which slice (q, k or v of a fused projection) a row belongs to picks its
nested offset and absmax2 groups: up to MAX_SLICES slices.

Both kernels launch with enable_fp_fusion=False: a nested absmax is code2[q] * absmax2[g] + offset
rounded twice, as bitsandbytes (and torch) compute it; a fused multiply-add would round once and
could move a dequantized weight by an ulp. No host syncs, no allocation but the output (and split-K's
partial sums): CUDA-graph capturable.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.nf4 import NF4Weight

FUSED_MAX_TOKENS = 64  # above: dequantize once into a dense tile, then cuBLAS (see nf4_linear)
MAX_SLICES = 3
PROGRAMS_PER_SM = 4  # split-K until the fused kernel has this many programs per SM (memory-level parallelism)
MAX_SPLIT_K = 16
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offsets_ptr, group_starts_ptr, code_ptr, bias_ptr, y_ptr,
    T, N, K, row1, row2, k_per_split,
    stride_xt, stride_yt,
    HAS_BIAS: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, NESTED_BS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    GEMV: tl.constexpr,
):
    """One NF4 block (BS elements of K) at a time, UNROLL of them per loop iteration: each block has
    one absmax per row, a (BLOCK_N,) vector broadcast over its BS/2 bytes, so the tile needs no
    reshape; the tile is loaded transposed, (bytes, rows), as tl.dot takes it. GEMV (one row of x a
    program, BLOCK_T = 1): no tensor cores, whose operands would pass through shared memory, but
    fp32 multiply-adds into a (BS/2, BLOCK_N) accumulator reduced once at the end."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)  # split-K: this program's share of K, partial sums to y[pid_k] (fp32)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask, n_mask = offs_t < T, offs_n < N
    HALF: tl.constexpr = BS // 2
    offs_j = tl.arange(0, HALF)  # byte j of a block's row: elements 2j (high nibble) and 2j + 1
    half_k = K // 2
    blocks_per_row = K // BS
    # each row's slice (q, k or v of a fused projection): its nested offset and first absmax2 group
    if NESTED:
        s = (offs_n >= row1).to(tl.int32) + (offs_n >= row2).to(tl.int32)
        first_row = tl.where(s == 0, 0, tl.where(s == 1, row1, row2))
        offset = tl.load(offsets_ptr + s, mask=n_mask, other=0.0)
        group0 = tl.load(group_starts_ptr + s, mask=n_mask, other=0)
        local_base = (offs_n - first_row) * blocks_per_row  # the row's first block within its slice
    if GEMV:
        acc2 = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum(K, (pid_k + 1) * k_per_split)
    for k0 in range(pid_k * k_per_split, k_end, BS * UNROLL):
        for u in tl.static_range(UNROLL):
            kb = k0 + u * BS
            block = kb // BS
            k_mask = (kb + 2 * offs_j) < k_end  # (HALF,): all or nothing (k_end is a block boundary)
            row_mask = n_mask & ((offs_n * 0 + kb) < k_end)
            if NESTED:
                q = tl.load(absmax_ptr + offs_n * blocks_per_row + block, mask=row_mask, other=0).to(tl.int32)
                a2 = tl.load(absmax2_ptr + group0 + (local_base + block) // NESTED_BS, mask=row_mask, other=0.0)
                a = tl.load(code2_ptr + q) * a2 + offset  # (BLOCK_N,) float32, as bitsandbytes forms it
            else:
                a = tl.load(absmax_ptr + offs_n * blocks_per_row + block, mask=row_mask, other=0.0)
            packed = tl.load(packed_ptr + offs_n[None, :] * half_k + (kb // 2 + offs_j)[:, None],
                             mask=k_mask[:, None] & n_mask[None, :], other=0)  # (HALF, BLOCK_N) uint8
            w_hi = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * a[None, :]
            w_lo = tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * a[None, :]
            if GEMV:
                x_row = x_ptr + pid_t * stride_xt + kb + 2 * offs_j
                x_even = tl.load(x_row, mask=k_mask, other=0.0)
                x_odd = tl.load(x_row + 1, mask=k_mask, other=0.0)
                # bitsandbytes' dequantized weight (one rounding to x's dtype), then fp32 products
                w_hi = w_hi.to(x_even.dtype).to(tl.float32)
                w_lo = w_lo.to(x_even.dtype).to(tl.float32)
                acc2 += x_even.to(tl.float32)[:, None] * w_hi + x_odd.to(tl.float32)[:, None] * w_lo
            else:
                x_mask = t_mask[:, None] & k_mask[None, :]
                x_even = tl.load(x_ptr + offs_t[:, None] * stride_xt + (kb + 2 * offs_j)[None, :], mask=x_mask,
                                 other=0.0)
                x_odd = tl.load(x_ptr + offs_t[:, None] * stride_xt + (kb + 2 * offs_j + 1)[None, :], mask=x_mask,
                                other=0.0)
                w_hi = w_hi.to(x_even.dtype)  # bitsandbytes' dequantized weight: one rounding of the fp32 product
                w_lo = w_lo.to(x_even.dtype)
                if DOT_IN_FP32:  # fp32 models (no TF32), and the CPU interpreter, whose 16-bit tl.dot is wrong
                    acc += tl.dot(x_even.to(tl.float32), w_hi.to(tl.float32), input_precision="ieee")
                    acc += tl.dot(x_odd.to(tl.float32), w_lo.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(x_even, w_hi)
                    acc += tl.dot(x_odd, w_lo)
    if GEMV:
        acc = tl.sum(acc2, axis=0)[None, :]  # (1, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptr += pid_k * T * stride_yt
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def _split_k_reduce_kernel(partial_ptr, bias_ptr, y_ptr, numel, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr):
    """y = sum over the splits of the fp32 partial sums (+ bias), one cast: one launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + k * numel + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offsets_ptr, group_starts_ptr, code_ptr, out_ptr,
    N, K, row1, row2,
    NESTED: tl.constexpr, BS: tl.constexpr, NESTED_BS: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
):
    """out[n, k] = NF4[q[n, k]] * absmax(n, k // BS), in out's dtype: BLOCK_N rows by UNROLL blocks a program,
    each block's absmax one value per row (as in the fused kernel)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = BS // 2
    offs_j = tl.arange(0, HALF)
    n_mask = offs_n < N
    blocks_per_row = K // BS
    if NESTED:
        s = (offs_n >= row1).to(tl.int32) + (offs_n >= row2).to(tl.int32)
        first_row = tl.where(s == 0, 0, tl.where(s == 1, row1, row2))
        offset = tl.load(offsets_ptr + s, mask=n_mask, other=0.0)
        group0 = tl.load(group_starts_ptr + s, mask=n_mask, other=0)
        local_base = (offs_n - first_row) * blocks_per_row
    for u in tl.static_range(UNROLL):
        block = tl.program_id(1) * UNROLL + u
        row_mask = n_mask & ((offs_n * 0 + block) < blocks_per_row)
        if NESTED:
            q = tl.load(absmax_ptr + offs_n * blocks_per_row + block, mask=row_mask, other=0).to(tl.int32)
            a2 = tl.load(absmax2_ptr + group0 + (local_base + block) // NESTED_BS, mask=row_mask, other=0.0)
            a = tl.load(code2_ptr + q) * a2 + offset
        else:
            a = tl.load(absmax_ptr + offs_n * blocks_per_row + block, mask=row_mask, other=0.0)
        mask = row_mask[:, None] & (offs_j < HALF)[None, :]
        packed = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + (block * HALF + offs_j)[None, :], mask=mask, other=0)
        hi = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * a[:, None]
        lo = tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * a[:, None]
        out = out_ptr + offs_n[:, None] * K + (block * BS + 2 * offs_j)[None, :]
        tl.store(out, hi.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + 1, lo.to(out_ptr.dtype.element_ty), mask=mask)


def _slice_args(w: NF4Weight):
    if len(w.slice_rows) - 1 > MAX_SLICES:
        raise ValueError(f"an NF4 weight of {len(w.slice_rows) - 1} slices (the kernels take {MAX_SLICES})")
    n = w.shape[0]
    bounds = list(w.slice_rows[1:-1]) + [n] * (MAX_SLICES - len(w.slice_rows) + 1)
    if w.nested:
        return (w.absmax, w.absmax2, w.code2, w.offsets, w.group_starts), bounds[0], bounds[1]
    return (w.absmax, w.absmax, w.code, w.code, w.code), bounds[0], bounds[1]  # unread stand-ins


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
               num_warps: int = 4, num_stages: int | None = None, gemv: bool | None = None) -> torch.Tensor:
    # block_k: elements of K per loop iteration, a multiple of the NF4 block size (UNROLL blocks)
    """The fused kernel: (T, K) x -> (T, N) in x's dtype.

    split_k (default: enough programs to fill the device PROGRAMS_PER_SM times over, since a GEMV
    of few output tiles, e.g. N = 4096 in tiles of 32, would leave most SMs idle): programs share K
    and write fp32 partial sums that one reduction then adds and casts. gemv (default: one row of x)
    runs one row a program without tensor cores."""
    T, K = x.shape
    N = w.shape[0]
    if K != w.shape[1] or x.stride(1) != 1:
        raise ValueError(f"x of shape {tuple(x.shape)} (unit stride in K) does not fit an NF4 weight of {w.shape}")
    gemv = T == 1 if gemv is None else gemv
    block_t = 1 if gemv else (16 if T <= 16 else (32 if T <= 32 else 64))
    block_n = block_n or (64 if gemv else (32 if T <= 16 else 64))
    block_k = block_k or max(w.blocksize, 256)
    # fp32 tiles of 64 rows in three stages need 282 KB of shared memory (an H200 has 227 KB): two stages
    num_stages = num_stages or (2 if x.dtype == torch.float32 and block_t >= 64 else 3)
    if block_k % w.blocksize:
        raise ValueError(f"block_k {block_k} is not a multiple of the NF4 block size {w.blocksize}")
    tiles = triton.cdiv(N, block_n) * triton.cdiv(T, block_t)
    k_tiles = triton.cdiv(K, block_k)
    if split_k is None:
        sms = _num_sms(x.device.index or 0) if x.is_cuda else 1
        split_k = max(1, min(k_tiles, MAX_SPLIT_K, triton.cdiv(PROGRAMS_PER_SM * sms, tiles)))
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    if split_k == 1:
        target = torch.empty(T, N, dtype=x.dtype, device=x.device) if out is None else out
    else:
        target = torch.empty(split_k, T, N, dtype=torch.float32, device=x.device)
    stats, row1, row2 = _slice_args(w)
    grid = (triton.cdiv(N, block_n), triton.cdiv(T, block_t), split_k)
    _nf4_matmul_kernel[grid](
        x, w.packed, *stats, w.code, bias if bias is not None and split_k == 1 else target, target,
        T, N, K, row1, row2, k_per_split, x.stride(0), target.stride(-2),
        HAS_BIAS=bias is not None and split_k == 1, NESTED=w.nested, BS=w.blocksize, NESTED_BS=w.nested_blocksize,
        BLOCK_T=block_t, BLOCK_N=block_n, UNROLL=block_k // w.blocksize, DOT_IN_FP32=x.dtype == torch.float32 or _INTERPRET,
        GEMV=gemv, num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False,
    )
    if split_k == 1:
        return target
    out = torch.empty(T, N, dtype=x.dtype, device=x.device) if out is None else out
    numel, block = T * N, 1024
    _split_k_reduce_kernel[(triton.cdiv(numel, block),)](target, bias if bias is not None else target, out, numel, N,
                                                         SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block)
    return out


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (N, K) weight, bitsandbytes' dequantize_4bit, in one launch."""
    N, K = w.shape
    out = torch.empty(N, K, dtype=dtype, device=w.device) if out is None else out
    stats, row1, row2 = _slice_args(w)
    block_n, unroll = 32, 4
    grid = (triton.cdiv(N, block_n), triton.cdiv(K // w.blocksize, unroll))
    _nf4_dequantize_kernel[grid](w.packed, *stats, w.code, out, N, K, row1, row2, NESTED=w.nested,
                                 BS=w.blocksize, NESTED_BS=w.nested_blocksize, BLOCK_N=block_n, UNROLL=unroll,
                                 enable_fp_fusion=False)
    return out


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Decode-sized batches: the fused kernel; longer ones (prefill): dequantize, then cuBLAS, whose
    GEMM at hundreds of rows is compute-bound and amortises the dense tile."""
    if x.shape[0] <= FUSED_MAX_TOKENS:
        return nf4_matmul(x, w, bias)
    return torch.nn.functional.linear(x, nf4_dequantize(w, x.dtype), bias)
