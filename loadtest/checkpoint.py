"""Random-weight checkpoints and PEFT adapters on disk, in Hugging Face's and peft's own layouts.

The serving benchmark feeds these to the real server exactly as a user would: a checkpoint
directory (`config.json`, sharded `model-0000i-of-0000n.safetensors` with HF tensor names, a
tokenizer) for `loraplex serve --model DIR`, and adapters as the two files peft's
`save_pretrained` writes, for the admin API. Weights are bf16 N(0, 0.02) (norm gains 1 + N(0, 0.02)),
never zeros: speed does not depend on the values, but no kernel may take a shortcut.
Written with safetensors alone (no transformers/peft model objects), generated on the GPU when
there is one, which is what makes a 7B checkpoint a matter of seconds.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from loadtest.random_model import LLAMA2_7B, LLAMA3_8B, random_adapter
from server.model.config import ModelConfig

# A model small enough to start in seconds on the CPU (the smoke test); vocab within SmolLM2's 49152.
TINY = dict(
    architectures=["LlamaForCausalLM"], vocab_size=4096, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
    max_position_embeddings=2048, rope_theta=10000.0,
)
SHAPES = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B, "tiny": TINY}
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = QKVO + ("gate_proj", "up_proj", "down_proj")

SHARD_BYTES = 4 << 30  # like save_pretrained's max_shard_size: several files, each small enough to build in RAM
WEIGHT_STD = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_SUBMODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def hf_config(shape: dict, tokenizer_dir: Path | None = None) -> dict:
    """config.json for `shape`: the keys our loader (and transformers) read, bf16, untied.
    BOS/EOS ids come from the tokenizer's model config when there is one."""
    cfg = {"model_type": "llama", "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, **shape}
    source = tokenizer_dir / "config.json" if tokenizer_dir else None
    if source is not None and source.is_file():
        src = json.loads(source.read_text())
        cfg.update({k: src[k] for k in ("bos_token_id", "eos_token_id") if k in src})
    return cfg


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama *ForCausalLM checkpoint, by its Hugging Face name."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (h,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (h,)
        for module, (fan_in, fan_out) in cfg.linear_shapes().items():
            shapes[f"{prefix}.{_SUBMODULE[module]}.{module}.weight"] = (fan_out, fan_in)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def decode_weight_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Weight bytes one decode step reads: everything but the embedding, whose few rows are
    gathered; a tied lm_head reads the embedding matrix once."""
    shapes = hf_tensor_shapes(cfg)
    elements = sum(_numel(s) for name, s in shapes.items() if name != "model.embed_tokens.weight")
    if cfg.tie_word_embeddings:
        elements += cfg.vocab_size * cfg.hidden_size
    return elements * dtype_bytes


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes  # K and V, every layer


def adapter_bytes(cfg: ModelConfig, rank: int, modules: tuple[str, ...], dtype_bytes: int) -> int:
    """A and B of one adapter with `rank` on `modules` in every layer."""
    shapes = cfg.linear_shapes()
    return cfg.num_layers * sum(rank * (shapes[m][0] + shapes[m][1]) for m in modules) * dtype_bytes


def write_random_checkpoint(out_dir: Path, shape: dict, tokenizer_dir: Path, device: str, seed: int = 0) -> dict:
    """Write config.json, sharded bf16 safetensors with an index, and the tokenizer; returns
    what was written (seconds, bytes, files)."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = hf_config(shape, tokenizer_dir)
    model_cfg = ModelConfig.from_hf_dict(config)
    shards = _plan_shards(hf_tensor_shapes(model_cfg), 2)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for index, names in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_tensor(shape_, name, gen, device) for name, shape_ in names}
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file_name for name in tensors})
        del tensors  # one shard in host memory at a time
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = copy_tokenizer(tokenizer_dir, out_dir, model_cfg.vocab_size)
    return {"dir": str(out_dir), "write_s": time.perf_counter() - start, "bytes": total, "files": len(shards),
            "tokenizer": tokenizer}


def existing_checkpoint(ckpt_dir: Path) -> dict:
    """What write_random_checkpoint would report, for a checkpoint written earlier (reused by a
    second benchmark in the same session instead of writing 13 GB again)."""
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    return {"dir": str(ckpt_dir), "write_s": 0.0, "bytes": index["metadata"]["total_size"],
            "files": len(set(index["weight_map"].values())), "tokenizer": {"source": str(ckpt_dir), "reused": True}}


def _plan_shards(shapes: dict[str, tuple[int, ...]], dtype_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = _numel(shape) * dtype_bytes
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + [current] if current else shards


def _random_tensor(shape: tuple[int, ...], name: str, gen: torch.Generator, device: str) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, WEIGHT_STD, generator=gen)
    if name.endswith("norm.weight"):
        t += 1.0  # norm gains near 1, as trained models have: activations stay in a normal range
    return t.cpu()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def copy_tokenizer(src: Path, dst: Path, vocab_size: int) -> dict:
    """Copy the tokenizer files; pad a smaller vocabulary up to the model's.

    The server decodes sampled ids with this tokenizer, and an id the tokenizer does not know
    decodes to nothing, so no chunk would carry it and the stream would hide tokens (Llama-3's
    128256 ids over SmolLM2's 49152). Padding adds plain vocabulary entries " <id>" (byte-level
    text, no merges reach them, so encoding is unchanged)."""
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {src}")
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    info = {"source": str(src), "files": copied, "padded_from": None}
    path = dst / "tokenizer.json"
    if not path.is_file():
        return info
    tok = json.loads(path.read_text(encoding="utf-8"))
    vocab = tok.get("model", {}).get("vocab")
    ids = [i for i in (vocab or {}).values()] + [t["id"] for t in tok.get("added_tokens", [])]
    size = max(ids) + 1 if ids else 0
    if isinstance(vocab, dict) and tok["model"].get("type") == "BPE" and size < vocab_size:
        space = "\u0120" if (tok.get("decoder") or {}).get("type") == "ByteLevel" else " "  # byte-level " "
        vocab.update({f"{space}<{i}>": i for i in range(size, vocab_size)})
        path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
        info["padded_from"] = size
    return info


def peft_adapter_files(cfg: ModelConfig, rank: int, modules: tuple[str, ...], seed: int, device: str,
                       base_model: str) -> tuple[bytes, bytes]:
    """adapter_config.json and adapter_model.safetensors as peft's save_pretrained writes them
    for a *ForCausalLM: keys base_model.model.model.layers.{i}.self_attn.{m}.lora_{A,B}.weight,
    A (r, in), B (out, r), bf16, random and non-zero (B too: a trained adapter, not a fresh one)."""
    adapter = random_adapter(cfg, rank, modules, seed, device=device, dtype=torch.bfloat16, b_std=0.01)
    tensors = {}
    for (layer, module), weights in adapter.modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{_SUBMODULE[module]}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = weights.lora_a.cpu()
        tensors[f"{prefix}.lora_B.weight"] = weights.lora_b.cpu()
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "r": rank, "rank_pattern": {}, "revision": None, "target_modules": sorted(modules),
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    return json.dumps(config, indent=2).encode(), save(tensors, metadata={"format": "pt"})


def write_peft_adapter(out_dir: Path, config: bytes, weights: bytes) -> Path:
    """The two files of peft_adapter_files as a directory PeftModel.from_pretrained reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_bytes(config)
    (out_dir / "adapter_model.safetensors").write_bytes(weights)
    return out_dir
