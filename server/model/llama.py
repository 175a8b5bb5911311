"""Our Llama-family forward (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flattened batch.

Tokens of many sequences — prefill chunks and single decode tokens alike — are laid end to
end as one (T, hidden) batch: every linear runs once for all of them, attention looks up each
sequence's own keys in the paged KV cache. q/k/v and gate/up are fused projections. Each
projection may carry LoRA slots (set by the adapter pool); the per-step `LoRABatchMeta` says
which slot each token uses. No HTTP, no tenants: just tensors.

Under tensor parallelism (server/model/tensor_parallel.py) the model is built with the shapes of
one rank's shard (`shard_config`: its heads and intermediate channels); o_proj and down_proj are
then row-parallel and end with an all-reduce, and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import LoRABatchMeta
from server.model.attention import AttentionMeta, paged_attention
from server.model.config import ModelConfig
from server.model.kv_cache import KVCache
from server.model.rope import RotaryEmbedding, rope_inv_freq
from server.model.tensor_parallel import TensorParallel

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the tensor-parallel group, in place


@dataclass
class LoRASlots:
    """One projection's adapter pool, slice by slice (see kernels/lora_reference.py)."""

    lora_a: list[torch.Tensor]  # per slice: (num_slots, max_rank, in_features)
    lora_b: list[torch.Tensor]  # per slice: (num_slots, out_i, max_rank), a view of rank-major storage
    scales: torch.Tensor  # (num_slots, n_slices) float32
    slot_ranks: torch.Tensor  # (num_slots, n_slices) int32: each slot's true rank, 0 = slice not targeted
    # DoRA (kernels/triton_dora.py): per slot a factor per output channel, used where dora_slots[s] != 0
    dora_factors: torch.Tensor | None = None  # (num_slots, sum(out_sizes)) float32
    dora_slots: torch.Tensor | None = None  # (num_slots,) int32, shared by every projection


# Projections an adapter of q/k/v/o modules touches: a batch whose adapters touch nothing else
# runs no LoRA kernels on the MLP (LoRABatchMeta.projections; its graphs are captured so)
ATTENTION_PROJECTIONS = frozenset({"qkv_proj", "o_proj"})
ALL_PROJECTIONS = ATTENTION_PROJECTIONS | {"gate_up_proj", "down_proj"}
# Not a projection: in LoRABatchMeta.projections it says the batch holds a DoRA adapter, so the
# projections whose LoRA kernels run also scale its tokens' outputs (without it: no DoRA launch)
DORA = "dora"


class Projection(nn.Module):
    """A (fused) linear: `x W^T (+ b)` for the whole batch, then each token's own LoRA delta,
    unless the step's metadata says no adapter in the batch targets this projection.

    The base weight is a dense parameter, or a quantized one (`quantized`: kernels.nf4.NF4Weight or
    kernels.fp8.FP8Weight, set by server/model/quantized.py, `weight` then None); the LoRA delta
    is added in the model dtype either way.

    With `all_reduce` the projection is row-parallel: it holds some input columns of W (and of
    each adapter's A) and sums over the tensor-parallel group (`_row_parallel_forward`)."""

    def __init__(self, name: str, in_features: int, out_sizes: tuple[int, ...], bias: bool,
                 all_reduce: AllReduce | None = None):
        super().__init__()
        self.name = name
        self.all_reduce = all_reduce
        self.in_features = in_features
        self.out_sizes = out_sizes
        self.weight = nn.Parameter(torch.empty(sum(out_sizes), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(out_sizes)), requires_grad=False) if bias else None
        self.quantized = None
        self.lora: LoRASlots | None = None

    def dense_weight(self, i: int) -> torch.Tensor:
        """Slice i's weight (out_i, in) in the model dtype: a view, or dequantized (a new tensor)."""
        start = sum(self.out_sizes[:i])
        if self.quantized is None:
            return self.weight[start : start + self.out_sizes[i]]
        from server.model.quantized import dequantize_rows

        return dequantize_rows(self.quantized, start, start + self.out_sizes[i])

    def forward(self, x: torch.Tensor, lora_meta: LoRABatchMeta | None) -> torch.Tensor:
        if self.all_reduce is not None:
            return self._row_parallel_forward(x, lora_meta)
        if self.quantized is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = kernels.quantized_linear(x, self.quantized, self.bias)
        if self._runs_lora(lora_meta):
            lora = self.lora
            kernels.lora_apply(y, x, lora.lora_a, lora.lora_b, lora.scales, lora_meta, slot_ranks=lora.slot_ranks)
            self._dora_scale(y, lora_meta)
        return y

    def _row_parallel_forward(self, x: torch.Tensor, lora_meta: LoRABatchMeta | None) -> torch.Tensor:
        """x and W (and A) hold this rank's input columns, so `x W^T` and the shrink `x A^T` are
        partial sums. The expand is linear, so each rank expands its partial shrink with B whole
        into its partial output and the one all-reduce sums both: LoRA adds no collective. The
        bias and DoRA's per-channel scale (which needs the full sum) follow on every rank."""
        partial = F.linear(x, self.weight) if self.quantized is None else kernels.quantized_linear(x, self.quantized)
        runs_lora = self._runs_lora(lora_meta)
        if runs_lora:
            lora = self.lora
            kernels.lora_apply(partial, x, lora.lora_a, lora.lora_b, lora.scales, lora_meta, slot_ranks=lora.slot_ranks)
        y = self.all_reduce(partial)  # (T, out)
        if self.bias is not None:
            y += self.bias
        if runs_lora:
            self._dora_scale(y, lora_meta)
        return y

    def _runs_lora(self, lora_meta: LoRABatchMeta | None) -> bool:
        return (self.lora is not None and lora_meta is not None and lora_meta.has_lora
                and (lora_meta.projections is None or self.name in lora_meta.projections))

    def _dora_scale(self, y: torch.Tensor, lora_meta: LoRABatchMeta) -> None:
        lora = self.lora
        if lora.dora_factors is not None and (lora_meta.projections is None or DORA in lora_meta.projections):
            kernels.dora_scale(y, self.bias, lora.dora_factors, lora.dora_slots, lora_meta)


class RMSNorm(nn.Module):
    """fp32 statistics, as transformers does, then back to the model dtype before the scale.
    Given the residual stream, the add before the norm is fused in: returns (normed, new residual)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, all_reduce: AllReduce | None = None):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.qkv_proj = Projection("qkv_proj", cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size), cfg.qkv_bias)
        self.o_proj = Projection("o_proj", cfg.q_size, (cfg.hidden_size,), cfg.o_bias, all_reduce)

    def forward(self, x, rope: RotaryEmbedding, kv_cache: KVCache, attn: AttentionMeta, lora: LoRABatchMeta | None):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x, lora).split(self.qkv_proj.out_sizes, dim=-1)
        # q, k, v: strided views of the fused output; q rotated into a new (T, nh, hd) tensor, k
        # rotated and v copied into the KV cache at the tokens' slots
        q = rope.rotate_and_cache(q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim),
                                  v.view(T, self.num_kv_heads, self.head_dim), *kv_cache.layer(self.layer),
                                  attn.slot_mapping)
        out = paged_attention(q, kv_cache, self.layer, attn, self.scale)  # (T, nh, hd)
        return self.o_proj(out.reshape(T, -1), lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, all_reduce: AllReduce | None = None):
        super().__init__()
        self.gate_up_proj = Projection("gate_up_proj", cfg.hidden_size, (cfg.intermediate_size, cfg.intermediate_size), cfg.mlp_bias)
        self.down_proj = Projection("down_proj", cfg.intermediate_size, (cfg.hidden_size,), cfg.mlp_bias, all_reduce)

    def forward(self, x, lora: LoRABatchMeta | None):
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x, lora)), lora)  # (T, 2I) -> (T, I)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, all_reduce: AllReduce | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, all_reduce)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, all_reduce)

    def forward(self, x, residual, rope, kv_cache, attn, lora):
        """(layer input, residual stream) -> (MLP output, residual stream): each sublayer's output
        is added to the stream inside the next norm (None on the first layer: x is the stream)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, kv_cache, attn, lora)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, lora), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        """`tp`: this process's place in a tensor-parallel group; the model is then its shard."""
        super().__init__()
        self.config = cfg  # the whole model's
        self.tp = tp if tp is not None and tp.world_size > 1 else None
        # the shapes this process holds: `cfg` itself, or its rank's heads and channels (the KV cache's too)
        self.shard_config = cfg if self.tp is None else self.tp.plan(cfg).local_config
        all_reduce = None if self.tp is None else self.tp.all_reduce
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(self.shard_config, i, all_reduce) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )

    def reset_rope(self) -> None:
        """Recompute the RoPE table (after building on the meta device)."""
        cfg = self.config
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(self.embed_tokens.weight.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) flattened tokens of all sequences
        attn: AttentionMeta,
        kv_cache: KVCache,
        lora: LoRABatchMeta | None = None,
        logits_indices: torch.Tensor | None = None,  # rows whose logits are wanted; None = all
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, hidden)
        rope = RotaryEmbedding(attn.positions, self.inv_freq, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, kv_cache, attn, lora)
        if logits_indices is not None:
            x, residual = x.index_select(0, logits_indices), residual.index_select(0, logits_indices)
        x, _ = self.norm(x, residual)  # the last layer's residual add, fused into the final norm
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        return F.linear(x, head).float()  # (n, vocab)

    def projections(self):
        """(layer index, projection name, module) for every LoRA-capable projection."""
        for i, layer in enumerate(self.layers):
            yield i, "qkv_proj", layer.self_attn.qkv_proj
            yield i, "o_proj", layer.self_attn.o_proj
            yield i, "gate_up_proj", layer.mlp.gate_up_proj
            yield i, "down_proj", layer.mlp.down_proj
