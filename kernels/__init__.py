"""LoRA kernels: `lora_apply` (y += scale * (x A^T) B^T per token), the op the model calls,
and its two halves `lora_shrink` (x -> x A^T) and `lora_expand` (y += scale * v B^T).

On CUDA tensors (with triton installed) these are the Triton kernels of `triton_shrink.py` and
`triton_expand.py`, and `lora_apply` is either that pair (v passing through an fp32 buffer) or,
for decode batches of more than 64 tokens that mostly have adapters of their own, the
one-launch kernel of `triton_fused_decode.py`; elsewhere they are the plain-PyTorch references of
`lora_reference.py`, the test oracle, behind the same signatures. `slot_ranks` ((num_slots, n_slices)
int32 on the device, optional) makes every implementation read only each slot's true rank (the
device pool's slots overlap: rows past a slot's rank may be another adapter's). The Triton modules
are imported on first use, so importing `kernels` stays cheap and never decides for the CPU
interpreter (TRITON_INTERPRET=1) before a test can.

The model's elementwise ops dispatch the same way: `rms_norm` (with the residual add fused in),
`silu_and_mul` and `apply_rope_qk` (with `apply_rope_and_write_kv`, the rotation and the KV cache
write in one launch), each a Triton kernel beside its reference in `triton_norm.py`,
`triton_activation.py` and `triton_rope.py`; so does `dora_scale`, DoRA's per-channel
output factor after the LoRA delta (`triton_dora.py`).

Quantized base weights: `quantized_linear(x, w, bias)` is the shared `x W^T (+ b)` of a projection
whose weight is NF4 (`nf4.py`: the format and its reference; `triton_nf4.py`: the fused
dequantize-matmul on CUDA) or FP8 (`fp8.py`: `torch._scaled_mm` on Hopper, the reference elsewhere).
"""

from __future__ import annotations

import functools

import torch

from kernels.lora_reference import lora_expand_reference, lora_shrink_reference
from kernels.metadata import LoRABatchMeta


@functools.lru_cache(maxsize=None)
def _triton_ops():
    """(lora_shrink, lora_expand) from Triton, or None where triton is not installed."""
    try:
        from kernels.triton_expand import lora_expand as expand
        from kernels.triton_shrink import lora_shrink as shrink
    except ImportError:
        return None
    return shrink, expand


def lora_apply(y, x, lora_a, lora_b, scales, meta, slot_ranks=None):
    """y += scales[s, i] * (lora_b[i][s] @ (lora_a[i][s] @ x[t])) for every token t of slot s >= 0,
    slice by slice (slices side by side in y), in place; returns y."""
    if x.is_cuda and _triton_ops() is not None:
        from kernels.triton_fused_decode import lora_apply as triton_apply

        return triton_apply(y, x, lora_a, lora_b, scales, meta, slot_ranks)
    v = lora_shrink(x, lora_a, meta, slot_ranks=slot_ranks)
    return lora_expand(y, v, lora_b, scales, meta, slot_ranks=slot_ranks)


def lora_shrink(x, lora_a, meta, out=None, slot_ranks=None):
    ops = _triton_ops() if x.is_cuda else None
    if ops is not None:
        return ops[0](x, lora_a, meta, out, slot_ranks=slot_ranks)
    return lora_shrink_reference(x, lora_a, meta, out, slot_ranks=slot_ranks)


def lora_expand(y, v, lora_b, scales, meta, slot_ranks=None):
    ops = _triton_ops() if y.is_cuda else None
    if ops is not None:
        return ops[1](y, v, lora_b, scales, meta, slot_ranks=slot_ranks)
    return lora_expand_reference(y, v, lora_b, scales, meta, slot_ranks=slot_ranks)


def dora_scale(y, bias, factors, dora_slots, meta):
    """DoRA's output scaling after `lora_apply`: y[t] = f * y[t] + (1 - f) * bias with f =
    factors[s] for every token t of a slot s >= 0 with dora_slots[s] set (triton_dora.py)."""
    if y.is_cuda and _triton_ops() is not None:
        from kernels.triton_dora import dora_scale as triton_dora_scale

        return triton_dora_scale(y, bias, factors, dora_slots, meta.token_slots)
    from kernels.triton_dora import dora_scale_reference

    return dora_scale_reference(y, bias, factors, dora_slots, meta.token_slots)


def quantized_linear(x, w, bias=None):
    """y = x W^T (+ bias) for W an NF4Weight or FP8Weight, in x's dtype."""
    from kernels.fp8 import FP8Weight, fp8_linear

    if isinstance(w, FP8Weight):
        return fp8_linear(x, w, bias)
    if x.is_cuda and _triton_ops() is not None:
        from kernels.triton_nf4 import nf4_linear

        return nf4_linear(x, w, bias)
    from kernels.nf4 import dense_cached

    # the CPU path (tests; no accelerator) keeps the dequantized weight once made: it is for
    # correctness, and dequantizing 4 x layers weights per step made a SmolLM2 step 10x slower
    return torch.nn.functional.linear(x, dense_cached(w, x.dtype), bias)


def write_kv(k_cache, v_cache, slot_mapping, k, v):
    """k_cache.flat[slot_mapping[t]] = k[t] (and v) for every token t with a slot >= 0."""
    if k.is_cuda and _triton_ops() is not None:
        from kernels.triton_kv_write import write_kv as triton_write

        return triton_write(k_cache, v_cache, slot_mapping, k, v)
    from kernels.attention_reference import write_kv_reference

    return write_kv_reference(k_cache, v_cache, slot_mapping, k, v)


def paged_attention(q, k_cache, v_cache, block_tables, query_starts, context_lens, max_query_len, scale,
                    sliding_window=None, out=None, prefill_seqs=None):
    """Causal attention of each sequence's query tokens over its paged keys/values (Triton on CUDA;
    `prefill_seqs`, the sequences of several query tokens, only narrows the kernel's grid)."""
    if q.is_cuda and _triton_ops() is not None:
        from kernels.triton_attention import paged_attention as triton_attention

        return triton_attention(q, k_cache, v_cache, block_tables, query_starts, context_lens, max_query_len,
                                scale, sliding_window, out, prefill_seqs=prefill_seqs)
    from kernels.attention_reference import paged_attention_reference

    return paged_attention_reference(q, k_cache, v_cache, block_tables, query_starts, context_lens, max_query_len,
                                     scale, sliding_window, out)


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm(x) (fp32 statistics, rounded as the model's PyTorch code); with `residual`,
    (RMSNorm(x + residual), x + residual): the residual add fused into the norm, one launch on CUDA."""
    if x.is_cuda and _triton_ops() is not None:
        from kernels.triton_norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps, residual)
    from kernels.triton_norm import rms_norm_reference

    return rms_norm_reference(x, weight, eps, residual)


def silu_and_mul(gate_up):
    """(T, 2I) [gate | up] -> (T, I) = silu(gate) * up."""
    if gate_up.is_cuda and _triton_ops() is not None:
        from kernels.triton_activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(gate_up)
    from kernels.triton_activation import silu_and_mul_reference

    return silu_and_mul_reference(gate_up)


def apply_rope_and_write_kv(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping, cos_sin=None):
    """`apply_rope_qk`, then `write_kv` of the rotated k and v into one layer's caches (one launch
    on CUDA); returns the rotated q, a new tensor."""
    if q.is_cuda and _triton_ops() is not None:
        from kernels.triton_rope import apply_rope_and_write_kv as triton_rope_and_write

        return triton_rope_and_write(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping)
    q, k = apply_rope_qk(q, k, positions, inv_freq, cos_sin)
    write_kv(k_cache, v_cache, slot_mapping, k, v)
    return q


def apply_rope_qk(q, k, positions, inv_freq, cos_sin=None):
    """q (T, heads, head_dim) and k (T, kv_heads, head_dim) rotated by each token's position; new tensors.
    `cos_sin`: rope_cos_sin's tables where the caller built them once for all layers (the reference
    path uses them; the Triton kernel computes cos/sin in registers and ignores them)."""
    if q.is_cuda and _triton_ops() is not None:
        from kernels.triton_rope import apply_rope_qk as triton_apply_rope_qk

        return triton_apply_rope_qk(q, k, positions, inv_freq)
    from kernels.triton_rope import apply_rope_qk_reference

    return apply_rope_qk_reference(q, k, positions, inv_freq, cos_sin)


__all__ = ["LoRABatchMeta", "lora_apply", "quantized_linear", "dora_scale", "lora_shrink", "lora_expand", "lora_shrink_reference", "lora_expand_reference",
           "paged_attention", "write_kv", "rms_norm", "silu_and_mul", "apply_rope_qk", "apply_rope_and_write_kv"]
