"""Rotary position embeddings: plain, linear-scaled and Llama-3 frequency scaling.

Matches transformers' "rotate half" convention (the first and second halves of each head
are the two coordinates of a rotation), which is how Llama-family checkpoints are stored.
Applying it is kernels.apply_rope_and_write_kv (kernels/triton_rope.py: the kernel and its
reference): q and k rotated, k and v written into the layer's KV cache.
"""

from __future__ import annotations

import math

import torch

import kernels


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, after the checkpoint's scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise ValueError(f"unsupported rope_type {kind!r}")


def _llama3_scale(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly, so that the original context keeps its high-frequency detail.
    factor = p["factor"]
    low, high = p["low_freq_factor"], p["high_freq_factor"]
    old_context = p["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """One step's rotation of every layer's q and k, by the tokens' positions.

    On CUDA each layer's call is one fused kernel that computes cos/sin in registers; on the
    CPU (the reference path) the cos/sin tables are built here once and shared by all layers."""

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        self.positions = positions  # (T,) int32
        self.inv_freq = inv_freq  # (head_dim // 2,) float32
        self.cos_sin = None
        if not positions.is_cuda:
            from kernels.triton_rope import rope_cos_sin

            self.cos_sin = rope_cos_sin(positions, inv_freq, dtype)  # (T, head_dim) each

    def rotate_and_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotates q (returned, a new tensor) and k; k and v go into one layer's caches at the
        tokens' slots (-1: none). One launch on CUDA."""
        return kernels.apply_rope_and_write_kv(q, k, v, self.positions, self.inv_freq, k_cache, v_cache,
                                               slot_mapping, self.cos_sin)
