"""`y = x W^T (+ b)` with W in NF4 (kernels/nf4.py): a GEMV for one row of x (decode at batch 1),
a fused dequantize-matmul on the tensor cores for a few rows (decode), and a dequantize kernel for
long batches (prefill), whose dense tile cuBLAS then multiplies.

All three read a tile of packed bytes (rows x UNROLL NF4 blocks x 32 bytes) and decode it with
`_decode`:

    w[n, 64b + 2j]     = NF4[byte >> 4] * absmax(n, b)     (the high nibble: the even element)
    w[n, 64b + 2j + 1] = NF4[byte & 15] * absmax(n, b)

in the compute dtype: for bf16 and fp16 models the code book and the absmax are in that dtype and
their product is rounded once, as bitsandbytes' own 4-bit inference kernel computes it (its
`dequantize_4bit` instead rounds a float32 product once: a quarter of the weights land one ulp
apart, and `dequantize_nf4_compute` is this decode, the kernels' reference); for fp32 models the
product is float32, which is `dequantize_4bit` exactly.

On the GPU the 16-entry look-up runs in registers (`_DECODE_ASM`, PTX): the code book's 16
two-byte values are eight 32-bit constants, one plane of low bytes and one of high bytes, and
`prmt` (byte permute) picks four bytes of a plane at once by four 3-bit indices; the fourth bit
of each index picks between the two halves of the book through a byte mask that `prmt`'s
sign-replicating mode makes from it. Eight weights cost about 25 instructions, one multiply-add
pair included. A table in memory (`tl.load(code + q)`, one load per weight) was the kernel's limit
before: 10x the memory roofline at batch 1 on an H200. Under Triton's CPU interpreter, and for
fp32, the look-up is that load.

A block's absmax is one value per row and block, broadcast over its 32 bytes; nested absmaxes
decode as code2[q] * absmax2[g] + offset in float32 (`_block_absmax`, launched with
enable_fp_fusion=False so that this rounds twice, as bitsandbytes and torch compute it). Which
slice (q, k or v of a fused projection) a row belongs to picks its nested offset and absmax2
groups: up to MAX_SLICES slices. No host syncs, no allocation but the output (and split-K's
partial sums): CUDA-graph capturable.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.nf4 import NF4_CODE, NF4Weight

FUSED_MAX_TOKENS = 64  # above: dequantize once into a dense tile, then cuBLAS (see nf4_linear)
MAX_SLICES = 3
PROGRAMS_PER_SM = 4  # split-K until the GEMV has this many programs per SM (memory-level parallelism)
MAX_SPLIT_K = 16
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _decode_asm(dtype: torch.dtype) -> str:
    """PTX for 4 packed bytes ($4) and their 4 absmaxes ($5, $6: two per register) -> the 4 high-nibble
    weights ($0, $1) and the 4 low-nibble weights ($2, $3), two per register, in `dtype` (bf16, fp16).

    prmt.b32 d, a, b, c: result byte i is byte c[4i+2 : 4i] of {b, a} (a: bytes 0-3), or with c[4i+3]
    set, that byte's sign bit replicated. The selector is the packed word itself, whose nibbles in
    order are (lo0, hi0, lo1, hi1, ...): its low 16 bits index bytes 0-1's four codes, its high 16
    bits bytes 2-3's."""
    bits = [b & 0xFFFF for b in torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype).view(torch.int16).tolist()]
    def word(values):
        return values[0] | values[1] << 8 | values[2] << 16 | values[3] << 24
    lo = [word([b & 0xFF for b in bits[4 * i:4 * i + 4]]) for i in range(4)]
    hi = [word([b >> 8 for b in bits[4 * i:4 * i + 4]]) for i in range(4)]
    fma = {torch.bfloat16: "fma.rn.bf16x2", torch.float16: "fma.rn.f16x2"}[dtype]
    planes = {"l": [f"{v:#010x}" for v in lo], "h": [f"{v:#010x}" for v in hi]}
    # per plane (low, high bytes) and half of the word (selector s: bytes 0-1, s16: bytes 2-3): the
    # four codes' bytes from the book's first and second halves, then the half the mask picks
    lookups = "\n".join(
        f"prmt.b32 t0, {planes[p][0]}, {planes[p][1]}, {sel};\n"
        f"prmt.b32 t1, {planes[p][2]}, {planes[p][3]}, {sel};\n"
        f"lop3.b32 p{p}{half}, t0, t1, m{half}, 0xD8;"
        for half, sel in ((0, "s"), (1, "s16")) for p in "lh")
    return f"""{{
.reg .b32 z, sh4, s, s16, m0, m1, t0, t1, pl0, ph0, pl1, ph1, w0, w1, w2, w3;
mov.b32 z, 0x80008000;
shl.b32 sh4, $4, 4;
prmt.b32 m0, sh4, $4, 0xD9C8;
prmt.b32 m1, sh4, $4, 0xFBEA;
and.b32 s, $4, 0x77777777;
shr.u32 s16, s, 16;
{lookups}
prmt.b32 w0, pl0, ph0, 0x7351;
prmt.b32 w1, pl1, ph1, 0x7351;
prmt.b32 w2, pl0, ph0, 0x6240;
prmt.b32 w3, pl1, ph1, 0x6240;
{fma} $0, w0, $5, z;
{fma} $1, w1, $6, z;
{fma} $2, w2, $5, z;
{fma} $3, w3, $6, z;
}}"""


# m0/m1: the byte masks, 0xFF where a code's fourth bit is set (sign bits of the word shifted by 4
# and of the word itself); lop3 0xD8 = m ? t1 : t0 per bit; -0.0 (z) as the addend keeps a
# product's sign and rounds it once. Written only after every input is read: outputs may share
# registers with inputs.
_DECODE_ASM = {torch.bfloat16: _decode_asm(torch.bfloat16), torch.float16: _decode_asm(torch.float16)}


@triton.jit
def _decode(packed, a, code_ptr, ASM: tl.constexpr, ASM_STR: tl.constexpr):
    """packed (uint8) and a (the block absmax of each byte, in the compute dtype, same shape) ->
    (high-nibble weights, low-nibble weights) in a's dtype."""
    if ASM:
        hi, lo = tl.inline_asm_elementwise(ASM_STR, "=r,=r,=r,=r,r,r,r", [packed, a], dtype=(a.dtype, a.dtype),
                                           is_pure=True, pack=4)
    else:  # the code book in the compute dtype, as float32: products of two such values are exact in float32
        af = a.to(tl.float32)
        hi = (tl.load(code_ptr + (packed >> 4).to(tl.int32)) * af).to(a.dtype)
        lo = (tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * af).to(a.dtype)
    return hi, lo


@triton.jit
def _row_slices(offs_n, n_mask, offsets_ptr, group_starts_ptr, row1, row2, blocks_per_row, NESTED: tl.constexpr):
    """Each row's slice (q, k or v of a fused projection): its nested offset, its first absmax2 group,
    and the index of its first block within the slice (unused stand-ins without nesting)."""
    if NESTED:
        s = (offs_n >= row1).to(tl.int32) + (offs_n >= row2).to(tl.int32)
        first_row = tl.where(s == 0, 0, tl.where(s == 1, row1, row2))
        offset = tl.load(offsets_ptr + s, mask=n_mask, other=0.0)
        group0 = tl.load(group_starts_ptr + s, mask=n_mask, other=0)
        local_base = (offs_n - first_row) * blocks_per_row
    else:
        offset, group0, local_base = offs_n * 0.0, offs_n, offs_n
    return offset, group0, local_base


@triton.jit
def _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, rows, blocks, mask, blocks_per_row, offset, group0, local_base,
                  NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
    """float32 absmax of (row, block) pairs (rows and blocks broadcast against each other; offset,
    group0 and local_base broadcast like rows)."""
    if NESTED:
        q = tl.load(absmax_ptr + rows * blocks_per_row + blocks, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + group0 + (local_base + blocks) // NESTED_BS, mask=mask, other=0.0)
        a = tl.load(code2_ptr + q) * a2 + offset
    else:
        a = tl.load(absmax_ptr + rows * blocks_per_row + blocks, mask=mask, other=0.0)
    return a


@triton.jit
def _weight_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offs_n, n_mask, kb, k_end, K, stride_p,
                 offset, group0, local_base, dtype: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr,
                 NESTED_BS: tl.constexpr, UNROLL: tl.constexpr, ASM: tl.constexpr, ASM_STR: tl.constexpr):
    """Rows offs_n by UNROLL blocks from element kb: (hi, lo), each (BLOCK_N, UNROLL, BS // 2) in
    `dtype`; blocks at or past k_end (a block boundary) are zeros."""
    HALF: tl.constexpr = BS // 2
    blocks_per_row = K // BS
    blk = kb // BS + tl.arange(0, UNROLL)
    mask = n_mask[:, None] & (blk < k_end // BS)[None, :]
    a = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offs_n[:, None], blk[None, :], mask, blocks_per_row,
                      offset[:, None], group0[:, None], local_base[:, None], NESTED, NESTED_BS)
    a = tl.where(mask, a, 0.0).to(dtype)
    packed = tl.load(packed_ptr + offs_n[:, None, None] * stride_p + (blk * HALF)[None, :, None]
                     + tl.arange(0, HALF)[None, None, :], mask=mask[:, :, None], other=0)
    return _decode(packed, tl.broadcast_to(a[:, :, None], packed.shape), code_ptr, ASM, ASM_STR)


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offsets_ptr, group_starts_ptr, code_ptr, bias_ptr, y_ptr,
    T, N, K, row1, row2, k_per_split, stride_p, stride_xt, stride_yt,
    HAS_BIAS: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, NESTED_BS: tl.constexpr,
    BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, ASM: tl.constexpr, ASM_STR: tl.constexpr,
):
    """One row of x a program (grid: row tiles, rows of x, split-K shares): fp32 multiply-adds into a
    (BLOCK_N, UNROLL, BS/2) accumulator per nibble, summed once at the end; no tensor cores, whose
    operands would pass through shared memory. Split-K: fp32 partial sums to y[pid_k]."""
    pid_n, pid_t, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HALF: tl.constexpr = BS // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offset, group0, local_base = _row_slices(offs_n, n_mask, offsets_ptr, group_starts_ptr, row1, row2, K // BS,
                                             NESTED)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, UNROLL, HALF), dtype=tl.float32)
    k_end = tl.minimum(K, (pid_k + 1) * k_per_split)
    x_row = x_ptr + pid_t * stride_xt
    offs_x = (tl.arange(0, UNROLL) * BS)[:, None, None] + (2 * tl.arange(0, HALF))[None, :, None] \
        + tl.arange(0, 2)[None, None, :]  # (UNROLL, HALF, 2): even and odd elements side by side
    for kb in range(pid_k * k_per_split, k_end, BS * UNROLL):
        hi, lo = _weight_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offs_n, n_mask, kb, k_end, K, stride_p,
                              offset, group0, local_base, dtype, NESTED, BS, NESTED_BS, UNROLL, ASM, ASM_STR)
        x = tl.load(x_row + kb + offs_x, mask=(kb + offs_x) < k_end, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(x)
        acc = tl.fma(hi.to(tl.float32), x_even[None, :, :], tl.fma(lo.to(tl.float32), x_odd[None, :, :], acc))
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y_ptr += pid_k * T * stride_yt + pid_t * stride_yt
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _nf4_mm_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offsets_ptr, group_starts_ptr, code_ptr, bias_ptr, y_ptr,
    T, N, K, row1, row2, k_per_split, stride_p, stride_xt, stride_yt,
    HAS_BIAS: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, NESTED_BS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ASM: tl.constexpr, ASM_STR: tl.constexpr,
):
    """A (BLOCK_T, BLOCK_N) tile of y on the tensor cores: each (BLOCK_N, UNROLL * BS) tile of W is
    decoded once, its two nibble halves interleaved back into K order (join + reshape), and
    multiplied by x's (BLOCK_T, UNROLL * BS) tile with fp32 accumulation."""
    pid_n, pid_t, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BLOCK_K: tl.constexpr = BS * UNROLL
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask, n_mask = offs_t < T, offs_n < N
    offset, group0, local_base = _row_slices(offs_n, n_mask, offsets_ptr, group_starts_ptr, row1, row2, K // BS,
                                             NESTED)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum(K, (pid_k + 1) * k_per_split)
    for kb in range(pid_k * k_per_split, k_end, BLOCK_K):
        hi, lo = _weight_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offs_n, n_mask, kb, k_end, K, stride_p,
                              offset, group0, local_base, dtype, NESTED, BS, NESTED_BS, UNROLL, ASM, ASM_STR)
        w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # element 2j: byte j's high nibble, 2j + 1: its low
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + (kb + offs_k)[None, :],
                    mask=t_mask[:, None] & ((kb + offs_k) < k_end)[None, :], other=0.0)
        if DOT_IN_FP32:  # fp32 models (no TF32), and the CPU interpreter, whose 16-bit tl.dot is wrong
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
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
    N, K, row1, row2, stride_p,
    NESTED: tl.constexpr, BS: tl.constexpr, NESTED_BS: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
    ASM: tl.constexpr, ASM_STR: tl.constexpr,
):
    """out[rows, UNROLL blocks] = the decoded tile, in K order, one contiguous store per row."""
    BLOCK_K: tl.constexpr = BS * UNROLL
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offset, group0, local_base = _row_slices(offs_n, n_mask, offsets_ptr, group_starts_ptr, row1, row2, K // BS,
                                             NESTED)
    kb = tl.program_id(1) * BLOCK_K
    hi, lo = _weight_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offs_n, n_mask, kb, K, K, stride_p,
                          offset, group0, local_base, out_ptr.dtype.element_ty, NESTED, BS, NESTED_BS, UNROLL, ASM,
                          ASM_STR)
    w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
    offs_k = kb + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w, mask=n_mask[:, None] & (offs_k < K)[None, :])


def _slice_args(w: NF4Weight):
    if len(w.slice_rows) - 1 > MAX_SLICES:
        raise ValueError(f"an NF4 weight of {len(w.slice_rows) - 1} slices (the kernels take {MAX_SLICES})")
    n = w.shape[0]
    bounds = list(w.slice_rows[1:-1]) + [n] * (MAX_SLICES - len(w.slice_rows) + 1)
    if w.nested:
        return (w.absmax, w.absmax2, w.code2, w.offsets, w.group_starts), bounds[0], bounds[1]
    return (w.absmax, w.absmax, w.code, w.code, w.code), bounds[0], bounds[1]  # unread stand-ins


@functools.lru_cache(maxsize=None)
def _code_book(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The NF4 code book rounded to the compute dtype, as float32 (the look-up table's values)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device).to(dtype).float()


def _decode_args(w: NF4Weight, dtype: torch.dtype) -> dict:
    """The look-up table and whether it runs in registers (CUDA, 16-bit) or from memory."""
    asm = w.device.type == "cuda" and not _INTERPRET and dtype in _DECODE_ASM
    return dict(code=_code_book(w.device, dtype), ASM=asm, ASM_STR=_DECODE_ASM[dtype] if asm else "")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None, gemv: bool | None = None) -> torch.Tensor:
    """The fused kernels: (T, K) x -> (T, N) in x's dtype.

    gemv (default: one row of x): one row a program, no tensor cores; otherwise tiles of 16 to 64 rows
    on the tensor cores. block_k: elements of K per loop iteration, a multiple of the NF4 block size.
    split_k (default: enough programs to fill the device PROGRAMS_PER_SM times over, since a GEMV
    of few output tiles, e.g. N = 4096 in tiles of 16, would leave most SMs idle): programs share K
    and write fp32 partial sums that one reduction then adds and casts."""
    T, K = x.shape
    N = w.shape[0]
    if K != w.shape[1] or x.stride(1) != 1:
        raise ValueError(f"x of shape {tuple(x.shape)} (unit stride in K) does not fit an NF4 weight of {w.shape}")
    gemv = T == 1 if gemv is None else gemv
    block_t = 1 if gemv else (16 if T <= 16 else (32 if T <= 32 else 64))
    # defaults: the best of loadtest/bench_quantized.py --kernels --tune on an H200 (7B qkv, 70B down)
    block_n = block_n or (16 if gemv else (128 if T <= 16 else 64))
    block_k = block_k or max(w.blocksize, 256 if gemv else 128)
    num_warps = num_warps or 4
    num_stages = num_stages or 2
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
    decode = _decode_args(w, x.dtype)
    has_bias = bias is not None and split_k == 1
    common = dict(HAS_BIAS=has_bias, NESTED=w.nested, BS=w.blocksize, NESTED_BS=w.nested_blocksize,
                  BLOCK_N=block_n, UNROLL=block_k // w.blocksize, ASM=decode["ASM"], ASM_STR=decode["ASM_STR"],
                  num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
    args = (x, w.packed, *stats, decode["code"], bias if has_bias else target, target,
            T, N, K, row1, row2, k_per_split, w.packed.stride(0), x.stride(0), target.stride(-2))
    grid = (triton.cdiv(N, block_n), triton.cdiv(T, block_t), split_k)
    if gemv:
        _nf4_gemv_kernel[grid](*args, **common)
    else:
        _nf4_mm_kernel[grid](*args, BLOCK_T=block_t, DOT_IN_FP32=x.dtype == torch.float32 or _INTERPRET, **common)
    if split_k == 1:
        return target
    out = torch.empty(T, N, dtype=x.dtype, device=x.device) if out is None else out
    numel, block = T * N, 1024
    _split_k_reduce_kernel[(triton.cdiv(numel, block),)](target, bias if bias is not None else target, out, numel, N,
                                                         SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block)
    return out


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None, block_n: int = 32,
                   block_k: int = 256, num_warps: int = 4) -> torch.Tensor:
    """The dense (N, K) weight in `dtype` (kernels/nf4.dequantize_nf4_compute), in one launch."""
    N, K = w.shape
    out = torch.empty(N, K, dtype=dtype, device=w.device) if out is None else out
    stats, row1, row2 = _slice_args(w)
    decode = _decode_args(w, dtype)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _nf4_dequantize_kernel[grid](w.packed, *stats, decode["code"], out, N, K, row1, row2,
                                 w.packed.stride(0), NESTED=w.nested,
                                 BS=w.blocksize, NESTED_BS=w.nested_blocksize, BLOCK_N=block_n,
                                 UNROLL=block_k // w.blocksize, ASM=decode["ASM"], ASM_STR=decode["ASM_STR"],
                                 num_warps=num_warps, enable_fp_fusion=False)
    return out


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Decode-sized batches: the fused kernels; longer ones (prefill): dequantize, then cuBLAS, whose
    GEMM at hundreds of rows is compute-bound and amortises the dense tile."""
    if x.shape[0] <= FUSED_MAX_TOKENS:
        return nf4_matmul(x, w, bias)
    return torch.nn.functional.linear(x, nf4_dequantize(w, x.dtype), bias)
