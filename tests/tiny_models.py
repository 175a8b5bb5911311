"""Tiny random Llama-family checkpoints built with transformers, for equivalence tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

_COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
)

TINY_CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(**_COMMON),
    "llama-tied": lambda: LlamaConfig(**{**_COMMON, "num_key_value_heads": 1}, tie_word_embeddings=True),
    "llama3-rope": lambda: LlamaConfig(
        **_COMMON,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0,
    ),
    "llama-linear-rope-bias": lambda: LlamaConfig(
        **_COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True, mlp_bias=True
    ),
    "qwen2-bias": lambda: Qwen2Config(**_COMMON),
    "mistral-window": lambda: MistralConfig(**_COMMON, sliding_window=5),
}

_CLASSES = {LlamaConfig: LlamaForCausalLM, Qwen2Config: Qwen2ForCausalLM, MistralConfig: MistralForCausalLM}


def build_tiny(name: str, seed: int = 0):
    """A random-weight HF model (eval, fp32) of the named tiny config; biases made non-zero."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[name]()
    model = _CLASSES[type(config)](config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model
