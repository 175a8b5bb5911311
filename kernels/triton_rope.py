"""Rotary position embedding of q and k together ("rotate half", as Llama checkpoints are stored).

    half = head_dim // 2
    for t in range(T):
        angle = float32(positions[t]) * inv_freq       # (half,), fp32
        c, s = cos(angle).to(dtype), sin(angle).to(dtype)
        for x, x_out in ((q, q_out), (k, k_out)):     # (T, heads, head_dim) each
            x1, x2 = x[t, :, :half], x[t, :, half:]
            x_out[t, :, :half] = x1 * c + (-x2) * s    # each product rounded, then the sum
            x_out[t, :, half:] = x2 * c + x1 * s

Rounding follows `apply_rope_qk_reference` (the model's rope_cos_sin + apply_rope as they were)
step by step: the angle rounded to fp32, cos/sin in fp32 (libdevice cosf/sinf, what torch.cos
and torch.sin run on CUDA) rounded to the dtype, each product rounded to the dtype, then the
sum; fp contraction is off. On CUDA that should be the reference bit for bit, cosf/sinf being
the same libdevice code torch's kernels are built from (tests/test_fused_elementwise_gpu.py
reports any difference); under the CPU interpreter numpy's cos/sin stand in for torch's and may
differ in the last fp32 bit, which flips the rounding of a rare element.

Returns new tensors (T, heads, head_dim), contiguous: the reference's contract, and what paged
attention and the KV write read best. `q_out` / `k_out` may be given instead, q and k
themselves included (each program reads a token's heads before it writes them). q and k may be
strided views, e.g. of the fused qkv projection's output, as long as head_dim is contiguous.
One program per token does q's heads and k's with one cos/sin table; the grid depends only on
T, so the launch can be graph-captured.

`apply_rope_and_write_kv` is the model's call: the same program stores the rotated k, and
copies v, straight into the layer's paged KV cache at the token's slot (what
kernels/triton_kv_write.py does on its own), so a decode step has one launch and no k round
trip through memory fewer per layer.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _jit = triton.jit
except ImportError:  # a CPU-only install: the reference below must still import
    triton = None
    _jit = lambda fn: fn  # noqa: E731  the kernel is then never launched

from kernels.triton_norm import round_to  # noqa: E402


@_jit
def _rotate_heads(x_ptr, out_ptr, stride_h, stride_out_h, cos, sin, HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRETED: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < HEADS) & (offs_d < HALF)
    src = x_ptr + offs_h * stride_h + offs_d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # each product rounded to the dtype, then their sum: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
    x1_cos = round_to(x1 * cos, dtype, INTERPRETED).to(tl.float32)
    x2_cos = round_to(x2 * cos, dtype, INTERPRETED).to(tl.float32)
    neg_x2_sin = round_to(-x2 * sin, dtype, INTERPRETED).to(tl.float32)
    x1_sin = round_to(x1 * sin, dtype, INTERPRETED).to(tl.float32)
    dst = out_ptr + offs_h * stride_out_h + offs_d
    tl.store(dst, round_to(x1_cos + neg_x2_sin, dtype, INTERPRETED), mask=mask)
    tl.store(dst + HALF, round_to(x2_cos + x1_sin, dtype, INTERPRETED), mask=mask)


@_jit
def _rope_qk_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, inv_freq_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    v_ptr, v_cache_ptr, slot_ptr, stride_vt, stride_vh,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRETED: tl.constexpr,
    TO_CACHE: tl.constexpr,
):
    """TO_CACHE: k_out is a layer's key cache and stride_kot its slot stride; token t's rotated
    k goes to slot slot_ptr[t] (and its v, copied, to the same slot of v_cache), none for -1."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + offs_d, mask=offs_d < HALF, other=0.0)
    angle = tl.load(positions_ptr + t).to(tl.float32) * inv_freq  # (BLOCK_HALF,)
    if INTERPRETED:
        cos, sin = tl.cos(angle), tl.sin(angle)
    else:  # cosf / sinf, as torch.cos / torch.sin on CUDA (tl.cos would be cos.approx)
        cos, sin = libdevice.cos(angle), libdevice.sin(angle)
    dtype = q_out_ptr.dtype.element_ty
    cos = round_to(cos, dtype, INTERPRETED).to(tl.float32)[None, :]
    sin = round_to(sin, dtype, INTERPRETED).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, cos, sin,
                  Q_HEADS, HALF, BLOCK_Q, BLOCK_HALF, INTERPRETED)
    row = t
    if TO_CACHE:
        row = tl.load(slot_ptr + t).to(tl.int64)
    if row >= 0:
        _rotate_heads(k_ptr + t * stride_kt, k_out_ptr + row * stride_kot, stride_kh, stride_koh, cos, sin,
                      KV_HEADS, HALF, BLOCK_KV, BLOCK_HALF, INTERPRETED)
        if TO_CACHE:  # v as it is, beside its key
            offs_h = tl.arange(0, BLOCK_KV)[:, None]
            offs_v = tl.arange(0, 2 * BLOCK_HALF)[None, :]
            mask = (offs_h < KV_HEADS) & (offs_v < 2 * HALF)
            v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_v, mask=mask)
            tl.store(v_cache_ptr + row * stride_kot + offs_h * stride_koh + offs_v, v, mask=mask)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *,
                  q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """q (T, heads, head_dim), k (T, kv_heads, head_dim), positions (T,) int32/int64, inv_freq
    (head_dim // 2,) float32 -> rotated (q, k), new contiguous tensors unless q_out / k_out are given."""
    _check_rope_args(q, k, positions, inv_freq)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    if q_out.shape != q.shape or k_out.shape != k.shape or q_out.dtype != q.dtype or k_out.dtype != k.dtype:
        raise ValueError("q_out and k_out must have q's and k's shapes and dtype")
    if q_out.stride(2) != 1 or k_out.stride(2) != 1:
        raise ValueError("head_dim must be the contiguous dimension of q_out and k_out")
    _launch(q, k, q_out, k_out, positions, inv_freq, k_out.stride(0), k_out.stride(1))
    return q_out, k_out


def apply_rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, *, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """`apply_rope_qk` and `write_kv` in one launch: returns the rotated q (a new contiguous
    tensor unless q_out is given); the rotated k and v (T, kv_heads, head_dim) go straight into
    one layer's caches (num_blocks, block_size, kv_heads, head_dim) at flat slots
    slot_mapping (T,), nothing for a slot of -1. The values stored are those of the two
    kernels run one after the other, bit for bit."""
    _check_rope_args(q, k, positions, inv_freq)
    num_tokens, kv_heads, head_dim = k.shape
    if v.shape != k.shape or v.dtype != k.dtype or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping {tuple(slot_mapping.shape)} disagree")
    if k_cache.shape[2:] != (kv_heads, head_dim) or k_cache.dtype != k.dtype or v_cache.shape != k_cache.shape \
            or v_cache.dtype != k_cache.dtype:
        raise ValueError("the caches do not match k and v in heads, head_dim or dtype")
    if v.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous() or slot_mapping.stride(0) != 1:
        raise ValueError("head_dim must be the contiguous dimension, and the caches and slot_mapping contiguous")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    if q_out.shape != q.shape or q_out.dtype != q.dtype or q_out.stride(2) != 1:
        raise ValueError("q_out must have q's shape and dtype, head_dim contiguous")
    _launch(q, k, q_out, k_cache, positions, inv_freq, kv_heads * head_dim, head_dim,
            to_cache=(v, v_cache, slot_mapping))
    return q_out


def _check_rope_args(q, k, positions, inv_freq) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.dtype != q.dtype:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (T, heads, head_dim) of one dtype")
    num_tokens, _, head_dim = q.shape
    if head_dim % 2 or positions.shape != (num_tokens,) or inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"positions {tuple(positions.shape)} must be ({num_tokens},) and inv_freq "
                         f"{tuple(inv_freq.shape)} ({head_dim // 2},), of an even head_dim")
    if positions.dtype not in (torch.int32, torch.int64) or inv_freq.dtype != torch.float32:
        raise ValueError("positions must be int32 or int64 and inv_freq float32")
    if q.stride(2) != 1 or k.stride(2) != 1 or positions.stride(0) != 1 or inv_freq.stride(0) != 1:
        raise ValueError("head_dim must be the contiguous dimension, and positions and inv_freq contiguous")


def _launch(q, k, q_out, k_out, positions, inv_freq, stride_kot: int, stride_koh: int, to_cache=None) -> None:
    num_tokens, q_heads, head_dim = q.shape
    kv_heads, half = k.shape[1], head_dim // 2
    if num_tokens == 0:
        return
    # without the cache, the kernel's v, v_cache and slot arguments are never read
    v, v_cache, slots = to_cache if to_cache is not None else (k, k_out, positions)
    block_q, block_kv, block_half = (triton.next_power_of_2(n) for n in (q_heads, kv_heads, half))
    _rope_qk_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), stride_kot, stride_koh, v, v_cache, slots, v.stride(0), v.stride(1),
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HALF=half, BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_HALF=block_half,
        INTERPRETED=type(_rope_qk_kernel).__name__ == "InterpretedFunction", TO_CACHE=to_cache is not None,
        num_warps=min(max(block_q * block_half // 512, 1), 8), enable_fp_fusion=False,
    )


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) for token positions (T,), computed in fp32 then cast once."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, head_dim); cos/sin (T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def apply_rope_qk_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                            cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The same in plain PyTorch (the CPU path), new tensors. `cos_sin`: the tables of
    rope_cos_sin(positions, inv_freq, q.dtype) where the caller built them once for all layers."""
    cos, sin = rope_cos_sin(positions, inv_freq, q.dtype) if cos_sin is None else cos_sin
    return apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)
