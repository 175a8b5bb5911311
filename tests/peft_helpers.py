"""Adapters made by `peft` itself, with random non-zero lora_B, saved as peft saves them."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

# Named LoRA configurations the equivalence tests sweep.
LORA_CONFIGS = {
    "r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r16-all-linear-rslora": dict(r=16, lora_alpha=32, target_modules="all-linear", use_rslora=True),
    "patterns": dict(
        r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj", "up_proj"],
        rank_pattern={"k_proj": 4, "down_proj": 12}, alpha_pattern={"o_proj": 24, "down_proj": 6},
    ),
    "layers-to-transform": dict(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj"], layers_to_transform=[0]),
}


# DoRA adapters (use_dora=True): peft initialises the magnitude to ||W||_row; randomize_adapter moves it.
DORA_CONFIGS = {
    "dora-r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True),
    "dora-r4-all-linear-patterns": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                        rank_pattern={"down_proj": 8}, alpha_pattern={"o_proj": 2}),
}


def randomize_adapter(peft_model, b_std: float = 0.05, adapter_name: str = "default", m_std: float = 0.1) -> None:
    """lora_B ~ N(0, b_std) (peft starts it at zero) and DoRA magnitudes scaled by 1 + N(0, m_std)
    per channel, so that every part of the adapter changes the output."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                p.normal_(0, b_std)
            elif f"lora_magnitude_vector.{adapter_name}" in name:
                p.mul_(1 + m_std * torch.randn_like(p))


def make_peft_model(base, config_name: str, seed: int, b_std: float = 0.05):
    """Wrap `base` (modified in place by peft) with a random adapter of LORA_CONFIGS or
    DORA_CONFIGS; returns the PeftModel."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(**{**LORA_CONFIGS, **DORA_CONFIGS}[config_name]))
    randomize_adapter(peft_model, b_std)
    return peft_model.eval()


def save_adapter(peft_model, path: Path) -> Path:
    peft_model.save_pretrained(path)
    return path


def save_random_tiny_adapter(base_config: LlamaConfig, lora_kwargs: dict, seed: int, directory: Path) -> Path:
    """A random tiny Llama wrapped by peft, lora_B drawn from N(0, 1), saved as peft saves it."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(LlamaForCausalLM(base_config), LoraConfig(**lora_kwargs))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        model.save_pretrained(directory)
    return directory
