"""Random-weight Llama-shaped models built directly on the device, for GPU benchmarks.

Speed does not depend on the values; weights are drawn from N(0, 0.02) (never zeros) so
no kernel can take a shortcut.
"""

from __future__ import annotations

import torch

from server.lora.adapter import LoRAAdapter, LoRAModuleWeights
from server.model.config import ModelConfig
from server.model.llama import LlamaModel

LLAMA2_7B = dict(
    architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
    max_position_embeddings=4096, rope_theta=10000.0,
)
LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
    max_position_embeddings=8192, rope_theta=500000.0,
)


def random_model(shape: dict, dtype: torch.dtype, device: str, seed: int = 0, tp=None) -> LlamaModel:
    """Random weights made on the device; with `tp` (server/model/tensor_parallel.py), that rank's shard."""
    cfg = ModelConfig.from_hf_dict(shape)
    with torch.device("meta"):
        model = LlamaModel(cfg, tp).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    model.reset_rope()
    return model.eval()


LLAMA2_70B = dict(
    architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
    max_position_embeddings=4096, rope_theta=10000.0,
)


def random_quantized_model(shape: dict, quantize: str, dtype: torch.dtype, device: str, seed: int = 0) -> LlamaModel:
    """A random model whose projections are quantized in place on the device, one HF module at a
    time (drawn in `dtype`, quantized as `load_model(..., quantize=...)` would, then freed): a
    70B-shaped NF4 model is made in ~36 GB without its 140 GB of bf16 ever existing, nor a file."""
    from server.model.quantized import check_format, fuse, quantize_module

    quantize = check_format(quantize)
    cfg = ModelConfig.from_hf_dict(shape)
    with torch.device("meta"):
        model = LlamaModel(cfg).to(dtype)
    for _, _, proj in model.projections():
        proj.weight = None
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for _, _, proj in model.projections():
            parts = []
            for rows in proj.out_sizes:
                dense = torch.empty(rows, proj.in_features, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
                parts.append(quantize_module(dense, quantize))
                del dense
            proj.quantized = fuse(parts)
    model.reset_rope()
    return model.eval()


def random_adapter(
    cfg: ModelConfig, rank: int, modules: tuple[str, ...], seed: int, device="cpu", dtype=torch.bfloat16, b_std: float = 0.01,
    dora: bool = False,
) -> LoRAAdapter:
    """Random A (scaled by 1/sqrt(fan_in)) and B (N(0, b_std)) for `modules` in every layer, scale 2;
    with `dora`, a DoRA adapter with magnitudes drawn from U(0.5, 1.5)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = cfg.linear_shapes()
    weights = {}
    for layer in range(cfg.num_layers):
        for m in modules:
            fan_in, fan_out = shapes[m]
            weights[(layer, m)] = LoRAModuleWeights(
                lora_a=(torch.randn(rank, fan_in, generator=gen, device=device) / fan_in**0.5).to(dtype),
                lora_b=(torch.randn(fan_out, rank, generator=gen, device=device) * b_std).to(dtype),
                scale=2.0,
                magnitude=(torch.rand(fan_out, generator=gen, device=device) + 0.5) if dora else None,
            )
    return LoRAAdapter(rank=rank, alpha=2.0 * rank, use_rslora=False, target_modules=tuple(sorted(modules)), modules=weights,
                       use_dora=dora)


class StubTokenizer:
    """Benchmarks feed token ids; the engine only needs decode and the EOS id."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""
